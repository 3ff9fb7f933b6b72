"""The ``svdq`` command line.

    svdq quickstart [--steps 100] [--rank 32] [--device cpu|cuda] [--json FILE] [--model-config FILE]
    svdq calibrate --out DIR [--model tiny|megatron:DIR|hf:DIR|module:function] [--data builtin|FILE|...]
                   [--seq-len 256] [--backend torch|megatron] ...
    svdq eval (--checkpoint DIR | --model SRC) [--adapters FILE] [--data ...] [--json FILE]
    svdq finetune --checkpoint DIR --out FTDIR --steps N [--resume] ...
    svdq export --checkpoint DIR [--adapters FILE] --out EXP [--format svdq|folded|modelopt-hf|peft] ...
    svdq save-model --out DIR [--model tiny] [--model-config FILE]

``quickstart`` is the README's main command (pretrained GPT-MoE → RTN / SVDQuant → fine-tune vs a QLoRA-style
baseline → export → reload; see ``calib.quickstart``).
The others: ``calib.cli.calibrate``, ``calib.cli.eval``, ``calib.cli.finetune``, ``calib.cli.export``,
``calib.cli.save_model``.

Exit codes, the same in every subcommand (:func:`exit_code`): 0 success; 2 an input error — a bad
argument, file or model (``ValueError``; ``FileNotFoundError``, ``FileExistsError``, ``PermissionError``,
``IsADirectoryError``, ``NotADirectoryError``), found before any work wherever the inputs tell it;
1 an I/O fault while working (any other ``OSError``: a full disk, a failing device) or a run that
diverged (``ArithmeticError``: a non-finite loss or tensor); 130 Ctrl-C (``interrupted``). Each prints one
line ``svdq CMD: error: ...``; no command leaves a partial output file (``calibrate --mode layerwise``
keeps ``DIR/partial`` on purpose, for ``--resume``). Any other exception is a bug in
svdq and keeps its traceback.

Output: every subcommand ends with one summary line on stdout and, with ``--json PATH``, writes the same
facts as JSON (atomically). Other messages go through the ``svdq`` logger (``logging``) to stderr:
``--log-level debug|info|warning|error`` (default info) or ``--quiet`` (warnings and errors only; the
summary line stays), before or after the subcommand. Progress bars show only on a terminal
(``--progress auto``; ``always`` / ``never`` force it) and never with ``--quiet``. Closed sets
(formats, layouts, modes) are argparse choices, checked before any work.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

from calib.cli import calibrate as cli_calibrate
from calib.cli import eval as cli_eval
from calib.cli import export as cli_export
from calib.cli import finetune as cli_finetune
from calib.cli import save_model as cli_save_model
from calib.cli.common import (
    LOG_LEVELS,
    PROGRESS_MODES,
    HelpFormatter,
    check_out_dir,
    check_out_file,
    configure_logging,
    positive_float,
    positive_int,
    show_progress,
)

COMMANDS = {
    "calibrate": cli_calibrate,
    "eval": cli_eval,
    "finetune": cli_finetune,
    "export": cli_export,
    "save-model": cli_save_model,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``svdq CMD: error: --flag must be ..., got '...'`` (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        m = re.fullmatch(r"argument ([^:]+): (must be .*)", message)
        if m:
            message = f"{m.group(1).split('/')[0]} {m.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def version() -> str:
    """The installed package's version (``importlib.metadata``), else the source tree's pyproject."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("svdq")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        from pathlib import Path

        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def _add_output_args(p, top: bool) -> None:
    """``--log-level`` / ``--quiet``: on the top-level parser (with defaults) and on every subcommand
    (without: given after the subcommand they override, absent they leave the top-level value)."""
    extra = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="messages shown on stderr" + (" (default: info)" if not top else ""),
        **({"default": "info"} if top else extra),
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="warnings and errors only, no progress bars (the summary line still prints)",
        **extra,
    )
    p.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        help="progress bars on stderr: auto (only on a terminal), always or never"
        + (" (default: auto)" if not top else ""),
        **({"default": "auto"} if top else extra),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="svdq",
        description="svdq: SVDQuant 4-bit calibration, adapter fine-tuning and export for MoE models. "
        "Run 'svdq COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"svdq {version()}")
    _add_output_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quick = sub.add_parser(
        "quickstart", help="quantize → calibrate → fine-tune → export on a pretrained GPT-MoE (a table)"
    )
    quick.add_argument("--steps", type=positive_int, default=100, help="fine-tuning steps, ours and baseline")
    quick.add_argument("--rank", type=positive_int, default=32, help="SVDQuant / LoRA rank")
    quick.add_argument("--lr", type=positive_float, default=1e-3, help="peak fine-tuning learning rate")
    quick.add_argument("--calib-batches", type=positive_int, default=8, help="calibration batches of 8 × seq")
    quick.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="tokens per held-out evaluation"
    )
    quick.add_argument("--seed", type=int, default=0, help="random seed")
    quick.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    quick.add_argument(
        "--model-config", default=None, help="JSON of TinyMoEConfig fields: a bigger model, trained now"
    )
    quick.add_argument(
        "--pretrain-steps", type=positive_int, default=300, help="training steps for --model-config"
    )
    quick.add_argument("--export-dir", default=None, help="keep the export here (default: a temp dir)")
    quick.add_argument("--json", default=None, help="write every figure as JSON")
    for module in COMMANDS.values():
        module.add_parser(sub)
    for p in sub.choices.values():
        _add_output_args(p, top=False)
    return parser


INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def exit_code(exc: BaseException) -> int | None:
    """The exit status of a command that raised ``exc`` (see the module docstring); ``None``: a bug."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, (ValueError, *INPUT_OS_ERRORS)):
        return 2
    if isinstance(exc, (OSError, ArithmeticError)):
        return 1
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


def _quickstart(args) -> int:
    from calib.models import read_config_file
    from calib.quickstart import run_quickstart

    if args.json is not None:
        check_out_file(args.json, "--json")
    if args.export_dir is not None:
        check_out_dir(args.export_dir, "--export-dir")
    return run_quickstart(
        steps=args.steps,
        seed=args.seed,
        device=args.device,
        rank=args.rank,
        json_path=args.json,
        lr=args.lr,
        calib_batches=args.calib_batches,
        eval_tokens=args.eval_tokens,
        model_config=read_config_file(args.model_config) if args.model_config else None,
        pretrain_steps=args.pretrain_steps,
        export_dir=args.export_dir,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, its line printed)
        return int(exc.code or 0)
    configure_logging(args.log_level, args.quiet)
    args.progress = show_progress(args.quiet, args.progress)
    # megatron-core and modelopt warn at import about optional kernels (Apex, TE) we do not use
    warnings.filterwarnings("ignore", module=r"(megatron|modelopt)\..*")
    try:
        if args.command == "quickstart":
            return _quickstart(args)
        return COMMANDS[args.command].run(args)
    except BaseException as exc:
        code = exit_code(exc)
        if code is None:
            raise
        if code == 130:
            note = getattr(args, "interrupt_note", None) or "no partial output written"
            print(f"svdq {args.command}: interrupted ({note})", file=sys.stderr)
        else:
            kind = "I/O error" if isinstance(exc, OSError) and code == 1 else "error"
            print(f"svdq {args.command}: {kind}: {_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
