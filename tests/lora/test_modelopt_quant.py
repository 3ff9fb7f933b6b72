"""Adapters on nvidia-modelopt-quantized Megatron linears (both orders) and the fold into quantized bases.

References are float64 computations written out here: a modelopt-quantized linear computes
``y = Q_in(x)·Q_w(W)ᵀ`` with ``Q_in(x)`` / ``Q_w(W)`` read from its own quantizers (``input_quantizer``
applies the SmoothQuant ``pre_quant_scale``), and the adapter adds ``scaling·(x·Aᵀ)·Bᵀ`` on the raw input.
Tolerance: float32 layer outputs vs the float64 reference, ``rtol = atol = 1e-5`` (K ≤ 128 accumulations;
an adapter quantized to 8 bits would be off by ~1e-2 of the branch).
"""

from __future__ import annotations

import modelopt.torch.quantization as mtq
import pytest
import torch

from calib.tiny_moe import tiny_moe_batch
from lora import (
    LoraConfig,
    adapter_factors,
    adapter_modules,
    adapter_state_dict,
    add_adapters,
    disable_adapters,
    enable_adapters,
    freeze_base,
    merge_adapters,
)
from lora.adapters.layers import ExpertLoraLinear, LoraLinear
from lora.modelopt_quant import (
    exclude_adapters,
    fold_adapters,
    fold_weight,
    modelopt_quantize,
    unwrapped_adapters,
)
from svdq.formats import dequantize, fake_quant, quantize_tensor
from tests.helpers.lora import CFG, tiny_model

pytestmark = pytest.mark.usefixtures("megatron_world")

QCFGS = {
    "int8": mtq.INT8_DEFAULT_CFG,  # per-channel weights, per-tensor static inputs
    "int4_block": mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG,  # static blocks of 128 (here: whole rows), weight only
    "fp8": mtq.FP8_DEFAULT_CFG,  # per-tensor E4M3 weights and inputs
    "int8_sq": mtq.INT8_SMOOTHQUANT_CFG,  # SmoothQuant: pre_quant_scale on every input
}
LORA = LoraConfig(rank=4, alpha=8.0, init="random")  # scaling 2; fc1 shared-down, fc2 shared-up
LORA_MIXED = LoraConfig(
    rank=4, alpha=8.0, init="random", fc1_layout="per-expert", fc2_layout="shared-down", parallel_expert=True
)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _batch():
    return tiny_moe_batch(CFG, batch=2)


def _loop(model):
    b = _batch()
    return model(b["tokens"], b["position_ids"], None)


def _copy_adapters(src, dst):
    values = adapter_state_dict(src)
    with torch.no_grad():
        for key, f in adapter_factors(dst).items():
            f.param.copy_(values[key])


def _shrink_up(model, factor=0.1):
    """Adapters of a 'trained' size (``‖s·B·A‖`` ~ 0.4 ‖W‖ instead of several times ‖W‖)."""
    with torch.no_grad():
        for f in adapter_factors(model).values():
            if f.role == "up":
                f.param.mul_(factor)


def _factors(w):
    if isinstance(w, LoraLinear):
        return w.lora_down, w.lora_up, w.scaling
    A, B = w.local_factors()
    return A, B, w._expert_group.scaling


def _col_scale(base):
    p = base.input_quantizer.pre_quant_scale
    return torch.ones(base.weight.shape[1], dtype=torch.float64) if p is None else p.double().reshape(-1)


def _record(model):
    """Logits, and (wrapper, input, output) of every adapted linear call, over one forward."""
    recs, handles = [], []
    for m in model.modules():
        if isinstance(m, (LoraLinear, ExpertLoraLinear)):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, out: recs.append((mod, a[0].detach(), out[0].detach()))
                )
            )
    try:
        with torch.no_grad():
            logits = _loop(model)
    finally:
        for h in handles:
            h.remove()
    return logits, recs


