"""Fused activation quantization for the frozen 4-bit path (svdq/DESIGN.md §16): ``Q_a(x / s)`` and the
LoRA down product ``x · Aᵀ`` in one pass over ``x``.

Tensors (``M`` rows = the flattened leading dimensions of ``x``, ``K`` channels, ``r`` LoRA rank,
``D`` = x's dtype, ``G`` = the format's group size: 16 for nvfp4, 32 / 64 / 128 for int4)::

    x            D (..., K)               float32 / bfloat16 / float16 input (flattened to (M, K))
    smooth       float32 (K,) or None     smoothing s; the 4-bit path quantizes xs = rnd_D(x / s)
                 or float32 (E, K)        with smooth_ids int (M,): row i divided by smooth[smooth_ids[i]]
    global_amax  float32 () / (M,) / None nvfp4 only: static per-tensor range, one range per row, or
                                          None (dynamic: max|xs| of the whole tensor, a first pass)
    lora_down    (r, K) or None           A; cast to D first (as the layers do)
    xq           D (..., K)               fake_quant(xs, fmt, global_amax), bit for bit
    u            D (..., r) or None       x · Aᵀ of the RAW x (fp32 accumulation)
    qdata        uint8 (..., K/2)         packed codes (nibble order of svdq.formats.packing)
    scale        nvfp4: float8_e4m3fn (..., K/16); int4: D (..., K/G)   block scales / multipliers
    global_scale nvfp4: float32 () (per-row ranges: (...,)); int4: None

The arithmetic is the one of :mod:`svdq.formats.nvfp4` / :mod:`svdq.formats.int4`, expression for
expression (IEEE-rounded divisions via ``tl.div_rn``, E4M3 and 16-bit roundings done on the bits), so
``xq``, ``qdata`` and ``scale`` equal the PyTorch reference's bit for bit on the same device. The nvfp4
global scale ``g = amax / 2688`` is computed by PyTorch in the wrapper (on CUDA PyTorch multiplies by the
reciprocal; doing it in torch keeps that). Kernel: one program per (BLOCK_M rows, a range of BLOCK_K-column
chunks); each chunk is read once, quantized per 16-block / group, written once, and multiplied into the
``u`` accumulator (``tl.dot``, fp32; float32 inputs in IEEE precision, not TF32). When the K range is
split over programs the ``u`` partials are summed in float32 by PyTorch. The straight-through backward
(:func:`ste_grad`) is one more kernel: one read of ``x`` and ``dxq``, one write of ``dx``.

Non-finite inputs: like :func:`svdq.formats.fake_quant`, a NaN/Inf in ``xs`` raises ``ValueError`` unless
inside :func:`svdq.formats.trusted_inputs` (one host sync; dynamic ranges check in the first pass, before
the quantizing pass). Inside ``trusted_inputs`` NaN elements come out NaN, but the rest of their block is
not bit-identical to the reference's (which makes the whole block NaN).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from svdq.formats import QuantFormat, parse_format
from svdq.formats._common import _CHECK_FINITE

from .backend import DTYPE_CODES as _DTYPES
from .backend import interpreting, triton_available, use_triton

__all__ = ["ActQuant", "fused_act_applies", "quantize_act", "quantize_act_ste", "ste_grad"]

_FORMATS = ("nvfp4", "int4")
_NVFP4_GLOBAL = 6.0 * 448.0  # E2M1_MAX * E4M3_MAX, as svdq.formats.nvfp4 writes it


class ActQuant(NamedTuple):
    """What :func:`quantize_act` returns (see the module docstring for shapes and dtypes)."""

    xq: Tensor
    u: Tensor | None = None
    qdata: Tensor | None = None
    scale: Tensor | None = None
    global_scale: Tensor | None = None


# ------------------------------------------------------------------------------------------- kernels
if triton_available():
    import triton
    import triton.language as tl

    from .tl_helpers import as_f32, mma, rnd_dt, to_dt

    @triton.jit
    def _smooth_tile(s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, SMOOTH_ROWS: tl.constexpr):
        """The smoothing of a (BLOCK_M, BLOCK_K) tile: ``s (K,)`` broadcast, or with ``SMOOTH_ROWS`` row
        ``i``'s ``s[sid[i]] ((E, K) table)``."""
        if SMOOTH_ROWS:
            sid = tl.load(sid_ptr + rows64, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_M,)
            return tl.load(s_ptr + sid[:, None] * K + cols[None, :], mask=m2, other=1.0)
        else:
            return tl.load(s_ptr + cols, mask=col_ok, other=1.0)[None, :]

    @triton.jit
    def _smoothed(x_ptr, s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, DT: tl.constexpr,
                  HAS_SMOOTH: tl.constexpr, SMOOTH_ROWS: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
        """(raw x tile in DT, xs = rnd_DT(x / s) as float32) for a (BLOCK_M, BLOCK_K) tile."""
        x = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=m2, other=0.0)
        x32 = as_f32(x, DT, INTERPRET)
        if HAS_SMOOTH:
            s = _smooth_tile(s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, SMOOTH_ROWS)
            xs = rnd_dt(tl.div_rn(x32, s), DT, INTERPRET)
        else:
            xs = x32
        return x, xs

    @triton.jit
    def _e4m3(v):
        """Round float32 ``v`` in [2**-9, 448] to E4M3 (RNE): (value as float32, its float8_e4m3fn bits)."""
        sub = (v + 16384.0) - 16384.0  # multiples of 2**-9: the ulp of float32 at 2**14
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # 3 mantissa bits, RNE
        normal = bits.to(tl.float32, bitcast=True)
        is_sub = v < 0.015625  # 2**-6, the smallest normal E4M3
        r = tl.where(is_sub, sub, normal)
        rb = r.to(tl.uint32, bitcast=True)
        code_normal = (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7)
        code_sub = (r * 512.0).to(tl.uint32)  # 0..8 (8 = 2**-6, the same byte as the normal path)
        return r, tl.where(is_sub, code_sub, code_normal).to(tl.uint8)

    @triton.jit
    def _dot(a, b, acc, DT: tl.constexpr, INTERPRET: tl.constexpr):
        if DT == 0:
            return tl.dot(a, b, acc, input_precision="ieee")
        elif INTERPRET:
            return tl.dot(as_f32(a, DT, INTERPRET), as_f32(b, DT, INTERPRET), acc, input_precision="ieee")
        else:
            return mma(a, b, acc, INTERPRET)

    @triton.jit
    def _amax_kernel(x_ptr, s_ptr, sid_ptr, part_ptr, bad_ptr, M, K,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
                     HAS_SMOOTH: tl.constexpr, SMOOTH_ROWS: tl.constexpr,
                     INTERPRET: tl.constexpr):  # fmt: skip
        """First pass of a dynamic range: per-tile max|xs| and count of non-finite xs."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < K
        m2 = row_ok[:, None] & col_ok[None, :]
        _, xs = _smoothed(x_ptr, s_ptr, sid_ptr, rows.to(tl.int64), row_ok, cols, m2, col_ok, K, DT,
                          HAS_SMOOTH, SMOOTH_ROWS, INTERPRET)  # fmt: skip
        a = tl.abs(xs)
        pid = pid_m * tl.num_programs(1) + pid_k
        tl.store(part_ptr + pid, tl.max(tl.max(a, axis=1), axis=0))
        bad = tl.sum(tl.sum(((xs - xs) != 0.0).to(tl.int32), axis=1), axis=0)
        tl.store(bad_ptr + pid, bad)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, s_ptr, sid_ptr, g_ptr, a_ptr,  # x (M, K) D; smooth (K,) / (E, K) f32 [+ sid (M,) i32];
                                              # g (M,) or (1,) f32 [nvfp4]; A (R, K) D
        xq_ptr, u_ptr, q_ptr, sc_ptr, bad_ptr,  # xq (M, K) D; u (M, R) D or (SPLIT, M, R) f32; codes; scales
        M, K, R, CHUNKS_PER_PROGRAM, G_STRIDE,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, R_PAD: tl.constexpr,
        IS_NVFP4: tl.constexpr, DT: tl.constexpr, HAS_SMOOTH: tl.constexpr, SMOOTH_ROWS: tl.constexpr,
        HAS_LORA: tl.constexpr,
        U_PARTIAL: tl.constexpr, STORE_PACKED: tl.constexpr, CHECK: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        NG: tl.constexpr = BLOCK_K // GROUP
        n_chunks = tl.cdiv(K, BLOCK_K)
        c_lo = pid_k * CHUNKS_PER_PROGRAM
        c_hi = tl.minimum(c_lo + CHUNKS_PER_PROGRAM, n_chunks)
        if IS_NVFP4:
            g = tl.load(g_ptr + rows64 * G_STRIDE, mask=row_ok, other=1.0)  # (BLOCK_M,)
            g6 = 6.0 * g
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
        rr = tl.arange(0, R_PAD)
        for c in range(c_lo, c_hi):
            cols = c * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            m2 = row_ok[:, None] & col_ok[None, :]
            x, xs = _smoothed(x_ptr, s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, DT, HAS_SMOOTH,
                              SMOOTH_ROWS, INTERPRET)  # fmt: skip
            xg = tl.reshape(xs, (BLOCK_M, NG, GROUP))
            gamax = tl.max(tl.abs(xg), axis=2)  # (BLOCK_M, NG), exact
            if IS_NVFP4:
                sb = tl.div_rn(gamax, g6[:, None])
                sb = tl.where(sb == 0.0, 1.0, sb)
                sb = tl.minimum(tl.maximum(sb, 0.001953125), 448.0)  # [2**-9, 448]
                sb, sbits = _e4m3(sb)
                sg = sb * g[:, None]  # (BLOCK_M, NG)
                y = tl.div_rn(xg, sg[:, :, None])
                a = tl.abs(y)
                mag = (a > 0.25).to(tl.int32) + (a > 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                mag += (a > 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a > 3.5).to(tl.int32)
                mag += (a > 5.0).to(tl.int32)
                mag += ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(tl.int32)  # ties up to the even code
                mv = tl.where(mag < 5, mag.to(tl.float32) * 0.5, tl.where(mag == 5, 3.0, 4.0))
                mv = tl.where(mag == 7, 6.0, mv)
                neg = y < 0.0
                val = tl.where(neg & (mag > 0), -mv, mv)  # code 8 ("negative zero") decodes to +0
                out = val * sg[:, :, None]
                code = mag + neg.to(tl.int32) * 8
            else:
                inv = rnd_dt(tl.div_rn(1.0, gamax), DT, INTERPRET)
                mult = rnd_dt(inv * 7.0, DT, INTERPRET)  # (BLOCK_M, NG)
                v = rnd_dt(xg * mult[:, :, None], DT, INTERPRET)
                v = tl.where(v != v, 0.0, v)  # 0 * inf in an all-zero / tiny group
                v = tl.minimum(tl.maximum(v, -9.0), 8.0)
                q = (v + 12582912.0) - 12582912.0  # round half to even (1.5 * 2**23)
                q = tl.minimum(tl.maximum(q, -8.0), 7.0)
                out = rnd_dt(tl.div_rn(q, mult[:, :, None]), DT, INTERPRET)
                code = (q + 8.0).to(tl.int32)
            out = tl.reshape(out, (BLOCK_M, BLOCK_K))
            out = tl.where(xs != xs, xs, out)  # NaN stays visible (trusted inputs only)
            tl.store(xq_ptr + rows64[:, None] * K + cols[None, :], to_dt(out, DT, INTERPRET), mask=m2)
            if CHECK:
                bad += tl.sum(((xs - xs) != 0.0).to(tl.int32), axis=1)
            if STORE_PACKED:
                even, odd = tl.split(tl.reshape(code, (BLOCK_M, BLOCK_K // 2, 2)))
                if IS_NVFP4:
                    byte = (even | (odd << 4)).to(tl.uint8)
                else:
                    byte = ((even << 4) | odd).to(tl.uint8)
                pc = c * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
                pm = row_ok[:, None] & (pc < K // 2)[None, :]
                tl.store(q_ptr + rows64[:, None] * (K // 2) + pc[None, :], byte, mask=pm)
                sc = c * NG + tl.arange(0, NG)
                sm = row_ok[:, None] & (sc < K // GROUP)[None, :]
                s_off = rows64[:, None] * (K // GROUP) + sc[None, :]
                if IS_NVFP4:
                    tl.store(sc_ptr + s_off, sbits, mask=sm)
                else:
                    tl.store(sc_ptr + s_off, to_dt(mult, DT, INTERPRET), mask=sm)
            if HAS_LORA:
                a_tile = tl.load(
                    a_ptr + rr[None, :] * K + cols[:, None],
                    mask=(rr < R)[None, :] & col_ok[:, None],
                    other=0.0,
                )  # (BLOCK_K, R_PAD)
                acc = _dot(x, a_tile, acc, DT, INTERPRET)
        if CHECK:
            tl.store(bad_ptr + pid_m * tl.num_programs(1) + pid_k, tl.sum(bad, axis=0))
        if HAS_LORA:
            um = row_ok[:, None] & (rr < R)[None, :]
            if U_PARTIAL:
                u_off = pid_k.to(tl.int64) * M * R + rows64[:, None] * R + rr[None, :]
                tl.store(u_ptr + u_off, acc, mask=um)
            else:
                tl.store(u_ptr + rows64[:, None] * R + rr[None, :], to_dt(acc, DT, INTERPRET), mask=um)

    @triton.jit
    def _ste_bwd_kernel(
        x_ptr, s_ptr, sid_ptr, g_ptr, gq_ptr, dx_ptr,  # x, dxq, dx (M, K) D; smooth as above; range f32
        M, K, G_STRIDE,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
        SMOOTH_ROWS: tl.constexpr, HAS_RANGE: tl.constexpr, INTERPRET: tl.constexpr,
    ):  # fmt: skip
        """The straight-through gradient of one tile: ``rnd_D(where(|xs| <= range, dxq, 0) / s)``."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < K
        rows64 = rows.to(tl.int64)
        m2 = row_ok[:, None] & col_ok[None, :]
        off = rows64[:, None] * K + cols[None, :]
        gq = as_f32(tl.load(gq_ptr + off, mask=m2, other=0.0), DT, INTERPRET)
        if HAS_RANGE:
            _, xs = _smoothed(x_ptr, s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, DT, HAS_SMOOTH,
                              SMOOTH_ROWS, INTERPRET)  # fmt: skip
            lim = tl.load(g_ptr + rows64 * G_STRIDE, mask=row_ok, other=0.0)  # (BLOCK_M,)
            gq = tl.where(tl.abs(xs) <= lim[:, None], gq, 0.0)
        if HAS_SMOOTH:
            s = _smooth_tile(s_ptr, sid_ptr, rows64, row_ok, cols, m2, col_ok, K, SMOOTH_ROWS)
            gq = tl.div_rn(gq, s)
        tl.store(dx_ptr + off, to_dt(gq, DT, INTERPRET), mask=m2)


