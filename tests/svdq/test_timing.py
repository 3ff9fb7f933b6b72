"""svdq.timing: per-phase calibration timing, free when off."""

import time

import torch
from torch import nn

import svdq
from svdq import timing


def _model_and_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    x = torch.randn(4, 32, 64)

    def loop(m):
        for b in x:
            m(b)

    return model, loop


def test_phases_are_exclusive_and_add_up():
    with timing.collect(sync_cuda=False) as t:
        t0 = time.perf_counter()
        with timing.layer("a"):
            with timing.phase("outer"):
                time.sleep(0.02)
                with timing.phase("inner"):
                    time.sleep(0.03)
                time.sleep(0.01)
        wall = time.perf_counter() - t0
    a = t.as_dict()["a"]
    assert 0.025 <= a["inner"] < 0.03 + 0.02
    assert 0.025 <= a["outer"] < 0.03 + 0.02  # 0.02 + 0.01, the inner 0.03 excluded
    assert abs(sum(a.values()) - wall) < 5e-3


def test_off_is_a_shared_noop():
    assert not timing.enabled()
    assert timing.phase("branch") is timing.phase("setup")  # one shared null context, no allocation
    model, loop = _model_and_loop()
    svdq.quantize(model, "nvfp4-w4a4-r32", loop, progress=False, report=False)
    assert "phase_seconds" not in model[0].svdq_summary


def test_quantize_reports_phases_per_layer():
    model, loop = _model_and_loop()
    t0 = time.perf_counter()
    with timing.collect() as t:
        svdq.quantize(model, "nvfp4-w4a4-r32", loop, progress=False, report=False)
    wall = time.perf_counter() - t0
    for name in ("0", "2"):
        phases = getattr(model, name).svdq_summary["phase_seconds"]
        assert {"setup", "smoothing", "branch", "residual", "install"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert phases == t.as_dict()[name]
    assert {"statistics", "act_range"} <= set(t.as_dict()[timing.MODEL])
    assert sum(t.totals().values()) <= wall + 1e-3
