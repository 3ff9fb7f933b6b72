"""lora.io (torch models): modelopt's HF NVFP4_SVD layout, the folded (branch-less) export and PEFT adapters.

References:
- modelopt side: the exported tensors are read back with nvidia-modelopt 0.47's own code —
  ``NVFP4QTensor(...).dequantize`` for ``weight`` / ``weight_scale`` / ``weight_scale_2``, and for the
  activations its CPU-capable ``NVFP4QTensor.quantize / dequantize`` with the static global scale
  ``weights_scaling_factor_2 = input_scale`` (what its fake quantizer computes from ``amax =
  input_scale·6·448``), after ``x·pre_quant_scale``, with the factors applied as ``SVDQuantLinear.forward``
  applies them: ``F.linear(Q_a(x̃), Ŵ, bias) + (x̃·lora_aᵀ)·lora_bᵀ``, ``x̃ = x·pre_quant_scale``.
  With power-of-two smoothing (``x·(1/s) == x/s`` exactly) and no bias, this equals ``SVDQLinear`` bit for
  bit; with general smoothing the two differ by float32 round-off (``x·fl(1/s)`` vs ``fl(x/s)``), checked
  to ``‖Δ‖/‖y‖ ≤ 1e-6`` on float32 layers (an activation code flipped by that round-off would show as
  ~1e-3 on these sizes). bfloat16 layers are exported with bfloat16 ``pre_quant_scale`` / factors, as
  modelopt does, and agree only to bf16 level (a few %, like either one against float32 math).
- the GPU tests (``-m gpu``) load the tensors into a real modelopt ``SVDQuantLinear`` and compare, and
  check the key names / dtypes / hf_quant_config against modelopt's own ``export_hf_checkpoint`` of a tiny
  transformers Llama, reading that export back with the reference above.
- fold: float64 recomputation of the re-quantized weight and of each reported error (1e-12 relative).
- PEFT: the real ``peft`` library on a float64 copy of the unquantized model; its delta must equal
  ``(x·A'ᵀ)·Bᵀ`` in float64 to 1e-10 (relative).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
from modelopt.torch.export.quant_utils import process_layer_quant_config
from modelopt.torch.quantization.qtensor import NVFP4QTensor
from safetensors import safe_open
from torch import nn

import svdq
from lora.io.atomic import atomic_output_dir
from lora.io.folded_hf import export_folded_hf, fold_branches, fold_layer
from lora.io.modelopt_hf import export_modelopt_hf, hf_quantization_config
from lora.io.peft import export_peft, residual_base_state_dict
from svdq.formats import dequantize, quantize_tensor
from svdq.layer import SVDQLinear

CFG = svdq.SVDQConfig(rank=8, exclude=("head",), alphas=(0.0, 0.5), sample_tokens=256)


class TinyMLP(nn.Module):
    """Plain torch model: two targeted linears (one without bias) and an excluded head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))))


def _data(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 64, generator=g) * torch.linspace(0.2, 4.0, 64)  # uneven channel ranges


def _loop(model):
    model(_data())


def _quantized(seed: int = 0, **kw) -> TinyMLP:
    return svdq.quantize(TinyMLP(seed), CFG, _loop, progress=False, **kw)


def _pow2_layer(bias: bool = False, rank: int = 4, seed: int = 0) -> SVDQLinear:
    """An SVDQLinear with power-of-two smoothing: ``x·(1/s)`` and ``lora_down·s`` are exact."""
    g = torch.Generator().manual_seed(seed)
    s = 2.0 ** torch.randint(-3, 4, (64,), generator=g).float()
    r = torch.randn(48, 64, generator=g)
    a = torch.randn(rank, 64, generator=g) * 0.2
    b = torch.randn(48, rank, generator=g) * 0.2
    bias_t = torch.randn(48, generator=g) if bias else None
    return SVDQLinear(quantize_tensor(r, "nvfp4"), s, a, b, bias_t, "nvfp4", "packed", torch.float32)


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _layer_tensors(tensors: dict, name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}