# ------------------------------------------------------------------------------------------- checks
def _check(x, smooth, fmt, global_amax, lora_down, smooth_ids=None) -> tuple[QuantFormat, Tensor | None]:
    """Validate the arguments (one-line ``ValueError`` naming the argument); returns (fmt, global_amax as
    a float32 tensor of shape () or (M,), or None)."""
    who = "quantize_act"
    if not isinstance(x, Tensor):
        raise ValueError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{who}: x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    if x.dim() == 0:
        raise ValueError(f"{who}: x must have at least one dimension (..., K); got shape ()")
    fmt = parse_format(fmt)
    if fmt.name not in _FORMATS:
        raise ValueError(f"{who}: fmt {fmt} is not supported by the kernel; expected nvfp4 or int4")
    K = x.shape[-1]
    if K % fmt.group_size:
        raise ValueError(f"{who}: x's last dimension {K} is not divisible by {fmt}'s group {fmt.group_size}")
    if smooth is not None:
        want = f"(E, {K}) with smooth_ids" if smooth_ids is not None else f"({K},)"
        shape_ok = isinstance(smooth, Tensor) and (
            (smooth_ids is None and tuple(smooth.shape) == (K,))
            or (smooth_ids is not None and smooth.dim() == 2 and smooth.shape[1] == K)
        )
        if not shape_ok or smooth.dtype != torch.float32:
            got = type(smooth).__name__
            if isinstance(smooth, Tensor):
                got = f"{smooth.dtype} {tuple(smooth.shape)}"
            raise ValueError(f"{who}: smooth must be a float32 tensor of shape {want}; got {got}")
        if smooth.device != x.device:
            raise ValueError(f"{who}: smooth is on {smooth.device}, x on {x.device}")
    if smooth_ids is not None:
        _check_ids(smooth_ids, x, smooth, who)
    if lora_down is not None:
        check_lora_down(lora_down, x, who)
    if global_amax is None:
        return fmt, None
    if fmt.name == "int4":
        raise ValueError(f"{who}: int4 scales are dynamic per group; global_amax is not supported")
    ga = torch.as_tensor(global_amax).detach().to(device=x.device, dtype=torch.float32)
    rows = tuple(x.shape[:-1])
    if ga.dim() == 0:
        per_row = False
    elif tuple(ga.shape) in (rows, (math.prod(rows),)):
        per_row, ga = True, ga.reshape(-1)
    else:
        raise ValueError(
            f"{who}: global_amax has shape {tuple(ga.shape)}; expected () or one range per row {rows}"
        )
    if _CHECK_FINITE.get():  # one host sync, skipped for trusted callers (as fake_quant does)
        ok = torch.isfinite(ga) & ((ga >= 0) if per_row else (ga > 0))
        if not bool(ok.all()):
            raise ValueError(f"{who}: global_amax must be finite and {'>= 0' if per_row else '> 0'}")
    return fmt, ga


