"""Hostile input to the svdq container (issue 19, classes 2, 3, 5, 8): per-tensor checksums, value
domains, metadata edits that keep the header checksum valid, non-finite writes, stale temporaries,
concurrent writers. Real safetensors files throughout."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora.io import container
from lora.io.atomic import atomic_output_dir, lock_path, remove_stale_siblings
from lora.io.container import CheckpointReader, tensor_checksum, verification, write_checkpoint
from tests.helpers import ROOT


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "l.weight_packed": torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g),
        "l.weight_scale": (torch.rand(8, 2, generator=g) + 0.5).to(torch.float8_e4m3fn),
        "l.weight_scale_2": torch.tensor(0.01),
        "l.smooth": torch.rand(32, generator=g) + 0.1,
        "l.input_amax": torch.tensor(3.0),
        "l.lora_down": torch.randn(4, 32, generator=g),
        "emb.weight": torch.randn(10, 4, generator=g).bfloat16(),
    }


def _write(tmp_path, tensors=None, **kw) -> Path:
    return write_checkpoint(tmp_path / "ckpt", tensors or _tensors(), {"note": "x"}, **kw)


def _rewrite(file: Path, edit_data=None, edit_meta=None) -> None:
    """Rewrite a safetensors file: ``edit_data(name, bytearray)`` changes a tensor's bytes in place,
    ``edit_meta(meta)`` the ``__metadata__`` dict; the header checksum is recomputed (a careful forger)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    if edit_data is not None:
        for name, entry in header.items():
            if name != "__metadata__":
                a, b = entry["data_offsets"]
                chunk = bytearray(data[a:b])
                if edit_data(name, chunk):
                    data[a:b] = chunk
    meta = header["__metadata__"]
    if edit_meta is not None:
        edit_meta(meta)
    specs = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    meta["checksum"] = container._header_checksum(meta, specs)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


def _read_all(path, **kw):
    with CheckpointReader(path, **kw) as r:
        return {k: r.get(k) for k in r.keys()}


def test_checksums_round_trip_and_flipped_bytes_are_caught(tmp_path):
    out = _write(tmp_path)
    back = _read_all(out)
    for k, t in _tensors().items():
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    meta = json.loads(container._read_header(out / "model.safetensors")[0]["tensor_checksums"])
    assert meta["algorithm"] == "crc32" and set(meta["tensors"]) == set(_tensors())
    assert meta["tensors"]["l.smooth"] == tensor_checksum(_tensors()["l.smooth"])

    def flip(name, chunk):
        if name == "l.weight_packed":
            chunk[5] ^= 0x11  # two code nibbles: still valid codes, only the checksum sees it
            return True

    _rewrite(out / "model.safetensors", edit_data=flip)
    with pytest.raises(
        ValueError, match=r"model.safetensors: tensor l.weight_packed: data checksum mismatch"
    ):
        _read_all(out)
    # trusted files: the checksum can be skipped (argument or context), the value checks stay
    assert _read_all(out, verify=False)["l.weight_packed"].shape == (8, 16)
    with verification(False):
        _read_all(out)
    with verification(False), pytest.raises(ValueError, match="checksum"):
        _read_all(out, verify=True)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("l.smooth", float("nan"), "l.smooth must be finite"),
        ("l.smooth", -1.0, "l.smooth must be > 0"),
        ("l.weight_scale_2", 0.0, "l.weight_scale_2 must be > 0"),
        ("l.input_amax", float("inf"), "l.input_amax must be finite and ≥ 0"),
        ("l.lora_down", float("inf"), "l.lora_down must be finite"),
        ("emb.weight", float("nan"), "emb.weight must not hold NaN"),
    ],
)
def test_values_outside_their_domain_are_refused_even_with_a_valid_checksum(tmp_path, name, value, why):
    out = _write(tmp_path)
    with CheckpointReader(out) as r:
        t = r.get(name).clone()
    t.view(-1)[0] = value
    sums = {}

    def put(n, chunk):
        if n == name:
            chunk[:] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            sums[n] = tensor_checksum(t)
            return True

    def fix_sums(meta):  # the forger recomputes the data checksum too
        doc = json.loads(meta["tensor_checksums"])
        doc["tensors"].update(sums)
        meta["tensor_checksums"] = json.dumps(doc)

    _rewrite(out / "model.safetensors", edit_data=put, edit_meta=fix_sums)
    with pytest.raises(ValueError, match=why):
        _read_all(out)
    with pytest.raises(ValueError, match=why):  # no checksum to skip around the value check
        _read_all(out, verify=False)


