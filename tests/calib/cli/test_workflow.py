"""The command line end to end on the built-in tiny GPT-MoE: calibrate → eval → finetune (exact resume)
→ export → eval of the export; input errors (exit 2, one line, nothing written); Ctrl-C (exit 130,
nothing partial)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import interrupt, no_temporaries, run_cli_cases, svdq

TOKENS = ["--tokens", "4096"]
FT = ["--steps", "10", "--tokens", "20000", "--batch", "4", "--warmup", "3", "--dropout", "0.05"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "calib"
    ((code, stdout, stderr),) = run_cli_cases([["calibrate", "--out", out, "--rank", "8", *TOKENS]])
    assert code == 0, stderr[-3000:]
    assert "wrote" in stdout and (out / "model").is_dir()
    return out / "model"


def _ppl(stdout: str) -> float:
    return float(stdout.split("perplexity ")[1].split()[0])


@pytest.mark.slow
def test_calibrate_eval_finetune_resume_export_eval(calibrated, tmp_path):
    ft, exp = tmp_path / "ft", tmp_path / "exp"
    cases = [
        ["eval", "--checkpoint", calibrated, *TOKENS, "--json", tmp_path / "base.json"],
        ["finetune", "--checkpoint", calibrated, "--out", ft, *FT],
        ["export", "--checkpoint", calibrated, "--adapters", ft / "adapters.safetensors", "--out", exp],
        ["eval", "--checkpoint", exp, *TOKENS],
        ["eval", "--checkpoint", calibrated, "--adapters", ft / "adapters.safetensors", *TOKENS],
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases, results):
        assert code == 0, (argv, err[-3000:])
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["tokens"] == 4096 // (8 * 33) * 8 * 32 and base["perplexity"] == pytest.approx(
        _ppl(results[0][1])
    )
    losses = json.loads((ft / "losses.json").read_text())
    assert len(losses["losses"]) == 10 and all(0 < x < 10 for x in losses["losses"])
    assert max(losses["lrs"]) == pytest.approx(1e-3) and losses["lrs"][0] == pytest.approx(1e-3 / 3)
    assert sorted(p.name for p in (ft / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    assert "fine-tuned" in results[1][1] and "loss" in results[1][1]
    # the export holds the fine-tuned adapters: same perplexity as checkpoint + adapter file, below the base
    assert _ppl(results[3][1]) == _ppl(results[4][1]) < base["perplexity"]
    assert not no_temporaries(tmp_path)

    # 5 steps, stop, resume to 10 in fresh processes: the same losses and adapters, bit for bit (the
    # adapter dropout masks continue from the saved RNG states). One intra-op thread, as in the in-process
    # run above: float sums of another thread count may round differently.
    ft2, one_thread = tmp_path / "ft2", {"OMP_NUM_THREADS": "1"}
    first = svdq("finetune", "--checkpoint", calibrated, "--out", ft2, *FT, "--stop-at", "5", env=one_thread)
    assert first.returncode == 0 and "continue with --resume" in first.stdout, first.stderr[-3000:]
    assert not (ft2 / "adapters.safetensors").exists()
    second = svdq("finetune", "--checkpoint", calibrated, "--out", ft2, *FT, "--resume", env=one_thread)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "step-000005" in second.stdout
    resumed = json.loads((ft2 / "losses.json").read_text())
    assert resumed["losses"] == losses["losses"] and resumed["grad_norms"] == losses["grad_norms"]
    a, b = load_file(ft / "adapters.safetensors"), load_file(ft2 / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_input_errors_exit_2_with_one_line_before_any_output(calibrated, tmp_path):
    big = tmp_path / "ids.npy"
    import numpy as np

    np.save(big, np.array([1, 2, 256]))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hidden": 32, "heads": 2}))
    done = tmp_path / "done"
    done.mkdir()
    (done / "x").write_text("previous run")
    ft = ["finetune", "--checkpoint", calibrated, "--steps", "4"]
    cases = [
        (["eval", "--checkpoint", tmp_path / "missing"], "checkpoint", "does not exist"),
        (["eval", "--checkpoint", calibrated, "--data", big], "eval", "token ids must lie in [0, 256)"),
        (["eval", "--checkpoint", calibrated, "--data", empty], "eval", "holds no tokens"),
        (["eval", "--checkpoint", calibrated, "--model", "tiny", "--model-config", other], "eval", "shape"),
        (["eval", "--checkpoint", calibrated, "--adapters", big], "eval", "not a safetensors file"),
        ([*ft, "--out", tmp_path / "r1", "--resume"], "r1", "nothing to resume"),
        ([*ft, "--out", done], "done", "pass --resume"),
        ([*ft, "--out", tmp_path / "r2", "--stop-at", "9"], "r2", "--stop-at"),
        ([*ft, "--out", tmp_path / "r3", "--lr", "0"], "r3", "--lr must be > 0"),
        ([*ft, "--out", tmp_path / "r4", "--data", big], "r4", "token ids must lie"),
        (["finetune", "--out", tmp_path / "r5", "--steps", "3", "--model", "tiny"], "r5", "--checkpoint DIR"),
        (["export", "--checkpoint", calibrated, "--out", done], "done", "not empty"),
        (
            ["export", "--checkpoint", calibrated, "--out", tmp_path / "e", "--max-shard-size", "lots"],
            "e",
            "size",
        ),
    ]
    results = run_cli_cases([c[0] for c in cases])
    for (argv, _, message), (code, out, err) in zip(cases, results):
        assert code == 2, (argv, out[-2000:], err[-2000:])
        assert message in err, (argv, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"svdq {argv[0]}: error: ") and err.count(": error: ") == 1, err
    for name in ("r1", "r2", "r3", "r4", "r5", "e"):
        assert not (tmp_path / name).exists(), name
    assert [p.name for p in done.iterdir()] == ["x"]


def test_resume_refuses_changed_settings_and_other_data(calibrated, tmp_path):
    ft = tmp_path / "ft"
    args = ["finetune", "--checkpoint", calibrated, "--out", ft, "--steps", "4", "--tokens", "3000"]
    results = run_cli_cases(
        [
            [*args, "--stop-at", "2", "--save-every", "0"],
            [*args, "--resume", "--lr", "2e-3"],
            [*args[:-1], "4000", "--resume"],
        ]
    )
    assert results[0][0] == 0, results[0][2][-2000:]
    assert results[1][0] == 2 and "{'lr': (0.001, 0.002)}" in results[1][2], results[1][2]
    assert results[2][0] == 2 and "another run" in results[2][2] and "'tokens': (3000, 4000)" in results[2][2]
    assert [p.name for p in (ft / "checkpoints").iterdir()] == ["step-000002"]


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_output(calibrated, tmp_path):
    out = tmp_path / "c"
    argv = ["calibrate", "--out", out, "--tokens", "4096", "--progress", "always"]  # stderr is a pipe
    code, err = interrupt(*argv, ready=lambda e: "calibrate:" in e)
    assert code == 130 and "interrupted" in err, err[-2000:]
    assert not out.exists() or not any(out.iterdir())

    ft = tmp_path / "ft"
    args = ["finetune", "--checkpoint", calibrated, "--out", ft, "--steps", "500", "--save-every", "2"]
    code, err = interrupt(
        *args, "--tokens", "5000", ready=lambda e: (ft / "checkpoints" / "step-000004").is_dir()
    )
    assert code == 130 and "interrupted" in err, err[-2000:]
    names = sorted(p.name for p in (ft / "checkpoints").iterdir())
    assert names[:2] == ["step-000002", "step-000004"] and all(n.startswith("step-") for n in names)
    assert all((ft / "checkpoints" / n / "state.json").is_file() for n in names)
    assert not (ft / "adapters.safetensors").exists() and not (ft / "losses.json").exists()
    assert not no_temporaries(tmp_path)


@pytest.mark.gpu
def test_finetune_in_bf16_on_cuda_resumes_exactly(calibrated, tmp_path):
    """On CUDA finetune runs under bf16 autocast (Megatron's router gating outside it)."""
    ft, ft2 = tmp_path / "ft", tmp_path / "ft2"
    args = ["finetune", "--checkpoint", calibrated, "--steps", "6", "--tokens", "20000", "--warmup", "2"]
    results = run_cli_cases(
        [[*args, "--out", ft], [*args, "--out", ft2, "--stop-at", "3"], [*args, "--out", ft2, "--resume"]]
    )
    assert [r[0] for r in results] == [0, 0, 0], [r[2][-2000:] for r in results]
    a, b = (json.loads((d / "losses.json").read_text()) for d in (ft, ft2))
    assert a["losses"] == b["losses"] and all(0 < x < 10 for x in a["losses"])
    ta, tb = load_file(ft / "adapters.safetensors"), load_file(ft2 / "adapters.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
