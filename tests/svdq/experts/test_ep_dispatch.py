"""4-bit expert-parallel dispatch (svdq/experts/ep_dispatch.py, svdq/DESIGN.md §22) on real gloo processes:
the received expert input and ``u`` against the 16-bit dispatch + quantization after it (bit for bit),
gradients against the 16-bit path's autograd, bytes handed to the all-to-all, and hostile input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from svdq.experts.ep_dispatch import DispatchTraffic, bytes_per_row, dispatch_16bit, dispatch_quantized
from svdq.formats import fake_quant, parse_format
from tests.helpers.dist import run_distributed


def _rows(rank: int, K: int, r: int, dtype, seed: int = 0):
    """This rank's rows (with outlier channels), send counts (one rank gets none from rank 1), smoothing,
    lora_down and per-row static ranges (some below the row's max|x/s|: they clip)."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    S = 9 if rank == 0 else 5
    x = torch.randn(S, K, generator=g)
    x[:, :3] *= 20.0  # outlier channels
    x = x.to(dtype)
    send = [4, 5] if rank == 0 else [5, 0]
    gs = torch.Generator().manual_seed(seed)  # shared by every rank: s and A are the layer's
    smooth = torch.rand(K, generator=gs) + 0.5
    A = torch.randn(r, K, generator=gs) / K**0.5
    xs_max = (x.float() / smooth).to(dtype).float().abs().amax(-1)  # (S,)
    ga = xs_max * (1.0 + torch.rand(S, generator=g))
    ga[::3] = xs_max[::3] * 0.5  # clipping rows: their gradient is masked
    return x, send, smooth, A, ga


def _exact_worker(rank, world, K, r):
    out = {}
    for name, fmt, per_row in (("nvfp4_rows", "nvfp4", True), ("nvfp4_tensor", "nvfp4", False),
                               ("int4", "int4-g64", None)):  # fmt: skip
        x, send, smooth, A, ga = _rows(rank, K, r, torch.bfloat16)
        amax = None if per_row is None else (ga if per_row else torch.tensor(30.0))  # (): same on all ranks
        tq, t16 = DispatchTraffic(), DispatchTraffic()
        kw = dict(act_format=fmt, smooth=smooth, lora_down=A, global_amax=amax)
        xq, u, recv = dispatch_quantized(x, send, traffic=tq, **kw)
        xq16, u16, recv16 = dispatch_16bit(x, send, traffic=t16, **kw)
        out[name] = dict(xq=xq, u=u, xq16=xq16, u16=u16, recv=recv, recv16=recv16, fwd=tq.forward,
                         fwd16=t16.forward, remote=tq.forward_remote, S=x.shape[0])  # fmt: skip
    # ground truth for the received rows: gather every rank's rows, quantize them where they are
    x, send, smooth, A, ga = _rows(rank, K, r, torch.bfloat16)
    xs = (x.float() / smooth).to(x.dtype)
    mine = torch.cat([fake_quant(xs[i : i + 1], "nvfp4", ga[i]) for i in range(x.shape[0])])
    out["local_fake_quant"] = mine  # (S, K): this rank's rows, each with its own static range
    out["send"] = send
    return out


def test_two_ranks_bit_identical_and_bytes():
    """2 gloo ranks, bf16 rows (K 2048, r 32, uneven split, one empty send): nvfp4 with per-row and
    per-tensor static ranges and int4-g64 — 4-bit dispatch gives the same expert input and u as 16-bit
    dispatch + quantization after it, bit for bit; the received rows equal fake_quant of the sender's rows;
    the bytes handed to the all-to-all are bytes_per_row's count and <= 0.3x the 16-bit path's."""
    K, r = 2048, 32
    res = run_distributed(_exact_worker, 2, K, r)
    for rank, out in enumerate(res):
        for name in ("nvfp4_rows", "nvfp4_tensor", "int4"):
            o = out[name]
            assert o["recv"] == o["recv16"]
            assert torch.equal(o["xq"], o["xq16"]), (rank, name)
            assert torch.equal(o["u"], o["u16"]), (rank, name)
            assert o["xq"].dtype == torch.bfloat16 and o["xq"].shape == (sum(o["recv"]), K)
            fmt = "nvfp4" if name != "int4" else "int4-g64"
            per_row = name == "nvfp4_rows"
            b = bytes_per_row(fmt, K, r, torch.bfloat16, per_row)
            assert o["fwd"] == o["S"] * b["quantized"] and o["fwd16"] == o["S"] * b["16bit"]
            assert o["remote"] == (o["S"] - out["send"][rank]) * b["quantized"]
            assert o["fwd"] <= 0.3 * o["fwd16"], (name, o["fwd"] / o["fwd16"])
    # rank 0 receives rank 0's first 4 rows then rank 1's 5 rows: each the sender's own fake_quant
    got = res[0]["nvfp4_rows"]["xq"]
    expect = torch.cat([res[0]["local_fake_quant"][:4], res[1]["local_fake_quant"][:5]])
    assert torch.equal(got, expect)
    assert not torch.equal(got, expect.new_zeros(expect.shape))


def _grad_worker(rank, world, K, r, dtype):
    out = {}
    cases = (("nvfp4_rows", "nvfp4", True), ("nvfp4_no_lora", "nvfp4", True), ("int4", "int4-g32", None))
    for name, fmt, per_row in cases:
        grads = {}
        for path, fn in (("q", dispatch_quantized), ("16", dispatch_16bit)):
            x, send, smooth, A, ga = _rows(rank, K, r, dtype, seed=1)
            x.requires_grad_(True)
            A.requires_grad_(True)
            amax = None if per_row is None else ga
            lora = None if name == "nvfp4_no_lora" else A
            xq, u, recv = fn(x, send, act_format=fmt, smooth=smooth, lora_down=lora, global_amax=amax)
            g = torch.Generator().manual_seed(7 + rank)  # the same loss on the received rows for both paths
            wx = torch.randn(xq.shape, generator=g).to(dtype)
            loss = (xq * wx).float().sum()
            if u is not None:
                loss = loss + (u * torch.randn(u.shape, generator=g).to(dtype)).float().sum()
            loss.backward()
            grads[path] = dict(dx=x.grad.clone())
            if lora is not None:
                dA = A.grad.clone()
                dist.all_reduce(dA)  # a shared factor's gradient is summed over the expert-parallel group
                grads[path].update(dA_local=A.grad.clone(), dA=dA)
        out[name] = grads
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_ranks_gradients_match_16bit_path(dtype):
    """Gradients of x and of the shared lora_down through the 4-bit dispatch equal the 16-bit path's
    autograd: dx bit for bit (the same per-row arithmetic on either side of the all-to-all); dA summed over
    the two ranks to 1e-5 relative in float32 (4e-3 in bf16: each rank's partial is rounded to bf16 before
    the sum) — per rank the partials differ (the 4-bit path sums over sent rows, the 16-bit over received)."""
    K, r = 64, 8
    res = run_distributed(_grad_worker, 2, K, r, dtype)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for out in res:
        for name, g in out.items():
            assert torch.equal(g["q"]["dx"], g["16"]["dx"]), name
            assert g["q"]["dx"].abs().sum() > 0
            if name == "nvfp4_no_lora":  # the rows whose range clips: those entries get no gradient
                assert (g["q"]["dx"] == 0).any()
                continue
            err = (g["q"]["dA"].float() - g["16"]["dA"].float()).norm() / g["16"]["dA"].float().norm()
            assert err <= tol, (name, float(err))
    assert not torch.allclose(res[0]["nvfp4_rows"]["q"]["dA_local"], res[0]["nvfp4_rows"]["16"]["dA_local"])


def _one_rank_worker(rank, world):
    x, _, smooth, A, ga = _rows(0, 32, 4, torch.bfloat16)
    S = x.shape[0]
    tq = DispatchTraffic()
    xq, u, recv = dispatch_quantized(x, [S], act_format="nvfp4", smooth=smooth, lora_down=A, global_amax=ga,
                                     traffic=tq)  # fmt: skip
    xq16, u16, _ = dispatch_16bit(x, [S], act_format="nvfp4", smooth=smooth, lora_down=A, global_amax=ga)
    errors = {}
    good = dict(act_format="nvfp4", smooth=smooth, lora_down=A, global_amax=ga)
    bad_cases = {
        "x_1d": ((x[0], [S]), {}),
        "x_int": ((x.to(torch.int32), [S]), {}),
        "counts_sum": ((x, [S - 1]), {}),
        "counts_len": ((x, [S, 0]), {}),
        "counts_neg": ((x, [-1]), {}),
        "recv_counts": ((x, [S]), {"recv_counts": [S + 1]}),
        "format_fp8": ((x, [S]), {"act_format": "fp8"}),
        "dynamic_range": ((x, [S]), {"global_amax": None}),
        "range_shape": ((x, [S]), {"global_amax": ga[:2]}),
        "range_zero": ((x, [S]), {"global_amax": torch.zeros(S)}),
        "range_nan": ((x, [S]), {"global_amax": float("nan")}),
        "int4_range": ((x, [S]), {"act_format": "int4-g32", "global_amax": ga}),
        "group": ((x[:, :24], [S]), {"smooth": smooth[:24], "lora_down": A[:, :24]}),
        "smooth_shape": ((x, [S]), {"smooth": smooth[:8]}),
        "smooth_zero": ((x, [S]), {"smooth": torch.zeros(32)}),
        "lora_shape": ((x, [S]), {"lora_down": A[:, :8]}),
    }
    for name, (args, kw) in bad_cases.items():
        for fn in (dispatch_quantized, dispatch_16bit):
            try:
                fn(*args, **{**good, **kw})
                errors[f"{name}/{fn.__name__}"] = None
            except ValueError as e:
                errors[f"{name}/{fn.__name__}"] = str(e)
    return dict(xq=xq, u=u, xq16=xq16, u16=u16, recv=recv, fwd=tq.forward, remote=tq.forward_remote,
                errors=errors)  # fmt: skip


def test_one_rank_and_hostile_input():
    """World size 1: no collective (recv = send), the same result as the 16-bit path, no remote bytes.
    Hostile input: one ValueError naming the argument, before any communication (both paths)."""
    (out,) = run_distributed(_one_rank_worker, 1)
    assert torch.equal(out["xq"], out["xq16"]) and torch.equal(out["u"], out["u16"])
    assert out["recv"] == [out["xq"].shape[0]] and out["remote"] == 0 and out["fwd"] > 0
    words = {"x_1d": "x", "x_int": "dtype", "counts_sum": "sum", "counts_len": "send_counts",
             "counts_neg": "send_counts", "recv_counts": "recv_counts", "format_fp8": "act_format",
             "dynamic_range": "static", "range_shape": "global_amax", "range_zero": "global_amax",
             "range_nan": "global_amax", "int4_range": "global_amax", "group": "divisible",
             "smooth_shape": "smooth", "smooth_zero": "smooth", "lora_shape": "lora_down"}  # fmt: skip
    for key, msg in out["errors"].items():
        assert msg is not None, f"{key}: no ValueError"
        assert words[key.split("/")[0]] in msg and "\n" not in msg, (key, msg)


def test_not_initialized_raises():
    """Without a process group: ValueError, not a hang."""
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="not initialized"):
        dispatch_quantized(x, [2], act_format="nvfp4", global_amax=1.0)


