"""Dequantize packed 4-bit weights to 16 bits in one Triton pass, and the frozen product that uses it:
``x · deq(W_e)ᵀ`` by cuBLAS grouped GEMMs on the dequantized weight (svdq/DESIGN.md §16, "Two ways to
multiply by a 4-bit weight").

The fused kernel of :mod:`svdq.kernels.grouped_w4` reads 0.56 bytes per weight and dequantizes in its
prologue, which wins when few rows meet each weight (decoding, small batches); but its MMA pipeline is
Triton's, several times slower than cuBLAS per FLOP at training sizes. With many rows per expert it is
faster to write the 16-bit weight once (≈ 2.6 bytes per weight of memory traffic) and let
``torch._grouped_mm`` (or ``F.linear`` for one expert) run at the tensor cores' rate; the backward
dequantizes again instead of keeping the 16-bit copy (the base is frozen: only ``dx`` is needed), unless
:func:`keep_dequantized` (``SVDQ_KEEP_DEQUANT=1``) trades that memory for the second pass.

Tensors (``E`` experts, ``N`` outputs, ``K`` inputs, ``S`` rows sorted by expert)::

    weight   W4Weight: qdata uint8 (E, N, K/2); scale float8_e4m3fn (E, N, K/16) [nvfp4] or D (E, N, K/g)
             [int4]; global_scale float32 (E,) [nvfp4]
    W        dtype (E, N, K)    bf16 / fp16 / float32: bit for bit ``ExpertResiduals.dequantize(float32)``
                                (``E2M1[code] · (s_b · g)``; int4 ``rnd_D((code − 8) / m)``) cast to dtype
    x        bf16 / fp16 (S, K);  offs int32 (E,) cumulative rows (offs[-1] = S)
    u        x.dtype (S, r)     optional: LoRA down output of each row, with
    lora_up  x.dtype (E, N, r)  each expert's up factor: y += u · B_eᵀ inside the same GEMM, as r more
                                input columns ([x | u] · [deq(W_e) | B_e]ᵀ), differentiable in u and B
    y        x.dtype (S, N)
"""

from __future__ import annotations

import contextvars
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import get_backend, interpreting, triton_available
from .grouped_w4 import _OUT_KIND, W4Weight, _weight_args

__all__ = [
    "DEQUANT_MIN_ROWS",
    "dequant_lora_applies",
    "dequant_mm",
    "dequant_mm_preferred",
    "dequantize_w4",
    "keep_dequantized",
    "set_keep_dequantized",
]

#: whether the LoRA-up-in-the-GEMM product (:class:`_DequantLoraMM`) has been tested and timed on a GPU:
#: until then backend ``"auto"`` keeps two products and an addition, ``SVDQ_KERNELS=triton`` takes it
LORA_FOLD_MEASURED = False

#: rows per expert (on average) from which the dequantize-then-cuBLAS product beats the fused kernel on
#: Hopper (bench/bench_kernels_gemm.py: fused ≈ 110 TFLOP/s vs cuBLAS ≈ 550 plus ≈ 2.6 bytes per weight of
#: dequantization traffic ⇒ break-even near 128 rows)
DEQUANT_MIN_ROWS = 128

