"""Hugging Face MoE architectures that :func:`calib.hf.to_megatron.megatron_from_hf` converts, keyed by
the HF config's ``model_type``: one small module each (config mapping, HF tensor names), see
:mod:`calib.hf.arch.base`."""

from __future__ import annotations

from calib.hf.arch import mixtral, olmoe, qwen2_moe, qwen3_moe
from calib.hf.arch.base import HFArch, MoEShape

ARCHS: dict[str, HFArch] = {
    a.model_type: a for a in (mixtral.ARCH, qwen2_moe.ARCH, qwen3_moe.ARCH, olmoe.ARCH)
}


def get_arch(model_type: str) -> HFArch:
    """The architecture of ``model_type``; ``ValueError`` naming it and the supported ones."""
    if model_type not in ARCHS:
        raise ValueError(
            f"HF model_type {model_type!r} is not supported for Megatron conversion; supported: "
            f"{', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


__all__ = ["ARCHS", "HFArch", "MoEShape", "get_arch"]
