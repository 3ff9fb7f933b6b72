"""The gathers of ``lora.framework.tp`` on 2 gloo processes undo the shards bit for bit: ``gather_dim`` of
``take_shard`` (plain and ``[gate_k; up_k]``), ``gather_packed`` of ``shard_packed``, for float32, bfloat16,
float8 and bool tensors, 0-d tensors and tensors without elements (an expert that got no token)."""

import torch

from lora.framework.tp import all_gather, gather_dim, gather_packed, shard_packed, take_shard
from svdq.formats import quantize_tensor as quantize
from tests.helpers.dist import run_distributed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g)  # (8 × 32) float32
    return {
        "float32": x,
        "bfloat16": x.to(torch.bfloat16),
        "float8": x.to(torch.float8_e4m3fn),
        "bool": x > 0,
        "empty": torch.empty(0, 32),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _worker(rank, world):
    group = torch.distributed.group.WORLD
    out = {}
    for name, full in _tensors().items():
        for dim in (0, 1):
            got = gather_dim(take_shard(full, dim, rank, world), dim, group)
            out[f"{name}-dim{dim}"] = got.dtype == full.dtype and torch.equal(_bits(got), _bits(full))
        got = gather_dim(take_shard(full, 0, rank, world, glu=True), 0, group, glu=True)
        out[f"{name}-glu"] = torch.equal(_bits(got), _bits(full))
    scalar = torch.tensor(float(rank) + 0.5)  # 0-d
    out["0-d"] = [float(t) for t in all_gather(scalar, group)] == [0.5, 1.5]
    packed = quantize(_tensors()["float32"], "nvfp4")
    for dim in (0, 1):
        got = gather_packed(shard_packed(packed, dim, rank, world), dim, group)
        same = got.meta() == packed.meta()
        for key, t in packed.to_tensors().items():
            same = same and torch.equal(_bits(got.to_tensors()[key]), _bits(t))
        out[f"packed-dim{dim}"] = same
    return out


def test_gathers_undo_the_shards_bit_for_bit():
    for ranks in run_distributed(_worker, 2):
        assert ranks == dict.fromkeys(ranks, True)
