"""Data-parallel calibration (2 gloo processes, each calibrating on its own half of the batches) equals one
process calibrating on all of them: the statistics are merged over the data-parallel group before the
decomposition (calib.calibrate.merge_input_stats) and the static activation ranges maxed over it.

``sample_tokens`` is set above the pooled token count so the scoring samples hold every token on both
sides (then the merge is exact up to summation order): report figures to 1e-5 relative, the same
decisions (rank, layout, α, refinement steps), adapter factors and logits to 1e-5 relative.
"""

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
from lora.framework.parallel import init_parallel
from tests.helpers.spawn import run_on_processes

CFG = TinyMoEConfig(num_layers=1, hidden=32, heads=4, num_experts=4, ffn_hidden=32, seq_len=16)
SAMPLE_TOKENS = 1024  # > the 4 × 4 × 16 calibration tokens


def _worker(rank, world):
    from calib.calibrate import CalibConfig, calibrate
    from lora.model import adapter_factors
    from svdq import SVDQConfig

    torch.set_num_threads(1)
    init_parallel(1, 1, data_parallel=world)
    model = build_tiny_gpt_moe(CFG, seed=1)
    model.eval()
    batches = [tiny_moe_batch(CFG, batch=4, seed=s) for s in range(5)]
    test, calib_batches = batches[0], batches[1:]
    mine = calib_batches[rank::world]  # the shard of this data-parallel rank

    def loop(m):
        for b in mine:
            m(b["tokens"], b["position_ids"], None)

    config = CalibConfig(svdq=SVDQConfig(rank=4, sample_tokens=SAMPLE_TOKENS), progress=False)
    report = calibrate(model, loop, config)
    with torch.no_grad():
        logits = model(test["tokens"], test["position_ids"], None)
    factors = {k: f.param.detach().clone() for k, f in adapter_factors(model).items()}
    return {"rows": report.rows, "logits": logits, "factors": factors}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
def test_data_parallel_calibration_equals_one_process_on_the_union():
    (ref,) = run_on_processes(_worker, 1, timeout=300)
    dp = run_on_processes(_worker, 2, timeout=300)
    for r in dp:
        assert [x["layer"] for x in r["rows"]] == [x["layer"] for x in ref["rows"]]
        for a, b in zip(r["rows"], ref["rows"]):
            keys = ("rank", "layout", "alpha", "refine_steps", "tokens")
            assert [a[k] for k in keys] == [b[k] for k in keys], a["layer"]
            for key in ("rtn_error", "final_error"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["layer"], key)
            amax_a = a["input_amax"] if isinstance(a["input_amax"], list) else [a["input_amax"]]
            amax_b = b["input_amax"] if isinstance(b["input_amax"], list) else [b["input_amax"]]
            for x, y in zip(amax_a, amax_b, strict=True):
                assert (x is None) == (y is None), a["layer"]
                assert x is None or x == pytest.approx(y, rel=1e-6), a["layer"]
        assert r["factors"].keys() == ref["factors"].keys()
        for k, t in ref["factors"].items():
            assert _rel(r["factors"][k], t) < 1e-5, k
        assert _rel(r["logits"], ref["logits"]) < 1e-5
    # both ranks hold the same calibrated model
    assert all(torch.equal(dp[0]["factors"][k], dp[1]["factors"][k]) for k in ref["factors"])


@pytest.mark.slow
def test_calibration_of_a_plain_torch_model_refuses_data_parallelism():
    with pytest.raises(Exception, match="data-parallel calibration .* needs a Megatron model"):
        run_on_processes(_torch_worker, 2, timeout=120)


def _torch_worker(rank, world):
    from torch import nn

    from calib.calibrate import CalibConfig, calibrate

    init_parallel(1, 1, data_parallel=world)
    model = nn.Sequential(nn.Linear(16, 16))
    calibrate(model, lambda m: m(torch.randn(4, 16)), CalibConfig(progress=False))
