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
line ``svdq CMD: error: ...``; no command leaves a partial output file. Any other exception is a bug in
svdq and keeps its traceback.
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
from calib.cli.common import check_out_dir, check_out_file, positive_float, positive_int

COMMANDS = {
    "calibrate": cli_calibrate,
    "eval": cli_eval,
    "finetune": cli_finetune,
    "export": cli_export,
    "save-model": cli_save_model,
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``svdq CMD: error: --flag must be ..., got '...'`` (exit 2)."""

    def error(self, message: str):
        m = re.fullmatch(r"argument ([^:]+): (must be .*)", message)
        if m:
            message = f"{m.group(1).split('/')[0]} {m.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svdq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser(
        "quickstart", help="quantize → calibrate → fine-tune → export on a pretrained GPT-MoE (a table)"
    )
    quick.add_argument(
        "--steps", type=positive_int, default=100, help="fine-tuning steps, ours and baseline (100)"
    )
    quick.add_argument("--rank", type=positive_int, default=32, help="SVDQuant / LoRA rank (32)")
    quick.add_argument(
        "--lr", type=positive_float, default=1e-3, help="peak fine-tuning learning rate (1e-3)"
    )
    quick.add_argument(
        "--calib-batches", type=positive_int, default=8, help="calibration batches of 8 × seq (8)"
    )
    quick.add_argument(
        "--eval-tokens", type=positive_int, default=16384, help="tokens per held-out evaluation"
    )
    quick.add_argument("--seed", type=int, default=0)
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
            print(f"svdq {args.command}: interrupted (no partial output written)", file=sys.stderr)
        else:
            kind = "I/O error" if isinstance(exc, OSError) and code == 1 else "error"
            print(f"svdq {args.command}: {kind}: {_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