if triton_available():
    import triton
    import triton.language as tl

    from .grouped_w4 import _deq_tile, _e2m1, _e4m3, _round_bf16_f32, _store

    @triton.jit
    def _deq_blocked(
        q_ptr, s_ptr, e, n, k0, N, K, g,
        FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The tile of :func:`svdq.kernels.grouped_w4._deq_tile` (with the global scale), computed per
        quantization block: one scale load and one ``s_b · g`` per block of ``GROUP`` weights, broadcast over
        the block, instead of one per weight. Same expressions, so the same bits; ``K`` is a multiple of
        ``GROUP`` (the formats require it) and ``BLOCK_K`` of ``GROUP``."""
        HALF: tl.constexpr = BLOCK_K // 2
        NB: tl.constexpr = BLOCK_K // GROUP
        n_ok = n < N
        n64 = n.to(tl.int64)
        e64 = e.to(tl.int64)
        kb = k0 // 2 + tl.arange(0, HALF)
        b = tl.load(
            q_ptr + e64 * N * (K // 2) + n64[:, None] * (K // 2) + kb[None, :],
            mask=n_ok[:, None] & (kb[None, :] < K // 2),
            other=0x88,
        ).to(tl.int32)  # (BLOCK_N, HALF): two codes per byte
        lo = b & 15
        hi = b >> 4
        KG = K // GROUP
        blk = k0 // GROUP + tl.arange(0, NB)
        s_off = e64 * N * KG + n64[:, None] * KG + blk[None, :]  # (BLOCK_N, NB)
        s_mask = n_ok[:, None] & (blk[None, :] < KG)
        if FMT == 0:  # nvfp4: element 2j in the low nibble; E2M1 · (s_b · g)
            codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, NB, GROUP))
            mult = _e4m3(tl.load(s_ptr + s_off, mask=s_mask, other=0).to(tl.int32)) * g  # (BLOCK_N, NB)
            w = _e2m1(codes) * mult[:, :, None]
        else:  # int4: element 2j in the high nibble; rnd_D((code − 8) / m)
            codes = tl.reshape(tl.join(hi, lo), (BLOCK_N, NB, GROUP))
            q = (codes - 8).to(tl.float32)
            if SCALE_KIND == 1:  # bf16 multipliers as their int16 bits
                mb = tl.load(s_ptr + s_off, mask=s_mask, other=0x3F80).to(tl.int32) & 0xFFFF
                m = (mb << 16).to(tl.float32, bitcast=True)
                w = _round_bf16_f32(tl.math.div_rn(q, m[:, :, None]))
            elif SCALE_KIND == 2:
                m = tl.load(s_ptr + s_off, mask=s_mask, other=1.0).to(tl.float32)
                w = tl.math.div_rn(q, m[:, :, None]).to(tl.float16).to(tl.float32)
            else:
                m = tl.load(s_ptr + s_off, mask=s_mask, other=1.0)
                w = tl.math.div_rn(q, m[:, :, None])
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

    @triton.jit
    def _dequant_kernel(
        q_ptr, s_ptr, g_ptr, w_ptr, N, K, OUT_K,
        FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKED: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_N, BLOCK_K) tile of expert ``program_id(2)``'s weight, dequantized and stored into rows
        of ``OUT_K ≥ K`` elements; ``BLOCKED``: per quantization block (:func:`_deq_blocked`), else per
        weight (the GEMM's tile)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        e = tl.program_id(2)
        k = k0 + tl.arange(0, BLOCK_K)
        if FMT == 0:
            g = tl.load(g_ptr + e)
        else:
            g = 1.0
        if BLOCKED:
            w = _deq_blocked(q_ptr, s_ptr, e, n, k0, N, K, g, FMT, GROUP, SCALE_KIND, BLOCK_N, BLOCK_K)
        else:
            w = _deq_tile(q_ptr, s_ptr, e, n, k0, N, K, FMT, GROUP, SCALE_KIND, BLOCK_N, BLOCK_K, g, FMT == 0)
        e64 = e.to(tl.int64)
        ptr = w_ptr + e64 * N * OUT_K + n.to(tl.int64)[:, None] * OUT_K + k[None, :]
        _store(ptr, w, (n[:, None] < N) & (k[None, :] < K), OUT_KIND, INTERPRET)

    #: tile shapes tried on the GPU, the fastest kept per (N, K, format): (BLOCK_N, BLOCK_K, warps, blocked).
    #: The first is the per-weight tile measured on an H100 at ≈ 0.7 TB/s
    #: (bench/results/kernels/profile_lora_moe_h100.txt); the blocked ones load one scale per block.
    _TILES = [
        (32, 128, 4, False),
        (64, 256, 8, False),
        (32, 128, 4, True),
        (64, 128, 4, True),
        (64, 256, 8, True),
        (128, 256, 8, True),
        (16, 512, 4, True),
    ]
    _dequant_tuned = triton.autotune(
        [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCKED": blocked}, num_warps=w)
            for bn, bk, w, blocked in _TILES
        ],
        key=["N", "K", "FMT", "GROUP", "OUT_KIND"],
    )(_dequant_kernel)


#: under the interpreter: whether :func:`dequantize_w4` runs the per-block tile (tests run both)
_BLOCKED = contextvars.ContextVar("svdq_dequant_blocked", default=True)


def dequantize_w4(
    weight: object,
    dtype: torch.dtype = torch.bfloat16,
    *,
    extra_cols: int = 0,
    _tile: tuple[int, int, int, bool] | None = None,
) -> Tensor:
    """``W (E, N, K)`` of ``dtype`` (see the module docstring): a PackedTensor ``(N, K)`` gives ``(1, N, K)``.
    Equal bit for bit to the PyTorch reference ``dequantize(float32).to(dtype)``. ``extra_cols``: the result
    is ``(E, N, K + extra_cols)`` with ``W`` in the first ``K`` columns and the rest left uninitialized
    (for the caller to fill, e.g. with a LoRA up factor). ``_tile = (BLOCK_N, BLOCK_K, warps, blocked)``
    replaces the autotuned choice (tests)."""
    w = W4Weight.of(weight)
    if not triton_available():
        raise RuntimeError("dequantize_w4: triton is not installed")
    if not (w.qdata.is_cuda or interpreting()):
        raise ValueError(
            "dequantize_w4: the weight is on the CPU; the kernel needs CUDA (or TRITON_INTERPRET=1)"
        )
    if dtype not in _OUT_KIND:
        raise ValueError(f"dequantize_w4: dtype must be bf16, fp16 or float32, got {dtype}")
    E, N, K = w.num_experts, w.out_features, w.in_features
    if extra_cols < 0:
        raise ValueError(f"dequantize_w4: extra_cols must be >= 0, got {extra_cols}")
    KO = K + extra_cols
    out = torch.empty(E, N, KO, dtype=dtype, device=w.device)  # (E, N, K + extra_cols)
    if E * N * K == 0:
        return out
    q, scale, g, consts = _weight_args(w)  # the fused kernel's view of the packed tensors
    consts = {**consts, "OUT_KIND": _OUT_KIND[dtype]}

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]), E)

    if interpreting():  # small tiles under the interpreter (CPU tests); both tile forms where they apply
        blocked = _BLOCKED.get() and 128 % consts["GROUP"] == 0
        bk = 128 if blocked else 64
        _dequant_kernel[grid](q, scale, g, out, N, K, KO, **consts, BLOCK_N=16, BLOCK_K=bk, BLOCKED=blocked,
                              INTERPRET=True)  # fmt: skip
    elif _tile is not None:
        bn, bk, warps, blocked = _tile
        _dequant_kernel[grid](q, scale, g, out, N, K, KO, **consts, BLOCK_N=bn, BLOCK_K=bk, BLOCKED=blocked,
                              INTERPRET=False, num_warps=warps)  # fmt: skip
    else:
        _dequant_tuned[grid](q, scale, g, out, N, K, KO, **consts, INTERPRET=False)
    return out


def dequant_mm_preferred(x: Tensor, weight: W4Weight) -> bool:
    """Whether :func:`dequant_mm` should replace the fused kernel for ``x (S, K)``: CUDA bf16 with at least
    :data:`DEQUANT_MIN_ROWS` rows per expert on average and 16-byte-aligned sizes (cuBLAS grouped GEMM)."""
    E, N, K = weight.num_experts, weight.out_features, weight.in_features
    if not (x.is_cuda and x.dtype == torch.bfloat16 and N % 8 == 0 and K % 8 == 0):
        return False
    if E > 1 and not hasattr(torch, "_grouped_mm"):
        return False
    return x.shape[0] >= DEQUANT_MIN_ROWS * E


def _product(x: Tensor, W: Tensor, offs: Tensor, transpose: bool) -> Tensor:
    """``x_e · W_eᵀ`` (or ``x_e · W_e`` with ``transpose``) for the rows of each expert."""
    E = W.shape[0]
    if E == 1:
        return x @ W[0] if transpose else F.linear(x, W[0])
    mat = W if transpose else W.transpose(-2, -1)  # (E, K, N) for x · Wᵀ
    if x.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, mat, offs=offs)
    ends = offs.tolist()  # the interpreter's (CPU) path
    pieces = [x[s:e] @ mat[i] for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))]
    return torch.cat(pieces) if pieces else x.new_zeros(0, mat.shape[-1])


_keep = {"value": None}


def keep_dequantized() -> bool:
    """Whether :func:`dequant_mm` keeps the 16-bit weight from the forward for the backward (one
    dequantization pass per step instead of two, for ``2·E·N·K`` bytes more activation memory per
    projection); set by :func:`set_keep_dequantized`, else ``$SVDQ_KEEP_DEQUANT`` (``1`` / ``0``), default
    off: the 4-bit base exists to save memory."""
    if _keep["value"] is None:
        raw = os.environ.get("SVDQ_KEEP_DEQUANT", "0").strip().lower()
        if raw not in ("0", "1", "true", "false", ""):
            raise ValueError(f"SVDQ_KEEP_DEQUANT must be 0 or 1, got {raw!r}")
        _keep["value"] = raw in ("1", "true")
    return _keep["value"]


def set_keep_dequantized(keep: bool) -> None:
    """Keep (``True``) or re-dequantize (``False``) the 16-bit weight for the backward, for this process."""
    if not isinstance(keep, bool):
        raise ValueError(f"set_keep_dequantized: keep must be a bool, got {type(keep).__name__}")
    _keep["value"] = keep


class _DequantMM(torch.autograd.Function):
    """``y = x · deq(W)ᵀ`` per expert; backward ``dx = dy · deq(W)`` with the weight dequantized again, or
    the forward's copy under :func:`keep_dequantized`."""

    @staticmethod
    def forward(ctx, x, weight, offs):  # type: ignore[override]
        W = dequantize_w4(weight, x.dtype)  # (E, N, K), freed after the product unless kept
        keep = keep_dequantized() and ctx.needs_input_grad[0]
        ctx.weight = None if keep else weight
        ctx.save_for_backward(offs, W if keep else None)
        return _product(x, W, offs, transpose=False)  # (S, N)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        offs, W = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if W is None or W.dtype != dy.dtype:
            W = dequantize_w4(ctx.weight, dy.dtype)  # (E, N, K)
        return _product(dy.contiguous(), W, offs, transpose=True), None, None  # (S, K)


def _weight_with_up(weight: W4Weight, lora_up: Tensor, dtype: torch.dtype) -> Tensor:
    """``[deq(W_e) | B_e]``: ``(E, N, K + r)`` of ``dtype``, the dequantized weight with each expert's
    ``lora_up (E, N, r)`` as r more input columns."""
    K = weight.in_features
    W = dequantize_w4(weight, dtype, extra_cols=lora_up.shape[-1])  # (E, N, K + r)
    W[:, :, K:] = lora_up
    return W


def _up_grad(dy: Tensor, u: Tensor, offs: Tensor) -> Tensor:
    """``dB_e = dy_eᵀ · u_e`` per expert: ``(E, N, r)`` (zeros for an expert without rows)."""
    if dy.is_cuda and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(dy.t(), u, offs=offs)  # (E, N, r), fp32 accumulation
    ends = offs.tolist()  # the interpreter's (CPU) path
    return torch.stack([dy[s:e].t() @ u[s:e] for s, e in zip([0, *ends[:-1]], ends)])


class _DequantLoraMM(torch.autograd.Function):
    """``y = [x | u] · [deq(W) | B]ᵀ = x · deq(W)ᵀ + u · Bᵀ`` per expert as ONE grouped GEMM (the LoRA up
    product rides along as ``r`` more input columns: no second product, no ``(S, N)`` addition).
    Backward: ``[dx | du] = dy · [deq(W) | B]`` (one grouped GEMM) and ``dB_e = dy_eᵀ · u_e``."""

    @staticmethod
    def forward(ctx, x, u, weight, lora_up, offs):  # type: ignore[override]
        W = _weight_with_up(weight, lora_up, x.dtype)  # (E, N, K + r)
        keep = keep_dequantized() and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        ctx.weight = None if keep else weight
        ctx.save_for_backward(offs, u, lora_up, W if keep else None)
        return _product(torch.cat([x, u], dim=1), W, offs, transpose=False)  # (S, N)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        offs, u, lora_up, W = ctx.saved_tensors
        dy = dy.contiguous()
        dx = du = dB = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if W is None or W.dtype != dy.dtype:
                W = _weight_with_up(ctx.weight, lora_up, dy.dtype)  # (E, N, K + r)
            dxu = _product(dy, W, offs, transpose=True)  # (S, K + r)
            K = W.shape[-1] - u.shape[-1]
            dx, du = dxu[:, :K], dxu[:, K:]
        if ctx.needs_input_grad[3]:
            dB = _up_grad(dy, u, offs)  # (E, N, r)
        return dx, du, None, dB, None


def dequant_lora_applies(x: Tensor, weight: W4Weight, u: Tensor, lora_up: Tensor) -> bool:
    """Whether :func:`dequant_mm` should take ``(u, lora_up)`` into its GEMM: :func:`dequant_mm_preferred`,
    per-expert ``lora_up (E, N, r)`` in x's dtype with ``r`` a multiple of 8 (16-byte rows of ``[x | u]``),
    and more outputs than inputs (the ``(S, N)`` addition it saves outweighs the ``(S, K)`` copy of
    ``[x | u]``); under backend ``"auto"`` only once :data:`LORA_FOLD_MEASURED`."""
    E, N, K = weight.num_experts, weight.out_features, weight.in_features
    if get_backend() == "auto" and not LORA_FOLD_MEASURED:
        return False
    r = u.shape[-1]
    return (
        dequant_mm_preferred(x, weight)
        and lora_up.shape == (E, N, r)
        and u.shape == (x.shape[0], r)
        and u.dtype == x.dtype == lora_up.dtype
        and r > 0
        and r % 8 == 0
        and N >= K
    )


def dequant_mm(
    x: Tensor,
    weight: object,
    offs: Tensor | None = None,
    *,
    u: Tensor | None = None,
    lora_up: Tensor | None = None,
) -> Tensor:
    """``y[rows of e] = x[rows of e] · deq(W_e)ᵀ`` through a dequantized 16-bit weight and cuBLAS
    (``torch._grouped_mm`` for several experts); differentiable in ``x`` (the weight is frozen).
    ``offs`` as in :func:`svdq.kernels.grouped_w4_mm` (``None`` for one expert). With ``u (S, r)`` and
    per-expert ``lora_up (E, N, r)`` (both differentiable) it adds ``u_e · B_eᵀ`` inside the same GEMM
    (:class:`_DequantLoraMM`)."""
    w = W4Weight.of(weight)
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"dequant_mm: x must be (S, {w.in_features}), got {tuple(x.shape)}")
    if offs is None:
        if w.num_experts != 1:
            raise ValueError(f"dequant_mm: offs is needed for a weight of {w.num_experts} experts")
        offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
    if (u is None) != (lora_up is None):
        raise ValueError("dequant_mm: pass both u and lora_up, or neither")
    if u is not None:
        r = u.shape[-1]
        if u.shape != (x.shape[0], r) or lora_up.shape != (w.num_experts, w.out_features, r):
            raise ValueError(
                f"dequant_mm: u must be (S, r) and lora_up ({w.num_experts}, {w.out_features}, r), got "
                f"{tuple(u.shape)} and {tuple(lora_up.shape)}"
            )
        return _DequantLoraMM.apply(x.contiguous(), u.contiguous(), w, lora_up.to(x.dtype).contiguous(), offs)
    return _DequantMM.apply(x.contiguous(), w, offs)