def check_lora_down(lora_down, x: Tensor, who: str) -> None:
    """``lora_down``: a float tensor ``(r, K)`` on ``x``'s device (``ValueError`` naming ``who``)."""
    K = x.shape[-1]
    if not isinstance(lora_down, Tensor) or lora_down.dim() != 2 or lora_down.shape[1] != K:
        got = tuple(lora_down.shape) if isinstance(lora_down, Tensor) else type(lora_down).__name__
        raise ValueError(f"{who}: lora_down must be a tensor of shape (r, {K}); got {got}")
    if lora_down.dtype not in _DTYPES:
        raise ValueError(f"{who}: lora_down has dtype {lora_down.dtype}; expected a float dtype")
    if lora_down.device != x.device:
        raise ValueError(f"{who}: lora_down is on {lora_down.device}, x on {x.device}")


def _check_ids(ids, x: Tensor, smooth: Tensor | None, who: str) -> None:
    """``smooth_ids``: an integer tensor of one index per row of ``x`` into the rows of ``smooth``."""
    rows = math.prod(x.shape[:-1])
    if smooth is None:
        raise ValueError(f"{who}: smooth_ids needs a smooth table of shape (E, K)")
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.numel() != rows:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{who}: smooth_ids must be an int32/int64 tensor of {rows} row indices; got {got}")
    if ids.device != x.device:
        raise ValueError(f"{who}: smooth_ids is on {ids.device}, x on {x.device}")
    if _CHECK_FINITE.get() and rows:  # one host sync, skipped for trusted callers
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= smooth.shape[0]:
            n = smooth.shape[0]
            raise ValueError(f"{who}: smooth_ids range [{lo}, {hi}] is outside the {n} smoothings")


