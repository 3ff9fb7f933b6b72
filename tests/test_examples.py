"""The examples run (reduced size) and produce what they promise."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quantize_torch_model_example():
    out = _run("examples/quantize_torch_model.py", "--steps", "3")
    assert "layer 0: alpha" in out and "step   2" in out


def test_calibrate_megatron_moe_example(tmp_path):
    _run("examples/calibrate_megatron_moe.py", "--out", str(tmp_path), "--steps", "2")
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["rows"]) == 8
    assert (tmp_path / "adapters.safetensors").stat().st_size > 0
