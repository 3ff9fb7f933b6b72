"""``SVDQConfig.act_range_margin``: static activation ranges with headroom (svdq/DESIGN.md §20).

The layer's range is ``k · max|x/s|`` of the calibration inputs (float32); held-out inputs up to ``k`` times
the calibrated maximum are quantized as the format does with that range — no block scale saturates, so
their error is that of per-call (dynamic) ranges — and larger ones clip at ``k · max``. Exports write the
range the layer uses: modelopt's ``input_scale = input_amax / (6·448)``, the svdq format's ``input_amax``.
References: an independent NVFP4 implementation (``tests/helpers/nvfp4_ref.py``) in float64.
"""

import pytest
import torch
from safetensors import safe_open
from torch import nn

import svdq
from svdq import SVDQConfig
from svdq.formats import fake_quant
from svdq.residual import quantize_activation
from tests.helpers.hf_moe import forward_loop_of, tiny_moe, token_batches
from tests.helpers.nvfp4_ref import nvfp4_fake_quant_ref

ULP = 2.0**-23


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)
        with torch.no_grad():
            for lin in (self.up, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _calibrated(margin: float):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 64, generator=g)
    X[:, :3] *= 15
    loop = lambda m: [m(b) for b in X.split(256)]  # noqa: E731
    cfg = SVDQConfig(rank=8, alphas=(0.0, 0.5), act_range_margin=margin)
    return svdq.quantize(TwoLayer(), cfg, loop, progress=False, report=False), X


def _err(q, x) -> float:
    return float((q.double() - x.double()).norm() / x.double().norm())


def test_config_margin_is_validated():
    assert SVDQConfig().act_range_margin >= 1.0
    for bad in (0.5, 0.0, float("nan")):
        with pytest.raises(ValueError, match="act_range_margin"):
            SVDQConfig(act_range_margin=bad)


@pytest.mark.parametrize("margin", [1.0, 4.0])
def test_range_is_margin_times_calibrated_max_and_in_the_summary(margin):
    model, X = _calibrated(margin)
    layer = model.up
    calib = float((X.double() / layer.smooth.double()).abs().max())  # the range pass sees the first layer's X
    s = layer.svdq_summary
    assert abs(s["calib_amax"] - calib) <= ULP * calib
    assert s["act_range_margin"] == margin and s["act_range"] == "static"
    want = torch.tensor(s["calib_amax"], dtype=torch.float32) * margin
    assert s["input_amax"] == float(layer.input_amax) == float(want)


def test_held_out_inputs_up_to_the_margin_are_not_clipped_beyond_clip_at_it():
    k = 4.0
    model, X = _calibrated(k)
    layer = model.up
    a = float(layer.svdq_summary["calib_amax"])
    fmt = layer.act_format
    for c in (1.5, 3.0, 3.9):  # held-out: the same tokens c times larger, up to the margin
        x = X * c
        xs = layer.smoothed_input(x)  # (n, in), max|xs| = c·a
        q = quantize_activation(x, layer.smooth, fmt, layer.input_amax)  # (n, in)
        ref = nvfp4_fake_quant_ref(xs, k * a)
        # the reference divides by the block scale in float64, the format in float32: a value on an E2M1
        # rounding boundary may take the neighbouring code (test_act_ranges.py)
        off = (q.double() - ref).abs() > 1e-6 * ref.abs()  # float32 result vs float64 reference
        assert off.float().mean() < 1e-3, c
        assert _err(q, ref) < 1e-3, c
        # no block scale saturates: the error is that of per-call ranges (the same up to the E4M3 rounding
        # of the block scales), far below that of the calibrated max without headroom (clipping)
        dyn = fake_quant(xs, fmt)
        clipped = quantize_activation(x, layer.smooth, fmt, torch.tensor(a))
        assert _err(q, xs) < 1.25 * _err(dyn, xs), c
        assert _err(clipped, xs) > (2 if c > 3 else 1.1) * _err(q, xs), c
        assert float(q.abs().max()) > a * c * (1 - 1 / 6 - 1 / 16)  # the largest value survives
    # beyond the margin values clip at k·max (block scale saturated at E4M3's 448: 6·448·g = k·a)
    x = X * (2 * k)
    q = quantize_activation(x, layer.smooth, fmt, layer.input_amax)
    top = float(q.abs().max())
    assert abs(top - k * a) <= 1e-6 * k * a, (top, k * a)


def test_int4_activations_ignore_the_margin():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=g)
    fmt = "int4-g32"
    cfg = SVDQConfig(rank=8, alphas=(0.5,), weight_format=fmt, act_format=fmt, act_range_margin=8.0)
    model = svdq.quantize(TwoLayer(), cfg, lambda m: m(X), progress=False, report=False)
    assert model.up.input_amax is None and model.up.svdq_summary["act_range_margin"] is None


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_exports_write_the_range_the_layer_uses(tmp_path):
    from lora.io.api import export
    from lora.io.modelopt_hf import export_modelopt_hf
    from svdq.experts import SVDQExperts

    k = 4.0
    model = tiny_moe("qwen3_moe")
    cfg = SVDQConfig(rank=8, alphas=(0.0, 0.5), sample_tokens=128, act_range_margin=k)
    svdq.quantize(model, cfg, forward_loop_of(token_batches(3)), progress=False, report=False)
    export_modelopt_hf(model, tmp_path / "mo")
    mo = _tensors(tmp_path / "mo" / "model.safetensors")
    export(model, tmp_path / "sv", "svdq")
    sv = {}
    for f in (tmp_path / "sv").glob("*.safetensors"):
        sv.update(_tensors(f))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, svdq.SVDQLinear):
            s = m.svdq_summary
            assert float(m.input_amax) == float(torch.tensor(s["calib_amax"], dtype=torch.float32) * k)
            assert torch.equal(mo[f"{name}.input_scale"], m.input_amax / (6.0 * 448.0)), name
            assert torch.equal(sv[f"{name}.input_amax"], m.input_amax), name
            checked += 1
        elif isinstance(m, SVDQExperts):
            for proj, hf in (("fc1", "gate_proj"), ("fc2", "down_proj")):
                amax = getattr(m, proj).input_amax  # (E,)
                calib = torch.tensor(m.svdq_summary[proj]["calib_amax"], dtype=torch.float32)
                assert torch.equal(amax, calib * k)
                assert torch.equal(sv[f"{name}.{proj}.input_amax"], amax)
                for e in range(amax.numel()):
                    assert torch.equal(mo[f"{name}.{e}.{hf}.input_scale"], amax[e] / (6.0 * 448.0)), (name, e)
                    checked += 1
    assert checked > 10