def modelopt_forward(t: dict[str, torch.Tensor], x: torch.Tensor, factor_keys: str = "quantizer"):
    """A layer's output computed from its exported tensors with modelopt's code (module docstring)."""
    out_f, half = t["weight"].shape
    w = NVFP4QTensor((out_f, 2 * half), x.dtype, t["weight"]).dequantize(
        dtype=x.dtype, scale=t["weight_scale"], double_scale=t["weight_scale_2"], block_sizes={-1: 16}
    )
    p = t.get("pre_quant_scale")
    xt = x * p if p is not None else x  # SVDQuantLinear._apply_pre_quant_scale
    q, sc, g = NVFP4QTensor.quantize(xt, 16, weights_scaling_factor_2=t["input_scale"])
    xq = q.dequantize(dtype=x.dtype, scale=sc, double_scale=g, block_sizes={-1: 16})
    y = F.linear(xq, w, t.get("bias"))
    ka, kb = ("weight_quantizer._svdquant_lora_a", "weight_quantizer._svdquant_lora_b")
    if factor_keys == "module":
        ka, kb = "svdquant_lora_a", "svdquant_lora_b"
    if ka in t:
        y = y + F.linear(F.linear(xt, t[ka]), t[kb])
    return y


def _inputs_of(model, names, x) -> dict[str, torch.Tensor]:
    seen = {}
    hs = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return seen


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------------- modelopt layout


@pytest.mark.parametrize("factor_keys", ["quantizer", "module"])
def test_pow2_layer_reconstructs_bit_exactly_with_modelopt(tmp_path, factor_keys):
    layer = _pow2_layer()
    x = _data(3)
    amax = (x / layer.smooth).abs().amax()
    layer.set_input_amax(0.7 * amax)  # some blocks saturate: static-range clipping is compared too
    model = nn.Sequential(layer)
    export_modelopt_hf(model, tmp_path / "mo", factor_keys=factor_keys)
    t = _layer_tensors(_read(tmp_path / "mo" / "model.safetensors"), "0")
    assert t["input_scale"].dtype == torch.float32 and t["input_scale"].shape == ()
    assert torch.equal(t["input_scale"], (0.7 * amax).float() / (6 * 448))
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(modelopt_forward(t, x, factor_keys), y)


