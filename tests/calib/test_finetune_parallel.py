"""calib.train.finetune under data parallelism (2 gloo processes) and gradient accumulation.

* dp=2 × grad_accum=1 against one process × grad_accum=2 on the same global batches: the same micro-batches
  in another place, so the losses agree to fp32 round-off (rtol 1e-5) and the adapters after 4 AdamW
  steps to 1e-5 relative (the gradient sum is ``g0 + g1`` in another order).
* one process × grad_accum=2 against grad_accum=1 (the whole batch at once): the same mean loss and step to
  fp32 round-off.
* exact resume under dp=2: 2 steps, stop; resume in fresh processes for 2 more — the losses, gradient norms,
  held-out evaluations and adapter values equal the uninterrupted 4-step dp=2 run bit for bit.
* the held-out evaluation is reduced over data parallelism: equal to the one-process evaluation (float64
  sums, rtol 1e-6).
* with a prompt / response mask whose target counts differ between the micro-batches, all three log the
  global token-weighted mean (float64 reference, not the mean of micro-batch means) and take the same steps.

The model: the tiny Megatron GPT-MoE (1 layer, 4 experts) with LoRA adapters on every target (the base is
frozen; a calibrated base trains the same way, the loop only sees adapter parameters).
"""

from pathlib import Path

import pytest
import torch

from tests.helpers.spawn import run_on_processes

MODEL = {"num_layers": 1, "hidden": 32, "heads": 4, "num_experts": 4, "ffn_hidden": 32, "seq_len": 16}
STEPS, BATCH = 4, 4


