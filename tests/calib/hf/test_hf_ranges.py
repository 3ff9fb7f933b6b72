"""calib.hf.measure / calib.hf.to_hf: ``down_proj``'s ``input_scale`` in the HF-layout exports of a Megatron
model imported from HF is the range of the input the Hugging Face model gives ``down_proj`` — ``h`` — not of
Megatron's ``linear_fc2`` input ``h·p`` (the router probability multiplied in before fc2).

Models: the calibrated Megatron twins of tiny random Qwen3-MoE and Mixtral (top-2 of 4 experts, float32,
tests/calib/hf/test_to_hf_export.py), the same data (three batches) for calibration and export.

References, float64:

* the twin itself: a hook on each expert's ``linear_fc1`` keeps its output and ``h = silu(gate)·up`` is formed
  from it without any probability; ``input_scale · 6 · 448`` equals ``max|h·pqs|`` (``pqs`` the exported
  ``pre_quant_scale = 1/s``) times the layer's headroom — its static range over ``max|h·p·pqs|`` of the same
  pass, ``act_range_margin`` up to the layers before (svdq/DESIGN.md §20) — to 1e-5 relative (float32
  rounding of ``(h·p)/p`` and of the ratio) and exceeds,
  for every expert, ``max|x·pqs|`` of the input ``x = h·p`` its ``linear_fc2`` gets in the same pass (what
  the calibrated range measures; 0.35 – 0.75 of the new value here);
* the Hugging Face model: the inputs its own fused experts give ``down_proj`` (``silu(gate)·up`` of the
  routed tokens, hooked on the unquantized HF model) and our HF-model export (``svdq.quantize`` on the HF
  model, ``modelopt-hf``, its own smoothing). These differ from the twin by the 4-bit noise of the layers
  before (random tiny weights quantize badly) and the routing changes it causes, up to 2× for one expert's
  maximum over ~50 rows; so the check is the geometric mean over the 8 experts of the ratio (the HF model's
  maxima times the margin), within 1.25× (1.0 – 1.17 seen), while the probability-scaled values sit at 0.61×
  of the HF model's.

Also: ``folded`` (``smoothing="keep"``) writes the same ``down_proj`` ranges; without ``forward_loop`` both
exports raise one line naming it, before writing anything.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lora
from calib import CalibConfig, calibrate
from calib.hf.to_megatron import megatron_from_hf
from lora.io.modelopt_hf import export_modelopt_hf
from lora.io.sites import find_sites
from tests.calib.hf.test_to_hf_export import CFG, LAYOUT, _hf_loop, _hf_quantized, _mcore_loop, _names, _read
from tests.calib.hf.test_to_megatron import tiny_hf

ARCHS = ("qwen3_moe", "mixtral")
FP4_FP8 = 6.0 * 448.0
EXACT, RATIO = 1e-5, 1.25


_TWINS: dict = {}


def _megatron(model_type: str):
    """The calibrated twin, cached for this module (its process groups are this module's world's)."""
    if model_type not in _TWINS:
        model = megatron_from_hf(tiny_hf(model_type), spec="local").eval()
        calibrate(model, _mcore_loop, CalibConfig(svdq=CFG, layout=LAYOUT, progress=False))
        _TWINS[model_type] = model
    return _TWINS[model_type]


def _twin_h(model) -> tuple[dict, dict]:
    """``({(layer, expert): h (n, I)}, {(layer, expert): h·p (n, I)})`` float64 over the data: ``h`` formed
    from each expert's ``linear_fc1`` output, ``h·p`` what its ``linear_fc2`` actually gets."""
    got: dict = {}
    fc2: dict = {}
    handles = []
    for g, site in find_sites(model)[1].items():
        layer = int(g.split(".")[2])
        for e, mlp in enumerate(site.base.local_experts):

            def hook(m, args, out, key=(layer, e)):
                gate, up = out[0].detach().double().chunk(2, dim=-1)
                got.setdefault(key, []).append(F.silu(gate) * up)

            def pre(m, args, key=(layer, e)):
                fc2.setdefault(key, []).append(args[0].detach().double())

            handles.append(mlp.linear_fc1.register_forward_hook(hook))
            handles.append(mlp.linear_fc2.register_forward_pre_hook(pre))
    try:
        _mcore_loop(model)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}, {k: torch.cat(v) for k, v in fc2.items()}


