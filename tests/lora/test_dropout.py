"""Adapter dropout (:mod:`lora.adapters.dropout`): its masks against float64 references, alone and under
tensor parallelism.

* TP=1: in training a ``LoraLinear``'s output and gradients equal the float64 formula
  ``y = x·Wᵀ + s·((x⊙m)·Aᵀ)·Bᵀ`` with the mask ``m`` the default generator draws (replayed from its saved
  state); in eval mode the branch is not dropped; ``LoraConfig.dropout`` reaches every adapter.
* TP=2 (two gloo processes on CPU, NCCL on two GPUs), every way Megatron runs a linear
  (``tests/helpers/linear_tp.py``): a replicated branch input gets one mask on both ranks, a split one (row
  input features, sequence-parallel shard) its own per rank; with the masks assembled, outputs and gradients
  equal the float64 computation of the whole layer (1e-5). Megatron's activation recomputation redraws
  the forward's masks (gradients equal those without recomputation).
* Expert-TP 2 (a GPT-MoE at TP=2): an expert group's replicated inputs get one mask on both expert-TP
  ranks, fc2 inputs their own; a forward and backward with dropout on every adapter runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora.adapters.layers import LoraExperts, LoraLinear
from lora.config import LoraConfig
from lora.framework.parallel import init_parallel
from lora.model import adapter_modules, add_adapters
from tests.helpers import linear_tp
from tests.helpers.lora import rng_restore, rng_snapshot, tiny_model
from tests.helpers.spawn import run_on_processes

P = 0.5
# how each case's branch input is laid out over the two ranks: None = replicated, else the split dim
SPLIT_DIM = {
    "column": None,
    "column-sp": 0,
    "column-gather": None,
    "column-expert": None,
    "row": 2,
    "row-sp": 2,
    "row-scatter": 2,
    "row-expert": 2,
}


def _reference(p: dict, mask: torch.Tensor):
    """float64 ``(y, dx, dA, dB)`` of the whole layer with the branch input masked by ``mask``
    (``0`` or ``1/(1-p)``), scaling 0.5."""
    p = {k: v.double() for k, v in p.items()}
    A, B, x = p["A"].requires_grad_(), p["B"].requires_grad_(), p["x"].requires_grad_()
    y = x @ p["W"].T + 0.5 * ((x * mask.double()) @ A.T) @ B.T
    (y * p["gy"]).sum().backward()
    return y.detach(), x.grad, A.grad, B.grad


# ---------------------------------------------------------------------------------------------- TP=1


@pytest.mark.usefixtures("megatron_world")
def test_dropout_tp1_matches_float64_with_the_drawn_mask():
    p = linear_tp.problem()
    lin, x, gy = linear_tp.build(linear_tp.CASES[0], 0, 1, p)
    wrap = LoraLinear(lin, linear_tp.R, scaling=0.5, name="q", dropout=P)
    wrap.init_from(p["A"], 0.5 * p["B"])
    wrap.train()
    snapshot = rng_snapshot()
    y, _ = wrap(x)
    (y * gy).sum().backward()
    rng_restore(snapshot)
    mask = F.dropout(torch.ones_like(x), P, True).cpu()  # the default generator's draw, replayed
    assert 0.3 < float((mask == 0).float().mean()) < 0.7
    ref_y, ref_dx, ref_dA, ref_dB = _reference(p, mask)
    for got, want in (
        (y, ref_y),
        (x.grad, ref_dx),
        (wrap.lora_down.grad, ref_dA),
        (wrap.lora_up.grad, ref_dB),
    ):
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    wrap.eval()
    with torch.no_grad():
        y_eval, _ = wrap(x)
    torch.testing.assert_close(
        y_eval.cpu().double(), _reference(p, torch.ones_like(mask))[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.usefixtures("megatron_world")
def test_config_dropout_reaches_every_adapter():
    model = tiny_model()
    add_adapters(model, LoraConfig.preset("moe", rank=4, parallel_expert=True, dropout=0.1))
    modules = adapter_modules(model).values()
    assert any(isinstance(m, LoraExperts) for m in modules) and any(
        isinstance(m, LoraLinear) for m in modules
    )
    assert all(m.dropout_p == 0.1 for m in modules)


@pytest.mark.usefixtures("megatron_world")
def test_full_recomputation_with_dropout_gives_the_same_adapter_gradients():
    """Megatron's full activation recomputation (a reentrant checkpoint per layer) on a frozen-base model
    with dropout on every adapter: the recomputed forward redraws the masks, so the adapter gradients equal
    those without recomputation; ``freeze_base`` makes the embedding output require grad, without which
    the checkpointed layers' adapters would get no gradient."""
    from calib.tiny_moe import TinyMoEConfig, tiny_moe_batch
    from lora import adapter_factors, freeze_base

    model = tiny_model(seed=2)
    add_adapters(model, LoraConfig.preset("moe", rank=4, parallel_expert=True, init="random", dropout=0.2))
    freeze_base(model)
    model.train()
    batch = tiny_moe_batch(TinyMoEConfig(), batch=2, seed=1)
    factors = adapter_factors(model)

    def grads():
        for f in factors.values():
            f.param.grad = None
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean().backward()
        return {k: f.param.grad.clone() for k, f in factors.items()}

    snapshot = rng_snapshot()
    plain = grads()
    rng_restore(snapshot)
    model.config.recompute_granularity, model.config.recompute_method = "full", "uniform"
    model.config.recompute_num_layers = 1
    try:
        recomputed = grads()
    finally:
        model.config.recompute_granularity = None
    assert all(g.abs().sum() > 0 for g in plain.values())
    for k in plain:
        torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
    fresh = grads()  # the RNG streams go on: other masks, other gradients (the check above is not vacuous)
    assert any(not torch.equal(fresh[k], plain[k]) for k in plain)