def _with_masks(batches):
    """Prompt / response masks whose target counts differ a lot between the two row halves (the
    micro-batches of dp=2 or grad_accum=2): rows 0-1 keep their last 2-4 labels, rows 2-3 their last 9-14."""
    g = torch.Generator().manual_seed(9)
    out = []
    for b in batches:
        rows, s = b["labels"].shape
        keep = [int(torch.randint(2, 5, (), generator=g)) for _ in range(rows // 2)]
        keep += [int(torch.randint(9, 15, (), generator=g)) for _ in range(rows - rows // 2)]
        mask = torch.stack([torch.arange(s) >= s - k for k in keep])  # (rows, s) bool
        out.append({**b, "loss_mask": mask})
    return out


def _setup(world, seed=0, masked=False):
    from calib.data import token_batches
    from calib.models import ModelSource, build_model
    from calib.tiny_moe import TinyMoEConfig
    from lora import LoraConfig, add_adapters
    from lora.framework.parallel import init_parallel

    torch.set_num_threads(1)
    init_parallel(1, 1, data_parallel=world, seed=seed)
    cfg = TinyMoEConfig(**MODEL)
    lm = build_model(ModelSource("tiny", config=cfg.to_dict(), seed=1))
    add_adapters(lm.model, LoraConfig(rank=4), seed=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (7 * BATCH * (cfg.seq_len + 1),), generator=g)
    batches = token_batches(ids, cfg.seq_len, BATCH)  # 7 batches: 5 to train on, 2 held out
    if masked:
        batches = _with_masks(batches)
    return lm, batches[:5], batches[5:]


def _first_loss_references(lm, train):
    """Update 1's loss from the initial adapters in float64: the global token-weighted mean over the whole
    batch, and the mean of the two half-batch means (what averaging micro-batch means would log)."""
    from calib.train import batch_index

    b = train[batch_index(0, len(train), 0)]
    with torch.no_grad():
        losses = lm.token_losses(b).double()  # (b, s)
    m = b["loss_mask"]
    half = b["labels"].shape[0] // 2
    means = [losses[i : i + half][m[i : i + half]].mean() for i in (0, half)]
    counts = [int(m[i : i + half].sum()) for i in (0, half)]
    return float(losses[m].sum() / m.sum()), float(sum(means) / 2), counts


def _worker(rank, world, out, grad_accum, stop_at, resume, eval_every, masked=False):
    from calib.train import TrainConfig, adapter_parameters, complete_checkpoints, finetune

    lm, train, held = _setup(world, masked=masked)
    init = {k: p.detach().clone() for k, p in adapter_parameters(lm.model).items()}
    refs = _first_loss_references(lm, train) if masked else None
    cfg = TrainConfig(steps=STEPS, lr=5e-3, warmup=1, batch=BATCH, grad_accum=grad_accum)
    ckpt = Path(out) / "checkpoints"
    resume_from = complete_checkpoints(ckpt)[-1] if resume else None
    result = finetune(
        lm,
        train,
        cfg,
        checkpoint_dir=ckpt,
        save_every=0,
        resume_from=resume_from,
        stop_at=stop_at,
        progress=False,
        eval_batches=held,
        eval_every=eval_every,
    )
    params = {k: p.detach().clone() for k, p in adapter_parameters(lm.model).items()}
    return {
        "losses": result.losses,
        "norms": result.grad_norms,
        "evals": result.evals,
        "params": params,
        "init": init,
        "refs": refs,
    }


def _one_process(rank, world, out):
    """grad_accum 1 and 2, unmasked and masked, in one process (one Megatron import)."""
    runs = [(m, n) for m in (False, True) for n in (1, 2)]
    return [_worker(rank, world, f"{out}/{m}{n}", n, None, False, 2, m) for m, n in runs]


def _data_parallel(rank, world, out):
    """dp=2 × grad_accum=1, unmasked and masked, in the same two processes."""
    return [_worker(rank, world, f"{out}/{m}", 1, None, False, 2, m) for m in (False, True)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process runs (accum 1, 2) and the dp=2 runs, unmasked and masked (two spawns)."""
    root = tmp_path_factory.mktemp("ftdp")
    ((whole, accum, m_whole, m_accum),) = run_on_processes(_one_process, 1, str(root / "a"), timeout=300)
    (dp0, m_dp0), (dp1, m_dp1) = run_on_processes(_data_parallel, 2, str(root / "c"), timeout=300)
    return {"plain": (whole, accum, [dp0, dp1]), "masked": (m_whole, m_accum, [m_dp0, m_dp1])}


@pytest.mark.slow
def test_data_parallel_finetune_matches_one_process_and_resumes_exactly(runs, tmp_path):
    whole, accum, dp = runs["plain"]
    run_on_processes(_worker, 2, str(tmp_path / "d"), 1, 2, False, 2, timeout=300)
    resumed = run_on_processes(_worker, 2, str(tmp_path / "d"), 1, None, True, 2, timeout=300)

    # the two data-parallel ranks log the same global loss and hold the same adapters
    assert dp[0]["losses"] == dp[1]["losses"] and dp[0]["evals"] == dp[1]["evals"]
    assert all(torch.equal(dp[0]["params"][k], dp[1]["params"][k]) for k in dp[0]["params"])
    # dp=2 × accum=1 ≈ dp=1 × accum=2 ≈ dp=1 × accum=1 (fp32 round-off)
    for other in (accum, whole):
        assert dp[0]["losses"] == pytest.approx(other["losses"], rel=1e-5)
        assert dp[0]["norms"] == pytest.approx(other["norms"], rel=1e-4)
        for k, p in other["params"].items():
            assert _rel(dp[0]["params"][k], p) < 1e-5, k
        assert [e["step"] for e in dp[0]["evals"]] == [2, 4]
        for e, f in zip(dp[0]["evals"], other["evals"]):
            assert e["tokens"] == f["tokens"] == 2 * BATCH * MODEL["seq_len"]
            assert e["loss"] == pytest.approx(f["loss"], rel=1e-5)
    # every adapter tensor moved from its initial value (B starts at zero, A gets gradients from step 2)
    assert all(not torch.equal(p, whole["init"][k]) for k, p in whole["params"].items())
    # exact resume: 2 steps + resume 2 in fresh processes == 4 steps, bit for bit, on both ranks
    for r in range(2):
        assert resumed[r]["losses"] == dp[r]["losses"]
        assert resumed[r]["norms"] == dp[r]["norms"]
        assert resumed[r]["evals"] == dp[r]["evals"]
        assert all(torch.equal(resumed[r]["params"][k], dp[r]["params"][k]) for k in dp[r]["params"])
    files = sorted(p.name for p in (tmp_path / "d" / "checkpoints" / "step-000004").iterdir())
    assert files == [
        "adapters.safetensors",
        "optimizer-rank00000.safetensors",
        "optimizer-rank00001.safetensors",
        "rng-rank00000.safetensors",
        "rng-rank00001.safetensors",
        "state.json",
    ]


@pytest.mark.slow
def test_masked_loss_is_the_global_token_weighted_mean(runs):
    """With a prompt / response mask whose target counts differ between micro-batches, dp=2 × accum=1,
    dp=1 × accum=2 and one big batch log the global token-weighted mean and take the same steps: the
    first loss equals the float64 reference (rtol 1e-6) and differs from the mean of micro-batch means;
    losses (rtol 1e-5), gradient norms (1e-4) and adapters (1e-5 relative) agree across the three."""
    whole, accum, (dp0, dp1) = runs["masked"]
    exact, mean_of_means, counts = whole["refs"]
    assert counts[0] != counts[1] and abs(exact - mean_of_means) > 1e-3 * abs(exact), (counts, exact)
    for run in (whole, accum, dp0, dp1):
        assert run["losses"][0] == pytest.approx(exact, rel=1e-6)
    assert dp0["losses"] == dp1["losses"]
    for other in (accum, dp0):
        assert other["losses"] == pytest.approx(whole["losses"], rel=1e-5)
        assert other["norms"] == pytest.approx(whole["norms"], rel=1e-4)
        for k, p in whole["params"].items():
            assert _rel(other["params"][k], p) < 1e-5, k
        for e, f in zip(other["evals"], whole["evals"]):
            assert e["tokens"] == f["tokens"] and e["loss"] == pytest.approx(f["loss"], rel=1e-5)


def test_micro_batches_cover_the_batch_once():
    from calib.train import micro_batches

    batch = {"tokens": torch.arange(24).view(12, 2), "labels": torch.arange(24).view(12, 2) + 1}
    parts = [mb for d in range(2) for mb in micro_batches(batch, d, 2, 3)]
    rows = torch.cat([p["tokens"] for p in parts])
    assert sorted(rows[:, 0].tolist()) == batch["tokens"][:, 0].tolist()
    assert all(p["tokens"].shape == (2, 2) and torch.equal(p["labels"], p["tokens"] + 1) for p in parts)
    with pytest.raises(ValueError, match="--batch 12 must be divisible .* 2 × --grad-accum 4"):
        micro_batches(batch, 0, 2, 4)


def test_parallel_sizes_must_multiply_to_the_world_size():
    from lora.framework.parallel import parallel_sizes

    assert parallel_sizes(2, 2, None, 8) == (2, 2, 2)
    assert parallel_sizes(1, 1, None, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"--tp=2 × --ep=1 × --dp=2 = 4 must equal WORLD_SIZE=2"):
        parallel_sizes(2, 1, 2, 2, flags=("--tp", "--ep", "--dp"))
    with pytest.raises(ValueError, match=r"--tp=3 × --ep=1 does not divide WORLD_SIZE=4"):
        parallel_sizes(3, 1, None, 4, flags=("--tp", "--ep", "--dp"))
