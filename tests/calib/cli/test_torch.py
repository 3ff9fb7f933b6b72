"""The command line on a plain torch model (``--model module:function``, :class:`svdq.SVDQLinear` layers):
calibrate → finetune → export → eval, and a crash mid-run (the model's forward raises on its N-th call):
no partial output, only complete checkpoints, and ``--resume`` continues exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import no_temporaries, run_cli_cases, svdq

MODEL = ["--model", "tests.helpers.factories:make_byte_mlp"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("torch") / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return path


EXP = ["export", "--trust-model-source", "--checkpoint"]


@pytest.mark.slow
def test_factory_model_workflow_crash_and_exact_resume(corpus, tmp_path):
    c, ft, exp = tmp_path / "c", tmp_path / "ft", tmp_path / "exp"
    ft_args = [
        "finetune",
        "--checkpoint",
        c / "model",
        "--trust-model-source",  # the checkpoint records a module:function factory
        "--data",
        corpus,
        "--steps",
        "10",
        "--save-every",
        "2",
    ]
    cases = [
        ["calibrate", "--out", c, *MODEL, "--data", corpus, "--rank", "8", "--tokens", "8192"],
        [*ft_args, "--out", ft, "--lr", "3e-3", "--batch", "4"],
        [*EXP, c / "model", "--adapters", ft / "adapters.safetensors", "--out", exp],
        ["eval", "--trust-model-source", "--checkpoint", exp, "--data", corpus],
        [
            "eval",
            "--trust-model-source",
            "--checkpoint",
            c / "model",
            "--adapters",
            ft / "adapters.safetensors",
        ]
        + ["--data", corpus],
        ["eval", "--trust-model-source", "--checkpoint", c / "model", "--data", corpus],
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases, results):
        assert code == 0, (argv, err[-3000:])
    ppl = [float(r[1].split("perplexity ")[1].split()[0]) for r in results[3:]]
    assert ppl[0] == ppl[1] < ppl[2]  # export == checkpoint + adapters, both better than before training
    straight = json.loads((ft / "losses.json").read_text())["losses"]
    kept = sorted(p.name for p in (ft / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008", "step-000010"]  # --keep 3

    # a crash in the 7th forward: exit code 1, the traceback, complete checkpoints 2, 4, 6 and nothing else
    crashed = tmp_path / "crashed"
    run = [*ft_args, "--out", crashed, "--lr", "3e-3", "--batch", "4"]
    proc = svdq(*run, env={"SVDQ_TEST_CRASH_AT": "7"})
    assert proc.returncode == 1 and "simulated crash in forward call 7" in proc.stderr, proc.stderr[-3000:]
    names = sorted(p.name for p in (crashed / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004", "step-000006"]
    assert sorted(p.name for p in crashed.iterdir()) == ["checkpoints"] and not no_temporaries(tmp_path)
    state = json.loads((crashed / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["step"] == 6 and state["losses"] == straight[:6]

    # calibration crashing mid-run writes nothing
    proc = svdq(
        "calibrate", "--out", tmp_path / "c2", *MODEL, "--data", corpus, env={"SVDQ_TEST_CRASH_AT": "3"}
    )
    assert proc.returncode == 1 and "simulated crash" in proc.stderr
    assert not (tmp_path / "c2").exists() and not no_temporaries(tmp_path)

    resumed = svdq(*run, "--resume")
    assert resumed.returncode == 0 and "step-000006" in resumed.stdout, resumed.stderr[-3000:]
    assert json.loads((crashed / "losses.json").read_text())["losses"] == straight
    a, b = load_file(ft / "adapters.safetensors"), load_file(crashed / "adapters.safetensors")
    assert a.keys() == b.keys() == {"up.lora_down", "up.lora_up", "down.lora_down", "down.lora_up"}
    assert all(torch.equal(a[k], b[k]) for k in a)