# ---------------------------------------------------------------------------------------------- TP=2


def _linear_worker(rank, world):
    from megatron.core.tensor_parallel import checkpoint

    from lora.adapters.dropout import adapter_dropout
    from lora.framework.te import tp_group_of

    init_parallel(tensor_parallel=world)
    p = linear_tp.problem()
    out = {"first_use_recomputed": _first_use_inside_recomputation(rank, world, p)}
    for case in linear_tp.CASES:
        name, mode, sp, flag, expert = case
        lin, x, gy = linear_tp.build(case, rank, world, p)
        wrap = LoraLinear(lin, linear_tp.R, scaling=0.5, name=name, dropout=P)
        wrap.init_from(p["A"], 0.5 * p["B"])
        wrap.train()
        with torch.no_grad():
            wrap(x)  # the first use adds the replicated-input RNG states (collective)
        snapshot = rng_snapshot()
        y, _ = wrap(x)
        (y * gy).sum().backward()
        grads = [x.grad, wrap.lora_down.grad, wrap.lora_up.grad]
        # the mask the forward drew: the same draw, replayed on a tensor of ones
        rng_restore(snapshot)
        branch_in = x if mode == "column" or flag else x.chunk(world, 2)[rank]  # row-scatter: own features
        mask = adapter_dropout(
            torch.ones_like(branch_in),
            P,
            True,
            tp_group_of(lin),
            split=SPLIT_DIM[name] is not None,
            expert=expert,
        )
        # activation recomputation redraws the same masks
        rng_restore(snapshot)
        for t in (x, wrap.lora_down, wrap.lora_up):
            t.grad = None
        y_re, _ = checkpoint(wrap, False, x)
        (y_re * gy).sum().backward()
        recomputed = [x.grad, wrap.lora_down.grad, wrap.lora_up.grad]
        out[name] = {
            "y": y.detach().cpu(),
            **{k: g.cpu() for k, g in zip(("dx", "dA", "dB"), grads)},
            "mask": mask.cpu(),
            "recompute_equal": all(torch.equal(a, b) for a, b in zip(grads, recomputed)),
        }
    return out


def _first_use_inside_recomputation(rank, world, p) -> bool:
    """The replicated-input state is created inside a recomputed forward (the tracker that recomputation
    restores lacks it): the gradients equal those of a plain forward from the same RNG states."""
    from megatron.core.tensor_parallel import checkpoint

    def run(recompute: bool):
        lin, x, gy = linear_tp.build(linear_tp.CASES[0], rank, world, p)  # column: replicated input
        wrap = LoraLinear(lin, linear_tp.R, scaling=0.5, name="first", dropout=P)
        wrap.init_from(p["A"], 0.5 * p["B"])
        wrap.train()
        y, _ = checkpoint(wrap, False, x) if recompute else wrap(x)
        (y * gy).sum().backward()
        return [x.grad, wrap.lora_down.grad, wrap.lora_up.grad]

    snapshot = rng_snapshot()
    recomputed = run(recompute=True)
    rng_restore(snapshot)
    return all(torch.equal(a, b) for a, b in zip(recomputed, run(recompute=False)))


