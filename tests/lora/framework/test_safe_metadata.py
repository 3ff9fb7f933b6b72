"""A megatron:DIR checkpoint's ``.metadata`` is unpickled only as plain checkpoint metadata: a crafted file
cannot import or call anything (it is refused naming the file and the global), a real one loads."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from lora.framework.safe_metadata import restricted_load
from tests.helpers.spawn import run_on_processes


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_restricted_load_refuses_callables_and_keeps_plain_data(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"meta\.bin: checkpoint metadata names posix\.mkdir"):
        restricted_load(io.BytesIO(pickle.dumps(_Evil(str(marker)))), "meta.bin")
    assert not marker.exists()
    data = {"shape": torch.Size([2, 3]), "dtype": torch.bfloat16, "keys": ["a"], "n": (1, 2.5)}
    assert restricted_load(io.BytesIO(pickle.dumps(data))) == data


def _save_then_tamper(rank, world, tmp):
    from calib.models import build_model, resolve_source, save_megatron_model
    from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
    from lora.framework.parallel import destroy_parallel, init_parallel

    init_parallel(seed=0)
    cfg = TinyMoEConfig(num_layers=1, hidden=32, heads=2, num_experts=2, ffn_hidden=32)
    save_megatron_model(build_tiny_gpt_moe(cfg, seed=7), cfg, Path(tmp) / "mdl")
    build_model(resolve_source(f"megatron:{tmp}/mdl"))  # the real metadata loads through the restriction
    (Path(tmp) / "mdl" / ".metadata").write_bytes(pickle.dumps(_Evil(str(Path(tmp) / "pwned"))))
    try:
        build_model(resolve_source(f"megatron:{tmp}/mdl"))
        error = None
    except ValueError as exc:
        error = str(exc)
    destroy_parallel()
    return error


@pytest.mark.slow
def test_a_crafted_megatron_metadata_file_is_refused_before_it_runs(tmp_path):
    (error,) = run_on_processes(_save_then_tamper, 1, str(tmp_path))
    assert error is not None and "posix.mkdir" in error and ".metadata" in error, error
    assert not (tmp_path / "pwned").exists()
