"""Mixtral (``model_type`` ``mixtral``): GQA attention without qk-norm, every layer a MoE layer whose
top-k softmax weights are renormalized (Megatron's softmax over the top-k logits, the same numbers).

nvidia-modelopt 0.47 has no Mixtral import mapping: the weights go through :func:`base.megatron_tensor`.
"""

from __future__ import annotations

from calib.hf.arch.base import HFArch, MoEShape, common_checks, head_dim, rope

MODEL_TYPE = "mixtral"


def read_shape(cfg) -> MoEShape:
    common_checks(cfg, MODEL_TYPE)
    theta, partial = rope(cfg, MODEL_TYPE)
    return MoEShape(
        model_type=MODEL_TYPE,
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim(cfg),
        num_experts=cfg.num_local_experts,
        topk=cfg.num_experts_per_tok,
        moe_ffn=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rotary_percent=partial,
        tie_embeddings=bool(cfg.tie_word_embeddings),
        renormalize_topk=True,
        qk_norm="none",
        init_std=cfg.initializer_range,
    )


ARCH = HFArch(MODEL_TYPE, read_shape)
