"""modelopt's HF ("unified") layout for MoE models: our exports against nvidia-modelopt 0.47's own
``export_hf_checkpoint`` of the same tiny transformers model.

References:
- folded (``smoothing="fold"``, plain NVFP4): modelopt's ``mtq.quantize(NVFP4_DEFAULT_CFG)`` (max calibration
  runs on the CPU) + ``export_hf_checkpoint``; the two exports have the same tensor names, dtypes, shapes,
  ``hf_quant_config.json`` ``quantization`` and ``config.json`` ``quantization_config`` (values differ,
  the producer too).
- kept (``NVFP4_SVD``): modelopt's SVDQuant calibration needs CUDA and its export of an SVDQuant MoE with
  fused experts raises (``requantize_resmooth_fused_llm_layers`` calls ``len()`` on the fused experts
  module), and it leaves fused experts plain NVFP4. The reference is modelopt's export of the same model
  with its dense linears made SVDQuant linears the way its ``svdquant`` leaves them (``SVDQuantLinear``,
  ``svdquant_lora_a / _b``, ``pre_quant_scale``) and the resmoothing step (values only) skipped: dense
  tensors agree exactly in structure; expert tensors are modelopt's plus exactly the three NVFP4_SVD
  leaves of a linear, with that linear's shapes.
- numerics: the folded export read back with a float32 dequantizer written here (E2M1 table · E4M3 block
  scale · weight_scale_2; activations fake-quantized with modelopt's CPU ``NVFP4QTensor`` at the static
  ``input_scale``), per expert, reproduces our folded model's logits to 1e-5 (relative); the kept export's
  per-expert linears reproduce the SVDQExperts projections to 1e-5.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lora
import svdq
from lora.io.folded_hf import export_folded_hf, fold_branches
from lora.io.modelopt_hf import export_modelopt_hf
from svdq import SVDQConfig
from svdq.experts import SVDQExperts
from tests.helpers.hf_moe import forward_loop_of, static_ranges_with_headroom, tiny_moe, token_batches

CFG = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128)
FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe")
SVD_LEAVES = ("pre_quant_scale", "weight_quantizer._svdquant_lora_a", "weight_quantizer._svdquant_lora_b")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_CACHE: dict = {}


def _loop():
    return forward_loop_of(token_batches(3))


def _ours(family: str) -> nn.Module:
    """svdq.quantize'd tiny model of ``family`` (cached; callers must not change it)."""
    if ("ours", family) not in _CACHE:
        model = tiny_moe(family)
        svdq.quantize(model, CFG, _loop(), progress=False, report=False)
        _CACHE[("ours", family)] = model
    return _CACHE[("ours", family)]


def _layout(d) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def _read(d) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _json(d, name):
    return json.loads((d / name).read_text())


def _modelopt_export(family: str, out, svd: bool = False):
    """modelopt's own export of the tiny model (module docstring)."""
    import modelopt.torch.export.unified_export_hf as ue
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_moe(family)
    model.config.architectures = [type(model).__name__]  # modelopt's dummy forward reads it
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, _loop())
    if not svd:
        export_hf_checkpoint(model, export_dir=str(out))
        return
    from modelopt.torch.quantization.conversion import create_and_replace_svdquant_linear_on_the_fly
    from modelopt.torch.quantization.nn.modules.quant_linear import SVDQuantLinear

    create_and_replace_svdquant_linear_on_the_fly(model)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, SVDQuantLinear) and m.weight_quantizer.is_enabled:
            o, i = m.weight.shape
            m.weight_quantizer.svdquant_lora_a = torch.randn(CFG.rank, i, generator=g) * 0.01
            m.weight_quantizer.svdquant_lora_b = torch.randn(o, CFG.rank, generator=g) * 0.01
            m.input_quantizer.pre_quant_scale = torch.rand(i, generator=g) + 0.5
    original = ue.requantize_resmooth_fused_llm_layers
    ue.requantize_resmooth_fused_llm_layers = lambda model: None  # raises for fused experts (docstring)
    try:
        export_hf_checkpoint(model, export_dir=str(out))
    finally:
        ue.requantize_resmooth_fused_llm_layers = original


def _modelopt(family: str, tmp_path_factory, svd: bool = False):
    key = ("modelopt", family, svd)
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(f"mo_{family}_{int(svd)}")
        _modelopt_export(family, out, svd)
        _CACHE[key] = out
    return _CACHE[key]


def _without_producer(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("producer", "svdq")}


