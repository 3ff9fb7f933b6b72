"""SVDQuant on Megatron linears: quantized residual as the frozen base, branch as the adapter.

TP=2 (column with and without sequence parallelism, row) must reproduce TP=1 on the same weights, and
TP=1 must reproduce ``svdq.SVDQLinear`` built from the same decomposition.
"""

import pytest
import torch

from lora.framework.parallel import init_parallel
from lora.framework.tp import take_shard
from tests.helpers.spawn import run_on_processes

IN, OUT, R, SEQ, MB = 64, 48, 4, 16, 2
CASES = [("column", False), ("column", True), ("row", False)]  # (mode, sequence parallel)


def _problem():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(OUT, IN, generator=g) * 0.1
    W[:, :2] *= 6
    xs = [torch.randn(SEQ, MB, IN, generator=g) for _ in range(4)]
    for x in xs:
        x[..., 5:8] *= 20
    return W, xs


def _install(linear, name: str, result, act_format, storage: str = "packed"):
    """:func:`lora.install.install_linear` of ``result`` on a standalone Megatron linear (held in a
    one-module container as its "model"); returns the adapter."""
    from lora.config import LoraConfig
    from lora.install import install_linear

    holder = torch.nn.ModuleDict({name: linear})
    cfg = LoraConfig(rank=R, targets=(name,), fc1_layout=None, fc2_layout=None, init="zeros")
    return install_linear(
        holder,
        name,
        residual=result.residual,
        smooth=result.smooth,
        act_format=act_format,
        lora_down=result.lora_down,
        lora_up=result.lora_up,
        lora_config=cfg,
        storage=storage,
    )


def _worker(rank, world, storage):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from lora.framework.full_input import full_in_features, full_input
    from lora.framework.tp import gather_full_weight
    from svdq import SVDQConfig, decompose_linear
    from svdq.stats import collect_input_stats

    init_parallel(tensor_parallel=world)
    W, xs = _problem()
    cfg = SVDQConfig(rank=R, weight_format="nvfp4", act_format="nvfp4")
    out = {}
    for mode, case_sp in CASES:
        sp = case_sp and world > 1  # at TP=1 the same case runs without sequence parallelism
        mp = ModelParallelConfig(
            tensor_model_parallel_size=world, sequence_parallel=sp, use_cpu_initialization=True
        )
        kw = {"config": mp, "init_method": torch.nn.init.zeros_, "bias": False, "skip_bias_add": True}
        if mode == "column":
            lin = ColumnParallelLinear(IN, OUT, gather_output=True, **kw)
            local = [take_shard(x, 0, rank, world) if sp else x for x in xs]
        else:
            lin = RowParallelLinear(IN, OUT, input_is_parallel=True, **kw)
            local = [take_shard(x, 2, rank, world) for x in xs]
        with torch.no_grad():
            lin.weight.copy_(take_shard(W, 0 if mode == "column" else 1, rank, world))
        lin.weight.requires_grad_(False)
        name = f"{mode}{'-sp' if case_sp else ''}"

        def loop(m, calib=local[:3]):
            for x in calib:
                m(x)

        stats = collect_input_stats(
            lin, {name: lin}, loop, transform=full_input, in_features=full_in_features
        )
        full = gather_full_weight(lin)
        result = decompose_linear(full, stats[name], cfg, name=name)
        wrap = _install(lin, name, result, cfg.act_format, storage)
        x = local[3].clone().requires_grad_()
        y, _ = wrap(x)
        y.float().square().sum().backward()
        out[name] = {
            "y": y.detach(),
            "A": result.lora_down,
            "residual": result.residual.to_tensors(),
            "dA": wrap.lora_down.grad,
            "frozen": [n for n, p in wrap.named_parameters() if p.requires_grad],
        }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_tp2_reproduces_tp1_and_svdqlinear(storage):
    from svdq import SVDQConfig, SVDQLinear, decompose_linear
    from svdq.stats import InputStats

    (t1,) = run_on_processes(_worker, 1, storage, timeout=240)
    r0, r1 = run_on_processes(_worker, 2, storage, timeout=240)
    W, xs = _problem()
    cfg = SVDQConfig(rank=R, weight_format="nvfp4", act_format="nvfp4")
    st = InputStats(IN)
    for x in xs[:3]:
        st.update(x)
    ref_layer = SVDQLinear.from_result(decompose_linear(W, st, cfg), None, "nvfp4", storage=storage)
    y_ref = ref_layer(xs[3]).detach()
    for mode, sp in CASES:
        name = f"{mode}{'-sp' if sp else ''}"
        a, b, one = r0[name], r1[name], t1[name]
        # the decomposition is the full weight's, identical on every rank and equal to TP=1
        assert torch.equal(a["A"], b["A"]) and torch.equal(a["A"], one["A"])
        for key in one["residual"]:
            assert torch.equal(a["residual"][key], one["residual"][key])
        assert one["frozen"] == ["lora_down", "lora_up"]
        torch.testing.assert_close(one["y"], y_ref, rtol=1e-5, atol=1e-5, msg=name)
        # gathered column output / all-reduced row output: every rank holds the whole y
        torch.testing.assert_close(a["y"], one["y"], rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(b["y"], one["y"], rtol=1e-4, atol=1e-4, msg=name)
        if mode == "column" and not sp:  # lora_down replicated: both ranks hold the full gradient
            torch.testing.assert_close(a["dA"], one["dA"], rtol=1e-4, atol=1e-4, msg=name)


def test_merge_refuses_quantized_base():
    import os

    from lora.framework.parallel import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    (msg,) = run_on_processes(_merge_worker, 1, timeout=120)
    assert "unquantized" in msg


def _merge_worker(rank, world):
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from svdq import SVDQConfig, decompose_linear
    from svdq.stats import InputStats

    init_parallel()
    W, xs = _problem()
    mp = ModelParallelConfig(use_cpu_initialization=True)
    lin = ColumnParallelLinear(
        IN, OUT, config=mp, init_method=torch.nn.init.zeros_, bias=False, gather_output=True
    )
    with torch.no_grad():
        lin.weight.copy_(W)
    st = InputStats(IN)
    st.update(xs[0])
    wrap = _install(lin, "l", decompose_linear(W, st, SVDQConfig(rank=R)), "nvfp4")
    try:
        wrap.merge()
    except TypeError as exc:
        return str(exc)
    return "merged"
