"""Expert-parallel dispatch of 4-bit activations (svdq/DESIGN.md §22): fc1's ``Q_a(x / s)`` and the shared
``u = x · Aᵀ`` computed on the sending rank, the packed codes, block scales and ``u`` sent by one
``all_to_all_single``, and the expert input dequantized on the receiving rank — bit for bit what sending
16-bit ``x`` and quantizing after the dispatch gives (:func:`dispatch_16bit`, the reference path).

Why it is exact: fc1's smoothing ``s`` and a shared-down ``lora_down`` ``A`` are one tensor per MoE layer
(§4), and each row's 4-bit quantization depends only on the row and its range — NVFP4 blocks / INT4 groups
lie inside a row, and the NVFP4 per-tensor range is static (calibrated, §5): one value for the layer, or
one per row (its destination expert's range). A dynamic NVFP4 range (``max|x/s|`` of the receiving
expert's whole batch) is not known before the dispatch, so it is refused.

Tensors (``S`` rows this rank sends, ordered by destination rank — Megatron's permuted tokens, one row per
(token, expert) pair — ``R`` rows it receives, ``K`` channels, ``r`` LoRA rank, ``D`` x's dtype, ``G`` the
format's group: 16 for nvfp4, 32 / 64 / 128 for int4)::

    x            D (S, K)            rows to send (float32 / bfloat16 / float16)
    send_counts  list[int] (W,)      rows for each rank of the group; sum S
    recv_counts  list[int] (W,)      rows from each rank (None: exchanged first, 8·W bytes)
    smooth       float32 (K,)        fc1's shared smoothing s (None: x is already x / s)
    lora_down    (r, K) or None      the shared A (cast to D, as the layers do)
    global_amax  nvfp4: float32 () or (S,) static max|x/s| range(s), finite and > 0; int4: None.
                                    A () range is the layer's: the same value on every rank (the
                                    receiver dequantizes with its own copy; not checked)
    -> xq        D (R, K)            received rows' Q_a(x / s), what the expert GEMM reads
    -> u         D (R, r) or None    received rows' x · Aᵀ

Wire format, one uint8 row per sent row (one collective): nvfp4 ``K/2`` packed E2M1 codes (nibble order
of :mod:`svdq.formats.packing`) + ``K/16`` E4M3 block scales [+ 4 bytes float32 global scale with per-row
ranges]; int4 ``K/2`` codes + ``K/G`` multipliers in ``D``; then ``2r`` (bf16/fp16) or ``4r`` (fp32) bytes
of ``u``. The 16-bit path sends ``x`` (``2K`` / ``4K`` bytes) [+ 4 bytes of range per row].

Gradients (straight-through, as :func:`svdq.kernels.act_quant.quantize_act_ste` and the reference
autograd): the received rows' ``d xq`` and ``d u`` travel back by the reverse all-to-all (in ``D``, one
collective); the sending rank forms ``dx = (mask · d xq) / s + du · A`` and ``dA = duᵀ · x`` over the rows
it SENT — the 16-bit path forms ``dA`` over the rows it RECEIVED. Per rank the two ``dA`` differ; their sum
over the expert-parallel group is the same (every row counted once), and that sum is what a shared factor
needs anyway (svdq/DESIGN.md §9). No gradient to ``smooth`` or ``global_amax``.

Backend: the fused Triton kernel (:func:`svdq.kernels.act_quant.quantize_act`, ``return_packed``) where
:func:`~svdq.kernels.act_quant.fused_act_applies` says so (CUDA, or ``SVDQ_KERNELS=triton`` under the
interpreter), else the PyTorch reference of :mod:`svdq.formats`; the two give the same codes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from svdq.formats import QuantFormat, parse_format, trusted_inputs
from svdq.formats import int4 as _int4
from svdq.formats import nvfp4 as _nvfp4
from svdq.formats.packing import pack_nibbles, unpack_nibbles
from svdq.kernels import triton_available
from svdq.kernels.act_quant import check_lora_down

__all__ = ["DispatchTraffic", "bytes_per_row", "dispatch_16bit", "dispatch_quantized"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FORMATS = ("nvfp4", "int4")


@dataclass
class DispatchTraffic:
    """Bytes handed to ``all_to_all_single`` by one rank (the send buffers' ``nbytes``), accumulated over
    calls. ``*_remote`` excludes the rows a rank sends to itself (they do not cross the network);
    ``counts`` is the exchange of row counts (when ``recv_counts`` is not given)."""

    forward: int = 0
    forward_remote: int = 0
    backward: int = 0
    backward_remote: int = 0
    counts: int = 0
    calls: int = 0


# ------------------------------------------------------------------------------------------- checks
def _check(x, send_counts, recv_counts, smooth, lora_down, fmt, global_amax, group, who):
    """Validate everything before any communication; returns (fmt, ga: float32 () / (S,) or None, world,
    this process's rank in ``group``)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who}: x must be a 2-D tensor (rows, channels); got {got}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{who}: x has dtype {x.dtype}; expected float32, bfloat16 or float16")
    fmt = parse_format(fmt)
    if fmt.name not in _FORMATS:
        raise ValueError(f"{who}: act_format {fmt} is not supported; 4-bit dispatch needs nvfp4 or int4")
    S, K = x.shape
    if K % fmt.group_size:
        raise ValueError(f"{who}: x has {K} channels, not divisible by {fmt}'s group {fmt.group_size}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{who}: torch.distributed is not initialized")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    for name, counts in (("send_counts", send_counts), ("recv_counts", recv_counts)):
        if counts is None and name == "recv_counts":
            continue
        ok = isinstance(counts, (list, tuple)) and len(counts) == world
        ok = ok and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        if not ok:
            raise ValueError(f"{who}: {name} must be {world} non-negative ints (one per rank): {counts!r}")
    if sum(send_counts) != S:
        raise ValueError(f"{who}: send_counts sum to {sum(send_counts)}, but x has {S} rows")
    if smooth is not None:
        if not isinstance(smooth, Tensor) or smooth.dtype != torch.float32 or tuple(smooth.shape) != (K,):
            got = f"{smooth.dtype} {tuple(smooth.shape)}" if isinstance(smooth, Tensor) else smooth
            raise ValueError(f"{who}: smooth must be a float32 tensor of shape ({K},); got {got}")
        if not bool(torch.isfinite(smooth).all() & (smooth > 0).all()):
            raise ValueError(f"{who}: smooth must be finite and > 0")
    if smooth is not None and smooth.device != x.device:
        raise ValueError(f"{who}: smooth is on {smooth.device}, x on {x.device}")
    if lora_down is not None:
        check_lora_down(lora_down, x, who)
    if fmt.name == "int4":
        if global_amax is not None:
            raise ValueError(f"{who}: int4 scales are per group of one row; global_amax must be None")
        return fmt, None, world, me
    if global_amax is None:
        raise ValueError(
            f"{who}: nvfp4 needs a static global_amax (() or one per row); a dynamic range depends on the "
            "receiving expert's whole batch and is not known before the dispatch"
        )
    ga = torch.as_tensor(global_amax).detach().to(device=x.device, dtype=torch.float32)
    if ga.dim() == 1 and ga.shape[0] == S:
        pass
    elif ga.numel() == 1:
        ga = ga.reshape(())
    else:
        raise ValueError(f"{who}: global_amax has shape {tuple(ga.shape)}; expected () or ({S},) one per row")
    if not bool((torch.isfinite(ga) & (ga > 0)).all()):
        raise ValueError(f"{who}: global_amax must be finite and > 0 (a static range)")
    return fmt, ga, world, me


def bytes_per_row(
    fmt: QuantFormat | str, channels: int, rank: int, dtype: torch.dtype, per_row_range: bool
) -> dict:
    """Bytes one dispatched row takes on the wire: ``{"quantized": ..., "16bit": ...}`` (see the module
    docstring's wire format)."""
    fmt = parse_format(fmt)
    el = torch.empty((), dtype=dtype).element_size()
    extra = 4 if per_row_range else 0
    if fmt.name == "nvfp4":
        q = channels // 2 + channels // 16
    elif fmt.name == "int4":
        q, extra = channels // 2 + (channels // fmt.group_size) * el, 0
    else:
        raise ValueError(f"bytes_per_row: act_format {fmt} is not supported; expected nvfp4 or int4")
    return {"quantized": q + extra + rank * el, "16bit": channels * el + extra}


def _prepare(x, send_counts, recv_counts, smooth, lora_down, fmt, global_amax, group, traffic, who):
    """:func:`_check`, then the row counts (exchanged when ``recv_counts`` is None):
    ``(fmt, ga, me, send_counts, recv_counts)``."""
    fmt, ga, world, me = _check(x, send_counts, recv_counts, smooth, lora_down, fmt, global_amax, group, who)
    send_counts = [int(c) for c in send_counts]
    if world == 1 and recv_counts is not None and list(recv_counts) != send_counts:
        raise ValueError(f"{who}: one rank: recv_counts {list(recv_counts)} must equal send_counts")
    if recv_counts is None and world > 1:
        recv_counts = _exchange_counts(send_counts, group, traffic, x.device)
    elif recv_counts is None:
        recv_counts = list(send_counts)
    return fmt, ga, me, send_counts, [int(c) for c in recv_counts]


# ------------------------------------------------------------------------------------------- wire
def _exchange_counts(send_counts, group, traffic, device) -> list[int]:
    send = torch.tensor(send_counts, dtype=torch.int64, device=device)  # on x's device (NCCL: CUDA)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if traffic is not None:
        traffic.counts += send.nbytes
    return [int(c) for c in recv.tolist()]


def _all_to_all_rows(buf: Tensor, send_counts, recv_counts, group, me: int) -> Tensor:
    """``all_to_all_single`` of the rows of ``buf (S, B)`` (any dtype; gloo and NCCL take uint8):
    returns ``(R, B)``."""
    if dist.get_world_size(group) == 1:
        return buf
    buf = buf.contiguous()
    out = buf.new_empty((sum(recv_counts), buf.shape[1]))
    dist.all_to_all_single(out, buf, list(recv_counts), list(send_counts), group=group)
    return out


def _count(traffic, direction, buf, send_counts, me):
    if traffic is None:
        return
    row = buf.shape[1] * buf.element_size()
    setattr(traffic, direction, getattr(traffic, direction) + buf.shape[0] * row)
    remote = (buf.shape[0] - send_counts[me]) * row
    setattr(traffic, direction + "_remote", getattr(traffic, direction + "_remote") + remote)


def _bytes(t: Tensor) -> Tensor:
    """``(S, n)`` of any dtype as ``(S, n · itemsize)`` uint8 (a view of a contiguous copy)."""
    return t.contiguous().view(torch.uint8)


def _split_cols(buf: Tensor, widths: list[int]) -> list[Tensor]:
    out, c = [], 0
    for w in widths:
        out.append(buf[:, c : c + w].contiguous())
        c += w
    return out


# ------------------------------------------------------------------------------------------- quantize
def _quantize_rows(x, smooth, fmt, ga, A):
    """(codes uint8 (S, K/2), scale (S, K/G) [e4m3 / D], g float32 () or (S,) [nvfp4], u D (S, r) or None)
    of the rows of ``x``: the fused kernel where it applies, else the PyTorch reference."""
    if triton_available() and x.shape[0]:
        from svdq.kernels.act_quant import fused_act_applies, quantize_act

        if fused_act_applies(x, fmt, smooth, *(t for t in (A,) if t is not None)):
            with trusted_inputs():
                res = quantize_act(x, smooth, fmt, ga, A, return_packed=True)
            return res.qdata, res.scale, res.global_scale, res.u
    xs = x if smooth is None else (x.float() / smooth).to(x.dtype)  # (S, K) rnd_D(x / s)
    with trusted_inputs():
        if fmt.name == "nvfp4":
            codes, scale, g = _nvfp4.encode(xs, ga if ga.dim() == 0 else ga.unsqueeze(-1), fmt)
            g = g if g.dim() == 0 else g.reshape(-1)
        else:
            codes, scale = _int4.encode(xs, fmt.group_size, fmt)
            g = None
    u = None if A is None else F.linear(x, A)  # (S, r)
    return pack_nibbles(codes, even_low=fmt.name == "nvfp4"), scale, g, u


def _dequantize_rows(codes, scale, g, fmt, dtype):
    """``D (R, K)`` from the received codes / scales: equal to ``fake_quant``'s output bit for bit."""
    vals = unpack_nibbles(codes, even_low=fmt.name == "nvfp4")
    if fmt.name == "nvfp4":
        return _nvfp4.decode(vals, scale, g if g.dim() == 0 else g.unsqueeze(-1)).to(dtype)
    return _int4.decode(vals, scale, fmt.group_size).to(dtype)


def _global_scale(ga: Tensor) -> Tensor:
    """nvfp4's ``g = amax / 2688`` (1 where 0) — :func:`svdq.formats.nvfp4.compute_scales`'s expression."""
    g = ga / (6.0 * 448.0)
    return torch.where(g == 0, torch.ones_like(g), g)


class _QuantDispatch(torch.autograd.Function):
    """Forward: quantize on the sender, one all-to-all of the wire rows, dequantize on the receiver.
    Backward: reverse all-to-all of ``(d xq, d u)``, straight-through on the sender."""

    @staticmethod
    def forward(ctx, x, A, smooth, ga, fmt, send_counts, recv_counts, group, me, traffic):  # type: ignore[override]
        S, K = x.shape
        dt = x.dtype
        codes, scale, g, u = _quantize_rows(x.detach(), smooth, fmt, ga, None if A is None else A.detach())
        per_row = fmt.name == "nvfp4" and ga.dim() == 1
        parts = [codes, _bytes(scale)]  # (S, K/2), (S, K/16 or K/G · itemsize)
        if per_row:
            parts.append(_bytes(g.reshape(S, 1)))  # (S, 4)
        if u is not None:
            parts.append(_bytes(u.to(dt)))  # (S, r · itemsize)
        widths = [p.shape[1] for p in parts]
        wire = torch.cat(parts, dim=1) if S else x.new_empty((0, sum(widths)), dtype=torch.uint8)
        _count(traffic, "forward", wire, send_counts, me)
        got = _all_to_all_rows(wire, send_counts, recv_counts, group, me)  # (R, B) uint8
        cols = _split_cols(got, widths)
        r_codes, r_scale = cols[0], cols[1]
        r_scale = r_scale.view(torch.float8_e4m3fn if fmt.name == "nvfp4" else dt)
        r_g = None
        if fmt.name == "nvfp4":
            r_g = cols[2].view(torch.float32).reshape(-1) if per_row else _global_scale(ga)
        xq = _dequantize_rows(r_codes, r_scale, r_g, fmt, dt)  # (R, K)
        r_u = cols[-1].view(dt) if u is not None else None  # (R, r)
        ctx.save_for_backward(x, A, smooth, ga)
        ctx.meta = (fmt, send_counts, recv_counts, group, me, traffic)
        if r_u is None:
            r_u = xq.new_zeros(xq.shape[0], 0)
        return xq, r_u

    @staticmethod
    def backward(ctx, gxq, gu):  # type: ignore[override]
        x, A, smooth, ga = ctx.saved_tensors
        fmt, send_counts, recv_counts, group, me, traffic = ctx.meta
        dt, K = x.dtype, x.shape[1]
        has_u = A is not None
        gxq = torch.zeros(sum(recv_counts), K, dtype=dt, device=x.device) if gxq is None else gxq.to(dt)
        parts = [gxq]
        if has_u:
            r = A.shape[0]
            gu = torch.zeros(gxq.shape[0], r, dtype=dt, device=x.device) if gu is None else gu.to(dt)
            parts.append(gu)
        back = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (R, K [+ r]) D
        _count(traffic, "backward", back, recv_counts, me)
        got = _all_to_all_rows(back, recv_counts, send_counts, group, me)  # (S, K [+ r])
        g_x, g_u = got[:, :K], got[:, K:]
        if ga is not None:  # straight-through, zeroed where the static range clips |x / s|
            xs = x if smooth is None else (x.float() / smooth).to(dt)
            lim = ga.unsqueeze(-1) if ga.dim() else ga
            g_x = torch.where(xs.float().abs() <= lim, g_x, torch.zeros_like(g_x))
        dx = g_x if smooth is None else (g_x.float() / smooth).to(dt)  # through rnd_D(x / s)
        dA = None
        if has_u:
            dx = dx + g_u @ A.to(dt)  # (S, K)
            if ctx.needs_input_grad[1]:
                dA = g_u.t() @ x  # (r, K) over the rows this rank sent
        return dx, dA, None, None, None, None, None, None, None, None


class _AllToAllRows(torch.autograd.Function):
    """Differentiable all-to-all of rows (the 16-bit path): the gradient goes back by the reverse one."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group, me, traffic):  # type: ignore[override]
        _count(traffic, "forward", x, send_counts, me)
        ctx.meta = (send_counts, recv_counts, group, me, traffic)
        return _all_to_all_rows(x.detach(), send_counts, recv_counts, group, me).clone()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        send_counts, recv_counts, group, me, traffic = ctx.meta
        g = g.contiguous()
        _count(traffic, "backward", g, recv_counts, me)
        return _all_to_all_rows(g, recv_counts, send_counts, group, me), None, None, None, None, None


# ------------------------------------------------------------------------------------------- public
def dispatch_quantized(
    x: Tensor,
    send_counts: list[int],
    *,
    act_format: QuantFormat | str,
    smooth: Tensor | None = None,
    lora_down: Tensor | None = None,
    global_amax: Tensor | float | None = None,
    recv_counts: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
    traffic: DispatchTraffic | None = None,
) -> tuple[Tensor, Tensor | None, list[int]]:
    """4-bit expert-parallel dispatch: ``(xq (R, K), u (R, r) or None, recv_counts)`` on the receiving
    rank (see the module docstring for the tensors, the wire format and the gradients).

    ``xq`` and ``u`` equal :func:`dispatch_16bit`'s bit for bit (same backend on both paths). ``traffic``
    accumulates the bytes sent. Raises ``ValueError`` (one line, naming the argument) for bad shapes or
    dtypes, split sizes that do not sum to ``x``'s rows, a format other than nvfp4 / int4, or an nvfp4
    range that is not static — before any communication."""
    args = (x, send_counts, recv_counts, smooth, lora_down, act_format, global_amax, group)
    fmt, ga, me, send_counts, recv_counts = _prepare(*args, traffic, "dispatch_quantized")
    A = None if lora_down is None else lora_down.to(x.dtype)  # autograd casts dA back
    if traffic is not None:
        traffic.calls += 1
    xq, u = _QuantDispatch.apply(x, A, smooth, ga, fmt, send_counts, recv_counts, group, me, traffic)
    return xq, (u if A is not None else None), recv_counts


def dispatch_16bit(
    x: Tensor,
    send_counts: list[int],
    *,
    act_format: QuantFormat | str,
    smooth: Tensor | None = None,
    lora_down: Tensor | None = None,
    global_amax: Tensor | float | None = None,
    recv_counts: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
    traffic: DispatchTraffic | None = None,
) -> tuple[Tensor, Tensor | None, list[int]]:
    """The reference: all-to-all of ``x`` in its own dtype (and of per-row ranges, float32), then on the
    receiving rank the frozen path's quantization as the grouped experts do it
    (:func:`svdq.kernels.act_quant.quantize_act_ste` where the fused kernel applies, else
    :func:`svdq.residual.quantize_activation` / :func:`svdq.experts.ops.quant_rows` and ``F.linear(x, A)``).
    Same arguments, checks and returns as :func:`dispatch_quantized`; autograd through everything."""
    from svdq.experts.ops import quant_rows
    from svdq.residual import quantize_activation

    args = (x, send_counts, recv_counts, smooth, lora_down, act_format, global_amax, group)
    fmt, ga, me, send_counts, recv_counts = _prepare(*args, traffic, "dispatch_16bit")
    if traffic is not None:
        traffic.calls += 1
    per_row = ga is not None and ga.dim() == 1
    xr = _AllToAllRows.apply(x, send_counts, recv_counts, group, me, traffic)  # (R, K)
    r_ga = ga
    if per_row:  # the receiver's ranges: in a model it looks its experts' ranges up; here they travel along
        r_ga = _AllToAllRows.apply(ga.unsqueeze(-1), send_counts, recv_counts, group, me, traffic).reshape(-1)
    A = None if lora_down is None else lora_down.to(x.dtype)
    if A is not None and triton_available() and xr.shape[0]:
        from svdq.kernels.act_quant import fused_act_applies, quantize_act_ste

        if fused_act_applies(xr, fmt, smooth, A):  # grouped_projection's fused branch
            with trusted_inputs():
                xq, u = quantize_act_ste(xr, smooth, fmt, r_ga, lora_down=A)
            return xq, u, recv_counts
    with trusted_inputs():
        if per_row:  # each row its own "expert" with a static range: quant_rows's per-row quantization
            xs = xr if smooth is None else (xr.float() / smooth).to(xr.dtype)
            ids = torch.arange(xr.shape[0], device=xr.device)
            xq = quant_rows(xs, ids, fmt, xr.shape[0], r_ga)
        else:
            xq = quantize_activation(xr, smooth, fmt, r_ga)
    u = None if A is None else F.linear(xr, A)  # (R, r)
    return xq, u, recv_counts