def test_nvfp4_nan_block_scale_code_is_refused(tmp_path):
    out = _write(tmp_path)

    def nan_code(name, chunk):
        if name == "l.weight_scale":
            chunk[3] = 0x7F  # the e4m3 NaN code
            return True

    _rewrite(out / "model.safetensors", edit_data=nan_code)
    with pytest.raises(ValueError, match="l.weight_scale must be finite"):
        _read_all(out, verify=False)


def test_old_files_without_per_tensor_checksums_still_load(tmp_path):
    out = _write(tmp_path)
    _rewrite(out / "model.safetensors", edit_meta=lambda m: m.pop("tensor_checksums"))
    assert set(_read_all(out)) == set(_tensors())
    fixture = ROOT / "tests" / "fixtures" / "pre_redesign" / "torch"
    with CheckpointReader(fixture) as r:
        assert r.checksums == {} and all(r.get(k) is not None for k in r.keys())


def test_malformed_checksum_field_is_refused(tmp_path):
    out = _write(tmp_path)

    def drop_one(meta):
        doc = json.loads(meta["tensor_checksums"])
        doc["tensors"].pop("l.smooth")
        meta["tensor_checksums"] = json.dumps(doc)

    _rewrite(out / "model.safetensors", edit_meta=drop_one)
    with pytest.raises(ValueError, match="tensor_checksums' is malformed"):
        CheckpointReader(out)


def test_sharded_checkpoints_carry_checksums_per_shard(tmp_path):
    out = _write(tmp_path, max_shard_bytes=200)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert set(_read_all(out)) == set(_tensors())

    def flip(name, chunk):
        if name == "l.lora_down":
            chunk[0] ^= 1
            return True

    for s in shards:
        _rewrite(s, edit_data=flip)
    with pytest.raises(ValueError, match="l.lora_down: data checksum mismatch"):
        _read_all(out)


@pytest.mark.parametrize("name", ["l.smooth", "l.lora_down", "emb.weight", "l.weight_scale"])
def test_non_finite_tensors_are_never_written(tmp_path, name):
    tensors = _tensors()
    bad = tensors[name].float().clone()
    bad.view(-1)[1] = float("nan")
    tensors[name] = bad.to(tensors[name].dtype)
    with pytest.raises(ValueError, match=f"cannot write.*tensor {name}"):
        _write(tmp_path, tensors)
    assert not (tmp_path / "ckpt").exists() and os.listdir(tmp_path) == []


def test_int4_multiplier_of_a_zero_group_may_be_inf(tmp_path):
    tensors = {"l.weight_scale": torch.tensor([[7.0, float("inf")]]).bfloat16(), "l.smooth": torch.ones(4)}
    out = _write(tmp_path, tensors)
    assert torch.isinf(_read_all(out)["l.weight_scale"].float()).any()


# ------------------------------------------------------------------------- atomicity, stale, concurrency


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".ckpt.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    stale_file = tmp_path / f".ckpt.tmp-{pid}-89abcdef.json"
    stale_file.write_text("{")
    live = tmp_path / f".ckpt.tmp-{os.getppid()}-deadbeef"
    live.mkdir()
    lock_path(tmp_path / "ckpt").write_text(str(pid))
    _write(tmp_path)
    assert not stale.exists() and not stale_file.exists() and live.exists()
    assert not lock_path(tmp_path / "ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", live.name])


def test_killed_overwrite_gets_its_old_directory_back(tmp_path):
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    old = tmp_path / f".ckpt.tmp-old-{dead}-0123abcd"
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    remove_stale_siblings(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "old"


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(FileExistsError, match="being written by another process"):
            _write(tmp_path)
    assert (out / "a").read_text() == "first"


def test_a_writer_that_finished_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(FileExistsError, match="written by another process meanwhile"):
        with atomic_output_dir(out) as tmp:
            (tmp / "a").write_text("mine")
            out.mkdir()  # another process completed out/ after our checks (no lock: an older svdq)
            (out / "b").write_text("theirs")
    assert sorted(os.listdir(out)) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_failure_is_one_oserror_naming_the_path_and_leaves_nothing(tmp_path):
    huge = {"x": torch.zeros(1)}
    target = tmp_path / "ckpt"
    # a path component that is a file: the write fails inside the atomic block
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        write_checkpoint(tmp_path / "file" / "ckpt", huge, {})
    assert not target.exists()
