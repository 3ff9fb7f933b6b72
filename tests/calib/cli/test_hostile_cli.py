"""Hostile and careless use of the command line (issue 19): checkpoints that name code, corrupt and
non-finite tensors, bad arguments and config fields, late failures, wrong file kinds, concurrent writers,
Ctrl-C. Real CLI runs (one spawned process for many cases, subprocesses where a process must be real) on
real files of the tiny GPT-MoE."""

import errno
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora.io import container
from tests.helpers import ROOT
from tests.helpers.cli import ENV, interrupt, no_temporaries, run_cli_cases

TOKENS = ["--tokens", "2048"]
FT = ["--tokens", "8000", "--batch", "2", "--warmup", "0"]


def _one_line_exit_2(result, *needles):
    """Exit 2, no traceback, exactly one ``svdq CMD: error:`` line (progress bars aside), the last one,
    holding every needle."""
    code, _, err = result
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert err.count(": error: ") == 1 and ": error: " in lines[-1], err[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    assert "Traceback" not in err


def _edit_meta(ckpt, edit) -> None:
    """Edit the user metadata of a single-file checkpoint and recompute the header checksum (a forger)."""
    f = ckpt / container.SINGLE_FILE
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    doc = json.loads(meta["metadata"])
    edit(doc)
    meta["metadata"] = json.dumps(doc, sort_keys=True)
    specs = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    meta["checksum"] = container._header_checksum(meta, specs)
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A calibrated checkpoint (its --out pre-seeded with a stale temporary of a dead process) and a short
    fine-tuning run."""
    root = tmp_path_factory.mktemp("hostile")
    out = root / "calib"
    out.mkdir()
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    stale = out / f".model.tmp-{dead}-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    cases = [
        ["calibrate", "--out", out, "--rank", "4", *TOKENS],
        ["finetune", "--checkpoint", out / "model", "--out", root / "ft", "--steps", "2", *FT],
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases, results):
        assert code == 0, (argv, err[-3000:])
    assert not stale.exists()  # removed by the next write to out/model
    return {"root": root, "ckpt": out / "model", "adapters": root / "ft" / "adapters.safetensors"}


# --------------------------------------------------------------------------- 1: no code from checkpoints


def test_a_checkpoint_naming_a_factory_never_runs_it_without_opt_in(world, tmp_path):
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / container.SINGLE_FILE).write_bytes((world["ckpt"] / container.SINGLE_FILE).read_bytes())
    _edit_meta(forged, lambda d: d["user"]["model"].update(spec="os:abort", config=None))
    getpid = tmp_path / "getpid"
    getpid.mkdir()
    (getpid / container.SINGLE_FILE).write_bytes((world["ckpt"] / container.SINGLE_FILE).read_bytes())
    _edit_meta(getpid, lambda d: d["user"]["model"].update(spec="os:getpid", config=None))
    cases = [
        ["eval", "--checkpoint", forged, *TOKENS],
        ["export", "--checkpoint", forged, "--out", tmp_path / "exp"],
        ["finetune", "--checkpoint", forged, "--out", tmp_path / "ft", "--steps", "1", *FT],
        ["eval", "--checkpoint", getpid, *TOKENS],
        # opted in (or repeated on the command line): the factory is called; os.getpid returns an int
        ["eval", "--checkpoint", getpid, "--trust-model-source", *TOKENS],
        ["eval", "--checkpoint", getpid, "--model", "os:getpid", *TOKENS],
        # built-in sources stay automatic
        ["eval", "--checkpoint", world["ckpt"], *TOKENS],
    ]
    results = run_cli_cases(cases)  # os:abort would kill this process
    for r in results[:4]:
        _one_line_exit_2(r, "records the model factory", "--trust-model-source", "--model os:")
    for r in results[4:6]:
        _one_line_exit_2(r, "os:getpid", "not an nn.Module")
    assert results[6][0] == 0 and "perplexity" in results[6][1]
    assert not (tmp_path / "exp").exists() and not (tmp_path / "ft").exists()


# --------------------------------------------------------------------------- 2: corrupt tensor data


def _copy_ckpt(src, dst):
    dst.mkdir()
    (dst / container.SINGLE_FILE).write_bytes((src / container.SINGLE_FILE).read_bytes())
    return dst


def _poke(ckpt, name, value=None, xor=None):
    """Overwrite the first element of tensor ``name`` in place (``value``) or xor its first byte."""
    f = ckpt / container.SINGLE_FILE
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + n])[name]
    a = 8 + n + entry["data_offsets"][0]
    if xor is not None:
        raw[a] ^= xor
    else:
        raw[a : a + 4] = struct.pack("<f", value)
    f.write_bytes(bytes(raw))


def test_corrupt_tensor_data_fails_naming_the_tensor(world, tmp_path):
    with safe_open(str(world["ckpt"] / container.SINGLE_FILE), "pt") as fh:
        keys = list(fh.keys())
    smooth = next(k for k in keys if k.endswith(".smooth"))
    packed = next(k for k in keys if k.endswith(".weight_packed"))
    nan = _copy_ckpt(world["ckpt"], tmp_path / "nan")
    _poke(nan, smooth, value=float("nan"))
    flipped = _copy_ckpt(world["ckpt"], tmp_path / "flip")
    _poke(flipped, packed, xor=0x10)
    neg = _copy_ckpt(world["ckpt"], tmp_path / "neg")
    _poke(neg, smooth, value=-2.0)
    cases = [
        ["eval", "--checkpoint", nan, *TOKENS],
        ["eval", "--checkpoint", flipped, *TOKENS],
        ["eval", "--checkpoint", flipped, "--no-verify", *TOKENS],  # trusted: the flip goes unseen
        ["eval", "--checkpoint", neg, "--no-verify", *TOKENS],  # value checks stay on
        ["export", "--checkpoint", nan, "--out", tmp_path / "exp"],
    ]
    r = run_cli_cases(cases)
    _one_line_exit_2(r[0], smooth, "checksum mismatch")
    _one_line_exit_2(r[1], packed, "checksum mismatch")
    assert r[2][0] == 0 and "perplexity" in r[2][1]
    _one_line_exit_2(r[3], smooth, "must be > 0")
    _one_line_exit_2(r[4], smooth)
    assert not (tmp_path / "exp").exists()


def test_self_consistent_metadata_edits_are_caught_against_the_tensors(world, tmp_path):
    def weight_format_int4(doc):
        for layer in doc["layers"].values():
            layer["weight"]["format"] = {**layer["weight"]["format"], "name": "int4", "group_size": 32}

    def rank_changed(doc):
        for gm in doc["expert_groups"].values():
            gm["projections"]["fc1"]["rank"] += 1

    def shape_changed(doc):
        for layer in doc["layers"].values():
            layer["shape"] = [layer["shape"][0] * 2, layer["shape"][1]]

    cases = []
    for i, edit in enumerate((weight_format_int4, rank_changed, shape_changed)):
        d = _copy_ckpt(world["ckpt"], tmp_path / f"edit{i}")
        _edit_meta(d, edit)
        cases.append(["eval", "--checkpoint", d, *TOKENS])
    for code, _, err in run_cli_cases(cases):
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]


# --------------------------------------------------------------------------- 3: non-finite values


def test_nan_adapters_are_refused_by_export_and_eval(world, tmp_path):
    with safe_open(str(world["adapters"]), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    bad = tmp_path / "nan_adapters.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    cases = [
        ["export", "--checkpoint", world["ckpt"], "--adapters", bad, "--out", tmp_path / "exp"],
        ["eval", "--checkpoint", world["ckpt"], "--adapters", bad, *TOKENS],
        ["finetune", "--checkpoint", world["ckpt"], "--out", tmp_path / "ft", "--steps", "1", "--lr", "inf"],
        ["finetune", "--checkpoint", world["ckpt"], "--out", tmp_path / "ft", "--steps", "1", "--lr", "nan"],
        [
            "finetune",
            "--checkpoint",
            world["ckpt"],
            "--out",
            tmp_path / "ft",
            "--steps",
            "1",
            "--grad-clip",
            "-1",
        ],
    ]
    r = run_cli_cases(cases)
    _one_line_exit_2(r[0], first, "NaN or inf", str(bad))
    _one_line_exit_2(r[1], first, "NaN or inf")
    for x in r[2:]:
        _one_line_exit_2(x)
    assert not (tmp_path / "exp").exists() and not (tmp_path / "ft").exists()


def test_diverging_finetune_stops_naming_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path):
    ft = tmp_path / "ft"
    argv = ["finetune", "--checkpoint", world["ckpt"], "--out", ft, "--steps", "6", *FT]
    ((code, _, err),) = run_cli_cases([[*argv, "--lr", "1e30", "--save-every", "1", "--grad-clip", "0"]])
    line = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert "finetune stopped at step" in line and "last good checkpoint is" in line, line
    step = int(line.split("stopped at step ")[1].split(":")[0])
    kept = sorted(p.name for p in (ft / "checkpoints").iterdir())
    assert kept[-1] == f"step-{step - 1:06d}"
    from calib.train import read_state

    state = read_state(ft / "checkpoints" / kept[-1])
    assert all(np.isfinite(state["losses"]))
    with safe_open(str(ft / "checkpoints" / kept[-1] / "adapters.safetensors"), "pt") as fh:
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())
    assert not (ft / "adapters.safetensors").exists()


# --------------------------------------------------------------------------- 4, 5: arguments, paths, configs


def test_arguments_and_model_configs_are_validated_before_any_work(world, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    configs = {
        "dtype": {"dtype": "float33"},
        "num_layers": {"num_layers": 0},
        "hidden": {"hidden": "64"},
        "topk": {"topk": 5, "num_experts": 4},
        "seq_len": {"seq_len": 2.5},
    }
    for name, fields in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(fields))
    out = tmp_path / "out"
    cases = [
        (["calibrate", "--out", out, "--batch", "0"], "--batch"),
        (["calibrate", "--out", out, "--tokens", "0"], "--tokens"),
        (["calibrate", "--out", out, "--rank", "-3"], "--rank"),
        (["calibrate", "--out", a_file], "is a file"),
        (["calibrate", "--out", a_file / "sub"], "lies under"),
        (["calibrate", "--out", out, "--layout", "fc1=sideways"], "sideways"),
        (["eval", "--checkpoint", world["ckpt"], "--json", tmp_path], "is a directory"),
        (
            ["eval", "--checkpoint", world["ckpt"], "--json", tmp_path / "missing" / "r.json"],
            "does not exist",
        ),
        (["export", "--checkpoint", world["ckpt"], "--out", a_file], "is a file"),
        (["finetune", "--checkpoint", world["ckpt"], "--out", a_file / "x", "--steps", "1"], "lies under"),
        (["save-model", "--out", a_file], "is a file"),
        (["quickstart", "--model-config", tmp_path / "nope.json"], "does not exist"),
        (["quickstart", "--steps", "0"], "--steps"),
        (["quickstart", "--json", tmp_path], "is a directory"),
    ] + [
        (["calibrate", "--out", out, "--model-config", tmp_path / f"{n}.json"], f"TinyMoEConfig.{n}")
        for n in configs
    ]
    t0 = time.perf_counter()
    results = run_cli_cases([c for c, _ in cases])
    for (_, needle), r in zip(cases, results):
        _one_line_exit_2(r, needle)
    assert not out.exists() and a_file.read_text() == "x"
    assert time.perf_counter() - t0 < 120  # nothing calibrated


def test_exit_codes_are_one_rule_for_every_subcommand():
    from calib.cli.main import exit_code

    assert exit_code(KeyboardInterrupt()) == 130
    for exc in (ValueError("x"), FileNotFoundError("x"), FileExistsError("x"), PermissionError("x")):
        assert exit_code(exc) == 2
    assert exit_code(json.JSONDecodeError("x", "", 0)) == 2
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == 1
    assert exit_code(FloatingPointError("diverged")) == 1
    for bug in (TypeError("x"), AttributeError("x"), KeyError("x"), RuntimeError("x")):
        assert exit_code(bug) is None  # real bugs keep their traceback


def test_free_space_is_checked_against_the_expected_size(tmp_path):
    from calib.cli.common import check_free_space

    check_free_space(tmp_path / "new" / "dir", 1000)
    with pytest.raises(ValueError, match="MB free on"):
        check_free_space(tmp_path / "new" / "dir", 10**18)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_work(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    ((code, _, err),) = run_cli_cases([["export", "--checkpoint", world["ckpt"], "--out", ro / "exp"]])
    assert code == 2 and "not writable" in err


# --------------------------------------------------------------------------- 6: wrong file kinds


def test_wrong_data_kinds_are_refused_naming_the_file(world, tmp_path):
    np.savez(tmp_path / "ids.npz", ids=np.arange(100))
    (tmp_path / "ids.bin").write_bytes(np.arange(3000, dtype=np.uint16).tobytes())
    np.save(tmp_path / "full.npy", np.arange(3000) % 256)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:500])
    np.save(tmp_path / "obj.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    run = world["root"] / "ft" / "checkpoints"
    step = sorted(run.iterdir())[-1]
    cut_state = tmp_path / "ft"
    (cut_state / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(step, cut_state / "checkpoints" / step.name)
    state = cut_state / "checkpoints" / step.name / "state.json"
    state.write_text(state.read_text()[:200])
    base = ["eval", "--checkpoint", world["ckpt"]]
    cases = [
        ([*base, "--data", tmp_path / "ids.npz"], "ids.npz", "zip archive"),
        ([*base, "--data", tmp_path / "ids.bin"], "ids.bin", "binary"),
        ([*base, "--data", tmp_path / "cut.npy"], "cut.npy", "truncated"),
        ([*base, "--data", tmp_path / "obj.npy"], "obj.npy", "Python objects"),
        (
            ["finetune", "--checkpoint", world["ckpt"], "--out", cut_state, "--steps", "2", *FT, "--resume"],
            "state.json",
            "not valid JSON",
        ),
    ]
    results = run_cli_cases([c for c, *_ in cases])
    for (_, *needles), r in zip(cases, results):
        _one_line_exit_2(r, *needles)


# --------------------------------------------------------------------------- 8: concurrent writers


def test_two_concurrent_exports_to_one_out_exactly_one_wins(world, tmp_path):
    out = tmp_path / "exp"
    argv = [
        sys.executable,
        "-m",
        "calib.cli",
        "export",
        "--checkpoint",
        str(world["ckpt"]),
        "--out",
        str(out),
    ]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ]
    procs.append(
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for c, err in outcomes if c == 2)
    assert str(out) in loser and "Traceback" not in loser
    assert (out / container.SINGLE_FILE).is_file() and not no_temporaries(tmp_path)
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_ctrl_c_is_interrupted_and_130(world, tmp_path, command):
    if command == "eval":
        argv = ["eval", "--checkpoint", world["ckpt"], "--tokens", "200000", "--batch", "1"]
    else:
        argv = ["finetune", "--checkpoint", world["ckpt"], "--out", tmp_path / "ft", "--steps", "500", *FT]
    # stderr is a pipe: progress bars only on request (they show the command is working)
    code, err = interrupt(*argv, "--progress", "always", ready=lambda s: f"{command}: " in s and "%|" in s)
    assert code == 130 and f"svdq {command}: interrupted" in err, err[-2000:]
    assert "Traceback" not in err and not no_temporaries(tmp_path)