def _hf_h(model_type: str) -> dict[tuple[int, int], torch.Tensor]:
    """``{(layer, expert): h (n, I)}`` float64: what the (unquantized) HF model's fused experts feed
    ``down_proj``, from a pre-hook on each experts module (routed tokens, no routing weight)."""
    hf = tiny_hf(model_type)
    got: dict = {}
    handles = []
    for name, m in hf.named_modules():
        if name.endswith("mlp.experts"):
            layer = int(name.split(".")[2])

            def hook(mod, args, kwargs, layer=layer):
                x, idx = args[0].detach().double(), args[1]
                x = x.reshape(-1, x.shape[-1])  # (T, H)
                for e in range(mod.gate_up_proj.shape[0]):
                    rows = (idx == e).any(dim=-1)
                    gate, up = (x[rows] @ mod.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
                    got.setdefault((layer, e), []).append(F.silu(gate) * up)

            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _hf_loop(hf)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def _down_scales(t: dict, model_type: str, num_layers: int = 2, num_experts: int = 4):
    name = _names(model_type)
    out = {}
    for layer in range(num_layers):
        for e in range(num_experts):
            n = name(f"model.layers.{layer}.mlp.experts.{e}.down_proj")
            out[(layer, e)] = (t[f"{n}.input_scale"], t[f"{n}.pre_quant_scale"])
    return out


def _fc2_ranges(model) -> dict[tuple[int, int], float]:
    """``{(layer, expert): input_amax}`` of each expert's ``linear_fc2`` base (Megatron semantics)."""
    out = {}
    for g, site in find_sites(model)[1].items():
        for e, mlp in enumerate(site.base.local_experts):
            out[(int(g.split(".")[2]), e)] = float(mlp.linear_fc2.base.input_amax)
    return out


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


@pytest.mark.parametrize("model_type", ARCHS)
def test_down_proj_input_scale_is_the_hf_input_range(megatron_world, model_type, tmp_path):
    model = _megatron(model_type)
    lora.export(model, tmp_path / "k", format="modelopt-hf", forward_loop=_mcore_loop)
    scales = _down_scales(_read(tmp_path / "k"), model_type)
    (twin, scaled), hf = _twin_h(model), _hf_h(model_type)
    export_modelopt_hf(_hf_quantized(model_type), tmp_path / "ref")
    hf_export = _down_scales(_read(tmp_path / "ref"), model_type)
    assert len(twin) == len(scales) == 8  # every expert got tokens
    ranges, k = _fc2_ranges(model), CFG.act_range_margin
    got, old, from_hf, ours_hf = {}, {}, {}, {}
    for key, (scale, pqs) in scales.items():  # pre_quant_scale = 1/s: the layer's input is x·pqs
        old[key] = float((scaled[key] * pqs.double()).abs().max())  # what the calibrated range measures
        # the calibration's range pass ran the layers before with dynamic ranges, this one with static ones
        # (random tiny weights: their maxima differ by up to ~1.6×)
        headroom = ranges[key] / old[key]
        assert k / 2 < headroom < 2 * k, (key, headroom)
        want = float((twin[key] * pqs.double()).abs().max()) * headroom
        got[key] = float(scale) * FP4_FP8 / headroom  # the HF-semantics maximum, margin divided out
        assert abs(got[key] * headroom - want) <= EXACT * want, (key, got[key], want)
        assert got[key] > old[key], (key, got[key], old[key])  # top-2: every p < 1
        from_hf[key] = float((hf[key] * pqs.double()).abs().max())
        ours_hf[key] = float(hf_export[key][0]) * FP4_FP8 / k  # svdq.quantize: k × its calibrated max
    keys = list(got)
    for ref in (from_hf, ours_hf):
        assert 1 / RATIO <= _geomean([got[k] / ref[k] for k in keys]) <= RATIO
    assert _geomean([old[key] / from_hf[key] for key in keys]) < 1 / RATIO  # h·p: clearly smaller


def test_folded_export_writes_the_same_down_proj_ranges(megatron_world, tmp_path):
    model = _megatron("mixtral")
    lora.export(model, tmp_path / "k", format="modelopt-hf", forward_loop=_mcore_loop)
    lora.export(model, tmp_path / "f", format="folded", forward_loop=_mcore_loop, verbose=False)
    kept = _down_scales(_read(tmp_path / "k"), "mixtral")
    folded = _down_scales(_read(tmp_path / "f"), "mixtral")
    assert all(torch.equal(kept[k][0], folded[k][0]) for k in kept)


@pytest.mark.parametrize("fmt", ["modelopt-hf", "folded"])
def test_exports_with_experts_need_a_forward_loop(megatron_world, fmt, tmp_path):
    msg = rf"format '{fmt}' of a Megatron model imported from HF needs forward_loop"
    with pytest.raises(ValueError, match=msg):
        lora.export(_megatron("qwen3_moe"), tmp_path / "x", format=fmt)
    assert not (tmp_path / "x").exists()
