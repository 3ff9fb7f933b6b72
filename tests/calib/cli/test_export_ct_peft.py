"""``svdq export --format compressed-tensors`` and ``--format peft`` (base + adapter) through the command
line on a local Hugging Face Qwen3-MoE (``hf:DIR``), read back by transformers / PEFT.

Reference: the calibrated checkpoint loaded into the unquantized model (``lora.load``) with activation
quantization off. PEFT (written base + adapter) equals it within 1e-4 relative (weight-only, as the base is
dequantized); the compressed-tensors export is loaded by transformers (every tensor name found, dense
weights float32; the bit-level and logit checks are in tests/lora/io/test_compressed_tensors.py).
Wrong combinations exit 2 before writing.
"""

from __future__ import annotations

import json

import pytest
import torch

import lora
from tests.helpers import hf_models
from tests.helpers.cli import run_cli_cases
from tests.lora.io.test_peft_base import _rel, _weight_only

SMALL = ["--tokens", "1024", "--seq-len", "32"]


def test_export_compressed_tensors_and_peft_with_base(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = hf_models.save(hf_models.build(hf_models.qwen3_moe_config(), seed=1), tmp_path / "qwen")
    c = tmp_path / "c"
    exp = ["export", "--checkpoint", c / "model"]
    cases = [
        ["calibrate", "--out", c, "--model", f"hf:{src}", *SMALL, "--rank", "4", "--batch", "4"],
        [*exp, "--out", tmp_path / "ct", "--format", "compressed-tensors", "--data", "builtin"],
        [*exp, "--out", tmp_path / "p", "--format", "peft"],
        [*exp, "--out", tmp_path / "e1", "--format", "peft", "--ct-scheme", "NVFP4"],
        [*exp, "--out", tmp_path / "e2", "--format", "compressed-tensors"],  # W4A4 without --data
    ]
    results = run_cli_cases(cases)
    for argv, (code, _, err) in zip(cases[:3], results):
        assert code == 0, (argv, err[-3000:])
    messages = ["--ct-scheme applies", "pass forward_loop (svdq export: --data)"]
    for argv, (code, _, err), msg in zip(cases[3:], results[3:], messages):
        assert code == 2 and msg in err, (argv, err[-2000:])
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()

    ours = AutoModelForCausalLM.from_pretrained(src).eval()
    lora.load(ours, c / "model", progress=False)
    _weight_only(ours)
    ids = torch.randint(3, hf_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ours(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "base").eval()
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
        assert _rel(pm(ids).logits, ref) < 1e-4
        ct = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
        ).eval()
        dense = [n for n, m in ct.named_modules() if isinstance(m, torch.nn.Linear) and "self_attn" in n]
        assert dense and all(ct.get_submodule(n).weight.dtype == torch.float32 for n in dense)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["svdq_export"]["user"]["export_format"] == "compressed-tensors"
    assert cfg["svdq_export"]["user"]["model"]["spec"] == f"hf:{src}"
    assert any("projections" in v for v in cfg["svdq_export"]["layers"].values())  # experts written
    meta = json.loads((tmp_path / "p" / "svdq_export.json").read_text())
    assert meta["format"] == "peft" and meta["user"]["export_format"] == "peft" and meta["experts"]
