"""calib.calibrate on a real Megatron GPT-MoE: single process and expert parallel 2 (gloo)."""

import json

import pytest
import torch

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch
from lora.framework.parallel import init_parallel
from tests.helpers.spawn import run_on_processes

CFG = TinyMoEConfig()


def _batches():
    return [tiny_moe_batch(CFG, batch=8, seed=s) for s in range(4)]


def _loop(batches):
    return lambda model: [model(b["tokens"], b["position_ids"], None) for b in batches]


def _calibrate_worker(rank, world, out_dir):
    from calib.calibrate import CalibConfig, calibrate
    from lora.adapters.layers import LoraExperts, LoraLinear
    from lora.base import SVDQBase
    from svdq import SVDQConfig
    from svdq.formats import fake_quant

    init_parallel(expert_parallel=world)
    model = build_tiny_gpt_moe(CFG, seed=1)
    batches = _batches()
    test = batches[0]
    with torch.no_grad():
        ref = model(test["tokens"], test["position_ids"], None)
    report = calibrate(model, _loop(batches[1:]), CalibConfig(svdq=SVDQConfig(rank=8), progress=False))
    with torch.no_grad():
        out = model(test["tokens"], test["position_ids"], None)
    kinds = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            kinds[name] = isinstance(m.base, SVDQBase)
        if isinstance(m, LoraExperts):
            kinds[name] = all(
                isinstance(getattr(e, p).base, SVDQBase)
                for e in m.base.local_experts
                for p in ("linear_fc1", "linear_fc2")
            )
    # every expert linear reproduces its quantized expert from the decomposition (adapter = branch)
    name = "decoder.layers.0.mlp.experts"
    group = model.get_submodule(name)
    amax = {
        f"{p}#{i}": getattr(e, f"linear_{p}").base.input_amax
        for p in ("fc1", "fc2")
        for i, e in enumerate(group.base.local_experts)
    }
    g = torch.Generator().manual_seed(5)
    expert_match = []
    for proj, width in (("fc1", CFG.hidden), ("fc2", CFG.ffn_hidden)):
        res = report.results[f"{name}.linear_{proj}"]
        x = torch.randn(24, width, generator=g)
        for i, expert in enumerate(group.base.local_experts):
            wrapper = getattr(expert, f"linear_{proj}")
            with torch.no_grad():
                got, _ = wrapper(x)
                wrapper.base.set_input_amax(None)  # MoEGroupResult.expert_forward: dynamic range
                got_dynamic, _ = wrapper(x)
            want = res.expert_forward(i, x)
            expert_match.append(((got_dynamic - want).norm() / want.norm()).item())
            # static range: the same expert with the calibrated max|x/s| as the per-tensor range
            down, up = res.expert_branch(i)
            xq = fake_quant(x / res.expert_smooth(i), res.act_format, global_amax=amax[f"{proj}#{i}"])
            want = xq @ res.residual_weight(i).T + (x @ down.T) @ up.T
            expert_match.append(((got - want).norm() / want.norm()).item())
    shared = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(("fc1_lora_down", "fc1_lora_up", "fc2_lora_down", "fc2_lora_up"))
    }
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})
    loss = model(test["tokens"], test["position_ids"], None, labels=test["labels"]).float().mean()
    loss.backward()
    if rank == 0 and out_dir:
        report.write_json(f"{out_dir}/report.json")
    return {
        "rows": report.rows,
        "logit_err": ((out - ref).norm() / ref.norm()).item(),
        "kinds": kinds,
        "shared": shared,
        "trainable": trainable,
        "loss": loss.item(),
        "expert_match": expert_match,
    }


def test_calibrate_single_process_replaces_every_target(tmp_path):
    (r,) = run_on_processes(_calibrate_worker, 1, str(tmp_path), timeout=300)
    assert r["kinds"] and all(r["kinds"].values())
    # 2 layers × (qkv, proj) dense + 2 layers × (fc1, fc2) expert projections
    assert len(r["rows"]) == 8
    for row in r["rows"]:
        assert row["final_error"] < row["rtn_error"], row
    assert r["logit_err"] < 0.15
    assert max(r["expert_match"]) < 1e-5  # installed experts == MoEGroupResult.expert_forward
    adapter_names = {"fc1_lora_down", "fc1_lora_up", "fc2_lora_down", "fc2_lora_up", "lora_down", "lora_up"}
    assert {"lora_down", "lora_up"} <= set(r["trainable"]) <= adapter_names  # the base is frozen
    assert torch.isfinite(torch.tensor(r["loss"]))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [row["layer"] for row in saved["rows"]] == [row["layer"] for row in r["rows"]]


