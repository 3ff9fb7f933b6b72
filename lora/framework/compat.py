"""Everything that differs between the supported megatron-core versions (0.16 – 0.19).

Keep version checks here and nowhere else.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from packaging.version import Version


class _DropGPTModelDeprecation(logging.Filter):
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED …" (a warning about its roadmap, not about the
    caller) every time a GPTModel is built; the CLI's error output must stay one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("GPTModel IS DEPRECATED")


logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropGPTModelDeprecation())


@lru_cache(maxsize=1)
def megatron_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def local_moe_layer_spec(num_experts: int, qk_layernorm: bool = False):
    """GPT layer spec with local (non-TE) modules and SequentialMLP experts; ``qk_layernorm``: per-head
    RMSNorm of queries and keys (``q_layernorm`` / ``k_layernorm``).

    0.16 returns a ``ModuleSpec`` from keyword arguments; 0.17+ builds it from
    ``get_gpt_layer_local_submodules`` (same keywords) and may wrap submodules in functools.partial.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_layernorm, normalization="RMSNorm"
    )


def moe_layer_spec(num_experts: int, spec: str = "local", qk_layernorm: bool = False):
    """The GPT-MoE layer spec: ``"local"`` (:func:`local_moe_layer_spec`), ``"te"`` (Transformer Engine
    modules, TEGroupedMLP experts) or ``"te-sequential"`` (TE modules, SequentialMLP of TE linears);
    ``qk_layernorm`` as in :func:`local_moe_layer_spec`."""
    if spec == "local":
        return local_moe_layer_spec(num_experts, qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts, moe_grouped_gemm=spec == "te", qk_layernorm=qk_layernorm
    )


def ensure_dp_cp_group(metadata: dict | None) -> dict:
    """Sharded-state-dict metadata with ``dp_cp_group`` set (leaf implementations index it directly)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    return ensure_metadata_has_dp_cp_group(metadata)


_TE_FALLBACK_NAMES = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def fix_moe_utils_without_te() -> None:
    """megatron-core 0.16 without Transformer Engine leaves the TE kernels of ``moe_utils`` undefined
    (the router then fails with ``NameError: te_general_gemm``); 0.19 sets them to None. Do the same.
    Harmless where TE is installed or the names exist."""
    from megatron.core.transformer.moe import moe_utils

    for name in _TE_FALLBACK_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def expert_mlp_probs(args: tuple, kwargs: dict):
    """The per-token router probabilities ``(n,)`` an expert MLP of a ``SequentialMLP`` is called with, from
    its forward arguments, or ``None``. megatron-core 0.16 – 0.19 call ``expert(tokens, probs)``
    (``MLP.forward(hidden_states, per_token_scale)``) and multiply ``probs`` into the activation *before*
    ``linear_fc2``; padded rows (fp8 / fp4 alignment) carry probability 0. With
    ``moe_apply_probs_on_input`` (top-1 only) the probabilities scale fc1's input instead and the experts get
    ones (:func:`probs_scale_expert_input`)."""
    probs = args[1] if len(args) > 1 else kwargs.get("per_token_scale")
    return probs if probs is None or probs.dim() == 1 else probs.reshape(-1)


def probs_scale_expert_input(config) -> bool:
    """Whether the router probability multiplies the experts' *input* (``moe_apply_probs_on_input``)."""
    return bool(getattr(config, "moe_apply_probs_on_input", False))
