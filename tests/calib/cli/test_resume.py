"""``svdq calibrate --mode layerwise --resume``: a run stopped after its first layer (the hidden
``--stop-after-layers``, raising what Ctrl-C raises) and resumed gives the uninterrupted run's checkpoint,
tensor for tensor; a resume with other settings or data fails with one line before any work."""

import json

import torch
from safetensors import safe_open

from tests.helpers.cli import run_cli_cases

BASE = ["calibrate", "--mode", "layerwise", "--rank", "8", "--tokens", "2048", "--progress", "never"]


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return out


def test_stopped_then_resumed_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    ((c_cut, _, e_cut),) = run_cli_cases([[*BASE, "--out", cut, "--stop-after-layers", "1"]])
    assert c_cut == 130 and "continue with --resume" in e_cut, e_cut[-2000:]
    assert any((cut / "partial").glob("*.safetensors")) and not (cut / "model").exists()
    results = run_cli_cases(
        [
            [*BASE, "--out", full],
            [*BASE, "--out", cut, "--resume", "--rank", "4"],  # other settings: refused
            [*BASE, "--out", cut, "--resume", "--tokens", "2000"],  # other data: refused
            [*BASE, "--out", cut, "--resume", "--json", tmp_path / "s.json"],
            [*BASE, "--out", tmp_path / "none", "--resume"],
        ]
    )
    (c_full, _, e_full), bad_cfg, bad_data, (c_res, out_res, e_res), nothing = results
    assert c_full == 0, e_full[-2000:]
    assert bad_cfg[0] == 2 and "another settings" in bad_cfg[2], bad_cfg[2][-1500:]
    assert bad_data[0] == 2 and "another data" in bad_data[2], bad_data[2][-1500:]
    assert nothing[0] == 2 and "nothing to resume" in nothing[2]
    assert c_res == 0, e_res[-2000:]
    assert "resuming after 1 finished layer(s)" in e_res and not (cut / "partial").exists()
    a, b = _tensors(full / "model"), _tensors(cut / "model")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((d / "report.json").read_text())["rows"] for d in (full, cut))
    for x, y in zip(ra, rb, strict=True):
        x.pop("seconds"), y.pop("seconds")
        assert x == y
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["command"] == "calibrate" and summary["layers"] == len(rb)
    assert out_res.strip().splitlines()[-1].startswith("calibrated ")
