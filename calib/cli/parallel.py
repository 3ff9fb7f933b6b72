"""``--tp`` / ``--ep`` / ``--dp`` of the ``svdq`` subcommands (calibrate, eval, finetune, export) under
``torchrun`` (svdq/DESIGN.md §17).

    torchrun --nproc-per-node 4 -m calib.cli finetune ... --tp 1 --ep 2 --dp 2

``tp · ep · dp`` must equal ``WORLD_SIZE`` (the processes torchrun started); ``--dp`` defaults to
``WORLD_SIZE / (tp · ep)``. Checked before any work (:func:`check_parallel_args`, one line naming the
arguments and ``WORLD_SIZE``). Without torchrun the world is one process, as before.
"""

from __future__ import annotations

import argparse

FLAGS = ("--tp", "--ep", "--dp")


def _positive(text: str) -> int:
    from calib.cli.common import positive_int

    return positive_int(text)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """The three options, in one argument group."""
    g = p.add_argument_group("parallelism (under torchrun; tp × ep × dp = WORLD_SIZE)")
    g.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size (Megatron models)")
    g.add_argument("--ep", type=_positive, default=1, help="expert-parallel size (Megatron MoE models)")
    g.add_argument(
        "--dp",
        type=_positive,
        default=None,
        help="data-parallel size: ranks reading disjoint shards of the data (default WORLD_SIZE / (tp × ep))",
    )


def check_parallel_args(args, backend: str | None = None) -> tuple[int, int, int]:
    """``(tp, ep, dp)`` of the arguments; ``ValueError`` (one line) unless ``tp · ep · dp == WORLD_SIZE``
    or when ``--tp`` / ``--ep`` > 1 is asked of a plain torch model (``backend="torch"``)."""
    from lora.framework.parallel import parallel_sizes

    tp, ep, dp = parallel_sizes(
        getattr(args, "tp", 1), getattr(args, "ep", 1), getattr(args, "dp", None), flags=FLAGS
    )
    if backend == "torch" and tp * ep > 1:
        raise ValueError(f"--tp {tp} / --ep {ep}: tensor and expert parallelism need a Megatron model")
    return tp, ep, dp


def init_from_args(args, backend: str | None = None) -> tuple[int, int, int]:
    """:func:`lora.framework.parallel.init_parallel` with the checked sizes and ``args.seed``."""
    from lora.framework.parallel import init_parallel

    tp, ep, dp = check_parallel_args(args, backend)
    init_parallel(tp, ep, data_parallel=dp, seed=getattr(args, "seed", 0))
    return tp, ep, dp


def is_rank0() -> bool:
    """Whether this process prints and writes the single-writer files (global rank 0)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
