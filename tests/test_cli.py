"""The README's main command runs end to end (reduced size)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_smoke_runs_and_reports_every_step():
    proc = subprocess.run(
        [sys.executable, "-m", "calib.cli", "quickstart", "--steps", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("train tiny GPT-MoE", "calibrate: SVDQuant NVFP4 W4A4", "fine-tune adapters only"):
        assert step in proc.stdout
    assert "OK" in proc.stdout