def _kernel_worker(rank, world, K, r):
    from svdq.kernels import kernel_backend

    out = {}
    for name, fmt, per_row in (("nvfp4", "nvfp4", True), ("int4", "int4-g32", None)):
        x, send, smooth, A, ga = _rows(rank, K, r, torch.bfloat16, seed=2)
        kw = dict(act_format=fmt, smooth=smooth, lora_down=A, global_amax=ga if per_row else None)
        with kernel_backend("triton"):  # the fused kernel (Triton's interpreter on CPU) on both paths
            out[name] = dict(kq=dispatch_quantized(x, send, **kw)[:2], k16=dispatch_16bit(x, send, **kw)[:2])
        with kernel_backend("torch"):
            out[name]["t16"] = dispatch_16bit(x, send, **kw)[:2]
    return out


def test_two_ranks_fused_kernel_sender():
    """SVDQ_KERNELS=triton (interpreter): the sender quantizes with quantize_act(return_packed=True); the
    received xq equals the torch-reference 16-bit path's bit for bit and the kernel's 16-bit path's too;
    u (the kernel's fp32-accumulated x · Aᵀ) equals the kernel 16-bit path's bit for bit and the torch
    path's F.linear to bf16 rounding (2**-7 relative of the row scale)."""
    pytest.importorskip("triton")
    res = run_distributed(_kernel_worker, 2, 64, 8)
    for out in res:
        for name, o in out.items():
            (xq, u), (xk, uk), (xt, ut) = o["kq"], o["k16"], o["t16"]
            assert torch.equal(xq, xk) and torch.equal(xq, xt), name
            assert torch.equal(u, uk), name
            assert ((u.float() - ut.float()).abs().amax(-1) <= 2**-7 * ut.float().abs().amax(-1)).all(), name


