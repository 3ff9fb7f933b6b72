"""The quickstart's figures as a benchmark record: perplexities, target ratios and stage times.

    python bench/bench_quickstart.py [--device cpu|cuda] [--steps 100]

Runs :func:`calib.quickstart.run` (pretrained 4-layer GPT-MoE; unquantized, RTN W4A4 NVFP4, SVDQuant W4A4
NVFP4, SVDQuant adapters vs the QLoRA-style baseline fine-tuned on the shifted domain, export → reload) and
writes ``quickstart_<cpu|gpu>.json`` (environment, every row, the targets) to ``$OUT`` or ``bench/results``.
The baseline (QLoRA-style: LoRA on the RTN base, same steps / data / optimizer) runs in the same call.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import write_result  # noqa: E402


def main() -> int:
    from calib.quickstart import QuickstartConfig, print_table, run
    from lora.framework.parallel import destroy_parallel, init_parallel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    init_parallel(seed=args.seed)
    try:
        result = run(QuickstartConfig(steps=args.steps, seed=args.seed, device=args.device, progress=False))
    finally:
        destroy_parallel()
    print_table(result)
    kind = "gpu" if args.device == "cuda" else "cpu"
    print(f"wrote {write_result(f'quickstart_{kind}', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
