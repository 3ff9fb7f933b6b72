"""OLMoE (``model_type`` ``olmoe``): attention whose queries and keys are RMS-normalized over the whole
projection (``q_norm`` (nh·d,), ``k_norm`` (ng·d,), across heads — not Megatron's per-head
``qk_layernorm``: :class:`calib.hf.arch.full_width_norm.FullWidthRMSNorm` replaces it, tensor
parallelism 1 only), every layer a MoE layer; ``norm_topk_prob`` (default off) renormalizes the top-k
weights, otherwise they are the softmax over all experts. ``clip_qkv`` is not supported.

nvidia-modelopt 0.47 has no OLMoE import mapping: the weights go through :func:`base.megatron_tensor`.
"""

from __future__ import annotations

from calib.hf.arch.base import HFArch, MoEShape, common_checks, head_dim, require, rope

MODEL_TYPE = "olmoe"


def read_shape(cfg) -> MoEShape:
    common_checks(cfg, MODEL_TYPE)
    require(cfg, MODEL_TYPE, "clip_qkv", lambda v: v is None, "None")
    d = head_dim(cfg)
    if d * cfg.num_attention_heads != cfg.hidden_size:
        raise ValueError(
            f"{MODEL_TYPE}: head_dim={d} × num_attention_heads={cfg.num_attention_heads} must equal "
            f"hidden_size={cfg.hidden_size} (the width of its q_norm)"
        )
    theta, partial = rope(cfg, MODEL_TYPE)
    return MoEShape(
        model_type=MODEL_TYPE,
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=d,
        num_experts=cfg.num_experts,
        topk=cfg.num_experts_per_tok,
        moe_ffn=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rotary_percent=partial,
        tie_embeddings=bool(cfg.tie_word_embeddings),
        renormalize_topk=bool(cfg.norm_topk_prob),
        qk_norm="full_width",
        init_std=cfg.initializer_range,
    )


ARCH = HFArch(MODEL_TYPE, read_shape)