def _experts_worker(rank, world, H, N, r):
    from svdq.experts.projection import grouped_projection

    E, T, k = 4, 6, 2  # 4 experts, 2 per rank; 6 tokens per rank, top-2
    g = torch.Generator().manual_seed(50 + rank)
    x = (torch.randn(T, H, generator=g) * torch.linspace(0.5, 8, H)).to(torch.bfloat16)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)  # (T·k,)
    order = torch.argsort(experts, stable=True)
    rows, ids = x.repeat_interleave(k, dim=0)[order], experts[order]  # by expert, hence by rank
    send = torch.bincount(ids // 2, minlength=world).tolist()
    gs = torch.Generator().manual_seed(3)  # the layer's tensors, the same on every rank
    smooth = torch.rand(H, generator=gs) + 0.5
    A = torch.randn(r, H, generator=gs) / H**0.5
    W = (torch.randn(E, N, H, generator=gs) / H**0.5).to(torch.bfloat16)  # dequantized residuals
    B = torch.randn(E, N, r, generator=gs) / r**0.5
    input_amax = torch.rand(E, generator=gs) * 20 + 10  # static per-expert ranges (some clip)
    # what Megatron's dispatcher knows: each received row's expert (here sent along, test only)
    recv = _counts(send)
    r_ids = torch.empty(sum(recv), dtype=torch.int64)
    dist.all_to_all_single(r_ids, ids, recv, send)
    local = slice(2 * rank, 2 * rank + 2)
    perm = torch.argsort(r_ids, stable=True)  # received rows by local expert (Megatron's sort_chunks)
    lid = r_ids[perm] - 2 * rank
    counts = torch.bincount(lid, minlength=2).tolist()
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    kw = dict(residual=W[local], smooth=smooth, act_format=parse_format("nvfp4"),
              input_amax=input_amax[local], lora_down=A, lora_up=B[local], ranges_static=True)  # fmt: skip
    # 4-bit dispatch: quantized and u = x · Aᵀ on the sender, each row with its expert's range
    xq, u, _ = dispatch_quantized(rows, send, act_format="nvfp4", smooth=smooth, lora_down=A,
                                  global_amax=input_amax[ids], recv_counts=recv)  # fmt: skip
    xq, u = xq[perm], u[perm]
    y4 = grouped_projection(xq, lid, counts, offs, quantized=(xq, u), **kw)
    # 16-bit dispatch, then the grouped experts quantize (the existing path)
    xr = torch.empty(sum(recv), H, dtype=torch.bfloat16)
    dist.all_to_all_single(xr, rows, recv, send)
    y16 = grouped_projection(xr[perm], lid, counts, offs, **kw)
    errors = []
    for bad in (dict(quantized=(xq.clone(), u)), dict(quantized=(xq, None))):
        try:
            grouped_projection(xq, lid, counts, offs, **{**kw, **bad})
        except ValueError as e:
            errors.append(str(e))
    return dict(y4=y4, y16=y16, errors=errors, counts=counts)


def _counts(send):
    s = torch.tensor(send)
    out = torch.empty_like(s)
    dist.all_to_all_single(out, s)
    return out.tolist()


def test_two_ranks_grouped_experts_output():
    """End to end on 2 gloo ranks (4 experts, 2 per rank, top-2, per-expert static ranges): 4-bit dispatch
    then grouped_projection(quantized=(xq, u)) gives the experts' fc1 output bit for bit equal to 16-bit
    dispatch then grouped_projection quantizing the received rows (the existing path)."""
    res = run_distributed(_experts_worker, 2, 64, 24, 8)
    for out in res:
        assert sum(out["counts"]) == out["y4"].shape[0] > 0
        assert torch.equal(out["y4"], out["y16"])
        assert len(out["errors"]) == 2 and all("quantized" in e for e in out["errors"])


def _cuda_worker(rank, world, K, r):
    out = {}
    for fmt, per_row in (("nvfp4", True), ("nvfp4", False), ("int4-g64", None)):
        x, send, smooth, A, ga = _rows(0, K, r, torch.bfloat16)
        x, smooth, A, ga = x.cuda(), smooth.cuda(), A.cuda(), ga.cuda()
        amax = None if per_row is None else (ga if per_row else ga.amax())
        S = x.shape[0]
        kw = dict(act_format=fmt, smooth=smooth, lora_down=A, global_amax=amax)
        (xq, u, _), (xq16, u16, _) = dispatch_quantized(x, [S], **kw), dispatch_16bit(x, [S], **kw)
        out[f"{fmt}/{per_row}"] = dict(x=torch.equal(xq, xq16), u=torch.equal(u, u16), cuda=xq.is_cuda)
    return out


@pytest.mark.gpu
def test_cuda_kernel_sender_one_rank():
    """On CUDA (one process, no collective at world size 1): the sender's fused kernel codes, dequantized
    on the receiver in torch, equal the 16-bit path's kernel quantization bit for bit (and u too)."""
    (out,) = run_distributed(_cuda_worker, 1, 2048, 32)
    for name, o in out.items():
        assert o["cuda"] and o["x"] and o["u"], (name, o)
