"""Grouped 4-bit residual GEMM with the per-expert ``lora_up`` in the epilogue, forward and backward
(svdq/DESIGN.md §16, "Grouped 4-bit GEMM").

One launch computes, for the rows of every expert ``e`` (rows sorted by expert)::

    y[rows of e] = x[rows of e] · deq(W_e)ᵀ  +  u[rows of e] · lora_up_eᵀ

with the 4-bit weights dequantized in the kernel's prologue (two codes per byte, block / group scales),
bf16 or fp16 MMA with fp32 accumulation, the NVFP4 per-tensor global scale applied to the fp32 accumulator
after the K loop, and the LoRA up-projection accumulated into the same fp32 tile. The base weight is frozen;
the backward gives ``dx = dy · deq(W_e)`` (the same dequantizing kernel, weight read transposed), ``du`` and
``d lora_up``.

Tensors (``S`` rows, ``E`` experts, ``N`` outputs, ``K`` inputs, ``r`` LoRA rank, ``g`` the int4 group)::

    x             bf16 / fp16 (S, K)           activations (already dequantized), sorted by expert
    offs          int32 (E,)                   cumulative rows per expert (offs[-1] = S; empty experts ok)
    u             x.dtype (S, r)               the lora_down product (computed outside), optional
    lora_up       x.dtype (E, N, r) or (N, r)  per expert, or shared by all experts, optional
    y             out_dtype (S, N)             x.dtype unless given (bf16 / fp16 / float32)

    W4Weight (the kernel-side view of the packed residual of all experts)
    qdata         uint8 (E, N, K/2)            nvfp4: element 2j in the LOW nibble; int4: in the HIGH nibble
    scale         nvfp4: float8_e4m3fn (E, N, K/16)   block scales
                  int4: D (E, N, K/g)                  multipliers 7/amax (D = float32 / bf16 / fp16)
    global_scale  nvfp4: float32 (E,)          per-expert global scale; int4: None

Dequantization is exactly :func:`svdq.formats.dequantize`'s: NVFP4 ``E2M1[code] * s_b`` (exact in bf16 and
fp16), times ``g`` in fp32 after the GEMM; INT4 ``rnd_D((code - 8) / m)`` (IEEE division), cast to the MMA
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svdq.formats import PackedTensor, QuantFormat

from .backend import interpreting, triton_available, use_triton

__all__ = ["GroupedW4MM", "W4Weight", "grouped_w4_applies", "grouped_w4_mm"]

_MMA_DTYPES = (torch.bfloat16, torch.float16)
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SCALE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True, eq=False)
class W4Weight:
    """The packed 4-bit residual of ``E`` experts as the kernels read it (see the module docstring).

    Build with :meth:`of` from a :class:`~svdq.formats.PackedTensor` ``(N, K)`` (dense: ``E = 1``) or
    ``(E, N, K)`` (one global scale for all experts), or from an
    :class:`~svdq.experts.storage.ExpertResiduals` (a global scale per expert).
    """

    fmt: QuantFormat
    qdata: Tensor  # (E, N, K/2) uint8
    scale: Tensor  # (E, N, K/g) float8_e4m3fn (nvfp4) or D (int4)
    global_scale: Tensor | None  # (E,) float32 (nvfp4) or None

    @property
    def num_experts(self) -> int:
        return int(self.qdata.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.qdata.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.qdata.shape[2]) * 2

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @classmethod
    def of(cls, weight: object) -> W4Weight:
        """The kernel view of ``weight``: a W4Weight, a PackedTensor ``(N, K)`` / ``(E, N, K)`` or an
        ExpertResiduals, of format nvfp4 or int4 (``ValueError`` otherwise)."""
        if isinstance(weight, W4Weight):
            return weight
        if isinstance(weight, PackedTensor):
            fmt, q, s, g = weight.fmt, weight.qdata, weight.scale, weight.global_scale
            if len(weight.shape) not in (2, 3):
                raise ValueError(f"grouped_w4_mm: weight must be (N, K) or (E, N, K), got {weight.shape}")
            if len(weight.shape) == 2:
                q, s = q.unsqueeze(0), s.unsqueeze(0)
        else:
            from svdq.experts.storage import ExpertResiduals

            if not isinstance(weight, ExpertResiduals):
                raise ValueError(
                    "grouped_w4_mm: weight must be a PackedTensor, ExpertResiduals or W4Weight, "
                    f"got {type(weight).__name__}"
                )
            fmt, t = weight.fmt, weight.tensors
            q, s, g = t["qdata"], t.get("scale"), t.get("global_scale")
        if fmt.name not in ("nvfp4", "int4"):
            raise ValueError(f"grouped_w4_mm: weight format must be nvfp4 or int4, got {fmt}")
        E = int(q.shape[0])
        if fmt.name == "nvfp4":
            g = g.reshape(-1).to(torch.float32).expand(E) if g.numel() == 1 else g.reshape(E)
            g = g.contiguous()
        return cls(fmt, q.contiguous(), s.contiguous(), g)


def _is_w4(weight: object) -> bool:
    try:
        W4Weight.of(weight)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


def grouped_w4_applies(x: Tensor, weight: object) -> bool:
    """Whether :func:`grouped_w4_mm` should run ``x · weightᵀ``: ``weight`` is nvfp4 / int4 (a PackedTensor,
    ExpertResiduals or W4Weight) with ``K`` = ``x.shape[-1]``, ``x`` is a 2-D bf16 / fp16 tensor and
    :func:`svdq.kernels.use_triton` says a kernel runs on these tensors (raising under backend ``"triton"``
    where it cannot)."""
    if not (isinstance(x, Tensor) and x.dim() == 2 and x.dtype in _MMA_DTYPES and _is_w4(weight)):
        return False
    w = W4Weight.of(weight)
    gs = w.fmt.group_size
    if x.shape[1] != w.in_features or w.in_features % gs or w.in_features % 16:
        return False
    return use_triton(x, w.qdata, who="grouped_w4_mm")


# ----------------------------------------------------------------------------------------------- kernels

if triton_available():
    import triton
    import triton.language as tl

    from .tl_helpers import mma, to_bf16

    @triton.jit
    def _round_bf16_f32(x):
        """float32 rounded (nearest even) to bfloat16 precision, kept in float32 (finite inputs)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _e2m1(code):
        """float32 E2M1 values of int32 codes 0..15 (bit 3 = sign; 8 -> +0)."""
        mag = code & 7
        ex = mag >> 1
        mt = mag & 1
        normal = (((ex + 126) << 23) | (mt << 22)).to(tl.float32, bitcast=True)
        v = tl.where(ex == 0, mt.to(tl.float32) * 0.5, normal)
        return tl.where((code & 8) != 0, 0.0 - v, v)  # (0 - v: code 8 is +0, as in the reference table)

    @triton.jit
    def _e4m3(b):
        """float32 value of int32 E4M3 bit patterns 0..255 (no NaN: scales are finite)."""
        ex = (b >> 3) & 15
        mt = b & 7
        normal = (((ex + 120) << 23) | (mt << 20)).to(tl.float32, bitcast=True)
        v = tl.where(ex == 0, mt.to(tl.float32) * 0.001953125, normal)
        return tl.where((b & 128) != 0, -v, v)

    @triton.jit
    def _tile_expert(offs_ptr, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
        """Row tile ``pid_m`` of the per-expert tiling (each expert's rows cut into BLOCK_M tiles, experts
        in order): (valid, expert, first row, end row of the expert)."""
        ar = tl.arange(0, E_POW2)
        end = tl.load(offs_ptr + ar, mask=ar < E, other=0)
        start = tl.load(offs_ptr + ar - 1, mask=(ar > 0) & (ar < E), other=0)
        nt = tl.where(ar < E, tl.cdiv(end - start, BLOCK_M), 0)
        cum = tl.cumsum(nt, axis=0)
        hit = (pid_m < cum) & (pid_m >= cum - nt)
        valid = tl.sum(hit.to(tl.int32), axis=0) > 0
        e = tl.sum(tl.where(hit, ar, 0), axis=0)
        row0 = tl.sum(tl.where(hit, start + (pid_m - (cum - nt)) * BLOCK_M, 0), axis=0)
        row_end = tl.sum(tl.where(hit, end, 0), axis=0)
        return valid, e, row0, row_end

    @triton.jit
    def _deq_tile(
        q_ptr,
        s_ptr,
        e,
        n,
        k0,
        N,
        K,
        FMT: tl.constexpr,
        GROUP: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        g,
        WITH_G: tl.constexpr,
    ):
        """float32 tile (BLOCK_N, BLOCK_K) of expert ``e``'s dequantized weight at rows ``n`` (BLOCK_N,) and
        columns ``k0 + arange(BLOCK_K)``; 0 outside (N, K). nvfp4: without the global scale (``E2M1 * s_b``,
        exact), or with ``WITH_G`` the reference's ``E2M1 * (s_b * g)``."""
        HALF: tl.constexpr = BLOCK_K // 2
        kb = k0 // 2 + tl.arange(0, HALF)
        k = k0 + tl.arange(0, BLOCK_K)
        n_ok = n < N
        n64 = n.to(tl.int64)
        e64 = e.to(tl.int64)
        qmask = n_ok[:, None] & (kb[None, :] < K // 2)
        b = tl.load(
            q_ptr + e64 * N * (K // 2) + n64[:, None] * (K // 2) + kb[None, :], mask=qmask, other=0x88
        )
        b = b.to(tl.int32)
        lo = b & 15
        hi = b >> 4
        KG = K // GROUP
        s_off = e64 * N * KG + n64[:, None] * KG + (k // GROUP)[None, :]
        s_mask = n_ok[:, None] & (k[None, :] < K)
        if FMT == 0:  # nvfp4: element 2j in the low nibble
            codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            sb = tl.load(s_ptr + s_off, mask=s_mask, other=0).to(tl.int32)
            if WITH_G:
                w = _e2m1(codes) * (_e4m3(sb) * g)
            else:
                w = _e2m1(codes) * _e4m3(sb)
        else:  # int4: element 2j in the high nibble, code = q + 8, w = rnd_D(q / m)
            codes = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
            q = (codes - 8).to(tl.float32)
            if SCALE_KIND == 1:  # bf16 multipliers, passed as their int16 bits
                mb = tl.load(s_ptr + s_off, mask=s_mask, other=0x3F80).to(tl.int32) & 0xFFFF
                m = (mb << 16).to(tl.float32, bitcast=True)
                w = _round_bf16_f32(tl.math.div_rn(q, m))
            elif SCALE_KIND == 2:
                m = tl.load(s_ptr + s_off, mask=s_mask, other=1.0).to(tl.float32)
                w = tl.math.div_rn(q, m).to(tl.float16).to(tl.float32)
            else:
                m = tl.load(s_ptr + s_off, mask=s_mask, other=1.0)
                w = tl.math.div_rn(q, m)
        return w

    @triton.jit
    def _to_mma(w, MMA_BF16: tl.constexpr, INTERPRET: tl.constexpr):
        if MMA_BF16:
            return to_bf16(w, INTERPRET)
        else:
            return w.to(tl.float16)

    @triton.jit
    def _store(ptr, acc, mask, OUT_KIND: tl.constexpr, INTERPRET: tl.constexpr):
        if OUT_KIND == 1:
            tl.store(ptr, to_bf16(acc, INTERPRET), mask=mask)
        elif OUT_KIND == 2:
            tl.store(ptr, acc.to(tl.float16), mask=mask)
        else:
            tl.store(ptr, acc, mask=mask)

    @triton.jit
    def _fwd_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        g_ptr,
        offs_ptr,
        u_ptr,
        b_ptr,
        y_ptr,
        N,
        K,
        R,
        E,
        AVG_M,  # autotune key only: rows per expert, rounded to a power of 2
        E_POW2: tl.constexpr,
        FMT: tl.constexpr,
        GROUP: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        HAS_LORA: tl.constexpr,
        LORA_PER_EXPERT: tl.constexpr,
        MMA_BF16: tl.constexpr,
        OUT_KIND: tl.constexpr,
        BLOCK_R: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        valid, e, row0, row_end = _tile_expert(offs_ptr, pid_m, E, E_POW2, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end  # all False when not valid (row0 = row_end = 0)
        rows64 = rows.to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_tiles = tl.where(valid, tl.cdiv(K, BLOCK_K), 0)
        for kt in range(0, k_tiles):
            k0 = kt * BLOCK_K
            k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(
                x_ptr + rows64[:, None] * K + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0
            )
            w = _deq_tile(q_ptr, s_ptr, e, n, k0, N, K, FMT, GROUP, SCALE_KIND, BLOCK_N, BLOCK_K, 1.0, False)
            acc = mma(xt, tl.trans(_to_mma(w, MMA_BF16, INTERPRET)), acc, INTERPRET)
        if FMT == 0:
            acc = acc * tl.load(g_ptr + e)
        if HAS_LORA:
            if LORA_PER_EXPERT:
                b_base = b_ptr + e.to(tl.int64) * N * R
            else:
                b_base = b_ptr
            r_tiles = tl.where(valid, tl.cdiv(R, BLOCK_R), 0)
            for rt in range(0, r_tiles):
                r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
                r_ok = r < R
                ut = tl.load(
                    u_ptr + rows64[:, None] * R + r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0
                )
                bt = tl.load(
                    b_base + n.to(tl.int64)[None, :] * R + r[:, None],
                    mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0,
                )  # (BLOCK_R, BLOCK_N)
                acc = mma(ut, bt, acc, INTERPRET)
        _store(
            y_ptr + rows64[:, None] * N + n[None, :],
            acc,
            row_ok[:, None] & n_ok[None, :],
            OUT_KIND,
            INTERPRET,
        )

    @triton.jit
    def _dx_kernel(
        dy_ptr,
        q_ptr,
        s_ptr,
        g_ptr,
        offs_ptr,
        dx_ptr,
        N,
        K,
        E,
        AVG_M,
        E_POW2: tl.constexpr,
        FMT: tl.constexpr,
        GROUP: tl.constexpr,
        SCALE_KIND: tl.constexpr,
        MMA_BF16: tl.constexpr,
        OUT_KIND: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        valid, e, row0, row_end = _tile_expert(offs_ptr, pid_m, E, E_POW2, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end  # all False when not valid (row0 = row_end = 0)
        rows64 = rows.to(tl.int64)
        k0 = pid_k * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        n_tiles = tl.where(valid, tl.cdiv(N, BLOCK_N), 0)
        for nt in range(0, n_tiles):
            n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            dyt = tl.load(
                dy_ptr + rows64[:, None] * N + n[None, :], mask=row_ok[:, None] & (n[None, :] < N), other=0.0
            )
            w = _deq_tile(q_ptr, s_ptr, e, n, k0, N, K, FMT, GROUP, SCALE_KIND, BLOCK_N, BLOCK_K, 1.0, False)
            acc = mma(dyt, _to_mma(w, MMA_BF16, INTERPRET), acc, INTERPRET)
        if FMT == 0:
            acc = acc * tl.load(g_ptr + e)
        _store(
            dx_ptr + rows64[:, None] * K + k[None, :],
            acc,
            row_ok[:, None] & (k[None, :] < K),
            OUT_KIND,
            INTERPRET,
        )

    def _configs(shapes):
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes
        ]

    _GPU_SHAPES = [
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 128, 4, 4),
    ]
    _fwd_tuned = triton.autotune(_configs(_GPU_SHAPES), key=["N", "K", "AVG_M", "FMT", "HAS_LORA"])(
        _fwd_kernel
    )
    _dx_tuned = triton.autotune(_configs(_GPU_SHAPES), key=["N", "K", "AVG_M", "FMT"])(_dx_kernel)

#: the single configuration used under Triton's interpreter
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}


def _launch(kernel, tuned, n_cols: int, S: int, E: int, args: tuple, consts: dict) -> None:
    """Launch over (row tiles of all experts, column tiles): at most ``cdiv(S, BLOCK_M) + E`` row tiles;
    the ones past the last expert's do nothing."""
    interp = interpreting()
    col_block = "BLOCK_N" if kernel is _fwd_kernel else "BLOCK_K"

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]) + E, triton.cdiv(n_cols, meta[col_block]))

    if interp:
        kernel[grid](*args, **consts, INTERPRET=True, **_INTERPRET_BLOCKS)
    else:
        tuned[grid](*args, **consts, INTERPRET=False)


def _weight_args(w: W4Weight) -> tuple[Tensor, Tensor, Tensor, dict]:
    fmt = w.fmt
    if fmt.name == "nvfp4":
        scale, kind, g = w.scale.view(torch.uint8), 0, w.global_scale
    else:
        kind = _SCALE_KIND[w.scale.dtype]
        scale = w.scale.view(torch.int16) if w.scale.dtype == torch.bfloat16 else w.scale
        g = w.qdata  # unused pointer
    consts = {"FMT": 0 if fmt.name == "nvfp4" else 1, "GROUP": fmt.group_size, "SCALE_KIND": kind}
    return w.qdata, scale, g, consts


def _common_consts(S: int, E: int, dtype: torch.dtype) -> tuple[int, dict]:
    avg = max(1, S // max(E, 1))
    avg_m = 1 << (avg.bit_length() - 1)
    return avg_m, {"E_POW2": max(2, triton.next_power_of_2(E)), "MMA_BF16": dtype == torch.bfloat16}


def _forward(
    x: Tensor, w: W4Weight, offs: Tensor, u: Tensor | None, b: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    S, K = x.shape
    N, E = w.out_features, w.num_experts
    y = torch.empty(S, N, dtype=out_dtype, device=x.device)  # (S, N)
    if S == 0 or N == 0:
        return y
    q, s, g, consts = _weight_args(w)
    avg_m, common = _common_consts(S, E, x.dtype)
    has_lora = u is not None
    R = u.shape[1] if has_lora else 0
    block_r = min(64, max(16, triton.next_power_of_2(max(R, 1))))
    args = (x, q, s, g, offs, u if has_lora else x, b if has_lora else x, y, N, K, R, E, avg_m)
    consts = {
        **consts,
        **common,
        "HAS_LORA": has_lora,
        "LORA_PER_EXPERT": has_lora and b.dim() == 3,
        "OUT_KIND": _OUT_KIND[out_dtype],
        "BLOCK_R": block_r,
    }
    _launch(_fwd_kernel, _fwd_tuned, N, S, E, args, consts)
    return y


def _backward_dx(dy: Tensor, w: W4Weight, offs: Tensor, dx_dtype: torch.dtype) -> Tensor:
    S, N = dy.shape
    K, E = w.in_features, w.num_experts
    dx = torch.empty(S, K, dtype=dx_dtype, device=dy.device)  # (S, K)
    if S == 0:
        return dx
    if N == 0:
        return dx.zero_()
    q, s, g, consts = _weight_args(w)
    avg_m, common = _common_consts(S, E, dy.dtype)
    args = (dy, q, s, g, offs, dx, N, K, E, avg_m)
    _launch(_dx_kernel, _dx_tuned, K, S, E, args, {**consts, **common, "OUT_KIND": _OUT_KIND[dx_dtype]})
    return dx


def _row_counts(offs: Tensor) -> list[int]:
    ends = offs.tolist()  # host sync (backward of per-expert lora_up only)
    return [e - s for s, e in zip([0, *ends[:-1]], ends)]


def _lora_grads(
    dy: Tensor, u: Tensor, b: Tensor, offs: Tensor, need_u: bool, need_b: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``du = dy · lora_up_e`` ``(S, r)`` and ``d lora_up_e = dy_eᵀ · u_e`` (``(E, N, r)`` or ``(N, r)``)."""
    if b.dim() == 2:
        return (dy @ b if need_u else None), (dy.t() @ u if need_b else None)
    du = torch.zeros_like(u) if need_u else None  # (S, r)
    db = torch.zeros_like(b) if need_b else None  # (E, N, r)
    start = 0
    for e, n in enumerate(_row_counts(offs)):
        if n:
            rows = slice(start, start + n)
            if need_u:
                du[rows] = dy[rows] @ b[e]
            if need_b:
                db[e] = dy[rows].t() @ u[rows]
        start += n
    return du, db


class GroupedW4MM(torch.autograd.Function):
    """``GroupedW4MM.apply(x, u, lora_up, weight, offs, out_dtype)``: :func:`grouped_w4_mm` with gradients
    for ``x``, ``u`` and ``lora_up`` (the 4-bit weight is frozen). ``u``/``lora_up`` may be ``None``;
    ``weight`` is a :class:`W4Weight`; all tensors already checked and contiguous."""

    @staticmethod
    def forward(ctx, x, u, lora_up, weight, offs, out_dtype):  # type: ignore[override]
        ctx.weight = weight
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(u, lora_up, offs)
        return _forward(x, weight, offs, u, lora_up, out_dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        u, b, offs = ctx.saved_tensors
        dy = dy.to(ctx.x_dtype).contiguous()  # (S, N)
        need_x, need_u, need_b = ctx.needs_input_grad[:3]
        dx = _backward_dx(dy, ctx.weight, offs, ctx.x_dtype) if need_x else None
        du = db = None
        if u is not None and (need_u or need_b):
            du, db = _lora_grads(dy, u, b, offs, need_u, need_b)
        return dx, du, db, None, None, None


def grouped_w4_mm(
    x: Tensor,
    weight: object,
    offs: Tensor | None,
    *,
    u: Tensor | None = None,
    lora_up: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``y[rows of e] = x[rows of e] · deq(W_e)ᵀ + u[rows of e] · lora_up_eᵀ`` in one Triton launch (see the
    module docstring for shapes); differentiable in ``x``, ``u`` and ``lora_up``.

    ``weight``: PackedTensor ``(N, K)`` / ``(E, N, K)``, ExpertResiduals or :class:`W4Weight` (nvfp4 / int4).
    ``offs``: int32 ``(E,)`` cumulative row counts, ``offs[-1] == S`` (``None`` for a dense weight, E = 1).
    ``u (S, r)`` and ``lora_up`` ``(E, N, r)`` / ``(N, r)`` come together or not at all (cast to ``x``'s
    dtype). ``out_dtype``: ``x.dtype`` (default), bf16, fp16 or float32. Bad arguments raise ``ValueError``.
    """
    w = W4Weight.of(weight)
    if not triton_available():
        raise RuntimeError("grouped_w4_mm: triton is not installed")
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in _MMA_DTYPES:
        raise ValueError(f"grouped_w4_mm: x must be a 2-D bf16 / fp16 tensor, got {_desc(x)}")
    S, K = x.shape
    E, N = w.num_experts, w.out_features
    if K != w.in_features:
        raise ValueError(f"grouped_w4_mm: x has {K} columns, the weight {w.in_features} inputs")
    if not (x.is_cuda or interpreting()) or x.device != w.device:
        raise ValueError(f"grouped_w4_mm: x ({x.device}) and weight ({w.device}) must be on one CUDA device")
    if offs is None:
        if E != 1:
            raise ValueError(f"grouped_w4_mm: offs is needed for a weight of {E} experts")
        offs = torch.full((1,), S, dtype=torch.int32, device=x.device)
    if offs.dtype != torch.int32 or tuple(offs.shape) != (E,) or offs.device != x.device:
        raise ValueError(f"grouped_w4_mm: offs must be int32 ({E},) on {x.device}, got {_desc(offs)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _OUT_KIND:
        raise ValueError(f"grouped_w4_mm: out_dtype must be bf16, fp16 or float32, got {out_dtype}")
    if (u is None) != (lora_up is None):
        raise ValueError("grouped_w4_mm: u and lora_up come together")
    if u is not None:
        if u.dim() != 2 or u.shape[0] != S:
            raise ValueError(f"grouped_w4_mm: u must be ({S}, r), got {_desc(u)}")
        r = u.shape[1]
        if tuple(lora_up.shape) not in ((E, N, r), (N, r)):
            raise ValueError(
                f"grouped_w4_mm: lora_up must be ({E}, {N}, {r}) or ({N}, {r}), got {_desc(lora_up)}"
            )
        u = u.to(x.dtype).contiguous()
        lora_up = lora_up.to(x.dtype).contiguous()
    return GroupedW4MM.apply(x.contiguous(), u, lora_up, w, offs.contiguous(), out_dtype)


def _desc(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
