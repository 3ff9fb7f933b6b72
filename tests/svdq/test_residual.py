"""The shared residual storage (``svdq.residual``) of ``svdq.SVDQLinear`` and ``lora.base.SVDQBase`` (on a
real Megatron ``ColumnParallelLinear``), in both storage modes, against a float64 dequantization written here
from the packed tensors (not from ``svdq.formats``).

Tolerances: the layers dequantize in float32 and cast to the layer dtype, so ``residual_weight`` is within
``2⁻²²`` relative of the float64 reference for a float32 layer and ``2⁻⁸`` for a bfloat16 one (one rounding
of the float32 value). Between the two classes and the two storage modes the residual is bit-identical.
"""

import pytest
import torch
from torch import nn

from svdq import InputStats, SVDQConfig, SVDQLinear, decompose_linear
from svdq.residual import STORAGE_MODES

pytestmark = pytest.mark.usefixtures("megatron_world")

IN, OUT, R = 64, 48, 4
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
REL_TOL = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8}
CASES = [(fmt, dtype) for fmt in ("nvfp4", "int4", "fp8") for dtype in (torch.float32, torch.bfloat16)]


def _result(fmt: str, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(OUT, IN, generator=g) * 0.1 * scale  # (OUT × IN) float32
    stats = InputStats(IN, sample_size=16)
    for _ in range(3):
        stats.update(torch.randn(8, IN, generator=g))
    cfg = SVDQConfig(rank=R, weight_format=fmt, act_format="nvfp4", alphas=(0.5,))
    return decompose_linear(W, stats, cfg, name="layer")


def _nibbles(qdata: torch.Tensor, even_low: bool) -> torch.Tensor:
    """uint8 ``(out, in/2)`` bytes -> codes ``(out, in)`` (nvfp4: element 2j low; int4: element 2j high)."""
    lo, hi = (qdata & 0x0F).long(), (qdata >> 4).long()
    pairs = (lo, hi) if even_low else (hi, lo)
    return torch.stack(pairs, dim=-1).reshape(qdata.shape[0], -1)


def _dequantize_f64(packed) -> torch.Tensor:
    """Float64 ``Q_w(R) (out × in)`` from the packed tensors, by the format definitions."""
    t, fmt = packed.to_tensors(), packed.fmt
    if fmt.name == "nvfp4":
        codes = _nibbles(t["qdata"], even_low=True)
        sign = torch.where(codes & 8 > 0, -1.0, 1.0).double()
        scale = t["scale"].double().repeat_interleave(16, dim=-1) * t["global_scale"].double()
        return sign * E2M1[codes & 7] * scale
    if fmt.name == "int4":
        codes = _nibbles(t["qdata"], even_low=False).double()
        return (codes - 8) / t["scale"].double().repeat_interleave(fmt.group_size, dim=-1)
    assert fmt.name == "fp8", fmt
    return t["qdata"].double() * t["scale"].double()


def _base(result, storage: str, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from lora.base import SVDQBase

    config = ModelParallelConfig(use_cpu_initialization=True, params_dtype=dtype)
    inner = ColumnParallelLinear(
        IN, OUT, config=config, init_method=nn.init.zeros_, bias=False, skip_bias_add=True, gather_output=True
    )
    return SVDQBase(inner, result.residual, result.smooth, "nvfp4", storage)


def _linear(result, storage: str, dtype: torch.dtype) -> SVDQLinear:
    return SVDQLinear.from_result(result, None, "nvfp4", storage=storage, dtype=dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t  # float8 tensors compare by their bytes


@pytest.mark.parametrize(("fmt", "dtype"), CASES)
def test_both_classes_hold_the_same_residual_in_both_modes(fmt, dtype):
    result = _result(fmt)
    ref = _dequantize_f64(result.residual)  # (OUT × IN) float64
    weights = []
    for storage in STORAGE_MODES:
        for layer in (_linear(result, storage, dtype), _base(result, storage, dtype)):
            w = layer.residual_weight() if storage == "fake" else layer.residual_weight(dtype)
            assert w.dtype == dtype and w.shape == (OUT, IN) == layer._shape
            err = (w.double() - ref).abs()
            assert bool((err <= REL_TOL[dtype] * ref.abs()).all()), (storage, type(layer).__name__)
            weights.append(w)
    for w in weights[1:]:
        assert torch.equal(w, weights[0])


@pytest.mark.parametrize(("fmt", "dtype"), CASES)
def test_state_dict_names_and_contents(fmt, dtype):
    result = _result(fmt)
    packed = {f"residual_{k}": t for k, t in result.residual.to_tensors().items()}
    lin_fake, lin_packed = _linear(result, "fake", dtype), _linear(result, "packed", dtype)
    base_fake, base_packed = _base(result, "fake", dtype), _base(result, "packed", dtype)

    own = ["lora_down", "lora_up", "smooth"]
    assert list(lin_fake.state_dict()) == [*own, "residual"]
    assert list(lin_packed.state_dict()) == [*own, *packed]
    assert [k for k in base_fake.state_dict() if not k.endswith("_extra_state")] == ["smooth", "inner.weight"]
    assert [k for k in base_packed.state_dict() if not k.endswith("_extra_state")] == [
        "smooth",
        *packed,
        "inner.weight",
    ]
    # fake: the dequantized residual, the same tensor in both classes; packed: the PackedTensor's tensors
    assert torch.equal(lin_fake.state_dict()["residual"], base_fake.state_dict()["inner.weight"])
    assert not base_fake.inner.weight.requires_grad
    assert base_packed.inner.weight.shape == (0,) and base_packed.inner.weight.dtype == dtype
    for layer in (lin_packed, base_packed):
        sd = layer.state_dict()
        for key, t in packed.items():
            assert sd[key].dtype == t.dtype and torch.equal(_bits(sd[key]), _bits(t))
        got = layer.packed_residual()
        assert got.meta() == result.residual.meta()
        for key, t in result.residual.to_tensors().items():
            assert torch.equal(_bits(got.to_tensors()[key]), _bits(t))
    for layer in (lin_fake, base_fake):
        with pytest.raises(RuntimeError, match="fake storage keeps only the dequantized residual"):
            layer.packed_residual()


@pytest.mark.parametrize("storage", STORAGE_MODES)
@pytest.mark.parametrize("make", [_linear, _base], ids=["SVDQLinear", "SVDQBase"])
def test_state_dict_round_trip_and_set_residual(make, storage):
    """A layer built from another residual (same format and shape) takes the first one's state dict, and
    ``set_residual`` gives what building from that residual gives."""
    dtype = torch.bfloat16
    first, second = _result("nvfp4"), _result("nvfp4", scale=3.0)
    src, dst = make(first, storage, dtype), make(second, storage, dtype)
    assert not torch.equal(src.residual_weight(dtype), dst.residual_weight(dtype))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.residual_weight(dtype), src.residual_weight(dtype))

    held = src.residual_weight() if storage == "fake" else None
    src.set_residual(second.residual)
    assert torch.equal(src.residual_weight(dtype), make(second, storage, dtype).residual_weight(dtype))
    if held is not None:  # fake storage: overwritten in place
        assert src.residual_weight() is held
    with pytest.raises(ValueError, match=r"residual shape \(48, 32\) != \(48, 64\)"):
        src.set_residual(_sliced(second.residual))


def _sliced(packed):
    from lora.framework.tp import shard_packed

    return shard_packed(packed, 1, 0, 2)  # (OUT × IN/2): a shape the layer does not take
