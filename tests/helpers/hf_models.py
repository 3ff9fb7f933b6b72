"""Tiny random Hugging Face MoE causal LMs (Qwen3-MoE, Mixtral: hidden 64, 4 experts, 2 layers, vocab 300 —
the builtin data is bytes) saved with ``save_pretrained``, and ways to spoil a saved checkpoint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

VOCAB = 300


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return Qwen3MoeConfig(**{**fields, **overrides})


def mixtral_config(**overrides):
    from transformers import MixtralConfig

    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return MixtralConfig(**{**fields, **overrides})


def build(config, seed: int = 0):
    """The causal LM of ``config`` with weights drawn from ``seed`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save(model, out: Path, **kwargs) -> Path:
    model.save_pretrained(out, **kwargs)
    return Path(out)


def make_tiny_qwen3_moe():
    """A ``module:function`` factory returning a transformers model (seeded by the CLI)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(qwen3_moe_config()).eval()


def rewrite_tensors(root: Path, edit) -> None:
    """Load ``root/model.safetensors``, let ``edit(tensors)`` change the dict, write it back."""
    from safetensors.torch import load_file, save_file

    path = Path(root) / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def corrupt_header(path: Path) -> None:
    """Keep the file's length but make its JSON header garbage."""
    data = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" + b"x" * (n - 1)
    Path(path).write_bytes(bytes(data))


def edit_config(root: Path, **fields) -> None:
    path = Path(root) / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
