"""The Megatron-on-CPU harness: tiny GPT-MoE training, EP=2 forward/backward and checkpoint round trip."""

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
from lora.framework.parallel import init_parallel
from tests.helpers.spawn import ChildProcessError_, run_on_processes

CFG = TinyMoEConfig()


def _loss(model, batch):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()


def _train(model, steps: int) -> list[float]:
    """AdamW on a fixed batch; the losses of every step."""
    batch = tiny_moe_batch(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _train_20_steps(rank, world):
    init_parallel()
    return _train(build_tiny_gpt_moe(CFG, seed=3), 20)


def test_loss_decreases_over_20_steps_single_process():
    (losses,) = run_on_processes(_train_20_steps, 1, timeout=240)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses


def _ep_forward_backward_checkpoint(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing, parallel_state

    init_parallel(expert_parallel=world)
    model = build_tiny_gpt_moe(CFG, seed=11)
    batch = tiny_moe_batch(CFG, seed=5)  # the same batch on both ranks
    logits = model(batch["tokens"], batch["position_ids"], None)
    loss = _loss(model, batch)
    loss.backward()
    grads_ok = all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    fresh = build_tiny_gpt_moe(CFG, seed=12345)
    changed = {
        n for n, p in fresh.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])
    }
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
    saved = dict(model.named_parameters())
    mismatched = [n for n, p in fresh.named_parameters() if not torch.equal(p, saved[n])]
    expert_fc1 = {
        parallel_state.get_expert_model_parallel_rank() * len(m.local_experts)
        + i: e.linear_fc1.weight.detach()
        for name, m in model.named_modules()
        if name.endswith("mlp.experts") and "layers.0." in name
        for i, e in enumerate(m.local_experts)
    }
    return {
        "logits": logits.detach(),
        "grads_ok": grads_ok,
        "mismatched": mismatched,
        "changed_before_load": sorted(changed),
        "expert_fc1": expert_fc1,
    }


def _single_process_logits(rank, world):
    init_parallel()
    model = build_tiny_gpt_moe(CFG, seed=11)
    batch = tiny_moe_batch(CFG, seed=5)
    return model(batch["tokens"], batch["position_ids"], None).detach()


@pytest.mark.slow
def test_expert_parallel_2_forward_backward_and_checkpoint_roundtrip(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r0, r1 = run_on_processes(_ep_forward_backward_checkpoint, 2, str(tmp_path / "ckpt"), timeout=300)
    (ref_logits,) = run_on_processes(_single_process_logits, 1, timeout=240)
    for r in (r0, r1):
        assert r["grads_ok"]
        assert r["mismatched"] == []
        # the fresh model really differed (expert weights included), so the load did the work
        assert any(".experts." in n for n in r["changed_before_load"])
        torch.testing.assert_close(r["logits"], ref_logits, rtol=1e-5, atol=1e-5)
    # ranks hold different global experts (EP=2 splits 4 experts as 0,1 | 2,3)
    assert set(r0["expert_fc1"]) == {0, 1} and set(r1["expert_fc1"]) == {2, 3}
    assert not torch.equal(r0["expert_fc1"][0], r1["expert_fc1"][2])


def _fails(rank, world):
    if rank == 1:
        raise ValueError("boom from rank 1")
    import time

    time.sleep(60)  # rank 0 would wait forever in a real collective


def _hangs(rank, world):
    import time

    time.sleep(600)


def test_child_failure_propagates_traceback_without_hanging():
    with pytest.raises(ChildProcessError_, match="boom from rank 1"):
        run_on_processes(_fails, 2, timeout=60)


def test_hung_child_times_out():
    with pytest.raises(ChildProcessError_, match="timed out"):
        run_on_processes(_hangs, 1, timeout=3)


def _train_on_cuda(rank, world):
    init_parallel(expert_parallel=world)  # CUDA present: NCCL, no CPU patches
    import torch.distributed as dist

    model = build_tiny_gpt_moe(CFG, seed=3)
    losses = _train(model, 10)
    return {"backend": dist.get_backend(), "device": str(next(model.parameters()).device), "losses": losses}


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_tiny_moe_trains_on_cuda_with_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    results = run_on_processes(_train_on_cuda, world, timeout=300)
    for r in results:
        assert r["backend"] == "nccl" and r["device"].startswith("cuda")
        assert r["losses"][-1] < r["losses"][0]