def _raise_if_bad(bad: Tensor, x: Tensor, fmt: QuantFormat) -> None:
    if bool(bad.any()):
        raise ValueError(f"{fmt}: input of shape {tuple(x.shape)} contains NaN or Inf")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------- public
def quantize_act(
    x: Tensor,
    smooth: Tensor | None,
    fmt: QuantFormat | str,
    global_amax: Tensor | float | None = None,
    lora_down: Tensor | None = None,
    *,
    smooth_ids: Tensor | None = None,
    return_packed: bool = False,
    _tiles: tuple[int, int, int] | None = None,
) -> ActQuant:
    """``Q_a(x / s)`` (and ``x · Aᵀ``) in one pass over ``x``; see the module docstring for the tensors.

    ``xq`` equals ``fake_quant(smoothed_input(x), fmt, global_amax)`` bit for bit (per-row ranges: what
    :func:`svdq.experts.ops.quant_rows` computes for rows with those ranges); with ``return_packed`` the
    codes and scales equal :func:`svdq.formats.quantize_tensor`'s. No autograd (see
    :func:`quantize_act_ste`). ``smooth_ids (M,)``: row ``i`` is smoothed by ``smooth[smooth_ids[i]]`` of
    an ``(E, K)`` table (experts with their own smoothing, rows sorted or not). ``_tiles = (BLOCK_M,
    BLOCK_K, programs along K)`` overrides the tiling (tests).

    Raises:
        ValueError: a bad argument (named), or NaN/Inf in ``x / s`` outside ``trusted_inputs()``.
    """
    fmt, ga = _check(x, smooth, fmt, global_amax, lora_down, smooth_ids)
    if not triton_available():
        raise RuntimeError("quantize_act: triton is not installed")
    if not x.is_cuda and not interpreting():
        raise ValueError("quantize_act: x is on the CPU; the kernel needs CUDA (or TRITON_INTERPRET=1)")
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    x2 = x.detach().reshape(-1, K).contiguous()  # (M, K)
    M, dev, dt = x2.shape[0], x.device, x.dtype
    is_nvfp4, G = fmt.name == "nvfp4", fmt.group_size
    A = None if lora_down is None else lora_down.detach().to(dt).contiguous()  # (r, K)
    R = 0 if A is None else A.shape[0]
    s = None if smooth is None else smooth.detach().contiguous()
    sid = None if smooth_ids is None else smooth_ids.reshape(-1).to(torch.int32).contiguous()  # (M,)
    check = _CHECK_FINITE.get()
    interp = interpreting()
    DT = _DTYPES[dt]

    if _tiles is not None:
        block_m, block_k, split = _tiles
        if block_m < 16 or block_k % G or block_k & (block_k - 1):
            raise ValueError(f"quantize_act: _tiles {_tiles}: BLOCK_M >= 16, BLOCK_K a power of 2 of groups")
    else:
        block_m = min(32, max(16, _next_pow2(M)))
        block_k = 128
        split = None
    n_m, n_chunks = triton.cdiv(max(M, 1), block_m), triton.cdiv(K, block_k)
    if split is None:
        if not R:
            split = n_chunks  # no K reduction: one chunk per program
        else:
            split = min(n_chunks, max(1, triton.cdiv(4 * _sm_count(dev), n_m)))
    per_program = triton.cdiv(n_chunks, split)
    split = triton.cdiv(n_chunks, per_program)
    warps = 4 if interp else 8

    xq = torch.empty_like(x2)
    qdata = scale = gs = None
    if return_packed:
        qdata = torch.empty(M, K // 2, dtype=torch.uint8, device=dev)
        scale = torch.empty(M, K // G, dtype=torch.uint8 if is_nvfp4 else dt, device=dev)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    bad = torch.zeros(n_m * split if check else 1, dtype=torch.int32, device=dev)

    g = None
    if is_nvfp4:
        if ga is None:  # dynamic: first pass for max|xs|
            part = torch.empty(n_m * n_chunks, dtype=torch.float32, device=dev)
            bad0 = torch.empty(n_m * n_chunks, dtype=torch.int32, device=dev)
            if M:
                _amax_kernel[(n_m, n_chunks)](
                    x2, s if s is not None else dummy, sid if sid is not None else dummy, part, bad0, M, K,
                    BLOCK_M=block_m, BLOCK_K=block_k, DT=DT, HAS_SMOOTH=s is not None,
                    SMOOTH_ROWS=sid is not None, INTERPRET=interp, num_warps=warps,
                )  # fmt: skip
                if check:
                    _raise_if_bad(bad0, x, fmt)
                amax = part.amax()
            else:
                amax = torch.zeros((), dtype=torch.float32, device=dev)
            check = False  # checked in the first pass
        else:
            amax = ga
        g = amax / _NVFP4_GLOBAL  # the reference's expression, on the same device
        g = torch.where(g == 0, torch.ones_like(g), g)
        gs = g.reshape(lead) if g.dim() else g

    if R:
        u = torch.empty((split, M, R) if split > 1 else (M, R), dtype=torch.float32 if split > 1 else dt,
                        device=dev)  # fmt: skip
    else:
        u = None
    if M:
        _act_quant_kernel[(n_m, split)](
            x2, s if s is not None else dummy, sid if sid is not None else dummy,
            g if g is not None else dummy, A if A is not None else dummy,
            xq, u if u is not None else dummy, qdata if qdata is not None else dummy,
            scale if scale is not None else dummy, bad,
            M, K, R, per_program, 1 if (g is not None and g.dim()) else 0,
            BLOCK_M=block_m, BLOCK_K=block_k, GROUP=G, R_PAD=max(16, _next_pow2(R)),
            IS_NVFP4=is_nvfp4, DT=DT, HAS_SMOOTH=s is not None, SMOOTH_ROWS=sid is not None,
            HAS_LORA=bool(R), U_PARTIAL=split > 1,
            STORE_PACKED=return_packed, CHECK=check, INTERPRET=interp, num_warps=warps,
        )  # fmt: skip
        if check:
            _raise_if_bad(bad, x, fmt)
    if R and split > 1:
        u = u.sum(0).to(dt)  # (M, R)
    if lora_down is not None:
        u = (u if R else x2.new_zeros(M, 0)).reshape(*lead, R)
    if return_packed:
        qdata = qdata.reshape(*lead, K // 2)
        scale = scale.reshape(*lead, K // G)
        if is_nvfp4:
            scale = scale.view(torch.float8_e4m3fn)
    return ActQuant(xq.reshape(x.shape), u, qdata, scale, gs)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def ste_grad(
    x: Tensor,
    gxq: Tensor,
    smooth: Tensor | None,
    global_amax: Tensor | None,
    smooth_ids: Tensor | None = None,
) -> Tensor:
    """The straight-through gradient to ``x`` through ``xq`` in one pass over ``x`` and ``dxq`` (a kernel):
    ``rnd_D(where(|x / s| <= range, dxq, 0) / s)`` (no mask without a range), bit for bit what autograd
    gives the reference path ``fake_quant((x.float() / s).to(D), fmt, range)``. ``global_amax``: float32
    ``()`` or one range per row; ``smooth`` / ``smooth_ids`` as in :func:`quantize_act`."""
    K = x.shape[-1]
    x2 = x.detach().reshape(-1, K).contiguous()  # (M, K)
    g2 = gxq.reshape(-1, K).to(x.dtype).contiguous()  # (M, K)
    M, dev = x2.shape[0], x.device
    dx = torch.empty_like(x2)
    if M and K:
        dummy = torch.empty(1, dtype=torch.float32, device=dev)
        sid = None if smooth_ids is None else smooth_ids.reshape(-1).to(torch.int32).contiguous()
        ga = None if global_amax is None else global_amax.reshape(-1).to(torch.float32).contiguous()
        interp = interpreting()
        block_m, block_k = (16, 64) if interp else (32, 128)
        _ste_bwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            x2, smooth.contiguous() if smooth is not None else dummy, sid if sid is not None else dummy,
            ga if ga is not None else dummy, g2, dx, M, K, 1 if (ga is not None and ga.numel() > 1) else 0,
            BLOCK_M=block_m, BLOCK_K=block_k, DT=_DTYPES[x.dtype], HAS_SMOOTH=smooth is not None,
            SMOOTH_ROWS=sid is not None, HAS_RANGE=ga is not None, INTERPRET=interp,
            num_warps=4 if interp else 8,
        )  # fmt: skip
    return dx.reshape(x.shape)


class _ActQuantSTE(torch.autograd.Function):
    """Forward: :func:`quantize_act`. Backward: the gradient PyTorch's autograd gives the reference path
    ``fake_quant((x.float() / s).to(D), fmt, ga)`` and ``F.linear(x, A)`` (:func:`ste_grad` for ``xq``)."""

    @staticmethod
    def forward(ctx, x, smooth, fmt, ga, A, smooth_ids):  # type: ignore[override]
        res = quantize_act(x, smooth, fmt, ga, A, smooth_ids=smooth_ids)
        ctx.fmt = fmt
        ctx.save_for_backward(x, smooth, ga, A, smooth_ids)
        return res.xq, res.u

    @staticmethod
    def backward(ctx, gxq, gu):  # type: ignore[override]
        x, smooth, ga, A, smooth_ids = ctx.saved_tensors
        K = x.shape[-1]
        dx = dA = None
        if gxq is not None:  # straight-through, zeroed where the range clips |x / s|, through x / s
            dx = ste_grad(x, gxq, smooth, ga, smooth_ids)
        if gu is not None and A is not None:
            dx_u = gu @ A  # (..., K)
            dx = dx_u if dx is None else dx + dx_u
            if ctx.needs_input_grad[4]:
                dA = gu.reshape(-1, A.shape[0]).t() @ x.reshape(-1, K)  # (r, K)
        return dx, None, None, None, dA, None


def quantize_act_ste(
    x: Tensor,
    smooth: Tensor | None,
    fmt: QuantFormat | str,
    global_amax: Tensor | float | None = None,
    lora_down: Tensor | None = None,
    *,
    smooth_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(xq, u)`` of :func:`quantize_act` with the reference path's gradients: to ``x`` through ``xq``
    the identity (zeroed where a given range clips ``|x / s|``) divided by ``s`` in float32 and rounded to
    ``D``; through ``u``, ``du · A``; to ``lora_down`` ``duᵀ · x`` (through its cast to ``D``). No gradient
    to ``smooth`` or ``global_amax``. For per-row ranges the mask is ``|x / s| <= range`` of the row, which
    is what :func:`svdq.experts.ops.quant_rows` does (its dynamic rows' ranges are their experts' maxima,
    so nothing is masked there). ``smooth_ids``: per-row smoothing, as in :func:`quantize_act`."""
    fmt, ga = _check(x, smooth, fmt, global_amax, lora_down, smooth_ids)
    A = None if lora_down is None else lora_down.to(x.dtype)  # autograd casts dA back
    return _ActQuantSTE.apply(x, smooth, fmt, ga, A, smooth_ids)


def fused_act_applies(x: Tensor, fmt: QuantFormat | str, *tensors: Tensor) -> bool:
    """Whether an integrator should call :func:`quantize_act` for ``x`` (and ``tensors``: smooth,
    lora_down, …): nvfp4 or int4 with ``x``'s last dimension divisible by the group size, a float32 /
    bfloat16 / float16 ``x``, and :func:`svdq.kernels.use_triton` (which raises under backend
    ``"triton"`` when the kernel cannot run on these tensors)."""
    fmt = parse_format(fmt)
    if fmt.name not in _FORMATS or x.dtype not in _DTYPES or x.dim() == 0:
        return False
    if x.shape[-1] % fmt.group_size:
        return False
    return use_triton(x, *(t for t in tensors if t is not None), who="quantize_act")
