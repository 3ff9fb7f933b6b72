"""The Megatron twin of an HF MoE model, calibrated with the defaults, gets the mission's layout: a shared
lora_down for every fc1 (gate/up) expert projection, fc2 the layout the data prefers (reported per
projection), and its quantized logits stay close to the unquantized twin's."""

from __future__ import annotations

import torch

from calib import CalibConfig, calibrate
from calib.hf.to_megatron import megatron_from_hf
from svdq import SVDQConfig
from svdq.solvers.shared_basis import LAYOUTS, SHARED_DOWN
from tests.calib.hf.test_to_megatron import batch, mcore_logits, tiny_hf


def test_default_layout_of_hf_twin_is_shared_down_for_fc1(megatron_world):
    model = megatron_from_hf(tiny_hf("qwen3_moe"))
    tokens, pos = batch()
    ref = mcore_logits(model, tokens, pos)

    def loop(m):
        with torch.no_grad():
            for seed in range(3):
                g = torch.Generator().manual_seed(seed)
                m(torch.randint(0, 96, tokens.shape, generator=g), pos, None)

    report = calibrate(model, loop, CalibConfig(svdq=SVDQConfig(rank=4, alphas=(0.0, 0.5)), progress=False))
    rows = {r["layer"]: r for r in report.rows}
    fc1 = [r for name, r in rows.items() if name.endswith("linear_fc1")]
    fc2 = [r for name, r in rows.items() if name.endswith("linear_fc2")]
    assert len(fc1) == len(fc2) == 2  # two MoE layers
    assert all(r["layout"] == SHARED_DOWN for r in fc1)
    assert all(r["layout"] in LAYOUTS for r in fc2)
    assert report.layout == {"fc1": "shared-down", "fc2": "auto"}
    out = mcore_logits(model, tokens, pos)
    assert ((out - ref).norm() / ref.norm()).item() < 0.5  # 4-bit, rank 4: close, not equal
