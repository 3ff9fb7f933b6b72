"""The ``svdq`` command line.

    svdq quickstart [--steps N] [--device cpu|cuda]

``quickstart`` is the README's main command. For now it is a smoke run of the pipeline that exists:
build the tiny Megatron GPT-MoE, train it a few steps, then run what later issues add.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="end-to-end run on the built-in tiny MoE model")
    quick.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # megatron-core and modelopt warn at import about optional kernels (Apex, TE) we do not use
    warnings.filterwarnings("ignore", module=r"(megatron|modelopt)\..*")
    if args.command == "quickstart":
        from calib.quickstart import run_quickstart

        return run_quickstart(steps=args.steps, seed=args.seed, device=args.device)
    return 2


if __name__ == "__main__":
    sys.exit(main())
