"""Wrong file kinds (issue 19, class 6): token data told by content, every error naming the file; a
truncated fine-tuning ``state.json``."""

import json

import numpy as np
import pytest

from calib.data import file_kind, load_tokens


@pytest.fixture
def files(tmp_path):
    ids = (np.arange(4000) * 7) % 256
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "ids_named_txt.txt", ids)  # writes ids_named_txt.txt.npy
    (tmp_path / "ids_named_txt.txt.npy").rename(tmp_path / "ids.txt")
    np.savez(tmp_path / "ids.npz", ids=ids)
    (tmp_path / "ids.bin").write_bytes(ids.astype(np.uint16).tobytes())
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ids.npy").read_bytes()[:300])
    np.save(tmp_path / "obj.npy", np.array([1, "two"], dtype=object), allow_pickle=True)
    (tmp_path / "fake.npy").write_text("hello, not an array")
    (tmp_path / "text.txt").write_text("plain text, ok ü")
    return tmp_path


def test_kinds_are_told_by_content(files):
    assert file_kind(files / "ids.npy") == "npy"
    assert file_kind(files / "ids.txt") == "npy"  # a .npy under another name is still ids
    assert file_kind(files / "text.txt") == "text"
    got = load_tokens(files / "ids.txt", 256)
    assert got.tolist() == load_tokens(files / "ids.npy", 256).tolist()
    assert load_tokens(files / "text.txt", 256).tolist() == list("plain text, ok ü".encode())


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("ids.npz", "is a zip archive"),
        ("ids.bin", "is binary (a NUL byte"),
        ("cut.npy", "is not a readable .npy array (truncated or damaged)"),
        ("obj.npy", "holds Python objects"),
        ("fake.npy", "has no NumPy header"),
    ],
)
def test_wrong_kinds_are_refused_naming_the_file(files, name, needle):
    with pytest.raises(ValueError) as info:
        load_tokens(files / name, 256)
    assert str(files / name) in str(info.value) and needle in str(info.value)


def test_a_directory_of_text_refuses_binary_members_naming_them(files, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("fine")
    (d / "b.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="b.dat is binary"):
        load_tokens(d, 256)
    with pytest.raises(ValueError, match="max_tokens"):
        load_tokens(files / "text.txt", 256, max_tokens=0)


def test_truncated_state_json_names_the_file(tmp_path):
    from calib.train import TrainConfig, check_resumable, read_state

    (tmp_path / "state.json").write_text(json.dumps({"config": TrainConfig(steps=2).to_dict()})[:25])
    with pytest.raises(ValueError, match=r"state.json: not valid JSON \(truncated"):
        read_state(tmp_path)
    with pytest.raises(ValueError, match="state.json: not valid JSON"):
        check_resumable(tmp_path, TrainConfig(steps=2))
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="state.json: not a JSON object"):
        read_state(tmp_path)
