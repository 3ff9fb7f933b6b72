"""The README's main command (``svdq quickstart``) runs end to end at reduced size."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_quickstart_reduced_runs_every_stage_and_reloads_identical_logits(tmp_path):
    out = tmp_path / "qs.json"
    export = tmp_path / "export"
    args = ["--steps", "3", "--calib-batches", "2", "--eval-tokens", "1024", "--rank", "16"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "calib.cli",
            "quickstart",
            *args,
            "--json",
            str(out),
            "--export-dir",
            str(export),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = [r["step"] for r in result["rows"]]
    for expected in (
        "unquantized",
        "RTN W4A4",
        "SVDQuant W4A4",
        "fine-tune SVDQuant",
        "QLoRA-style",
        "export",
    ):
        assert any(s.startswith(expected) for s in steps), (expected, steps)
        assert any(expected in line for line in proc.stdout.splitlines()), expected
    rows = {s.split(" ")[0]: r for s, r in zip(steps, result["rows"])}
    assert rows["fine-tune"]["figures"]["losses"] and len(rows["fine-tune"]["figures"]["losses"]) == 3
    assert result["figures"]["logits_identical"] is True
    assert (export / "model.safetensors").exists()
    # every calibrated layer beats round-to-nearest
    assert all(r["final_error"] < r["rtn_error"] for r in result["report"])
    for key in ("svdq_over_unquantized", "finetuned_over_qlora"):
        assert result["figures"][key] > 0 and key in result["targets"]
