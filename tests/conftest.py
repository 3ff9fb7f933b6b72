"""Shared pytest setup: the ``gpu`` marker skips cleanly without CUDA; fixtures shared by the test
packages (``megatron_world``)."""

import os

import pytest
import torch

# Without CUDA, Triton kernels (svdq.kernels) run in Triton's interpreter. Set before anything of the
# project is imported: @triton.jit reads it when a kernel (or a helper it calls) is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lora.framework.parallel import destroy_parallel, free_port, init_parallel  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process Megatron world (gloo) for the module's tests, torn down afterwards."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    init_parallel()
    yield
    destroy_parallel()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