def _reference(w, x, A=None, B=None):
    """float64 ``Q_in(x)·Q_w(W)ᵀ + s·(x·Aᵀ)·Bᵀ`` from the base's own quantizers."""
    base = w.base
    A0, B0, s = _factors(w)
    A = A0.detach().double() if A is None else A
    B = B0.detach().double() if B is None else B
    with torch.no_grad():
        xq = base.input_quantizer(x).double()
        wq = base.weight_quantizer(base.weight).double()
    return xq @ wq.T + s * (x.double() @ A.T) @ B.T, xq @ wq.T


def _quantizer_names(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def _tensors(sd):
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _check_against_float64(model):
    logits, recs = _record(model)
    assert len(recs) >= 2 * CFG.num_layers * 2  # qkv + proj per layer, plus the expert linears
    for w, x, y in recs:
        if x.numel() == 0:
            continue
        y64, base64 = _reference(w, x)
        torch.testing.assert_close(y.double(), y64, **TOL)
        branch = y64 - base64
        assert branch.abs().max() > 1e-3  # the adapter is active, so the check covers it
    return logits


# --------------------------------------------------------------------------------- both orders


@pytest.mark.parametrize("qname", list(QCFGS))
def test_both_orders_agree_and_match_float64(qname):
    cfg = QCFGS[qname]
    # (a) quantize, then add adapters
    a = tiny_model()
    mtq.quantize(a, cfg, _loop)
    add_adapters(a, LORA, seed=3)
    # (b) add adapters, then plain mtq.quantize; B = 0 while calibrating, so calibration sees the base
    b = tiny_model()
    add_adapters(b, LORA.replace(init="kaiming"), seed=3)
    mtq.quantize(b, cfg, _loop)
    _copy_adapters(a, b)
    # same quantizers and, state-dict keys being the base's own, the same quantizer state
    qa, qb = _quantizer_names(a), _quantizer_names(b)
    assert qa == qb
    assert not [n for n in qa + qb if "lora" in n]  # adapters carry no quantizer
    sa, sb = _tensors(a.state_dict()), _tensors(b.state_dict())
    assert sa.keys() == sb.keys() and any("_amax" in k for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # every adapted linear of both models against float64; the two orders give the same logits
    la = _check_against_float64(a)
    lb = _check_against_float64(b)
    assert torch.equal(la, lb)


def test_quantize_helper_matches_order_a_with_trained_adapters():
    """``lora.modelopt_quant.modelopt_quantize`` on a model whose adapters are non-zero: calibration runs on
    the unwrapped model, so the quantizers equal order (a)'s, and the expert linears get the expert-parallel
    groups (plain ``mtq.quantize`` leaves them on the dense groups: the finding of the module docstring)."""
    cfg = QCFGS["int8"]
    a = tiny_model()
    mtq.quantize(a, cfg, _loop)
    add_adapters(a, LORA_MIXED, seed=5)
    b = tiny_model()
    add_adapters(b, LORA_MIXED, seed=5)
    modelopt_quantize(b, cfg, _loop)
    sa, sb = _tensors(a.state_dict()), _tensors(b.state_dict())
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    assert _quantizer_names(a) == _quantizer_names(b)
    ka, kb = sorted(a.sharded_state_dict()), sorted(b.sharded_state_dict())
    assert ka == kb and any("weight_quantizer._amax" in k for k in ka) and any("lora_up" in k for k in ka)
    assert torch.equal(_check_against_float64(a), _check_against_float64(b))

    def expert_base(model):
        return model.decoder.layers[0].mlp.experts.base.local_experts[0].base.linear_fc1.base

    assert expert_base(a).parallel_state.expert_model_parallel_group.is_initialized()
    assert expert_base(b).parallel_state.expert_model_parallel_group.is_initialized()
    raw = tiny_model()
    add_adapters(raw, LORA_MIXED, seed=5)
    mtq.quantize(raw, cfg, _loop)
    assert not expert_base(raw).parallel_state.expert_model_parallel_group.is_initialized()
    # calibrate_with_adapters: the calibration forward sees the adapters, as plain mtq.quantize does
    c = tiny_model()
    add_adapters(c, LORA_MIXED, seed=5)
    modelopt_quantize(c, cfg, _loop, calibrate_with_adapters=True)
    sraw, sc = _tensors(raw.state_dict()), _tensors(c.state_dict())
    amax = [k for k in sc if k.endswith("input_quantizer._amax")]
    assert amax and all(torch.equal(sraw[k], sc[k]) for k in amax)
    assert any(not torch.equal(sa[k], sc[k]) for k in amax)  # the adapters changed layer-1 activations


def test_quant_cfg_patterns_see_unwrapped_names():
    """A ``quant_cfg`` pattern written for the plain model misses under plain ``mtq.quantize`` after
    ``add_adapters`` (the quantizers are named ``….linear_qkv.base.weight_quantizer``); the helper matches."""
    cfg = exclude_adapters(QCFGS["fp8"])  # a copy, with one more entry
    cfg["quant_cfg"].append({"quantizer_name": "*linear_qkv.weight_quantizer", "enable": False})

    def qkv_weight_quantizer(model):
        return model.decoder.layers[0].self_attention.linear_qkv.base.weight_quantizer

    raw = tiny_model()
    add_adapters(raw, LORA)
    mtq.quantize(raw, cfg, _loop)
    assert qkv_weight_quantizer(raw).is_enabled
    helped = tiny_model()
    add_adapters(helped, LORA)
    modelopt_quantize(helped, cfg, _loop)
    assert not qkv_weight_quantizer(helped).is_enabled
    assert helped.decoder.layers[0].self_attention.linear_proj.base.weight_quantizer.is_enabled


def test_unwrapped_adapters_and_exclude():
    model = tiny_model()
    add_adapters(model, LORA_MIXED)
    before = [(n, type(m)) for n, m in model.named_modules()]
    with unwrapped_adapters(model) as plain:
        assert not [m for m in plain.modules() if type(m).__module__ == "lora.adapters.layers"]
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    cfg = exclude_adapters(QCFGS["int8"])
    assert cfg["quant_cfg"][-1] == {"quantizer_name": "*lora*", "enable": False}
    assert cfg["quant_cfg"][:-1] == QCFGS["int8"]["quant_cfg"]


def test_modelopt_state_restores_inside_unwrapped_adapters():
    """modelopt's own state names modules: restore it on an adapted model inside ``unwrapped_adapters``
    (outside, modelopt finds no module for the recorded quantizer names)."""
    import modelopt.torch.opt as mto

    a = tiny_model()
    add_adapters(a, LORA, seed=1)
    modelopt_quantize(a, QCFGS["int8"], _loop)
    with unwrapped_adapters(a):
        state = mto.modelopt_state(a)
    c = tiny_model(seed=2)
    add_adapters(c, LORA, seed=9)
    with pytest.raises(Exception, match="Unmatched keys"):
        mto.restore_from_modelopt_state(c, state)
    c = tiny_model(seed=2)
    add_adapters(c, LORA, seed=9)
    with unwrapped_adapters(c):
        mto.restore_from_modelopt_state(c, state)
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(_loop(a), _loop(c))


def test_gradients_reach_only_adapters_and_match_float64():
    model = tiny_model()
    mtq.quantize(model, QCFGS["int8_sq"], _loop)
    add_adapters(model, LORA, seed=7)
    trainable = freeze_base(model)
    assert trainable and all("lora" in n for n in trainable)
    b = _batch()
    loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
    loss.backward()
    for n, p in model.named_parameters():
        if "lora" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)
    # one column (attention qkv) and one expert row (fc2, own lora_down + shared lora_up) layer vs float64
    _, recs = _record(model)
    picks = [r for r in recs if isinstance(r[0], LoraLinear)][:1]
    picks += [r for r in recs if isinstance(r[0], ExpertLoraLinear) and r[0].proj == "fc2" and r[1].numel()][
        :1
    ]
    for w, x, _ in picks:
        A, B, _s = _factors(w)
        A.grad = B.grad = None
        out = w(x)[0]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * g).sum().backward()
        A64 = A.detach().double().requires_grad_()
        B64 = B.detach().double().requires_grad_()
        y64, _ = _reference(w, x, A64, B64)
        (y64 * g.double()).sum().backward()
        for got, want in ((A.grad, A64.grad), (B.grad, B64.grad)):  # float32 sums over the tokens
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_merge_refuses_modelopt_base():
    model = tiny_model()
    mtq.quantize(model, QCFGS["fp8"], _loop)
    add_adapters(model, LORA)
    with pytest.raises(TypeError, match="unquantized"):
        merge_adapters(model)