def test_layer_tensors_match_the_layer(tmp_path):
    model = _quantized()
    export_modelopt_hf(model, tmp_path / "mo")
    tensors = _read(tmp_path / "mo" / "model.safetensors")
    for name in ("up", "down"):
        layer, t = model.get_submodule(name), _layer_tensors(tensors, name)
        packed = layer.packed_residual()
        expected = {
            "weight": (torch.uint8, (layer.out_features, layer.in_features // 2)),
            "weight_scale": (torch.float8_e4m3fn, (layer.out_features, layer.in_features // 16)),
            "weight_scale_2": (torch.float32, ()),
            "input_scale": (torch.float32, ()),
            "pre_quant_scale": (torch.float32, (layer.in_features,)),
            "weight_quantizer._svdquant_lora_a": (torch.float32, (8, layer.in_features)),
            "weight_quantizer._svdquant_lora_b": (torch.float32, (layer.out_features, 8)),
        }
        if layer.bias is not None:
            expected["bias"] = (torch.float32, (layer.out_features,))
        assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == expected
        assert torch.equal(t["weight"], packed.qdata)
        assert torch.equal(t["weight_scale"].view(torch.uint8), packed.scale.view(torch.uint8))
        assert torch.equal(t["weight_scale_2"], packed.global_scale)
        assert torch.equal(t["input_scale"], layer.input_amax / 2688.0)
        assert torch.equal(t["pre_quant_scale"], (1.0 / layer.smooth.double()).float())
        # lora_a reads the smoothed input: pre_quant_scale·lora_a == lora_down to float32 round-off
        la = t["weight_quantizer._svdquant_lora_a"].double() * t["pre_quant_scale"].double()
        assert torch.allclose(la, layer.lora_down.double(), rtol=2e-7, atol=0)
    assert torch.equal(tensors["head.weight"], model.head.weight)
    assert torch.equal(tensors["head.bias"], model.head.bias)


def test_model_layers_reconstruct_with_modelopt(tmp_path):
    model = _quantized()
    export_modelopt_hf(model, tmp_path / "mo")
    tensors = _read(tmp_path / "mo" / "model.safetensors")
    xs = _inputs_of(model, ["up", "down"], _data(5))
    for name, x in xs.items():
        with torch.no_grad():
            y = model.get_submodule(name)(x)
        err = _rel(modelopt_forward(_layer_tensors(tensors, name), x), y)
        assert err <= 1e-6, f"{name}: {err}"


def test_bf16_model_exports_bf16_tensors(tmp_path):
    model = TinyMLP().to(torch.bfloat16)
    svdq.quantize(model, CFG, lambda m: m(_data().bfloat16()), progress=False)
    export_modelopt_hf(model, tmp_path / "mo")
    tensors = _read(tmp_path / "mo" / "model.safetensors")
    for name in ("up", "down"):
        t = _layer_tensors(tensors, name)
        for key in (
            "pre_quant_scale",
            "weight_quantizer._svdquant_lora_a",
            "weight_quantizer._svdquant_lora_b",
        ):
            assert t[key].dtype == torch.bfloat16, key  # modelopt keeps these in the weight dtype
        assert t["input_scale"].dtype == t["weight_scale_2"].dtype == torch.float32
    # bf16 arithmetic (x·p vs x/s, bf16 GEMMs, 4-bit activation codes flipped by bf16 rounding) moves both
    # implementations 1-3 % away from float32 math on these layers; they agree to that level
    for name, x in _inputs_of(model, ["up", "down"], _data(5).bfloat16()).items():
        with torch.no_grad():
            y = model.get_submodule(name)(x)
        assert _rel(modelopt_forward(_layer_tensors(tensors, name), x), y) <= 5e-2


def test_quant_config_matches_modelopt(tmp_path):
    model = _quantized()
    cfg = export_modelopt_hf(model, tmp_path / "mo", config={"model_type": "tiny"})
    on_disk = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    assert on_disk == cfg
    layer_cfg = {
        "up.quantization": "nvfp4_svdquant",
        "up.awq_block_size": 16,
        "down.quantization": "nvfp4_svdquant",
        "down.awq_block_size": 16,
        "head.quantization": None,
        "head.awq_block_size": 0,
    }
    expected = {"quant_algo": None, "kv_cache_quant_algo": None}
    expected.update(process_layer_quant_config(layer_cfg))
    assert cfg["quantization"] == expected
    assert cfg["quantization"]["quant_algo"] == "NVFP4_SVD"
    config = json.loads((tmp_path / "mo" / "config.json").read_text())
    assert config["model_type"] == "tiny"
    assert config["quantization_config"] == convert_hf_quant_config_format(cfg)
    holder = nn.ModuleDict({"embed": nn.Embedding(10, 64), "mlp": model})
    cfg2 = export_modelopt_hf(holder, tmp_path / "mo2")
    assert cfg2["quantization"]["exclude_modules"] == ["embed", "mlp.head"]  # as modelopt lists them


@pytest.mark.parametrize("smoothing", ["keep", "fold"])
def test_mixed_and_folded_quant_configs_match_modelopt(smoothing):
    model = _quantized()
    fold_branches(model, "down", smoothing=smoothing)
    algo = {"keep": "nvfp4_awq", "fold": "nvfp4"}[smoothing]
    from lora.io.modelopt_hf import build_hf_quant_config, layer_quant_algo

    algos = {n: layer_quant_algo(model.get_submodule(n)) for n in ("up", "down")}
    assert algos == {"up": "NVFP4_SVD", "down": algo.upper()}
    mixed = build_hf_quant_config(algos, ["head"])
    ref = {"quant_algo": None, "kv_cache_quant_algo": None}
    ref.update(
        process_layer_quant_config(
            {
                "up.quantization": "nvfp4_svdquant",
                "up.awq_block_size": 16,
                "down.quantization": algo,
                "down.awq_block_size": 16,
                "head.quantization": None,
                "head.awq_block_size": 0,
            }
        )
    )
    assert mixed["quantization"] == ref
    assert hf_quantization_config(mixed) == convert_hf_quant_config_format(mixed)
    single = build_hf_quant_config({"down": algos["down"]}, ["head", "up"])
    assert hf_quantization_config(single) == convert_hf_quant_config_format(single)
    module_style = build_hf_quant_config({"up": "NVFP4_SVD"}, [], lora_rank=8)
    assert hf_quantization_config(module_style) == convert_hf_quant_config_format(module_style)


def test_static_range_required_or_measured(tmp_path):
    model = _quantized(act_range="dynamic")
    with pytest.raises(ValueError, match=r"\['up', 'down'\] have no static activation range"):
        export_modelopt_hf(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    export_modelopt_hf(model, tmp_path / "b", forward_loop=_loop)
    tensors = _read(tmp_path / "b" / "model.safetensors")
    xs = _inputs_of(model, ["up", "down"], _data())
    for name, x in xs.items():
        amax = model.get_submodule(name).smoothed_input(x).abs().amax().float()
        assert torch.equal(tensors[f"{name}.input_scale"], amax / 2688.0)


def test_unsupported_layers_raise_naming_the_layer(tmp_path):
    int4 = svdq.quantize(
        TinyMLP(), CFG.replace(weight_format="int4", act_format="int4"), _loop, progress=False
    )
    with pytest.raises(ValueError, match="up: modelopt's NVFP4 layouts need nvfp4 weights and activations"):
        export_modelopt_hf(int4, tmp_path / "x")
    fake = svdq.quantize(TinyMLP(), CFG, _loop, progress=False, storage="fake")
    with pytest.raises(ValueError, match="up: storage='fake'"):
        export_modelopt_hf(fake, tmp_path / "x")
    with pytest.raises(ValueError, match="no svdq.SVDQLinear layers"):
        export_modelopt_hf(TinyMLP(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty directory is replaced
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"), atomic_output_dir(out):
        pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


# ------------------------------------------------------------------------------------------------ fold


def _fold_reference(layer: SVDQLinear, smoothing: str):
    """float64 recomputation: (T, W_fold, packed new residual)."""
    q = dequantize(layer.packed_residual(), torch.float32).double()
    s = layer.smooth.double()
    delta = layer.lora_up.detach().double() @ layer.lora_down.detach().double()
    target = q / s + delta
    if smoothing == "keep":
        packed = quantize_tensor((q + delta * s).float(), "nvfp4")
        w_fold = dequantize(packed, torch.float32).double() / s
    else:
        packed = quantize_tensor(target.float(), "nvfp4")
        w_fold = dequantize(packed, torch.float32).double()
    return target, w_fold, packed, delta


@pytest.mark.parametrize("smoothing", ["keep", "fold"])
def test_fold_report_equals_float64_recomputation(smoothing):
    model = _quantized()
    before = copy.deepcopy(model)
    xs = _inputs_of(model, ["up", "down"], _data())
    report = fold_branches(model, smoothing=smoothing, forward_loop=_loop)
    assert set(report) == {"up", "down"}
    for name in ("up", "down"):
        old, new = before.get_submodule(name), model.get_submodule(name)
        target, w_fold, packed, delta = _fold_reference(old, smoothing)
        assert new.rank == 0 and new.lora_down.shape == (0, old.in_features)
        assert torch.equal(new.packed_residual().qdata, packed.qdata)
        assert torch.equal(new.packed_residual().global_scale, packed.global_scale)
        x = xs[name].reshape(-1, old.in_features)
        with torch.no_grad():
            y, y_fold = old(x), new(x)
        r = report[name]
        assert r["tokens"] == x.shape[0] and r["smoothing"] == smoothing
        assert r["weight_err"] == pytest.approx(_rel(w_fold, target), rel=1e-12)
        assert r["delta_rel"] == pytest.approx(float(delta.norm() / target.norm()), rel=1e-12)
        x64 = x.double()
        act = float((x64 @ (w_fold - target).T).norm() / (x64 @ target.T).norm())
        assert r["act_weight_err"] == pytest.approx(act, rel=1e-12)
        assert r["output_err"] == pytest.approx(_rel(y_fold, y), rel=1e-12)
        assert 0 < r["weight_err"] < r["delta_rel"]  # folding is better than dropping the branch
        if smoothing == "keep":
            assert torch.equal(new.smooth, old.smooth) and torch.equal(new.input_amax, old.input_amax)
        else:
            assert torch.equal(new.smooth, torch.ones_like(old.smooth))
            # max|x| times the layer's headroom input_amax / max|x/s| (svdq/DESIGN.md §20; 16 on _loop's data)
            x64 = xs[name].double()
            headroom = float(old.input_amax) / float((x64 / old.smooth.double()).abs().max())
            assert float(new.input_amax) == pytest.approx(float(x64.abs().max()) * headroom, rel=1e-6)
            assert headroom == pytest.approx(CFG.act_range_margin, rel=1e-6)


def test_fold_inputs_dict_and_weight_only_report():
    model = _quantized()
    x = _inputs_of(model, ["up"], _data())["up"]
    r1 = fold_branches(copy.deepcopy(model), "up", inputs={"up": x})
    r2 = fold_branches(copy.deepcopy(model), "up", forward_loop=_loop)
    assert r1 == r2
    r3 = fold_branches(copy.deepcopy(model))
    assert set(r3["down"]) == {"format", "smoothing", "rank", "weight_err", "delta_rel"}
    with pytest.raises(ValueError, match=r"inputs given for \['nope'\]"):
        fold_branches(copy.deepcopy(model), inputs={"nope": x})
    with pytest.raises(ValueError, match="smoothing must be one of"):
        fold_branches(model, smoothing="drop")
    folded, errors = fold_layer(model.up)  # a bare layer: returns the folded copy
    assert folded.rank == 0 and model.up.rank == 8 and errors["weight_err"] > 0


@pytest.mark.parametrize("smoothing", ["keep", "fold"])
def test_folded_hf_export_reads_back_with_modelopt(tmp_path, smoothing, capsys):
    model = _quantized()
    before = copy.deepcopy(model)
    report = export_folded_hf(model, tmp_path / "f", smoothing=smoothing, forward_loop=_loop)
    assert "error added by the fold" in capsys.readouterr().out
    for name in ("up", "down"):  # the model itself is unchanged
        assert torch.equal(model.get_submodule(name).lora_up, before.get_submodule(name).lora_up)
    cfg = json.loads((tmp_path / "f" / "hf_quant_config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == {"keep": "NVFP4_AWQ", "fold": "NVFP4"}[smoothing]
    tensors = _read(tmp_path / "f" / "model.safetensors")
    assert not any("lora" in k for k in tensors)
    assert any(k.endswith("pre_quant_scale") for k in tensors) == (smoothing == "keep")
    folded = copy.deepcopy(model)
    assert fold_branches(folded, smoothing=smoothing, forward_loop=_loop) == report
    xs = _inputs_of(folded, ["up", "down"], _data(7))
    for name, x in xs.items():
        with torch.no_grad():
            y = folded.get_submodule(name)(x)
        y_mo = modelopt_forward(_layer_tensors(tensors, name), x)
        if smoothing == "fold" and folded.get_submodule(name).bias is None:
            assert torch.equal(y_mo, y)  # s = 1: no pre_quant_scale round-off
        else:
            assert _rel(y_mo, y) <= 1e-6


# ------------------------------------------------------------------------------------------------ PEFT


def _peft_setup(tmp_path, mixed_ranks: bool = False):
    peft = pytest.importorskip("peft")
    base = TinyMLP()
    q = copy.deepcopy(base)
    if mixed_ranks:
        svdq.quantize(q, CFG.replace(include=("up",)), _loop, progress=False)
        svdq.quantize(q, CFG.replace(include=("down",), rank=4), _loop, progress=False)
    else:
        svdq.quantize(q, CFG, _loop, progress=False)
    cfg = export_peft(q, tmp_path / "adapter", base_model_name_or_path="tiny-mlp")
    return peft, base.double(), q, cfg


@pytest.mark.parametrize("mixed_ranks", [False, True])
def test_peft_delta_equals_branch(tmp_path, mixed_ranks):
    peft, base, q, cfg = _peft_setup(tmp_path, mixed_ranks)
    assert cfg["target_modules"] == ["down", "up"] and cfg["lora_alpha"] == cfg["r"]
    on_disk = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert on_disk == cfg
    keys = set(_read(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in ("up", "down") for ab in "AB"}
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    x = _data(9).double()
    for name in ("up", "down"):
        lora_layer = pm.base_model.model.get_submodule(name)
        ours = q.get_submodule(name)
        assert lora_layer.scaling["default"] == 1.0
        assert torch.equal(lora_layer.lora_A["default"].weight, ours.lora_down.double())
        assert torch.equal(lora_layer.lora_B["default"].weight, ours.lora_up.double())
        xin = x if name == "up" else torch.randn(4, 16, 128, dtype=torch.float64)
        with torch.no_grad():
            delta = lora_layer(xin) - lora_layer.base_layer(xin)
        branch = (xin @ ours.lora_down.double().T) @ ours.lora_up.double().T
        assert _rel(delta, branch) <= 1e-10
    if mixed_ranks:
        assert cfg["rank_pattern"] == cfg["alpha_pattern"] and len(cfg["rank_pattern"]) == 1


def test_peft_on_residual_base_reproduces_layer_weights(tmp_path):
    peft, base, q, _ = _peft_setup(tmp_path)
    base.load_state_dict(residual_base_state_dict(q, dtype=torch.float64), strict=False)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    merged = pm.merge_and_unload()
    for name in ("up", "down"):
        ours = q.get_submodule(name)
        t = dequantize(ours.packed_residual(), torch.float32).double() / ours.smooth.double()
        t = t + ours.lora_up.double() @ ours.lora_down.double()
        assert _rel(merged.get_submodule(name).weight, t) <= 1e-12


def test_peft_export_errors(tmp_path):
    q = _quantized()
    fold_branches(q)
    with pytest.raises(ValueError, match="rank 0"):
        export_peft(q, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cfg = export_peft(_quantized(), tmp_path / "b", module_prefix="model")
    assert cfg["target_modules"] == ["model.down", "model.up"]
    assert "base_model.model.model.up.lora_A.weight" in _read(tmp_path / "b" / "adapter_model.safetensors")


# ------------------------------------------------------------------------------- Megatron folded export


def _megatron_fold_worker(rank, world, out):
    from calib.calibrate import CalibConfig, calibrate
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
    from lora import LoraConfig, add_adapters
    from lora.framework.parallel import init_parallel
    from lora.io.folded import export_folded
    from lora.io.svdq_export import export_quantized, load_quantized
    from lora.modelopt_quant import fold_adapters

    init_parallel()
    cfg = TinyMoEConfig()
    batches = [tiny_moe_batch(cfg, batch=4, seed=s) for s in range(2)]

    def loop(m):
        for b in batches:
            m(b["tokens"], b["position_ids"], None)

    def logits(m):
        m.eval()
        with torch.no_grad():
            return m(batches[0]["tokens"], batches[0]["position_ids"], None)

    model = build_tiny_gpt_moe(cfg, seed=1)
    calibrate(model, loop, CalibConfig(svdq=svdq.SVDQConfig(rank=8, alphas=(0.0, 0.5)), progress=False))
    export_quantized(model, f"{out}/adapted", progress=False)
    a, b = build_tiny_gpt_moe(cfg, seed=2), build_tiny_gpt_moe(cfg, seed=3)
    load_quantized(a, f"{out}/adapted", progress=False)
    load_quantized(b, f"{out}/adapted", progress=False)
    direct = fold_adapters(b, forward_loop=loop)
    report = export_folded(a, f"{out}/folded", forward_loop=loop)
    fresh = build_tiny_gpt_moe(cfg, seed=4)
    load_quantized(fresh, f"{out}/folded", progress=False)
    plain = build_tiny_gpt_moe(cfg, seed=5)
    add_adapters(plain, LoraConfig(rank=4))
    try:
        export_folded(plain, f"{out}/plain")
        error = "no error"
    except ValueError as exc:
        error = str(exc)
    return {
        "report": report,
        "direct": direct,
        "folded_equal_direct": torch.equal(logits(a), logits(b)),
        "reloaded_exact": torch.equal(logits(fresh), logits(a)),
        "error": error,
    }


@pytest.mark.slow
def test_megatron_export_folded(tmp_path, capsys):
    from lora.io.container import CheckpointReader
    from tests.helpers.spawn import run_on_processes

    (r,) = run_on_processes(_megatron_fold_worker, 1, str(tmp_path), timeout=400)
    assert r["report"] == r["direct"]  # exactly fold_adapters' report
    assert len(r["report"]) == 2 * 2 + 2 * 4 * 2  # attention qkv / proj + every expert fc1 / fc2
    for name, e in r["report"].items():
        assert e["tokens"] > 0 and 0 < e["weight_err"] < e["delta_rel"], name
        assert {"act_weight_err", "output_err"} <= set(e)
    assert r["folded_equal_direct"] and r["reloaded_exact"]
    with CheckpointReader(tmp_path / "folded") as f:
        assert not any("lora" in k for k in f.keys())  # noqa: SIM118
        assert all(m["rank"] == 0 for m in f.metadata["layers"].values())
    assert "not an SVDQuant base" in r["error"] and "decoder.layers.0" in r["error"]
    assert not (tmp_path / "plain").exists()


# ------------------------------------------------------------------------------------------------- GPU


def _svdq_cfg(rank: int) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "svdquant", "lowrank": rank}
    return cfg


@pytest.mark.gpu
def test_exported_tensors_in_a_real_modelopt_svdquant_linear(tmp_path):
    """Our tensors loaded into modelopt's own SVDQuantLinear (its CUDA NVFP4 fake quantization)."""
    import modelopt.torch.quantization as mtq

    model = _quantized().cuda()
    export_modelopt_hf(model, tmp_path / "mo")
    tensors = {k: v.cuda() for k, v in _read(tmp_path / "mo" / "model.safetensors").items()}
    xs = _inputs_of(model, ["up", "down"], _data().cuda())
    for name, x in xs.items():
        ours = model.get_submodule(name)
        t = _layer_tensors(tensors, name)
        ref = nn.Sequential(nn.Linear(ours.in_features, ours.out_features, bias=ours.bias is not None)).cuda()
        mtq.quantize(ref, _svdq_cfg(8), lambda m, x=x: m(x))
        lin = ref[0]
        w = NVFP4QTensor(tuple(lin.weight.shape), torch.float32, t["weight"]).dequantize(
            dtype=torch.float32,
            scale=t["weight_scale"],
            double_scale=t["weight_scale_2"],
            block_sizes={-1: 16},
        )
        with torch.no_grad():
            lin.weight.copy_(w)  # the weight quantizer re-quantizes Q_w(R) to itself with the same scale
            lin.weight_quantizer.amax = t["weight_scale_2"] * 2688.0
            lin.input_quantizer.amax = t["input_scale"] * 2688.0
            lin.input_quantizer.pre_quant_scale = t["pre_quant_scale"]
            lin.weight_quantizer.svdquant_lora_a = t["weight_quantizer._svdquant_lora_a"]
            lin.weight_quantizer.svdquant_lora_b = t["weight_quantizer._svdquant_lora_b"]
            if ours.bias is not None:
                lin.bias.copy_(t["bias"])
            y_mo, y = lin(x), ours(x)
        assert _rel(y_mo, y) <= 1e-5, name
        assert _rel(modelopt_forward({k: v.cpu() for k, v in t.items()}, x.cpu()), y_mo.cpu()) <= 1e-5


@pytest.mark.gpu
def test_key_layout_matches_modelopt_hf_export(tmp_path):
    """modelopt's own export of a tiny NVFP4-SVDQuant Llama: same key suffixes, dtypes, shapes and
    hf_quant_config fields as ours; its tensors read back with this file's reference reproduce its layer."""
    transformers = pytest.importorskip("transformers")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        architectures=["LlamaForCausalLM"],
    )
    llm = transformers.LlamaForCausalLM(cfg).cuda().float()
    tokens = torch.randint(0, 128, (2, 16), device="cuda")
    mtq.quantize(llm, _svdq_cfg(8), lambda m: m(tokens))
    name = "model.layers.0.mlp.down_proj"
    seen = {}
    h = llm.get_submodule(name).register_forward_hook(
        lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach())
    )
    with torch.no_grad():
        llm(tokens)
    h.remove()
    export_hf_checkpoint(llm, export_dir=str(tmp_path / "ref"))
    ref = _read(tmp_path / "ref" / "model.safetensors")
    t_ref = _layer_tensors(ref, name)
    ref_cfg = json.loads((tmp_path / "ref" / "hf_quant_config.json").read_text())

    layer = SVDQLinear(
        quantize_tensor(torch.randn(64, 128), "nvfp4"),
        torch.rand(128) + 0.5,
        torch.randn(8, 128),
        torch.randn(64, 8),
        input_amax=1.0,
    )
    ours_cfg = export_modelopt_hf(nn.ModuleDict({"down_proj": layer}), tmp_path / "ours")
    t_ours = _layer_tensors(_read(tmp_path / "ours" / "model.safetensors"), "down_proj")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t_ours.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in t_ref.items()
    }
    assert ref_cfg["quantization"]["quant_algo"] == "NVFP4_SVD"
    for key in ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale"):
        assert ours_cfg["quantization"][key] == ref_cfg["quantization"][key], key
    y = modelopt_forward({k: v.cpu() for k, v in t_ref.items()}, seen["x"].cpu())
    assert _rel(y, seen["y"].cpu()) <= 1e-5
