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
``calib.cli.save_model``. Input errors exit with status 2 and one line naming what is wrong, before any
work; Ctrl-C exits with 130 after printing ``interrupted``; no command leaves a partial output file.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from calib.cli import calibrate as cli_calibrate
from calib.cli import eval as cli_eval
from calib.cli import export as cli_export
from calib.cli import finetune as cli_finetune
from calib.cli import save_model as cli_save_model

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
    quick = sub.add_parser(
        "quickstart", help="quantize → calibrate → fine-tune → export on a pretrained GPT-MoE (a table)"
    )
    quick.add_argument("--steps", type=int, default=100, help="fine-tuning steps, ours and baseline (100)")
    quick.add_argument("--rank", type=int, default=32, help="SVDQuant / LoRA rank (32)")
    quick.add_argument("--lr", type=float, default=1e-3, help="peak fine-tuning learning rate (1e-3)")
    quick.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 8 × seq (8)")
    quick.add_argument("--eval-tokens", type=int, default=16384, help="tokens per held-out evaluation")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    quick.add_argument(
        "--model-config", default=None, help="JSON of TinyMoEConfig fields: a bigger model, trained now"
    )
    quick.add_argument("--pretrain-steps", type=int, default=300, help="training steps for --model-config")
    quick.add_argument("--export-dir", default=None, help="keep the export here (default: a temp dir)")
    quick.add_argument("--json", default=None, help="write every figure as JSON")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # megatron-core and modelopt warn at import about optional kernels (Apex, TE) we do not use
    warnings.filterwarnings("ignore", module=r"(megatron|modelopt)\..*")
    if args.command == "quickstart":
        from calib.quickstart import config_from_file, run_quickstart

        return run_quickstart(
            steps=args.steps,
            seed=args.seed,
            device=args.device,
            rank=args.rank,
            json_path=args.json,
            lr=args.lr,
            calib_batches=args.calib_batches,
            eval_tokens=args.eval_tokens,
            model_config=config_from_file(args.model_config) if args.model_config else None,
            pretrain_steps=args.pretrain_steps,
            export_dir=args.export_dir,
        )
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
