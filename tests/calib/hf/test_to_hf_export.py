"""calib.hf.to_hf: a Megatron model imported from HF (``megatron_from_hf``) and calibrated
(``calib.calibrate``, local spec, SequentialMLP experts) exports to nvidia-modelopt's HF layout under the
HF model's names.

Structure: for tiny random Qwen3-MoE and Mixtral (``tiny_hf``), ``lora.export(format="modelopt-hf")`` and
``format="folded"`` (``smoothing="fold"``, plain NVFP4) of the Megatron twin write exactly the tensor names,
dtypes and shapes, the ``hf_quant_config.json`` ``quantization`` and the ``config.json``
(``quantization_config`` and the model config) of our HF-model export (:mod:`lora.io.modelopt_hf`, itself
pinned to modelopt's ``export_hf_checkpoint`` in tests/lora/io/test_modelopt_hf_moe.py) of the same HF
model quantized with ``svdq.quantize``; the 16-bit tensors (norms, embeddings, routers, lm_head) equal
the HF model's bit for bit.

Numerics (float32 references): each exported linear read back as modelopt's ``SVDQuantLinear`` reads it
(E2M1 · E4M3 block scale · ``weight_scale_2``; input ``x·pre_quant_scale`` fake-quantized with modelopt's
CPU ``NVFP4QTensor`` at ``input_scale``; branch ``(x̃·lora_aᵀ)·lora_bᵀ``) reproduces, on the inputs each
Megatron linear received in a forward pass, that Megatron linear's output (activation quantization
included on both sides) — q / k / v re-interleaved into ``linear_qkv``'s rows, gate / up stacked into
``linear_fc1``'s — to 1e-5 relative (float32 round-off; the same bound as the HF-model export's test).
Folded: the dequantized exported weights, reassembled per Megatron linear, differ from the unfolded
effective weight ``T = Q_w(R)·diag(1/s) + B·A'`` (float64, from the live model) by exactly the reported
``weight_err`` (1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import lora
import svdq
from calib import CalibConfig, calibrate
from calib.hf.arch import get_arch
from calib.hf.arch.base import qkv_rows
from calib.hf.to_megatron import megatron_from_hf
from lora.io import api
from lora.io.folded import export_folded
from lora.io.folded_hf import export_folded_hf
from lora.io.modelopt_hf import export_modelopt_hf
from svdq import SVDQConfig
from svdq.formats import dequantize
from tests.calib.hf.test_to_megatron import SEQ, VOCAB, batch, tiny_hf

CFG = SVDQConfig(rank=4, alphas=(0.0, 0.5), sample_tokens=64)
LAYOUT = {"fc1": "shared-down", "fc2": "per-expert"}  # fixed: "auto" may choose differently on each side
ARCHS = ("qwen3_moe", "mixtral")
TOL = 1e-5
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_CACHE: dict = {}


def _tokens(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(s)) for s in range(n)]


def _mcore_loop(m) -> None:
    _, pos = batch()
    with torch.no_grad():
        for t in _tokens():
            m(t, pos, None)


def _hf_loop(m) -> None:
    with torch.no_grad():
        for t in _tokens():
            m(t)


def _megatron(model_type: str):
    """The calibrated Megatron twin of ``tiny_hf(model_type)`` (cached; callers must not change it)."""
    if ("mcore", model_type) not in _CACHE:
        model = megatron_from_hf(tiny_hf(model_type), spec="local").eval()
        calibrate(model, _mcore_loop, CalibConfig(svdq=CFG, layout=LAYOUT, progress=False))
        _CACHE[("mcore", model_type)] = model
    return _CACHE[("mcore", model_type)]


def _hf_quantized(model_type: str):
    if ("hf", model_type) not in _CACHE:
        model = tiny_hf(model_type)
        svdq.quantize(model, CFG, _hf_loop, layout=LAYOUT, progress=False, report=False)
        _CACHE[("hf", model_type)] = model
    return _CACHE[("hf", model_type)]


def _layout(d) -> dict:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def _read(d) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _json(d, name: str) -> dict:
    return json.loads((d / name).read_text())


def _assert_same_structure(ours, ref) -> None:
    assert _layout(ours) == _layout(ref)
    q_ours, q_ref = _json(ours, "hf_quant_config.json"), _json(ref, "hf_quant_config.json")
    assert q_ours["quantization"] == q_ref["quantization"]
    c_ours, c_ref = _json(ours, "config.json"), _json(ref, "config.json")
    drop = ("producer", "svdq")
    assert {k: v for k, v in c_ours["quantization_config"].items() if k not in drop} == {
        k: v for k, v in c_ref["quantization_config"].items() if k not in drop
    }
    rest = ("quantization_config", "svdq")
    assert {k: v for k, v in c_ours.items() if k not in rest} == {
        k: v for k, v in c_ref.items() if k not in rest
    }
    # the 16-bit tensors are the HF model's (calibration changes none of them)
    t_ours, t_ref = _read(ours), _read(ref)
    quantized = {k.removesuffix(".weight_scale_2") for k in t_ref if k.endswith(".weight_scale_2")}
    plain = [k for k in t_ref if k.rsplit(".", 1)[0] not in quantized and ".weight_quantizer." not in k]
    assert len(plain) > 4 and all(torch.equal(t_ours[k], t_ref[k]) for k in plain), plain


@pytest.mark.parametrize("model_type", ARCHS)
def test_kept_export_has_the_hf_export_structure(megatron_world, model_type, tmp_path):
    model = _megatron(model_type)
    assert api.model_kind(model) == "megatron-hf"
    out = lora.export(
        model, tmp_path / "k", format="modelopt-hf", forward_loop=_mcore_loop, metadata={"run": 1}
    )
    assert out.kind == "megatron-hf" and out.result["quantization"]["quant_algo"] == "NVFP4_SVD"
    export_modelopt_hf(_hf_quantized(model_type), tmp_path / "ref")
    _assert_same_structure(tmp_path / "k", tmp_path / "ref")
    meta = _json(tmp_path / "k", "config.json")["svdq"]
    assert meta["user"] == {"run": 1} and meta["model_kind"] == "megatron"
    assert meta["layers"]["model.layers.0.self_attn.k_proj"]["megatron"] == (
        "decoder.layers.0.self_attention.linear_qkv"
    )
    assert meta["experts"]["model.layers.1.mlp.experts"]["projections"]["fc1"]["layout"] == "shared-down"


@pytest.mark.parametrize("model_type", ARCHS)
def test_folded_export_has_the_hf_export_structure(megatron_world, model_type, tmp_path):
    model = _megatron(model_type)
    out = lora.export(
        model, tmp_path / "f", format="folded", smoothing="fold", forward_loop=_mcore_loop, verbose=False
    )
    assert out.layout == "modelopt HF NVFP4 layout, Hugging Face names"
    assert out.report and all(r["weight_err"] > 0 and "act_weight_err" in r for r in out.report.values())
    export_folded_hf(
        _hf_quantized(model_type), tmp_path / "ref", smoothing="fold", forward_loop=_hf_loop, verbose=False
    )
    _assert_same_structure(tmp_path / "f", tmp_path / "ref")
    assert _json(tmp_path / "f", "hf_quant_config.json")["quantization"]["quant_algo"] == "NVFP4"


# ------------------------------------------------------------------------------------ numerics


def _dequant_weight(t: dict, lin: str) -> torch.Tensor:
    """float32 ``(out, in)`` from ``weight`` / ``weight_scale`` / ``weight_scale_2``."""
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
    """``y`` of exported linear ``lin`` as modelopt's SVDQuantLinear reads it (module docstring)."""
    p = t.get(f"{lin}.pre_quant_scale")
    xt = x * p if p is not None else x
    y = F.linear(_act_quant(xt, t[f"{lin}.input_scale"]), _dequant_weight(t, lin), t.get(f"{lin}.bias"))
    a = t.get(f"{lin}.weight_quantizer._svdquant_lora_a")
    if a is not None:
        y = y + F.linear(F.linear(xt, a), t[f"{lin}.weight_quantizer._svdquant_lora_b"])
    return y