@pytest.mark.slow
def test_dropout_under_tensor_parallel_2_matches_float64():
    r0, r1 = run_on_processes(_linear_worker, 2, timeout=300)
    assert r0.pop("first_use_recomputed") and r1.pop("first_use_recomputed")
    p = linear_tp.problem()
    for case in linear_tp.CASES:
        name = case[0]
        a, b = r0[name], r1[name]
        dim = SPLIT_DIM[name]
        if dim is None:  # replicated input: one mask
            assert torch.equal(a["mask"], b["mask"]), name
            mask = a["mask"]
        else:  # split input: each rank its own
            assert not torch.equal(a["mask"], b["mask"]), name
            mask = torch.cat([a["mask"], b["mask"]], dim=dim)
        assert mask.shape == p["x"].shape and 0.3 < float((mask == 0).float().mean()) < 0.7, name
        linear_tp.check(case, a, b, *_reference(p, mask))
        assert a["recompute_equal"] and b["recompute_equal"], name


def _expert_worker(rank, world):
    import dataclasses

    from megatron.core.models.gpt import GPTModel

    from calib.tiny_moe import TinyMoEConfig, tiny_moe_batch, transformer_config
    from lora.framework import compat

    init_parallel(tensor_parallel=world)
    cfg = TinyMoEConfig()
    model = GPTModel(  # TP=2 without sequence parallelism (the local spec's norm refuses it on CPU)
        config=dataclasses.replace(transformer_config(cfg), sequence_parallel=False),
        transformer_layer_spec=compat.local_moe_layer_spec(cfg.num_experts),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_len,
        position_embedding_type="rope",
    )
    model = model.cuda() if torch.cuda.is_available() else model
    model.eval()  # MoE refuses to train at TP > 1 without sequence parallelism: only the adapters train
    add_adapters(model, LoraConfig.preset("moe", rank=4, parallel_expert=True, init="random", dropout=0.3))
    modules = adapter_modules(model).values()
    for m in modules:
        m.training = True
    group = next(m for m in modules if isinstance(m, LoraExperts))
    ones = torch.ones(64, cfg.hidden, device=next(group.parameters()).device)
    masks = {"replicated": group.drop(ones).cpu(), "split": group.drop(ones, split=True).cpu()}
    b = tiny_moe_batch(cfg, batch=2, seed=0)
    loss = model(b["tokens"], b["position_ids"], None, labels=b["labels"]).float().mean()
    loss.backward()
    grads_finite = all(torch.isfinite(m.grad).all() for m in model.parameters() if m.grad is not None)
    return {"etp": group.etp_size, **masks, "loss": loss.item(), "grads_finite": bool(grads_finite)}


@pytest.mark.slow
def test_expert_dropout_under_expert_tensor_parallel_2():
    r0, r1 = run_on_processes(_expert_worker, 2, timeout=300)
    assert r0["etp"] == r1["etp"] == 2
    assert torch.equal(r0["replicated"], r1["replicated"])
    assert not torch.equal(r0["split"], r1["split"])
    for r in (r0, r1):
        assert 0.15 < float((r["replicated"] == 0).float().mean()) < 0.45  # p = 0.3
        assert r["grads_finite"] and torch.isfinite(torch.tensor(r["loss"]))
    assert r0["loss"] == pytest.approx(r1["loss"], rel=1e-6)  # one model, whatever the rank


# the TP=2 checks above run on whatever device the processes get; these make the GPU lane
# (.ci/gpu-tests, which hides CUDA from the CPU suite) run them on two GPUs with NCCL and CUDA RNG states
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_dropout_under_tensor_parallel_2_nccl():
    test_dropout_under_tensor_parallel_2_matches_float64()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_expert_dropout_under_expert_tensor_parallel_2_nccl():
    test_expert_dropout_under_expert_tensor_parallel_2()
