"""Qwen2-MoE (``model_type`` ``qwen2_moe``): GQA attention with q / k / v biases (``qkv_bias``), no
qk-norm, every layer a MoE layer (``decoder_sparse_step`` 1, no ``mlp_only_layers``) with a shared
expert (``shared_expert_intermediate_size``) scaled by ``sigmoid(shared_expert_gate · x)`` (Megatron's
``moe_shared_expert_gate``); ``norm_topk_prob`` as in Qwen3-MoE. Sliding-window layers are not
supported.

nvidia-modelopt 0.47 maps only the dense ``Qwen2ForCausalLM``: the weights go through
:func:`base.megatron_tensor`.
"""

from __future__ import annotations

from calib.hf.arch.base import HFArch, MoEShape, common_checks, head_dim, require, rope

MODEL_TYPE = "qwen2_moe"


def read_shape(cfg) -> MoEShape:
    common_checks(cfg, MODEL_TYPE)
    require(cfg, MODEL_TYPE, "mlp_only_layers", lambda v: not v, "every layer a MoE layer: []")
    require(cfg, MODEL_TYPE, "decoder_sparse_step", lambda v: v in (None, 1), "every layer a MoE layer: 1")
    require(
        cfg, MODEL_TYPE, "layer_types", lambda v: not v or set(v) == {"full_attention"}, "full attention only"
    )
    require(cfg, MODEL_TYPE, "shared_expert_intermediate_size", lambda v: v is None or v > 0, "> 0 or None")
    theta, partial = rope(cfg, MODEL_TYPE)
    return MoEShape(
        model_type=MODEL_TYPE,
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim(cfg),
        num_experts=cfg.num_experts,
        topk=cfg.num_experts_per_tok,
        moe_ffn=cfg.moe_intermediate_size,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rotary_percent=partial,
        tie_embeddings=bool(cfg.tie_word_embeddings),
        renormalize_topk=bool(cfg.norm_topk_prob),
        qk_norm="none",
        init_std=cfg.initializer_range,
        qkv_bias=bool(getattr(cfg, "qkv_bias", True)),
        shared_ffn=getattr(cfg, "shared_expert_intermediate_size", None),
    )


ARCH = HFArch(MODEL_TYPE, read_shape)
