"""The ``svdq`` command line.

    svdq quickstart [--steps N] [--device cpu|cuda]
    svdq calibrate --out DIR [--model tiny|module:function] [--data builtin|FILE|DIR|ids.npy] ...

``quickstart`` is the README's main command (train the tiny GPT-MoE → calibrate → fine-tune adapters).
``calibrate`` calibrates a model on a token stream and writes its report (see ``calib.cli_calibrate``).
Input errors exit with status 2 and one line naming what is wrong.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from calib import cli_calibrate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="end-to-end run on the built-in tiny MoE model")
    quick.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    cli_calibrate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # megatron-core and modelopt warn at import about optional kernels (Apex, TE) we do not use
    warnings.filterwarnings("ignore", module=r"(megatron|modelopt)\..*")
    if args.command == "quickstart":
        from calib.quickstart import run_quickstart

        return run_quickstart(steps=args.steps, seed=args.seed, device=args.device)
    if args.command == "calibrate":
        try:
            return cli_calibrate.run(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"svdq calibrate: error: {exc}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