# ------------------------------------------------------------------------------------ folded: NVFP4


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_export_has_modelopt_nvfp4_layout(family, tmp_path, tmp_path_factory):
    ref = _modelopt(family, tmp_path_factory)
    report = export_folded_hf(
        _ours(family), tmp_path / "f", smoothing="fold", forward_loop=_loop(), verbose=False
    )
    assert _layout(tmp_path / "f") == _layout(ref)
    ours_q, ref_q = _json(tmp_path / "f", "hf_quant_config.json"), _json(ref, "hf_quant_config.json")
    assert ours_q["quantization"] == ref_q["quantization"]
    assert ours_q["quantization"]["quant_algo"] == "NVFP4"
    gates = [n for n in ours_q["quantization"]["exclude_modules"] if n.endswith("gate")]
    assert len(gates) == (4 if family == "qwen2_moe" else 2)  # routers (+ Qwen2's shared_expert_gate)
    ours_c, ref_c = _json(tmp_path / "f", "config.json"), _json(ref, "config.json")
    assert _without_producer(ours_c["quantization_config"]) == _without_producer(ref_c["quantization_config"])
    # the svdq metadata and the fold report: every linear and every expert projection, with its error
    meta = ours_c["svdq"]
    assert meta == ours_q["svdq"] and meta["export_format"] == "folded" and meta["smoothing"] == "fold"
    assert meta["source"]["experts"] and all(r["rank"] > 0 for r in meta["source"]["layers"].values())
    experts = [n for n, m in _ours(family).named_modules() if isinstance(m, SVDQExperts)]
    n_exp = sum(_ours(family).get_submodule(n).num_experts for n in experts)
    linears = [n for n, m in _ours(family).named_modules() if isinstance(m, svdq.SVDQLinear)]
    assert len(report) == len(linears) + 2 * n_exp == meta["fold"]["folded"]
    assert all(r["weight_err"] > 0 and "output_err" in r for r in report.values())


# ---------------------------------------------------------------------------------- kept: NVFP4_SVD


@pytest.mark.parametrize("family", ("mixtral", "qwen3_moe", "olmoe"))
def test_kept_export_has_modelopt_svd_layout(family, tmp_path, tmp_path_factory):
    ref = _modelopt(family, tmp_path_factory, svd=True)
    cfg = export_modelopt_hf(_ours(family), tmp_path / "k")
    ours, theirs = _layout(tmp_path / "k"), _layout(ref)
    dense = {k: v for k, v in ours.items() if ".experts." not in k}
    assert dense == {k: v for k, v in theirs.items() if ".experts." not in k}
    exp_ours = {k: v for k, v in ours.items() if ".experts." in k}
    exp_ref = {k: v for k, v in theirs.items() if ".experts." in k}
    assert {k: exp_ours[k] for k in exp_ref} == exp_ref  # every modelopt expert tensor, same dtype/shape
    extra = set(exp_ours) - set(exp_ref)
    linears = {k.rsplit(".weight_scale_2", 1)[0] for k in exp_ref if k.endswith(".weight_scale_2")}
    assert extra == {f"{lin}.{leaf}" for lin in linears for leaf in SVD_LEAVES}
    for lin in linears:  # the NVFP4_SVD leaves have the shapes of that linear
        out_f, half = exp_ref[f"{lin}.weight"][1]
        (r, in_f) = exp_ours[f"{lin}.{SVD_LEAVES[1]}"][1]
        assert in_f == 2 * half and exp_ours[f"{lin}.{SVD_LEAVES[0]}"][1] == (in_f,)
        assert exp_ours[f"{lin}.{SVD_LEAVES[2]}"][1] == (out_f, r) and r > 0
    # the config: one NVFP4_SVD entry as modelopt writes it for an SVDQuant linear, modelopt's exclusions
    svd_entry = next(
        v for v in _json(ref, "hf_quant_config.json")["quantization"]["quantized_layers"].values()
    )
    q = cfg["quantization"]
    assert {k: q[k] for k in svd_entry} == svd_entry
    nvfp4 = _json(_modelopt(family, None), "hf_quant_config.json")["quantization"]
    assert q["exclude_modules"] == nvfp4["exclude_modules"]
    assert _json(tmp_path / "k", "config.json")["quantization_config"]["quant_algo"] == "NVFP4_SVD"


def _dequant_weight(t: dict, lin: str) -> torch.Tensor:
    """float32 ``(out, in)`` from ``weight`` / ``weight_scale`` / ``weight_scale_2`` (E2M1 · E4M3 · g)."""
    q = t[f"{lin}.weight"]
    codes = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(q.shape[0], -1).long()  # element 2j low nibble
    vals = E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()
    scale = t[f"{lin}.weight_scale"].float().repeat_interleave(16, dim=-1)
    return vals * scale * t[f"{lin}.weight_scale_2"].float()


