"""The svdq checkpoint format: packed 4-bit residuals, scales, smoothing and the low-rank branch of every
SVDQuant layer plus the model's other tensors, as self-describing safetensors (framework-free).

* :mod:`svdq.checkpoint.format` — the container: one file or shards + index, JSON metadata, checksums,
  atomic directory writes, validated reads (:class:`CheckpointReader`).
* :mod:`svdq.checkpoint.layers` — naming version "1" of one linear (:class:`LinearState`).
* :mod:`svdq.checkpoint.torch_model` — plain torch models with :class:`svdq.SVDQLinear` layers.

Megatron models (and the one user entry point for both kinds) are in :mod:`lora.export`.
"""

from svdq.checkpoint.format import (
    FORMAT,
    INDEX_FILE,
    NAMING_VERSION,
    SINGLE_FILE,
    CheckpointReader,
    read_metadata,
    write_checkpoint,
)
from svdq.checkpoint.layers import LinearState, linear_meta, linear_tensors, read_linear
from svdq.checkpoint.torch_model import export_torch, load_torch

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "NAMING_VERSION",
    "SINGLE_FILE",
    "CheckpointReader",
    "LinearState",
    "export_torch",
    "linear_meta",
    "linear_tensors",
    "load_torch",
    "read_linear",
    "read_metadata",
    "write_checkpoint",
]
