"""Qwen3-MoE (``model_type`` ``qwen3_moe``): GQA attention with per-head RMSNorm of queries and keys
(Megatron's ``qk_layernorm``), an explicit ``head_dim``, every layer a MoE layer (``decoder_sparse_step``
1, no ``mlp_only_layers``); ``norm_topk_prob`` renormalizes the top-k weights, otherwise they are the
softmax over all experts (Megatron's ``moe_router_pre_softmax``).

nvidia-modelopt 0.47 maps ``Qwen3MoeForCausalLM`` (per-expert ``mlp.experts.<e>.{gate,up,down}_proj``
names, which transformers 5 writes in ``save_pretrained``): a checkpoint directory can go through its
importer.
"""

from __future__ import annotations

from calib.hf.arch.base import HFArch, MoEShape, common_checks, head_dim, require, rope

MODEL_TYPE = "qwen3_moe"


def read_shape(cfg) -> MoEShape:
    common_checks(cfg, MODEL_TYPE)
    require(cfg, MODEL_TYPE, "mlp_only_layers", lambda v: not v, "every layer a MoE layer: []")
    require(cfg, MODEL_TYPE, "decoder_sparse_step", lambda v: v in (None, 1), "every layer a MoE layer: 1")
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
        qk_norm="per_head",
        init_std=cfg.initializer_range,
    )


ARCH = HFArch(MODEL_TYPE, read_shape, modelopt_arch="Qwen3MoeForCausalLM")