# --------------------------------------------------------------------------------- fold: modelopt


def _grid_check(qname, wq, stored, folded):
    """``folded`` (the quantizer's output on the new stored weight) is ``stored`` re-quantized afresh."""
    stored, folded = stored.detach(), folded.detach()
    if qname in ("int8", "int8_sq", "int4_block"):
        qmax = 7 if qname == "int4_block" else 127
        amax = stored.abs().amax(dim=1, keepdim=True)  # int4 blocks of 128 span the whole 64-wide rows
        assert torch.equal(wq.amax.reshape(amax.shape), amax)
        step = amax.double() / qmax
        r = folded.double() / step
        assert (r - r.round()).abs().max() < 1e-3 and r.abs().max() <= qmax + 1e-3
        assert ((folded.double() - stored.double()).abs() / step).max() <= 0.5 + 1e-4
    elif qname == "fp8":
        assert torch.equal(wq.amax, stored.abs().amax())
        assert torch.equal(folded, fake_quant(stored, "fp8", global_amax=wq.amax))  # svdq.formats, bit-exact


@pytest.mark.parametrize("qname", list(QCFGS))
def test_fold_modelopt_base(qname):
    model = tiny_model()
    mtq.quantize(model, QCFGS[qname], _loop)
    add_adapters(model, LORA, seed=11)
    _shrink_up(model)
    logits, recs = _record(model)
    disable_adapters(model)
    with torch.no_grad():
        dropped = _loop(model)
    enable_adapters(model)
    # float64 targets T = Q_w(W)·diag(p) + s·B·A per linear, and the recorded inputs / outputs
    info = {}
    for w in [m for m in model.modules() if isinstance(m, (LoraLinear, ExpertLoraLinear))]:
        A, B, s = _factors(w)
        c = _col_scale(w.base)
        with torch.no_grad():
            T = w.base.weight_quantizer(w.base.weight).double() * c + s * B.double() @ A.double()
        key = (
            w.adapter_name
            if isinstance(w, LoraLinear)
            else (f"{w._expert_group.adapter_name}.experts.{w.global_index}.linear_{w.proj}")
        )
        xs = [x.reshape(-1, x.shape[-1]) for m, x, _ in recs if m is w]
        ys = [y.reshape(-1, y.shape[-1]) for m, _, y in recs if m is w]
        info[key] = (w.base, T, c, torch.cat(xs), torch.cat(ys), s * (B.double() @ A.double()))
    report = fold_adapters(model, forward_loop=_loop)
    assert not adapter_modules(model) and set(report) == set(info)
    for key, (base, T, c, x, y, delta) in info.items():
        r = report[key]
        assert r["format"].startswith("modelopt(") and r["tokens"] == x.shape[0]
        with torch.no_grad():
            folded = base.weight_quantizer(base.weight)
            W_f = folded.double() * c
            y_fold = base(x)[0]
        _grid_check(qname, base.weight_quantizer, base.weight, folded)
        torch.testing.assert_close(base.weight.double(), (T / c).float().double(), rtol=0, atol=0)

        def rel(a, b):
            return float(a.norm() / b.norm())

        x64 = x.double()
        assert r["weight_err"] == pytest.approx(rel(W_f - T, T), rel=1e-9)
        assert r["delta_rel"] == pytest.approx(rel(delta, T), rel=1e-9)
        assert r["act_weight_err"] == pytest.approx(rel(x64 @ (W_f - T).T, x64 @ T.T), rel=1e-9)
        assert r["output_err"] == pytest.approx(rel(y_fold.double() - y.double(), y.double()), rel=1e-6)
        bound = {"int8": 0.01, "int8_sq": 0.02, "fp8": 0.05, "int4_block": 0.15}[qname]
        assert r["weight_err"] < bound and r["weight_err"] < r["delta_rel"] / 3
    with torch.no_grad():
        folded_logits = _loop(model)
    assert (folded_logits - logits).norm() < 0.5 * (dropped - logits).norm()


