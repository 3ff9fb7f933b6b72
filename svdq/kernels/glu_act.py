"""The gated activation of MoE experts with the routing probability, fused (svdq/DESIGN.md §16):
``a = (silu(gate) · (linear + offset)) · p`` in one pass over fc1's output, and its backward in one more.

Megatron's ``MLP.forward`` (unfused, ``bias_activation_fusion=False``) computes this as five elementwise
kernels forward (silu, add, two products, a cast) and about as many backward, each a round trip of an
``(S, F)`` tensor through memory; here the forward reads ``h`` once and writes ``a`` once, and the backward
reads ``h`` and ``da`` once and writes ``dh`` and ``dp``.

Tensors (``S`` rows, ``F`` the expert's ffn width, ``D`` h's dtype, ``P`` the probabilities' dtype)::

    h       D (S, 2F)   fc1's output: gate = h[:, :F], linear = h[:, F:]
    probs   P (S,)      routing probability of each row (float32 / bfloat16 / float16)
    a       D (S, F)    rnd_D(rnd_O(m · p)), m = rnd_D(rnd_D(silu(gate)) · rnd_D(linear + offset)),
                        O the promoted dtype of D and P (what PyTorch computes the product in)
    dh      D (S, 2F)   the gradients autograd gives the unfused form, expression for expression
    dp      P (S,)      Σ_f da · m (float32 sum in another order: accumulation-order tolerance)

The arithmetic is PyTorch's CUDA code: ``silu(x) = x / (1 + exp(-x))`` and its derivative
``dy · s · (1 + x · (1 − s))`` in float32 (libdevice ``expf``, IEEE divisions), each product rounded to
its output dtype as PyTorch rounds it; ``a`` and ``dh`` equal the unfused form bit for bit on CUDA. On the
CPU (Triton's interpreter) PyTorch's vectorized ``exp`` may differ from NumPy's in the last bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import DTYPE_CODES, interpreting, triton_available, use_triton

__all__ = ["MEASURED", "swiglu_prob", "swiglu_prob_applies", "swiglu_prob_reference"]

#: whether the kernel has been tested and timed on a GPU: until then backend ``"auto"`` keeps the unfused
#: form and only ``SVDQ_KERNELS=triton`` runs it (svdq.kernels.backend.use_triton)
MEASURED = False


if triton_available():
    import triton
    import triton.language as tl

    from .tl_helpers import as_f32, rnd_dt, to_dt

    try:  # libdevice's expf: what PyTorch's CUDA kernels call (tl.exp is an approximation on the GPU)
        from triton.language.extra import libdevice as _libdevice
    except ImportError:  # pragma: no cover - older Triton
        from triton.language.extra.cuda import libdevice as _libdevice

    @triton.jit
    def _exp(v, INTERPRET: tl.constexpr):
        if INTERPRET:
            return tl.exp(v)
        else:
            return _libdevice.exp(v)

    @triton.jit
    def _load_glu(h_ptr, rows64, cols, m2, F, OFFSET, DT: tl.constexpr, INTERPRET: tl.constexpr):
        """(gate, silu(gate) rounded to D, linear + offset rounded to D) of a (BLOCK_M, BLOCK_F) tile,
        as float32."""
        base = rows64[:, None] * (2 * F) + cols[None, :]
        g = as_f32(tl.load(h_ptr + base, mask=m2, other=0.0), DT, INTERPRET)
        lin = as_f32(tl.load(h_ptr + base + F, mask=m2, other=0.0), DT, INTERPRET)
        silu = rnd_dt(tl.div_rn(g, 1.0 + _exp(-g, INTERPRET)), DT, INTERPRET)
        return g, silu, rnd_dt(lin + OFFSET, DT, INTERPRET)

    @triton.jit
    def _glu_fwd_kernel(
        h_ptr, p_ptr, a_ptr, M, F, OFFSET,
        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, DT: tl.constexpr, PT: tl.constexpr,
        OT: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        m2 = row_ok[:, None] & (cols < F)[None, :]
        _, silu, lin = _load_glu(h_ptr, rows64, cols, m2, F, OFFSET, DT, INTERPRET)
        m = rnd_dt(silu * lin, DT, INTERPRET)
        p = as_f32(tl.load(p_ptr + rows64, mask=row_ok, other=0.0), PT, INTERPRET)  # (BLOCK_M,)
        a = rnd_dt(m * p[:, None], OT, INTERPRET)  # the product in the promoted dtype O, then cast to D
        tl.store(a_ptr + rows64[:, None] * F + cols[None, :], to_dt(a, DT, INTERPRET), mask=m2)

    @triton.jit
    def _glu_bwd_kernel(
        h_ptr, p_ptr, da_ptr, dh_ptr, dp_ptr, M, F, OFFSET,
        BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, DT: tl.constexpr, PT: tl.constexpr,
        OT: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        """One program per BLOCK_M rows, looping over F (the row sums of dp stay in registers)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        p = as_f32(tl.load(p_ptr + rows64, mask=row_ok, other=0.0), PT, INTERPRET)  # (BLOCK_M,)
        dp = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            m2 = row_ok[:, None] & (cols < F)[None, :]
            g, silu, lin = _load_glu(h_ptr, rows64, cols, m2, F, OFFSET, DT, INTERPRET)
            m = rnd_dt(silu * lin, DT, INTERPRET)
            da = tl.load(da_ptr + rows64[:, None] * F + cols[None, :], mask=m2, other=0.0)
            da = as_f32(da, DT, INTERPRET)
            dp += tl.sum(rnd_dt(da * m, OT, INTERPRET), axis=1)  # d(m · p)/dp in O, summed in float32
            dm = rnd_dt(rnd_dt(da * p[:, None], OT, INTERPRET), DT, INTERPRET)  # d(m · p)/dm in O, to D
            dsilu = rnd_dt(dm * lin, DT, INTERPRET)
            dlin = rnd_dt(dm * silu, DT, INTERPRET)
            s = tl.div_rn(1.0, 1.0 + _exp(-g, INTERPRET))
            dg = rnd_dt(dsilu * s * (1.0 + g * (1.0 - s)), DT, INTERPRET)
            base = rows64[:, None] * (2 * F) + cols[None, :]
            tl.store(dh_ptr + base, to_dt(dg, DT, INTERPRET), mask=m2)
            tl.store(dh_ptr + base + F, to_dt(dlin, DT, INTERPRET), mask=m2)
        tl.store(dp_ptr + rows64, to_dt(dp, PT, INTERPRET), mask=row_ok)