def _act_quant(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    q, sc, g = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=input_scale)
    return q.dequantize(dtype=x.dtype, scale=sc, double_scale=g, block_sizes={-1: 16})


def _linear_ref(t: dict, lin: str, x: torch.Tensor) -> torch.Tensor:
    """``y`` of exported linear ``lin`` as modelopt's SVDQuantLinear reads it (x·p, Q_a, Ŵ, branch)."""
    p = t.get(f"{lin}.pre_quant_scale")
    xt = x * p if p is not None else x
    y = F.linear(_act_quant(xt, t[f"{lin}.input_scale"]), _dequant_weight(t, lin), t.get(f"{lin}.bias"))
    if f"{lin}.{SVD_LEAVES[1]}" in t:
        y = y + F.linear(F.linear(xt, t[f"{lin}.{SVD_LEAVES[1]}"]), t[f"{lin}.{SVD_LEAVES[2]}"])
    return y


class _RefLinear(nn.Module):
    def __init__(self, t, name):
        super().__init__()
        self.t, self.name = t, name

    def forward(self, x):
        return _linear_ref(self.t, self.name, x)


class _RefExperts(nn.Module):
    """Experts forward from the per-expert exported linears: ``act(gate)·up`` then down, per expert."""

    def __init__(self, t, name, num_experts, act):
        super().__init__()
        self.t, self.name, self.E, self.act = t, name, num_experts, act

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.E):
            tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            x, pre = hidden_states[tok], f"{self.name}.{e}"
            h = self.act(_linear_ref(self.t, f"{pre}.gate_proj", x)) * _linear_ref(
                self.t, f"{pre}.up_proj", x
            )
            y = _linear_ref(self.t, f"{pre}.down_proj", h)
            out.index_add_(0, tok, y * top_k_weights[tok, slot].unsqueeze(-1))
        return out


@pytest.mark.parametrize("family", ("qwen3_moe", "olmoe", "qwen2_moe"))  # checkpoint = in-memory names
def test_folded_export_dequantized_reproduces_folded_logits(family, tmp_path):
    model = _ours(family)
    export_folded_hf(model, tmp_path / "f", smoothing="fold", forward_loop=_loop(), verbose=False)
    folded = copy.deepcopy(model)
    fold_branches(folded, smoothing="fold", forward_loop=_loop())
    t = _read(tmp_path / "f")
    ref = tiny_moe(family, seed=99)  # other weights: everything comes from the files
    for name, m in list(folded.named_modules()):
        if isinstance(m, svdq.SVDQLinear):
            ref.set_submodule(name, _RefLinear(t, name))
        elif isinstance(m, SVDQExperts):
            act = ref.get_submodule(name).act_fn
            ref.set_submodule(name, _RefExperts(t, name, m.num_experts, act))
    plain = {k: v for k, v in t.items() if k in ref.state_dict()}
    assert set(plain) == set(ref.state_dict())  # norms, embeddings, routers, lm_head
    ref.load_state_dict(plain)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        y, y_ref = folded(ids).logits, ref(ids).logits
    assert float((y - y_ref).norm() / y.norm()) <= 1e-5


def test_folded_export_input_scale_is_the_layers_static_range(tmp_path):
    """``smoothing="fold"``: every exported ``input_scale · 6·448`` equals the static range the folded layer
    uses (``fold_branches``) and ``max|x| · input_amax / max|x/s|`` over the export's forward_loop
    (float64 reference), 1e-6 relative: the headroom of svdq/DESIGN.md §20 carried to raw coordinates."""
    model = _ours("qwen3_moe")
    loop = forward_loop_of(token_batches(2, seed=5))  # not the calibration data
    ranges = static_ranges_with_headroom(model, loop)
    export_folded_hf(model, tmp_path / "f", smoothing="fold", forward_loop=loop, verbose=False)
    folded = copy.deepcopy(model)
    fold_branches(folded, smoothing="fold", forward_loop=loop)
    t = _read(tmp_path / "f")
    checked = 0
    for name, m in folded.named_modules():
        if isinstance(m, svdq.SVDQLinear):
            want = {name: (float(m.input_amax), float(ranges[name]))}
        elif isinstance(m, SVDQExperts):
            want = {}
            for p, parts in (("fc1", ("gate_proj", "up_proj")), ("fc2", ("down_proj",))):
                used, ref = m.projections()[p].input_amax, ranges[f"{name}.{p}"]
                for e in range(m.num_experts):
                    want |= {f"{name}.{e}.{nm}": (float(used[e]), float(ref[e])) for nm in parts}
        else:
            continue
        for lin, (used, ref) in want.items():
            exported = float(t[f"{lin}.input_scale"]) * 6 * 448
            assert exported == pytest.approx(used, rel=1e-6) and exported == pytest.approx(ref, rel=1e-6), lin
            checked += 1
    assert checked >= 8
    # the headroom is real: above max|x| (act_range_margin 16 on the calibration data)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert float(t[f"{q_proj}.input_scale"]) * 6 * 448 > 4 * float(
        static_ranges_with_headroom(_plain_copy(model), loop)[q_proj]
    )


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose layers have no static range (``static_ranges_with_headroom`` then gives
    ``max|x|``)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, svdq.SVDQLinear):
            mod.set_input_amax(None)
        elif isinstance(mod, SVDQExperts):
            for proj in mod.projections().values():
                proj.set_input_amax(None)
    return m