def _names(model_type: str):
    """In-memory HF name → checkpoint name (modelopt's reverse of transformers' conversion)."""
    from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper

    mapper = build_reverse_name_mapper(tiny_hf(model_type))
    if model_type == "mixtral":  # the checkpoint names differ from the in-memory ones
        assert (
            mapper("model.layers.0.mlp.experts.1.gate_proj") == "model.layers.0.block_sparse_moe.experts.1.w1"
        )
    return mapper or (lambda n: n)


def _megatron_io(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{Megatron linear: (input rows, output rows)}`` of one forward pass (dense sites, expert linears)."""
    from lora.io.sites import find_sites

    dense, groups = find_sites(model)
    mods = dict(dense)
    for g, site in groups.items():
        for i, e in enumerate(site.base.local_experts):
            mods[f"{g}.experts.{i}.linear_fc1"], mods[f"{g}.experts.{i}.linear_fc2"] = (
                e.linear_fc1,
                e.linear_fc2,
            )
    got: dict = {}

    def hook(m, args, out, key):
        x, y = args[0].detach(), out[0].detach()
        if x.numel():
            got.setdefault(key, []).append(
                (x.reshape(-1, x.shape[-1]).clone(), y.reshape(-1, y.shape[-1]).clone())
            )

    handles = [m.register_forward_hook(lambda m, a, o, k=k: hook(m, a, o, k)) for k, m in mods.items()]
    tokens, pos = batch()
    try:
        with torch.no_grad():
            model(tokens, pos, None)
    finally:
        for h in handles:
            h.remove()
    return {k: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for k, v in got.items()}


def _reassembled(t: dict, key: str, x: torch.Tensor, model_type: str, fn) -> torch.Tensor:
    """The Megatron linear ``key``'s output rows from its exported HF linears (``fn(t, hf_name, x)``)."""
    arch = get_arch(model_type)
    shape = arch.read_shape(tiny_hf(model_type).config)
    name = _names(model_type)
    layer = int(key.split(".")[2])
    if key.endswith("linear_qkv"):
        rows = qkv_rows(shape)
        parts = {p: fn(t, name(f"model.layers.{layer}.self_attn.{p}_proj"), x) for p in rows}
        out = torch.empty(*x.shape[:-1], sum(len(r) for r in rows.values()), dtype=parts["q"].dtype)
        for p, r in rows.items():
            out[..., r] = parts[p]
        return out
    if key.endswith("linear_proj"):
        return fn(t, name(f"model.layers.{layer}.self_attn.o_proj"), x)
    e = int(key.split(".")[-2])
    pre = f"model.layers.{layer}.mlp.experts.{e}"
    if key.endswith("linear_fc1"):
        return torch.cat([fn(t, name(f"{pre}.gate_proj"), x), fn(t, name(f"{pre}.up_proj"), x)], -1)
    return fn(t, name(f"{pre}.down_proj"), x)


@pytest.mark.parametrize("model_type", ARCHS)
def test_kept_export_reproduces_the_megatron_linears(megatron_world, model_type, tmp_path):
    model = _megatron(model_type)
    lora.export(model, tmp_path / "k", format="modelopt-hf", forward_loop=_mcore_loop)
    t = _read(tmp_path / "k")
    io = _megatron_io(model)
    t.update(_megatron_fc2_scales(model, model_type))  # down_proj's range is the HF one (test_hf_ranges.py)
    assert any(k.endswith("linear_qkv") for k in io) and any(k.endswith("linear_fc2") for k in io)
    for key, (x, y) in io.items():
        ref = _reassembled(t, key, x, model_type, _linear_ref)
        err = float((ref.double() - y.double()).norm() / y.double().norm())
        assert err <= TOL, (key, err)


def _megatron_fc2_scales(model, model_type: str) -> dict[str, torch.Tensor]:
    """``down_proj.input_scale`` from each live ``linear_fc2``'s own (probability-scaled) static range: the
    Megatron linear's output on Megatron's inputs needs the range it was run with."""
    from lora.io.modelopt_hf_layout import input_scale
    from lora.io.sites import find_sites

    name, out = _names(model_type), {}
    for g, site in find_sites(model)[1].items():
        layer = int(g.split(".")[2])
        for e, mlp in enumerate(site.base.local_experts):
            n = name(f"model.layers.{layer}.mlp.experts.{e}.down_proj")
            out[f"{n}.input_scale"] = input_scale(n, mlp.linear_fc2.base.input_amax)
    return out


def _effective(model, key: str) -> torch.Tensor:
    """``T = Q_w(R)·diag(1/s) + scaling·B·A'`` (float64) of a live Megatron linear (dense site or expert)."""
    from lora.io.sites import find_sites

    dense, groups = find_sites(model)
    if key in dense:
        w = dense[key]
        A, B, scaling = w.lora_down, w.lora_up, w.scaling
    else:
        g, _, rest = key.rpartition(".experts.")
        e, proj = int(rest.split(".")[0]), rest.split(".")[1]
        site = groups[g]
        w = getattr(site.base.local_experts[e], proj)
        (A, B), scaling = w.local_factors(), site.scaling
    base = w.base
    q = dequantize(base.packed_residual(), torch.float64)
    return q / base.smooth.double() + scaling * B.detach().double() @ A.detach().double()


@pytest.mark.parametrize("model_type", ARCHS)
def test_folded_weights_are_the_reported_fold_of_the_megatron_linears(megatron_world, model_type, tmp_path):
    model = _megatron(model_type)
    report = lora.export(
        model, tmp_path / "f", format="folded", smoothing="fold", forward_loop=_mcore_loop, verbose=False
    ).report
    t = _read(tmp_path / "f")
    assert not any(k.endswith("pre_quant_scale") or "_svdquant_" in k for k in t)
    name = _names(model_type)
    qk = [name(f"model.layers.0.self_attn.{p}_proj") for p in "qkv"]
    assert all(torch.equal(t[f"{n}.weight_scale_2"], t[f"{qk[0]}.weight_scale_2"]) for n in qk)
    assert all(torch.equal(t[f"{n}.input_scale"], t[f"{qk[0]}.input_scale"]) for n in qk)
    eye = {}
    for key, rep in report.items():
        T = _effective(model, key)
        if T.shape[1] not in eye:
            eye[T.shape[1]] = torch.eye(T.shape[1])
        w = _reassembled(t, key, eye[T.shape[1]], model_type, lambda t, n, x: x @ _dequant_weight(t, n).T).T
        err = float((w.double() - T).norm() / T.norm())
        assert abs(err - rep["weight_err"]) <= 1e-6 * max(1.0, rep["weight_err"]), (key, err, rep)


# ------------------------------------------------------------------------------------ route and errors


def test_route_keeps_plain_megatron_models_on_the_svdq_format(megatron_world):
    import copy

    plain = copy.copy(_megatron("qwen3_moe"))  # shallow: the same modules, without the HF origin
    plain.__dict__.pop(api.HF_ORIGIN, None)
    assert api.model_kind(plain) == "megatron"
    assert api.check_format("folded", "megatron").fn is export_folded
    with pytest.raises(ValueError, match="not Megatron models"):
        api.check_format("modelopt-hf", "megatron")
    assert api.check_format("svdq", "megatron-hf").kind == "megatron"  # falls back to the Megatron exporter


def test_fold_smoothing_needs_a_forward_loop(megatron_world, tmp_path):
    with pytest.raises(ValueError, match=r"smoothing='fold' needs forward_loop"):
        lora.export(_megatron("mixtral"), tmp_path / "x", format="folded", smoothing="fold")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_exports_a_megatron_twin_checkpoint_in_both_variants(tmp_path):
    """``svdq calibrate --model hf:DIR --backend megatron`` then ``svdq export --format modelopt-hf`` /
    ``--format folded --fold-smoothing fold --data builtin``: the HF names, modelopt's configs."""
    from tests.helpers import hf_models
    from tests.helpers.cli import no_temporaries, run_cli_cases

    qwen = hf_models.save(hf_models.build(hf_models.qwen3_moe_config(), seed=1), tmp_path / "qwen")
    c, k, f = tmp_path / "c", tmp_path / "k", tmp_path / "f"
    small = ["--tokens", "512", "--seq-len", "32"]
    cases = [
        ["calibrate", "--out", c, "--model", f"hf:{qwen}", "--backend", "megatron", *small, "--rank", "4"],
        ["export", "--checkpoint", c / "model", "--out", k, "--format", "modelopt-hf"],
        ["export", "--checkpoint", c / "model", "--out", f, "--format", "folded", "--fold-smoothing", "fold"]
        + ["--data", "builtin", *small],
    ]
    results = run_cli_cases(cases)
    assert [r[0] for r in results] == [0, 0, 0], [r[2][-3000:] for r in results]
    # no --data: the calibration's data is used, and said so on stderr (the svdq logger)
    assert "on the calibration data (--data builtin)" in results[1][2]
    assert "modelopt HF NVFP4 layout, Hugging Face names" in results[2][1]
    hf_cfg = json.loads((qwen / "config.json").read_text())
    for out, algo in ((k, "NVFP4_SVD"), (f, "NVFP4")):
        q = _json(out, "hf_quant_config.json")["quantization"]
        assert q["quant_algo"] == algo and "lm_head" in q["exclude_modules"]
        assert any(n.endswith("mlp.gate") for n in q["exclude_modules"])
        cfg = _json(out, "config.json")
        assert cfg["quantization_config"]["quant_algo"] == algo and cfg["model_type"] == hf_cfg["model_type"]
        t = _layout(out)
        assert "model.layers.0.self_attn.k_proj.weight_scale_2" in t
        assert "model.layers.1.mlp.experts.3.up_proj.input_scale" in t
        assert not any(k_.startswith("decoder.") for k_ in t)
    assert not no_temporaries(tmp_path)