@pytest.mark.slow
def test_calibrate_expert_parallel_2_agrees_across_ranks():
    r0, r1 = run_on_processes(_calibrate_worker, 2, "", timeout=400)
    # shared expert factors are the same tensor on both expert-parallel ranks
    assert r0["shared"].keys() == r1["shared"].keys() and r0["shared"]
    for k in r0["shared"]:
        assert torch.equal(r0["shared"][k], r1["shared"][k]), k
    # both ranks fed the same batch: identical calibrated outputs and figures
    assert r0["logit_err"] == pytest.approx(r1["logit_err"], rel=1e-6)
    for a, b in zip(r0["rows"], r1["rows"]):
        assert a["layout"] == b["layout"] and a["rank"] == b["rank"]
        assert a["final_error"] == pytest.approx(b["final_error"], rel=1e-6)
        assert a["final_error"] < a["rtn_error"]


def test_calibrate_rejects_targets_that_match_nothing():
    (msg,) = run_on_processes(_no_match_worker, 1, timeout=120)
    assert "no target matched" in msg


def _no_match_worker(rank, world):
    from calib.calibrate import CalibConfig, calibrate

    init_parallel()
    model = build_tiny_gpt_moe(CFG, seed=1)
    called = []
    try:
        calibrate(
            model,
            lambda m: called.append(1),
            CalibConfig(dense_targets=("nope*",), expert_targets=("nope*",)),
        )
    except ValueError as exc:
        assert not called  # failed before running the forward loop
        return str(exc)
    return "no error"


def _nan_worker(rank, world, where):
    from calib.calibrate import CalibConfig, calibrate

    init_parallel()
    model = build_tiny_gpt_moe(CFG, seed=1)
    batches = _batches()
    if where == "weight":
        with torch.no_grad():
            model.decoder.layers[1].mlp.experts.local_experts[2].linear_fc2.weight[0, 0] = float("nan")
    else:
        with torch.no_grad():
            model.embedding.word_embeddings.weight[batches[0]["tokens"][0, 0]] = float("inf")
    try:
        calibrate(model, _loop(batches), CalibConfig(progress=False))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_calibrate_names_the_layer_with_nonfinite_weights_or_activations():
    (weight_msg,) = run_on_processes(_nan_worker, 1, "weight", timeout=120)
    assert "decoder.layers.1.mlp.experts.local_experts.2.linear_fc2: weight contains NaN" in weight_msg
    (act_msg,) = run_on_processes(_nan_worker, 1, "activation", timeout=120)
    assert "calibration activations contain NaN or Inf" in act_msg and "decoder.layers.0" in act_msg


def test_calibrate_plain_torch_model_goes_through_svdq_quantize(tmp_path):
    from calib.calibrate import CalibConfig, calibrate
    from svdq import SVDQConfig, SVDQLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(512, 64)
    x[:, :2] *= 15
    report = calibrate(model, lambda m: m(x), CalibConfig(svdq=SVDQConfig(rank=8), progress=False))
    assert isinstance(model[0], SVDQLinear) and isinstance(model[2], SVDQLinear)
    assert [r["layer"] for r in report.rows] == ["0", "2"]
    assert all(r["final_error"] < r["rtn_error"] for r in report.rows)
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["tokens"] == 512


def test_calib_config_round_trips_through_json_with_its_nested_svdq_config():
    from calib.calibrate import CalibConfig
    from svdq import SVDQConfig

    cfg = CalibConfig(svdq=SVDQConfig(rank=8, alphas=(0.0, 0.5)), layout="per-expert", mode="layerwise")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["version"] == 1 and d["svdq"]["version"] == 1 and d["svdq"]["rank"] == 8
    back = CalibConfig.from_dict(d)
    assert back == cfg and isinstance(back.svdq, SVDQConfig)
    del d["version"], d["svdq"]["version"]  # dicts from before the version field
    assert CalibConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"SVDQConfig: unknown field\(s\) \['rnak'\]"):
        CalibConfig.from_dict({"svdq": {"rnak": 8}})
