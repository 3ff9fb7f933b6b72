"""lora.export / lora.load (lora.io.api): every format through the front door writes the same bytes as its
own exporter (whose consumers the other tests check: modelopt, PEFT, load_quantized) and loads back where
svdq reads it; one-line errors before any work; a failure mid-export leaves no output; adapter files of
both generations (``svdq-lora``, the older ``svdq-params``) load.

Models: the plain torch ``TinyMLP`` of test_torch_interop (svdq.quantize, NVFP4 W4A4) and the tiny Megatron
GPT-MoE with adapters over hand-built SVDQuant bases (int4, random smoothing) in a one-process world.
"""

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import lora.io.container as container
import lora.io.modelopt_hf_layout as modelopt_hf_layout
import lora.modelopt_quant
from calib.tiny_moe import tiny_moe_batch
from lora import LoraConfig, adapter_factors, add_adapters
from lora.base import SVDQBase
from lora.io.api import EXPORTERS, detect_format, formats_taking
from lora.io.atomic import atomic_output_dir, atomic_write_file
from lora.io.folded import export_folded
from lora.io.folded_hf import export_folded_hf, fold_branches
from lora.io.modelopt_hf import export_modelopt_hf
from lora.io.peft import export_peft
from lora.io.svdq_export import export_quantized
from lora.model import branch_parameters
from svdq.formats import quantize_tensor
from tests.helpers.cli import no_temporaries
from tests.helpers.lora import CFG, tiny_model
from tests.lora.io.test_torch_interop import TinyMLP, _data, _loop, _quantized


def _content(p: Path):
    """A file's bytes; for safetensors its header metadata and tensors (the header's key order varies)."""
    if p.suffix != ".safetensors":
        return p.read_bytes()
    with safe_open(str(p), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    raw = {
        k: (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).tolist())
        for k, t in tensors.items()
    }
    return meta, raw


