"""``svdq calibrate``: real runs on the built-in model and a factory model, and every input error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "calib.cli", "calibrate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_calibrate_builtin_model_and_corpus(tmp_path):
    proc = _cli("--out", str(tmp_path / "out"), "--tokens", "4096", "--rank", "8")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["rows"]) == 8
    assert all(r["final_error"] < r["rtn_error"] for r in report["rows"])
    assert "mean relative output error" in proc.stdout
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not list((tmp_path / "out").glob("*.tmp*"))  # no temporary files left


def test_calibrate_factory_model_on_a_text_file(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    proc = _cli(
        "--out",
        str(tmp_path / "o"),
        "--model",
        "_factories:make_byte_mlp",
        "--data",
        str(text),
        "--rank",
        "8",
        "--tokens",
        "8192",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == ["up", "down"]  # lm_head excluded by default


def test_calibrate_input_errors_exit_2_before_any_output(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    big = tmp_path / "ids.npy"
    np.save(big, np.array([1, 2, 300], dtype=np.int64))
    floats = tmp_path / "f.npy"
    np.save(floats, np.array([1.5, 2.0]))
    cases = [
        (("--data", str(tmp_path / "missing.txt")), "does not exist"),
        (("--data", str(empty)), "holds no tokens"),
        (("--data", str(big)), "token ids must lie in [0, 256)"),
        (("--data", str(floats)), "must be integers"),
        (("--model", "_factories:not_a_module"), "not an nn.Module"),
        (("--model", "nonsense"), "module:function"),
    ]
    for args, message in cases:
        out = tmp_path / f"out{len(message)}"
        proc = _cli("--out", str(out), *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert not out.exists()
