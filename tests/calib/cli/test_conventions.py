"""Command-line conventions (issue 23): --version, plain-text help with defaults, closed sets as choices
checked before any work, --log-level / --quiet before or after the subcommand, one summary line and
--json for every subcommand, and the calibration report (title, legend clear of the bars, per-expert
errors). Real CLI runs of the tiny GPT-MoE in one spawned process."""

import json
import re
from importlib.metadata import version

import pytest

from calib.cli.common import FORMAT_CHOICES
from svdq.formats import QuantFormat
from tests.helpers.cli import run_cli_cases, svdq

COMMANDS = ["quickstart", "calibrate", "eval", "finetune", "export", "save-model"]
TOKENS = ["--tokens", "2048"]


def test_version_prints_the_package_version():
    proc = svdq("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"svdq {version('svdq')}"


def test_help_is_plain_text_and_shows_defaults():
    results = run_cli_cases([["--help"], *([c, "--help"] for c in COMMANDS)])
    for name, (code, out, err) in zip(["svdq", *COMMANDS], results):
        assert code == 0 and out, (name, err[-1000:])
        for markup in ("``", ":func:", ":class:", ":mod:", ":data:"):
            assert markup not in out, (name, markup)
    helps = dict(zip(["svdq", *COMMANDS], (out for _, out, _ in results)))
    flat = {k: " ".join(v.split()) for k, v in helps.items()}
    assert "--rank R SVDQuant low-rank branch rank (default: 16)" in flat["calibrate"]
    assert "(default: fc1=shared-down,fc2=auto)" in flat["calibrate"]
    assert "--log-level {debug,info,warning,error}" in flat["svdq"]


def test_format_choices_are_the_quant_format_string_forms():
    for text in FORMAT_CHOICES:
        assert str(QuantFormat.from_str(text)) in FORMAT_CHOICES


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["calibrate", "--out", "{tmp}/o", "--layout", "fc1=shared-down,fc2=bad"], "--layout must be one of"),
        (["calibrate", "--out", "{tmp}/o", "--layout", "fc3=auto"], "--layout must be one of"),
        (["calibrate", "--out", "{tmp}/o", "--format", "nvfp5"], "argument --format: invalid choice"),
        (["calibrate", "--out", "{tmp}/o", "--mode", "fast"], "argument --mode: invalid choice"),
        (["export", "--out", "{tmp}/o", "--format", "gguf"], "argument --format: invalid choice"),
        (["--log-level", "loud", "eval"], "argument --log-level: invalid choice"),
    ],
)
def test_bad_closed_set_values_exit_2_before_loading_anything(tmp_path, argv, needle):
    proc = svdq(*(a.format(tmp=tmp_path) for a in argv))
    assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "o").exists() and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    c, ft, ex, sm = root / "c", root / "ft", root / "ex", root / "sm"
    j = {k: root / f"{k}.json" for k in ("calibrate", "eval", "finetune", "export", "save-model")}
    cases = [
        ["--quiet", "calibrate", "--out", c, "--rank", "8", *TOKENS, "--json", j["calibrate"]],
        ["eval", "--checkpoint", c / "model", *TOKENS, "--json", j["eval"], "--log-level", "debug"],
        ["finetune", "--checkpoint", c / "model", "--out", ft, "--steps", "2", "--tokens", "4000",
         "--batch", "2", "--json", j["finetune"]],
        ["export", "--checkpoint", c / "model", "--out", ex, "--format", "folded", "--json", j["export"],
         "-q"],
        ["save-model", "--out", sm, "--json", j["save-model"]],
    ]  # fmt: skip
    return root, j, run_cli_cases(cases)


def test_every_subcommand_ends_with_one_summary_line_and_writes_json(runs):
    root, jsons, results = runs
    for (name, path), (code, out, err) in zip(jsons.items(), results):
        assert code == 0, (name, err[-2000:])
        last = out.strip().splitlines()[-1]
        assert f"(summary: {path})" in last, (name, last)
        record = json.loads(path.read_text())
        assert record["command"] == name
        assert "%|" not in err  # stderr is not a terminal: no progress bars
    quiet_calibrate, export = results[0], results[3]
    assert len(quiet_calibrate[1].strip().splitlines()) == 1 and "svdq: " not in quiet_calibrate[2]
    assert len(export[1].strip().splitlines()) == 1  # -q after the subcommand: no fold table
    assert json.loads(jsons["export"].read_text())["files"]
    assert json.loads(jsons["eval"].read_text())["tokens"] > 0
    calib = json.loads(jsons["calibrate"].read_text())
    assert calib["layers"] == 8 and calib["weight_format"] == "nvfp4" and calib["rank"] == 8


def test_report_json_has_per_expert_errors_and_png_title_and_clear_legend(runs):
    from calib.report import CalibReport

    root = runs[0]
    doc = json.loads((root / "c" / "report.json").read_text())
    assert doc["model"] == "tiny" and doc["weight_format"] == doc["act_format"] == "nvfp4"
    assert doc["rank"] == 8 and doc["layout"] == {"fc1": "shared-down", "fc2": "auto"}
    groups = [r for r in doc["rows"] if r["kind"].startswith("experts")]
    assert len(groups) == 4
    for r in groups:
        assert [e["expert"] for e in r["experts"]] == [0, 1, 2, 3]
        assert sum(e["tokens"] for e in r["experts"]) == r["tokens"]
        # the group's final error lies within its experts' range (an activation-weighted total)
        errs = [e["final_error"] for e in r["experts"]]
        assert min(errs) - 1e-9 <= r["final_error"] <= max(errs) + 1e-9
    assert (root / "c" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = CalibReport(rows=doc["rows"], config=doc["config"], layout=doc["layout"], model=doc["model"])
    fig, ax, ex = report.figure()
    fig.canvas.draw()
    title = fig._suptitle.get_text()
    assert re.search(r"tiny .*W nvfp4 / A nvfp4, rank 8, layout fc1=shared-down, fc2=auto", title)
    renderer = fig.canvas.get_renderer()
    for axes in (ax, ex):
        legend = axes.get_legend().get_window_extent(renderer)
        assert legend.x0 >= axes.get_window_extent(renderer).x1  # outside the axes, on the right
        for bar in axes.patches:
            assert not legend.overlaps(bar.get_window_extent(renderer)), bar
        for markers in axes.collections:  # scatter markers: their centres in display coordinates
            for x, y in axes.transData.transform(markers.get_offsets()):
                assert not legend.contains(x, y)
        assert len(axes.collections) in (0, 2 * len(groups))  # per-expert panel: RTN + ours per group
    assert sum(len(c.get_offsets()) for c in ex.collections) == 2 * 4 * len(groups)


def test_only_global_rank_0_logs_below_warnings(monkeypatch, capsys):
    """Under torchrun every process runs the CLI: info messages come from global rank 0 only, warnings and
    errors from every rank."""
    from calib.cli.common import configure_logging, log

    saved = (list(log.handlers), log.level, log.propagate)
    try:
        for rank, shown in (("0", True), ("1", False)):
            monkeypatch.setenv("RANK", rank)
            configure_logging("info")
            log.info("an info line")
            log.warning("a warning line")
            err = capsys.readouterr().err
            assert ("svdq: an info line" in err) == shown, (rank, err)
            assert "svdq: a warning line" in err
    finally:
        monkeypatch.delenv("RANK")
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]
