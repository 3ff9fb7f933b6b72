"""Model sources of the command line (``tiny``, ``megatron:DIR``, ``module:function``), ``svdq save-model``,
and ``svdq eval`` perplexity against a float64 reference. Megatron runs in spawned processes."""

import json
import math
from pathlib import Path

import torch

from tests.helpers.cli import run_cli_cases
from tests.helpers.spawn import run_on_processes


def _models_and_mismatches(rank, world, tmp):
    from calib.models import build_model, resolve_source, save_megatron_model
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
    from lora.framework.parallel import destroy_parallel, init_parallel

    init_parallel(seed=0)
    cfg = TinyMoEConfig(num_layers=1, hidden=32, heads=2, num_experts=2, ffn_hidden=32)
    model = build_tiny_gpt_moe(cfg, seed=7)
    save_megatron_model(model, cfg, Path(tmp) / "mdl")
    lm = build_model(resolve_source(f"megatron:{tmp}/mdl"))
    want = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    got = lm.model.state_dict()
    same = all(torch.equal(v, got[k]) for k, v in want.items())
    other_seed = build_model(resolve_source("tiny", Path(tmp) / "cfg.json", seed=8)).model.state_dict()
    differs = any(not torch.equal(v, other_seed[k]) for k, v in want.items() if v.dim() == 2)
    destroy_parallel()
    return same, differs, lm.vocab_size, lm.seq_len


def test_megatron_source_round_trips_and_mismatched_configs_fail_before_work(tmp_path):
    cfg = dict(num_layers=1, hidden=32, heads=2, num_experts=2, ffn_hidden=32)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    ((same, differs, vocab, seq),) = run_on_processes(_models_and_mismatches, 1, str(tmp_path), timeout=240)
    assert same and differs and (vocab, seq) == (256, 32)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**cfg, "hidden": 64}))
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({**cfg, "num_experts": 4}))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**cfg, "hiden": 64}))
    src = f"megatron:{tmp_path}/mdl"
    ev = ["eval", "--tokens", "2000", "--model"]
    cases = [
        ev + [src, "--model-config", str(wrong)],
        ev + [src, "--model-config", str(experts)],
        ev + ["tiny", "--model-config", str(unknown)],
        ev + [f"megatron:{tmp_path}/nowhere"],
        ev + [f"megatron:{tmp_path}"],  # a directory without config.json
        ev + ["tests.helpers.factories:not_a_module"],
        ev + ["tests.helpers.factories:nothing_here"],
        ev + ["no_such_module_xyz:f"],
        ["eval", "--tokens", "2000"],
        ["save-model", "--out", str(tmp_path / "mdl")],  # exists, not empty
        ["save-model", "--out", str(tmp_path / "m2"), "--model", "tests.helpers.factories:make_byte_mlp"],
        ev + [src, "--adapters", str(tmp_path / "none.safetensors")],
    ]
    results = run_cli_cases(cases)
    messages = [
        "does not match the Megatron checkpoint",
        "linear_fc1.weight has shape (1, 2, 64, 32) in the checkpoint, (1, 4, 64, 32) in the model",
        "unknown TinyMoEConfig fields: ['hiden']",
        "nowhere does not exist",
        "config.json does not exist",
        "not an nn.Module",
        "has no callable 'nothing_here'",
        "cannot import no_such_module_xyz",
        "pass --checkpoint DIR or --model SRC",
        "exists and is not empty",
        "save-model writes Megatron models",
        "adapter file",
    ]
    for argv, (code, out, err), message in zip(cases, results, messages):
        assert code == 2, (argv, out, err)
        assert message in err, (argv, err)
        # one error line, the last (megatron may print a deprecation notice before it)
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"svdq {argv[0]}: error: ") and err.count(": error: ") == 1, err
    assert not (tmp_path / "m2").exists()


def _perplexity_vs_float64(rank, world, data):
    from calib.cli.eval import perplexity
    from calib.data import load_tokens, token_batches
    from calib.models import build_model, resolve_source
    from lora.framework.parallel import destroy_parallel, init_parallel

    init_parallel(seed=0)
    lm = build_model(resolve_source("tiny", seed=3))
    batches = token_batches(load_tokens(data, 256, max_tokens=3000), lm.seq_len, batch=4)
    got = perplexity(lm, batches, progress=False)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for b in batches:
            logits = lm.model(b["tokens"], b["position_ids"], None).double()  # (b, s, vocab)
            logp = torch.log_softmax(logits, dim=-1)
            total -= logp.gather(-1, b["labels"].unsqueeze(-1)).sum()
            count += b["labels"].numel()
    destroy_parallel()
    return got, float(total / count), count


def test_eval_perplexity_matches_a_float64_reference(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("perplexity is the exponential of the mean negative log likelihood. " * 60)
    ((got, ref_loss, count),) = run_on_processes(_perplexity_vs_float64, 1, str(text), timeout=240)
    assert got["tokens"] == count == 3000 // (4 * 33) * 4 * 32
    assert abs(got["loss"] - ref_loss) <= 2e-6 * ref_loss  # fp32 logits, float64 sums
    assert math.isclose(got["perplexity"], math.exp(ref_loss), rel_tol=1e-5)


def test_save_model_subcommand_then_eval_calibrate_and_json(tmp_path):
    out = tmp_path / "mdl"
    cases = [
        ["save-model", "--out", str(out), "--seed", "5"],
        ["eval", "--model", f"megatron:{out}", "--tokens", "3000", "--json", str(tmp_path / "a.json")],
        ["eval", "--model", "tiny", "--seed", "5", "--tokens", "3000", "--json", str(tmp_path / "b.json")],
        ["calibrate", "--out", str(tmp_path / "c"), "--model", f"megatron:{out}", "--tokens", "2048"],
        ["eval", "--checkpoint", str(tmp_path / "c" / "model"), "--tokens", "3000"],
    ]
    results = run_cli_cases(cases)
    assert [r[0] for r in results] == [0] * 5, results
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".*tmp*"))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == b["tokens"] == 3000 // 264 * 256
    assert a["model"]["spec"] == f"megatron:{out}" and "perplexity" in results[1][1]
    quantized = float(results[4][1].split("perplexity ")[1].split()[0])
    assert quantized != a["perplexity"] and abs(quantized - a["perplexity"]) < 0.05 * a["perplexity"]