def test_fold_without_recalibration_keeps_ranges():
    model = tiny_model()
    mtq.quantize(model, QCFGS["int8"], _loop)
    add_adapters(model, LoraConfig(rank=4, init="random", targets=("*.linear_qkv",)), seed=2)
    _shrink_up(model)
    base = model.decoder.layers[0].self_attention.linear_qkv.base
    amax = base.weight_quantizer.amax.clone()
    report = fold_adapters(model, "*layers.0.*", recalibrate=False)
    assert list(report) == ["decoder.layers.0.self_attention.linear_qkv"]
    assert torch.equal(base.weight_quantizer.amax, amax)
    assert list(adapter_modules(model)) == ["decoder.layers.1.self_attention.linear_qkv"]


# --------------------------------------------------------------------------------- fold: generic


@pytest.mark.parametrize("fmt", ["int4-g32", "nvfp4", "fp8-channel"])
def test_fold_weight_generic_vs_float64(fmt):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=g) * 0.05
    c = torch.rand(64, generator=g) + 0.5
    w_q = fake_quant(W, fmt)
    delta = (torch.randn(48, 4, generator=g) @ torch.randn(4, 64, generator=g)).double() * 0.01
    X = torch.randn(100, 64, generator=g)
    packed, r = fold_weight(w_q, delta, fmt, col_scale=c, inputs=X)
    T = w_q.double() * c.double() + delta
    stored = (T / c.double()).float()
    assert torch.equal(dequantize(packed), fake_quant(stored, fmt))
    W_f = dequantize(packed).double() * c.double()
    x64 = X.double()
    assert r["format"] == fmt
    assert r["weight_err"] == pytest.approx(float((W_f - T).norm() / T.norm()), rel=1e-12)
    assert r["delta_rel"] == pytest.approx(float(delta.norm() / T.norm()), rel=1e-12)
    assert r["act_weight_err"] == pytest.approx(
        float((x64 @ (W_f - T).T).norm() / (x64 @ T.T).norm()), rel=1e-12
    )
    assert 0 < r["weight_err"] < r["delta_rel"]


