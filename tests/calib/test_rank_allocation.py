"""Sensitivity rank allocation on the quickstart GPT-MoE's real weights (svdq/DESIGN.md §19)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from calib.calibrate import CalibConfig
from svdq import SVDQConfig, decompose_linear
from svdq.solvers.allocation import allocate_ranks, dense_site


def test_bad_rank_allocation_is_refused():
    with pytest.raises(ValueError, match="rank_allocation"):
        CalibConfig(rank_allocation="greedy")


def test_quickstart_dense_layers_output_error_not_worse_than_uniform(megatron_world):
    """Real pretrained weights and activations (the quickstart GPT-MoE asset, one calibration batch):
    allocating the 8 attention projections' budget lowers the sum of squared output errors."""
    from calib.corpus import random_windows, stdlib_split
    from calib.pretrain import load_pretrained, read_pretrained_config
    from calib.tiny_moe import build_tiny_gpt_moe
    from lora.framework.full_input import full_in_features, full_input
    from svdq.stats import collect_input_stats

    cfg = read_pretrained_config()
    model = build_tiny_gpt_moe(cfg, seed=0)
    load_pretrained(model)
    batch = random_windows(stdlib_split().base_train, 4, cfg.seq_len, torch.Generator().manual_seed(0), "cpu")
    linears = {
        n: m
        for n, m in model.named_modules()
        if n.endswith(("linear_qkv", "linear_proj")) and ".experts" not in n
    }
    stats = collect_input_stats(
        model,
        linears,
        lambda m: m(batch["tokens"], batch["position_ids"], None),
        256,
        0,
        transform=full_input,
        in_features=full_in_features,
    )
    svdq_cfg = SVDQConfig(rank=16, alphas=(0.5,), refine_steps=0)
    sites = [dense_site(n, m.weight.detach(), stats[n], svdq_cfg) for n, m in linears.items()]
    ranks = allocate_ranks(sites)
    assert sum(ranks[s.name] * s.cost for s in sites) <= sum(s.uniform_budget for s in sites)

    def total(rank_of):
        errs = [
            decompose_linear(
                m.weight, stats[n], dataclasses.replace(svdq_cfg, rank=rank_of(n)), n
            ).final_error
            for n, m in linears.items()
        ]
        return sum(e**2 for e in errs)

    uniform, allocated = total(lambda n: 16), total(ranks.__getitem__)
    assert allocated <= uniform


def test_calibrate_with_sensitivity_allocation_keeps_the_budget_and_reports_ranks(megatron_world):
    """calibrate(rank_allocation="sensitivity") on a tiny GPT-MoE: the report's ranks are the allocation,
    the installed adapters have them, the branch parameters stay within the uniform budget, and the
    quantized model still tracks the unquantized one."""
    from calib.calibrate import calibrate
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
    from svdq.solvers.shared_basis import param_count

    cfg = TinyMoEConfig()
    batches = [tiny_moe_batch(cfg, batch=8, seed=s) for s in range(3)]
    model = build_tiny_gpt_moe(cfg, seed=1)
    test = batches[0]
    with torch.no_grad():
        ref = model(test["tokens"], test["position_ids"], None)
    rank = 8
    report = calibrate(
        model,
        lambda m: [m(b["tokens"], b["position_ids"], None) for b in batches[1:]],
        CalibConfig(svdq=SVDQConfig(rank=rank), progress=False, rank_allocation="sensitivity"),
    )
    with torch.no_grad():
        out = model(test["tokens"], test["position_ids"], None)
    used = budget = 0
    for row in report.rows:
        res = report.results[row["layer"]]
        if row["kind"] == "dense":
            out_f, in_f = res.lora_up.shape[0], res.lora_down.shape[1]
            used += row["rank"] * (in_f + out_f)
            budget += rank * (in_f + out_f)
            assert res.lora_down.shape[0] == row["rank"]
        else:
            E, (out_f, in_f) = res.num_experts, res.residuals[0].shape
            used += row["branch_params"]
            budget += param_count("per-expert", rank, E, out_f, in_f)
            assert row["rank"] == res.rank
    assert used <= budget
    assert len({row["rank"] for row in report.rows}) > 1  # not simply uniform on these layers
    assert float((out - ref).norm() / ref.norm()) < 0.2


def test_residual_quant_line_counts_layers_and_experts():
    from calib.report import CalibReport

    rows = [
        {"kind": "dense", "residual_quant": "gptq"},
        {"kind": "dense", "residual_quant": "rtn"},
        {"kind": "experts fc1", "residual_quant": "gptq 6/8"},
        {"kind": "experts fc2", "residual_quant": "rtn"},
    ]
    line = CalibReport(rows=rows).residual_quant_line()
    assert "GPTQ in 2 of 4 layers (in the expert groups using it: 6 of 8 experts)" in line