def test_kept_expert_linears_reproduce_svdq_experts(tmp_path):
    """Per expert, the exported gate / up / down linears (shared lora_down copied into every expert's
    lora_a) give the SVDQExperts projection outputs."""
    model = _ours("qwen3_moe")
    export_modelopt_hf(model, tmp_path / "k")
    t = _read(tmp_path / "k")
    name = "model.layers.0.mlp.experts"
    layer = model.get_submodule(name)
    inter = layer.intermediate_size
    assert layer.fc1.layout == "shared-down"
    g = torch.Generator().manual_seed(3)
    from lora.io.fold_experts import _expert_output

    for e in range(layer.num_experts):
        pre = f"{name}.{e}"
        a_gate, a_up = t[f"{pre}.gate_proj.{SVD_LEAVES[1]}"], t[f"{pre}.up_proj.{SVD_LEAVES[1]}"]
        assert torch.equal(a_gate, a_up) and torch.equal(a_gate, t[f"{name}.0.gate_proj.{SVD_LEAVES[1]}"])
        assert torch.equal(t[f"{pre}.gate_proj.weight_scale_2"], t[f"{pre}.up_proj.weight_scale_2"])
        x = torch.randn(12, layer.hidden_size, generator=g)
        h = torch.randn(12, inter, generator=g)
        with torch.no_grad():
            y1, y2 = _expert_output(layer.fc1, x, e), _expert_output(layer.fc2, h, e)
        ref1 = torch.cat([_linear_ref(t, f"{pre}.gate_proj", x), _linear_ref(t, f"{pre}.up_proj", x)], -1)
        assert float((ref1 - y1).norm() / y1.norm()) <= 1e-5
        assert float((_linear_ref(t, f"{pre}.down_proj", h) - y2).norm() / y2.norm()) <= 1e-5


# -------------------------------------------------------------------------------- api and bad input


def test_api_exports_moe_models_in_both_variants(tmp_path):
    model = _ours("olmoe")
    kept = lora.export(model, tmp_path / "k", format="modelopt-hf", metadata={"source": "tiny-olmoe"})
    assert kept.result["quantization"]["quant_algo"] == "NVFP4_SVD"
    assert kept.result["svdq"]["user"] == {"source": "tiny-olmoe"}
    fc1 = kept.result["svdq"]["experts"]["model.layers.0.mlp.experts"]["projections"]["fc1"]
    assert fc1["layout"] == "shared-down" and fc1["rank"] > 0
    folded = lora.export(model, tmp_path / "f", format="folded", smoothing="fold", forward_loop=_loop())
    assert (
        folded.report
        and _json(tmp_path / "f", "hf_quant_config.json")["quantization"]["quant_algo"] == "NVFP4"
    )
    assert lora.io.api.detect_format(tmp_path / "f") == "modelopt-hf"


def test_missing_expert_ranges_are_filled_from_the_others(tmp_path):
    model = copy.deepcopy(_ours("olmoe"))
    name = "model.layers.1.mlp.experts"
    proj = model.get_submodule(name).fc2
    amax = proj.input_amax.clone()
    amax[2] = 0.0  # expert 2 dynamic: modelopt's fallback, the maximum over the experts
    proj.set_input_amax(amax)
    cfg = export_modelopt_hf(model, tmp_path / "k")
    assert cfg["svdq"]["experts"][name]["projections"]["fc2"]["filled_input_scale"] == [2]
    t = _read(tmp_path / "k")
    assert torch.equal(t[f"{name}.2.down_proj.input_scale"], amax.max() / (6.0 * 448.0))
    model.get_submodule(name).fc2.set_input_amax(None)
    with pytest.raises(ValueError, match=rf"{name}\.fc2: no expert has a static activation range"):
        export_modelopt_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_experts_handler_is_refused_before_writing(tmp_path):
    model = tiny_moe("gpt_oss")
    svdq.quantize(model, CFG, _loop(), progress=False, report=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: .*handler 'gpt-oss'"):
        export_modelopt_hf(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()