def test_fold_plain_base_with_weight_format():
    """A plain float base holding already-quantized values (e.g. after fake quantization) + weight_format."""
    model = tiny_model()
    fmt = "int4-g32"
    lin = model.decoder.layers[0].self_attention.linear_qkv
    with torch.no_grad():
        lin.weight.copy_(fake_quant(lin.weight, fmt))
    add_adapters(
        model, LoraConfig(rank=4, alpha=8.0, init="random", targets=("*.linear_qkv", "*.linear_proj"))
    )
    _shrink_up(model)
    with pytest.raises(TypeError, match="weight_format"):
        fold_adapters(model, "*layers.0.self_attention.linear_qkv")
    w = model.decoder.layers[0].self_attention.linear_qkv
    T = w.base.weight.double() + w.scaling * (w.lora_up.double() @ w.lora_down.double())
    report = fold_adapters(
        model, "*layers.0.self_attention.linear_qkv", weight_format=fmt, forward_loop=_loop
    )
    assert set(report) == {"decoder.layers.0.self_attention.linear_qkv"}
    assert torch.equal(lin.weight.detach(), fake_quant(T.float(), fmt))
    assert model.decoder.layers[0].self_attention.linear_qkv is lin
    r = report["decoder.layers.0.self_attention.linear_qkv"]
    assert r["weight_err"] == pytest.approx(float((lin.weight.double() - T).norm() / T.norm()), rel=1e-9)
    assert {"act_weight_err", "output_err"} <= set(r)
    merge_adapters(model, "*layers.1.*")
    with pytest.raises(RuntimeError, match="unmerged"):
        fold_adapters(model, "*layers.1.*", weight_format=fmt)


