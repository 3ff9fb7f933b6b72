"""The ``svdq`` command line.

    svdq quickstart [--steps N] [--device cpu|cuda]
    svdq calibrate --out DIR [--model tiny|megatron:DIR|module:function] [--data builtin|FILE|DIR|ids.npy] ...
    svdq eval (--checkpoint DIR | --model SRC) [--adapters FILE] [--data ...] [--json FILE]
    svdq finetune --checkpoint DIR --out FTDIR --steps N [--resume] ...
    svdq export --checkpoint DIR [--adapters FILE] --out EXP [--max-shard-size 2GB]
    svdq save-model --out DIR [--model tiny] [--model-config FILE]

``quickstart`` is the README's main command (train the tiny GPT-MoE → calibrate → fine-tune adapters).
The others: ``calib.cli_calibrate``, ``calib.cli_eval``, ``calib.cli_finetune``, ``calib.cli_export``,
``calib.cli_save_model``. Input errors exit with status 2 and one line naming what is wrong, before any
work; Ctrl-C exits with 130 after printing ``interrupted``; no command leaves a partial output file.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from calib import cli_calibrate, cli_eval, cli_export, cli_finetune, cli_save_model

COMMANDS = {
    "calibrate": cli_calibrate,
    "eval": cli_eval,
    "finetune": cli_finetune,
    "export": cli_export,
    "save-model": cli_save_model,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="end-to-end run on the built-in tiny MoE model")
    quick.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # megatron-core and modelopt warn at import about optional kernels (Apex, TE) we do not use
    warnings.filterwarnings("ignore", module=r"(megatron|modelopt)\..*")
    if args.command == "quickstart":
        from calib.quickstart import run_quickstart

        return run_quickstart(steps=args.steps, seed=args.seed, device=args.device)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print(f"svdq {args.command}: interrupted (no partial output written)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"svdq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
