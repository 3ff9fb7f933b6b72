"""Exports written by svdq 0.1.0 before the redesign (commit 149b006; ``tests/fixtures/pre_redesign``)
load bit for bit: the loaded model reproduces the logits stored next to the export exactly, and exporting
it again writes the same tensors (``torch.equal``) and the same layer metadata (adapter configurations
compared as :class:`lora.config.LoraConfig`: the files of today write its schema version and
``rank_pattern``)."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
from lora.framework.parallel import destroy_parallel, init_parallel
from tests.helpers import FIXTURES

PRE_REDESIGN = FIXTURES / "pre_redesign"


def _tensors(path: Path) -> dict:
    from lora.io.container import CheckpointReader

    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}, r.metadata


def _same_export(a: Path, b: Path):
    ta, ma = _tensors(a)
    tb, mb = _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert _configs_loaded(ma.get("layers")) == _configs_loaded(mb.get("layers"))
    assert _configs_loaded(ma.get("expert_groups", {})) == _configs_loaded(mb.get("expert_groups", {}))


def _configs_loaded(layers: dict) -> dict:
    """Layer (or expert group) metadata with each adapter configuration dict (``"lora"``) read as a
    ``LoraConfig``."""
    from lora.config import LoraConfig

    return {
        name: {k: LoraConfig.from_dict(v) if k == "lora" and v is not None else v for k, v in meta.items()}
        for name, meta in layers.items()
    }


def test_torch_export_loads_bit_for_bit(tmp_path):
    from lora.io.svdq_export import export_quantized, load_quantized
    from tests.helpers.factories import make_byte_mlp

    expected = load_file(str(PRE_REDESIGN / "torch_expected.safetensors"))
    model = make_byte_mlp()
    load_quantized(model, PRE_REDESIGN / "torch", progress=False)
    with torch.no_grad():
        logits = model(expected["tokens"])
    assert torch.equal(logits, expected["logits"])
    export_quantized(model, tmp_path / "again", progress=False)
    _same_export(PRE_REDESIGN / "torch", tmp_path / "again")


def test_megatron_export_loads_bit_for_bit(tmp_path):
    from lora.io.svdq_export import export_quantized, load_quantized

    expected = load_file(str(PRE_REDESIGN / "megatron_expected.safetensors"))
    init_parallel()
    try:
        model = build_tiny_gpt_moe(TinyMoEConfig(num_layers=1), seed=7)
        load_quantized(model, PRE_REDESIGN / "megatron", progress=False)
        model.eval()
        with torch.no_grad():
            logits = model(expected["tokens"], expected["position_ids"], None)
        assert torch.equal(logits, expected["logits"])
        export_quantized(model, tmp_path / "again", progress=False)
        _same_export(PRE_REDESIGN / "megatron", tmp_path / "again")
    finally:
        destroy_parallel()