def _files(root: Path) -> dict:
    """``{relative path: content}`` of every file under ``root`` (compared exactly)."""
    return {str(p.relative_to(root)): _content(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _torch_out(model, x=None):
    with torch.no_grad():
        return model(_data() if x is None else x)


# ------------------------------------------------------------------------------------------ torch


@pytest.mark.parametrize(
    "fmt, direct, options",
    [
        ("svdq", lambda m, out: export_quantized(m, out, progress=False), {"progress": False}),
        (
            "folded",
            lambda m, out: export_folded_hf(m, out, forward_loop=_loop, verbose=False),
            {"forward_loop": _loop, "verbose": False},
        ),
        ("modelopt-hf", lambda m, out: export_modelopt_hf(m, out), {}),
        (
            "peft",
            lambda m, out: export_peft(m, out, base_model_name_or_path="x"),
            {"base_model_name_or_path": "x"},
        ),
    ],
)
def test_torch_export_equals_the_formats_exporter(tmp_path, fmt, direct, options):
    model = _quantized()
    exported = lora.export(model, tmp_path / "api", fmt, **options)
    direct(model, tmp_path / "direct")
    assert exported.out_dir == tmp_path / "api" and exported.format == fmt and exported.kind == "torch"
    assert _files(tmp_path / "api") == _files(tmp_path / "direct")  # same metadata, tensors bit for bit
    if fmt == "folded":
        assert exported.layout == "modelopt HF NVFP4 layout"
        assert exported.report == fold_branches(copy.deepcopy(model), forward_loop=_loop)
        assert detect_format(tmp_path / "api") == "modelopt-hf"
    else:
        assert exported.report is None
    if fmt in ("modelopt-hf", "peft"):
        assert detect_format(tmp_path / "api") == fmt
        with pytest.raises(ValueError, match="svdq does not load it back"):
            lora.load(TinyMLP(5), tmp_path / "api")


def test_torch_svdq_export_loads_back_exactly(tmp_path):
    model = _quantized()
    lora.export(model, tmp_path / "ckpt", progress=False)
    fresh = TinyMLP(7)  # other weights, plain nn.Linear
    meta = lora.load(fresh, tmp_path / "ckpt", progress=False)
    assert meta["model_kind"] == "torch" and detect_format(tmp_path / "ckpt") == "svdq"
    assert torch.equal(_torch_out(fresh), _torch_out(model))


def test_unknown_format_option_and_kind_errors_before_any_work(tmp_path):
    model = _quantized()
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match="unknown export format 'onnx'; known formats: svdq, folded, modelopt-hf, peft, "
        "compressed-tensors",
    ):
        lora.export(model, out, "onnx")
    with pytest.raises(ValueError, match=r"format 'peft' \(torch models\) takes no option 'max_shard_bytes'"):
        lora.export(model, out, "peft", max_shard_bytes=10)
    assert not out.exists()
    assert list(EXPORTERS) == ["svdq", "folded", "modelopt-hf", "peft", "compressed-tensors"]
    assert formats_taking("forward_loop") == ["folded", "modelopt-hf", "compressed-tensors"]
    assert formats_taking("max_shard_bytes") == ["svdq"]
    from calib.cli.export import FORMATS

    assert FORMATS == tuple(EXPORTERS)  # the command line's choices


def test_failed_export_leaves_no_partial_output(tmp_path, monkeypatch):
    """A failure after the first file: nothing at ``out`` (new), the old content kept (overwrite), and no
    temporary left, for the svdq container (second shard) and the HF layout (its JSON after the tensors)."""
    model = _quantized()
    real_save, calls = container._save_file, []

    def fail_second(tensors, path, meta):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(tensors, path, meta)

    monkeypatch.setattr(container, "_save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        lora.export(model, tmp_path / "svdq", max_shard_bytes=4096, progress=False)
    assert len(calls) == 2 and not (tmp_path / "svdq").exists()

    def fail_json(path, obj):
        assert (path.parent / "model.safetensors").is_file()  # the tensors were written already
        raise OSError("disk full")

    monkeypatch.setattr(modelopt_hf_layout, "write_json", fail_json)  # the one HF-layout writer
    with pytest.raises(OSError, match="disk full"):
        lora.export(model, tmp_path / "hf", "modelopt-hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        lora.export(model, tmp_path / "old", "modelopt-hf", overwrite=True)
    assert _files(tmp_path / "old") == {"keep.txt": b"old"}
    assert not no_temporaries(tmp_path)


def test_atomic_write_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def partial(tmp):
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write_file(path, partial)
    assert path.read_text() == "old" and not no_temporaries(tmp_path)
    assert atomic_write_file(path, lambda tmp: tmp.write_text("new")) == path and path.read_text() == "new"
    with pytest.raises(FileNotFoundError):
        atomic_write_file(tmp_path / "missing" / "b.json", lambda tmp: tmp.write_text("x"))
    with pytest.raises(FileExistsError, match="not a directory"), atomic_output_dir(path):
        pass


def test_torch_adapter_file_is_svdq_lora_and_old_svdq_params_files_load(tmp_path):
    from calib.train import load_adapter_file

    model = _quantized()
    path = lora.save_adapters(model, tmp_path / "adapters.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "svdq-lora" and meta["model_kind"] == "torch" and meta["configs"] == "[]"
    assert meta["layers"] == '{"up": 8, "down": 8}'
    params = branch_parameters(model)
    assert sorted(params) == ["down.lora_down", "down.lora_up", "up.lora_down", "up.lora_up"]
    # the file written before the formats were one: the same tensors, metadata format svdq-params
    old = tmp_path / "old.safetensors"
    save_file(
        {n: p.detach() for n, p in params.items()},
        str(old),
        metadata={"format": "svdq-params", "version": "1"},
    )
    for file in (path, old):
        other = _quantized(seed=3)  # other branches
        assert detect_format(file) == "adapters"
        assert sorted(lora.load(other, file)) == sorted(params)
        assert all(torch.equal(p, params[n]) for n, p in branch_parameters(other).items())
        assert load_adapter_file(_quantized(seed=4), file) == list(params)
    bad = tmp_path / "bad.safetensors"
    save_file({"up.lora_down": params["up.lora_down"]}, str(bad), metadata={"format": "svdq-params"})
    with pytest.raises(ValueError, match="tensor up.lora_up is missing"):
        lora.load(_quantized(), bad)


# ------------------------------------------------------------------------------------------ Megatron


def _megatron(seed: int = 0):
    """Tiny GPT-MoE, adapters on the attention linears over int4 SVDQuant bases (same for a seed)."""
    model = tiny_model(seed=1)
    add_adapters(
        model, LoraConfig(rank=4, alpha=8.0, init="random", targets=("*.linear_qkv", "*.linear_proj"))
    )
    with torch.no_grad():
        for f in adapter_factors(model).values():
            if f.role == "up":
                f.param.mul_(0.1)
    g = torch.Generator().manual_seed(seed)
    for m in list(model.modules()):
        if isinstance(m, lora.LoraLinear):
            inner = m.base
            s = torch.rand(inner.weight.shape[1], generator=g) + 0.5
            m.base = SVDQBase(
                inner, quantize_tensor((inner.weight.detach() * s).float(), "int4-g32"), s, "int4-g32"
            )
    return model


def _logits(model):
    b = tiny_moe_batch(CFG, batch=2)
    model.eval()
    with torch.no_grad():
        return model(b["tokens"], b["position_ids"], None)


def _mloop(model):
    b = tiny_moe_batch(CFG, batch=2, seed=1)
    model(b["tokens"], b["position_ids"], None)


@pytest.mark.usefixtures("megatron_world")
def test_megatron_svdq_and_folded_through_the_front_door(tmp_path):
    model = _megatron()
    exported = lora.export(model, tmp_path / "svdq", metadata={"run": 1}, progress=False)
    export_quantized(model, tmp_path / "svdq_direct", metadata={"run": 1}, progress=False)
    assert exported.kind == "megatron" and exported.report is None
    assert _files(tmp_path / "svdq") == _files(tmp_path / "svdq_direct")
    fresh = tiny_model(seed=5)
    assert lora.load(fresh, tmp_path / "svdq", progress=False)["user"] == {"run": 1}
    assert torch.equal(_logits(fresh), _logits(model))

    a, b = _megatron(), _megatron()
    folded = lora.export(a, tmp_path / "folded", "folded", forward_loop=_mloop, verbose=False)
    direct = export_folded(b, tmp_path / "folded_direct", forward_loop=_mloop, verbose=False)
    assert folded.layout == "svdq format" and folded.report == direct and len(direct) == 4
    assert _files(tmp_path / "folded") == _files(tmp_path / "folded_direct")
    fresh = tiny_model(seed=6)
    lora.load(fresh, tmp_path / "folded", progress=False)
    assert not lora.adapter_modules(fresh) and torch.equal(_logits(fresh), _logits(a))
    c = _megatron()
    assert lora.fold_adapters(c) == lora.modelopt_quant.fold_adapters(_megatron())  # the user verb
    assert torch.equal(_logits(c), _logits(a))  # a was folded by the export (in place)


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("fmt", ["modelopt-hf", "peft"])
def test_megatron_refuses_torch_only_formats_before_any_work(tmp_path, fmt):
    with pytest.raises(ValueError, match=f"format '{fmt}': .*not Megatron models; use format 'svdq'"):
        lora.export(_megatron(), tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("format", ["svdq", "folded", "modelopt-hf", "peft"])
def test_non_finite_adapters_are_refused_by_every_format_before_writing(format, tmp_path):
    model = _quantized()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_up" in n)
    with torch.no_grad():
        p.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=rf"parameter {name} holds NaN or inf"):
        lora.export(model, tmp_path / "out", format)
    assert not (tmp_path / "out").exists()