def _promoted(h: Tensor, probs: Tensor) -> int:
    """The DT code of the dtype PyTorch computes ``m · p`` in."""
    return DTYPE_CODES[torch.promote_types(h.dtype, probs.dtype)]


def _blocks() -> tuple[int, int]:
    return (16, 64) if interpreting() else (32, 128)


def _launch_fwd(h: Tensor, probs: Tensor, offset: float) -> Tensor:
    S, F2 = h.shape
    F_ = F2 // 2
    a = torch.empty(S, F_, dtype=h.dtype, device=h.device)  # (S, F)
    if S and F_:
        bm, bf = _blocks()
        _glu_fwd_kernel[(triton.cdiv(S, bm), triton.cdiv(F_, bf))](
            h, probs, a, S, F_, float(offset), BLOCK_M=bm, BLOCK_F=bf, DT=DTYPE_CODES[h.dtype],
            PT=DTYPE_CODES[probs.dtype], OT=_promoted(h, probs), INTERPRET=interpreting(), num_warps=4,
        )  # fmt: skip
    return a


def _launch_bwd(h: Tensor, probs: Tensor, da: Tensor, offset: float) -> tuple[Tensor, Tensor]:
    S, F2 = h.shape
    dh = torch.empty_like(h)  # (S, 2F)
    dp = torch.zeros(S, dtype=probs.dtype, device=h.device)  # (S,)
    if S and F2:
        bm, bf = _blocks()
        _glu_bwd_kernel[(triton.cdiv(S, bm),)](
            h, probs, da, dh, dp, S, F2 // 2, float(offset), BLOCK_M=bm, BLOCK_F=bf,
            DT=DTYPE_CODES[h.dtype], PT=DTYPE_CODES[probs.dtype], OT=_promoted(h, probs),
            INTERPRET=interpreting(), num_warps=4,
        )  # fmt: skip
    return dh, dp


class _SwiGLUProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, probs: Tensor, offset: float) -> Tensor:  # type: ignore[override]
        ctx.offset = offset
        ctx.save_for_backward(h, probs)
        return _launch_fwd(h, probs, offset)

    @staticmethod
    def backward(ctx, da: Tensor):  # type: ignore[override]
        h, probs = ctx.saved_tensors
        dh, dp = _launch_bwd(h, probs, da.contiguous(), ctx.offset)
        return dh, dp if ctx.needs_input_grad[1] else None, None


def swiglu_prob_applies(h: Tensor, probs: Tensor) -> bool:
    """Whether :func:`swiglu_prob` runs as the kernel on ``h (S, 2F)``, ``probs (S,)``: 2-D ``h`` of an
    even width, float32 / bfloat16 / float16 tensors on one device, and :func:`svdq.kernels.use_triton`
    (with :data:`MEASURED`)."""
    if h.dim() != 2 or h.shape[1] % 2 or probs.shape != (h.shape[0],):
        return False
    if h.dtype not in DTYPE_CODES or probs.dtype not in DTYPE_CODES:
        return False
    return use_triton(h, probs, who="swiglu_prob", measured=MEASURED)


def swiglu_prob_reference(h: Tensor, probs: Tensor, offset: float = 0.0) -> Tensor:
    """The unfused form (Megatron's ``MLP.forward`` with ``activation_func=F.silu``, gated): ``(S, F)``."""
    gate, linear = torch.chunk(h, 2, dim=-1)
    return (F.silu(gate) * (linear + offset) * probs.unsqueeze(-1)).to(h.dtype)


def swiglu_prob(h: Tensor, probs: Tensor, offset: float = 0.0) -> Tensor:
    """``a (S, F)`` of the module docstring, with gradients to ``h`` and ``probs``: the kernel where
    :func:`swiglu_prob_applies`, else :func:`swiglu_prob_reference`."""
    if not swiglu_prob_applies(h, probs):
        return swiglu_prob_reference(h, probs, offset)
    return _SwiGLUProb.apply(h.contiguous(), probs.contiguous(), float(offset))