@pytest.mark.parametrize("storage", ["packed", "fake"])
def test_fold_svdq_base(storage):
    """An SVDQuant base (lora.base): its residual R (smoothed coordinates) becomes
    Q(R + s·B·A·diag(s)); and :func:`quantize` leaves such a base alone."""
    from lora.base import SVDQBase

    fmt, act = "int4-g32", "int4-g32"
    model = tiny_model()
    add_adapters(
        model, LoraConfig(rank=4, alpha=8.0, init="random", targets=("*layers.0.self_attention.linear_qkv",))
    )
    _shrink_up(model)
    w = model.decoder.layers[0].self_attention.linear_qkv
    inner = w.base
    s = torch.rand(inner.weight.shape[1], generator=torch.Generator().manual_seed(4)) + 0.5
    w.base = SVDQBase(inner, quantize_tensor((inner.weight.detach() * s).float(), fmt), s, act, storage)
    x = torch.randn(5, 2, s.shape[0], generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y_svdq = w(x)[0]
    modelopt_quantize(
        model, QCFGS["int8"], _loop
    )  # modelopt around it: the SVDQuant base's own linear stays as is
    assert not w.base.inner.weight_quantizer.is_enabled and not w.base.inner.input_quantizer.is_enabled
    assert model.decoder.layers[0].self_attention.linear_proj.weight_quantizer.is_enabled
    with torch.no_grad():
        assert torch.equal(w(x)[0], y_svdq)
    R_q = w.base.residual_weight().double()
    delta = w.scaling * (w.lora_up.double() @ w.lora_down.double())
    T = R_q / s.double() + delta  # raw coordinates
    report = fold_adapters(model, forward_loop=_loop)
    new_base = model.decoder.layers[0].self_attention.linear_qkv
    assert isinstance(new_base, SVDQBase) and not adapter_modules(model)
    R_new = new_base.residual_weight()
    assert torch.equal(R_new, fake_quant((T * s.double()).float(), fmt))
    r = report["decoder.layers.0.self_attention.linear_qkv"]
    W_f = R_new.double() / s.double()
    assert r["format"] == f"svdq({fmt})"
    assert r["weight_err"] == pytest.approx(float((W_f - T).norm() / T.norm()), rel=1e-9)
    # the folded layer: Q_a(x/s)·Q(R')ᵀ in float64
    with torch.no_grad():
        y = new_base(x)[0]
    xq = fake_quant((x / s).float(), act).double()
    torch.testing.assert_close(y.double(), xq @ R_new.double().T, **TOL)


# --------------------------------------------------------------------------------- NVFP4 (CUDA)


@pytest.mark.gpu
def test_nvfp4_both_orders_and_fold_cuda():
    cfg = mtq.NVFP4_DEFAULT_CFG
    a = tiny_model()
    mtq.quantize(a, cfg, _loop)
    add_adapters(a, LORA, seed=3)
    b = tiny_model()
    add_adapters(b, LORA, seed=3)
    modelopt_quantize(b, cfg, _loop)
    _copy_adapters(a, b)
    sa, sb = _tensors(a.state_dict()), _tensors(b.state_dict())
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_check_against_float64(a), _check_against_float64(b))
    _shrink_up(a)
    report = fold_adapters(a, forward_loop=_loop)
    assert report and not adapter_modules(a)
    lin = a.decoder.layers[0].self_attention.linear_qkv
    wq = lin.weight_quantizer
    assert torch.equal(wq.amax.float(), lin.weight.detach().abs().amax().float())
    folded = wq(lin.weight.detach())
    ours = fake_quant(lin.weight.detach(), "nvfp4", global_amax=wq.amax)  # svdq.formats' NVFP4 on the GPU
    assert (folded != ours).float().mean() < 1e-3
    for r in report.values():
        assert r["weight_err"] < 0.15 and r["weight_err"] < r["delta_rel"] / 2
