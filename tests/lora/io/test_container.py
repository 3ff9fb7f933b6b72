"""lora.io.container: the safetensors container (atomic writes, validation of damaged files) and the export /
load of plain torch models with svdq.SVDQLinear layers (through lora.io.svdq_export's entry points)."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import svdq
from lora.io import container as fmt_mod
from lora.io.container import INDEX_FILE, SINGLE_FILE, CheckpointReader, write_checkpoint
from lora.io.svdq_export import export_quantized, load_quantized, read_export_metadata
from svdq.formats import quantize_tensor


def _model(seed: int, hidden: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(hidden, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 32)
    )


@pytest.fixture(scope="module")
def quantized():
    """A Sequential quantized by svdq.quantize (static activation ranges), and its calibration input."""
    model = _model(0)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    x[:, :2] *= 10
    svdq.quantize(model, svdq.SVDQConfig(rank=8), lambda m: m(x), progress=False)
    assert model[0].input_amax is not None  # the static range travels too
    return model, x


def _export(model, path, **kw):
    return export_quantized(model, path, progress=False, **kw)


# ------------------------------------------------------------------------------------------ torch models


def test_torch_model_round_trip_is_bit_exact(quantized, tmp_path):
    model, x = quantized
    _export(model, tmp_path / "ck", metadata={"source": "unit test", "nested": {"n": [1, 2]}})
    assert os.listdir(tmp_path / "ck") == [SINGLE_FILE]
    with CheckpointReader(tmp_path / "ck") as r:
        keys = set(r.keys())
    assert {
        "0.weight_packed",
        "0.weight_scale",
        "0.weight_scale_2",
        "0.smooth",
        "0.lora_down",
        "0.lora_up",
    } <= keys
    assert {"0.bias", "0.input_amax", "2.weight", "2.bias"} <= keys  # bias, static range, other tensors
    assert r.specs["0.weight_packed"] == (torch.uint8, (128, 32))
    assert r.specs["0.weight_scale"] == (torch.float8_e4m3fn, (128, 4))
    fresh = _model(5)
    meta = load_quantized(fresh, tmp_path / "ck", progress=False)
    assert meta["user"] == {"source": "unit test", "nested": {"n": [1, 2]}}
    assert read_export_metadata(tmp_path / "ck")["user"] == meta["user"]
    assert meta["format"] == "svdq" and meta["naming_version"] == "1" and meta["tool_version"]
    assert isinstance(fresh[0], svdq.SVDQLinear) and isinstance(fresh[3], svdq.SVDQLinear)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    trainable = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_down", "0.lora_up", "3.lora_down", "3.lora_up"]
    frozen = _model(6)
    load_quantized(frozen, tmp_path / "ck", trainable=False, progress=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_sharded_torch_export_loads_identically(quantized, tmp_path):
    model, x = quantized
    _export(model, tmp_path / "ck", max_shard_bytes=4096)
    files = sorted(os.listdir(tmp_path / "ck"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert INDEX_FILE in files and len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards) and index["metadata"]["format"] == "svdq"
    fresh = _model(3)
    load_quantized(fresh, tmp_path / "ck", progress=False)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_torch_layer_without_branch_round_trips(tmp_path):
    """Rank 0 (e.g. a folded layer): no lora tensors, metadata rank 0, rebuilt with empty factors."""
    model = _model(0)
    w = model[0].weight.detach()
    model[0] = svdq.SVDQLinear(
        quantize_tensor(w, "int4"),
        torch.rand(64) + 0.5,
        torch.zeros(0, 64),
        torch.zeros(128, 0),
        model[0].bias,
        act_format="int4",
    )
    x = torch.randn(16, 64)
    _export(model, tmp_path / "ck")
    with CheckpointReader(tmp_path / "ck") as r:
        assert r.metadata["layers"]["0"]["rank"] == 0
        assert r.metadata["layers"]["0"]["weight"]["format"]["name"] == "int4"
        assert not any(k.startswith("0.lora") for k in r.keys())
    fresh = _model(1)
    load_quantized(fresh, tmp_path / "ck", progress=False)
    assert fresh[0].rank == 0
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_fake_storage_is_refused_naming_the_layer(tmp_path):
    model = _model(0)
    x = torch.randn(64, 64)
    svdq.quantize(model, svdq.SVDQConfig(rank=4), lambda m: m(x), storage="fake", progress=False)
    with pytest.raises(ValueError, match="0: storage='fake'"):
        _export(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_checkpoint_of_another_model_is_refused_and_the_model_is_unchanged(quantized, tmp_path):
    model, _ = quantized
    _export(model, tmp_path / "ck")
    other = _model(2, hidden=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"layer 0: the checkpoint has shape \[128, 64\], the model \[128, 32\]"
    ):
        load_quantized(other, tmp_path / "ck", progress=False)
    assert type(other[0]) is torch.nn.Linear
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k
    extra = torch.nn.Sequential(*_model(2), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match="tensor 4.weight of the model is not in the checkpoint"):
        load_quantized(extra, tmp_path / "ck", progress=False)


# ------------------------------------------------------------------------------------------ damaged files


def _rewrite(src, dst, drop: str | None = None, add: str | None = None) -> None:
    """A well-formed checkpoint with the metadata of ``src`` and a tensor dropped / added."""
    with CheckpointReader(src) as r:
        tensors = {k: r.get(k) for k in r.keys() if k != drop}
        meta = {k: v for k, v in r.metadata.items() if k not in ("format", "naming_version", "tool_version")}
    if add:
        tensors[add] = torch.zeros(3)
    write_checkpoint(dst, tensors, meta)


@pytest.mark.parametrize("drop", ["3.weight_scale", "2.bias"])
def test_missing_tensor_is_named(quantized, tmp_path, drop):
    model, _ = quantized
    _export(model, tmp_path / "ck")
    _rewrite(tmp_path / "ck", tmp_path / "bad", drop=drop)
    with pytest.raises(ValueError, match=f"tensor {drop} "):
        load_quantized(_model(1), tmp_path / "bad", progress=False)


def test_unknown_tensor_is_named(quantized, tmp_path):
    model, _ = quantized
    _export(model, tmp_path / "ck")
    _rewrite(tmp_path / "ck", tmp_path / "bad", add="0.stray")
    with pytest.raises(ValueError, match="tensor 0.stray of the checkpoint is not named by its metadata"):
        load_quantized(_model(1), tmp_path / "bad", progress=False)


def test_truncated_file_is_refused_naming_the_file(quantized, tmp_path):
    model, _ = quantized
    path = _export(model, tmp_path / "ck") / SINGLE_FILE
    raw = path.read_bytes()
    for keep in (len(raw) - 1, len(raw) // 2, 100, 5):
        path.write_bytes(raw[:keep])
        with pytest.raises(ValueError, match=str(path)):
            CheckpointReader(tmp_path / "ck")


def test_every_flipped_header_byte_is_detected(tmp_path):
    """Each byte of the length prefix and the JSON header, flipped: a ValueError naming the file (the
    header checksum catches what the structure checks cannot, e.g. a digit of the user metadata)."""
    tensors = {"a.weight_packed": torch.arange(8, dtype=torch.uint8).reshape(2, 4), "b": torch.ones(3)}
    path = write_checkpoint(tmp_path / "ck", tensors, {"user": {"step": 12}}) / SINGLE_FILE
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert b'\\"step\\": 12' in raw[: 8 + n]
    for i in range(8 + n):
        bad = bytearray(raw)
        bad[i] ^= 0x01 if i % 2 else 0x20
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=str(path)):
            CheckpointReader(tmp_path / "ck")
    path.write_bytes(raw)
    assert CheckpointReader(tmp_path / "ck").metadata["user"] == {"step": 12}


def test_wrong_format_or_naming_version_names_the_field(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"x": torch.ones(2)}, str(d / SINGLE_FILE), metadata={"format": "gguf", "naming_version": "1"})
    with pytest.raises(ValueError, match="field 'format' is 'gguf'"):
        CheckpointReader(d)
    save_file({"x": torch.ones(2)}, str(d / SINGLE_FILE), metadata={"format": "svdq", "naming_version": "7"})
    with pytest.raises(ValueError, match="field 'naming_version' is '7'"):
        CheckpointReader(d)
    sharded = write_checkpoint(
        tmp_path / "sh", {"x": torch.ones(2), "y": torch.ones(3)}, {}, max_shard_bytes=8
    )
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["metadata"]["naming_version"] = "2"
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{sharded / INDEX_FILE}: field 'naming_version' is '2'"):
        CheckpointReader(sharded)


def test_sharded_checkpoint_damage_is_detected(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(4)}
    d = write_checkpoint(tmp_path / "ck", tensors, {"user": {}}, max_shard_bytes=16)
    with CheckpointReader(d) as r:
        assert {k: r.get(k) for k in r.keys()}.keys() == tensors.keys()
        assert all(torch.equal(r.get(k), v) for k, v in tensors.items())
    index = json.loads((d / INDEX_FILE).read_text())
    text = (d / INDEX_FILE).read_text()
    (d / INDEX_FILE).write_text(text.replace('"t1"', '"t9"'))  # the index edited
    with pytest.raises(ValueError, match="index.json: checksum mismatch"):
        CheckpointReader(d)
    (d / INDEX_FILE).write_text(text)
    os.remove(d / index["weight_map"]["t3"])
    with pytest.raises(FileNotFoundError, match="shard model-00004-of-00004.safetensors is missing"):
        CheckpointReader(d)


# ------------------------------------------------------------------------------------------ atomic writes


def test_failed_write_leaves_no_directory(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.ones(4) for i in range(4)}
    real_save, calls = fmt_mod._save_file, []

    def fail_second(part, path, meta):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(part, path, meta)

    monkeypatch.setattr(fmt_mod, "_save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "ck", tensors, {}, max_shard_bytes=16)
    assert len(calls) == 2 and not calls[0].exists()  # the first shard was written, then removed
    assert os.listdir(tmp_path) == []  # no output directory, no temporary directory
    # an overwrite that fails midway keeps the old checkpoint intact
    write_checkpoint(tmp_path / "ck", {"old": torch.zeros(2)}, {"user": {"v": 1}})
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "ck", tensors, {}, max_shard_bytes=16, overwrite=True)
    assert os.listdir(tmp_path) == ["ck"]
    assert CheckpointReader(tmp_path / "ck").metadata["user"] == {"v": 1}


def test_unserializable_tensor_and_existing_directory_are_refused(tmp_path):
    with pytest.raises(TypeError, match="tensor c: dtype torch.complex64 cannot be stored"):
        write_checkpoint(tmp_path / "ck", {"a": torch.ones(2), "c": torch.ones(2, dtype=torch.complex64)}, {})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_checkpoint(tmp_path / "ck", {"a": torch.ones(2)}, {"user": {"x": object()}})
    assert os.listdir(tmp_path) == []
    write_checkpoint(tmp_path / "ck", {"a": torch.ones(2)}, {})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)}, {})
    write_checkpoint(tmp_path / "ck", {"a": torch.zeros(2)}, {}, overwrite=True)
    assert torch.equal(CheckpointReader(tmp_path / "ck").get("a"), torch.zeros(2))
    assert os.listdir(tmp_path) == ["ck"]
