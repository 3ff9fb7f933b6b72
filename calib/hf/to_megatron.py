"""Hugging Face MoE model → the equivalent Megatron GPT-MoE (``GPTModel``), weights loaded.

:func:`megatron_from_hf` takes a transformers model or a local HF checkpoint directory (``config.json`` +
safetensors, read offline), looks its ``model_type`` up in :mod:`calib.hf.arch` (``ValueError`` naming
it and the supported ones otherwise), builds the Megatron model under the current parallel state
(:func:`lora.framework.init_parallel` first; tensor / expert parallel sizes from megatron's
``parallel_state``) and loads the weights:

* ``importer="modelopt"``: nvidia-modelopt's ``import_mcore_gpt_from_hf``, which reads the safetensors of a
  directory directly — for architectures it maps (Qwen3-MoE) and SequentialMLP experts (its Qwen3 mapping
  has no TEGroupedMLP rule), without vocabulary padding;
* ``importer="svdq"``: our mapping (:func:`calib.hf.arch.base.megatron_tensor`) from the HF state dict
  (transformers 5's fused experts; a directory is loaded with ``AutoModelForCausalLM``): every parameter of
  the Megatron model by its global name (:func:`lora.io.sites.other_tensors`: TE spellings, global expert
  indices), sharded over tensor-parallel ranks, each expert-parallel rank taking its experts. Every
  Megatron parameter must come from an HF tensor and every HF tensor must be used (``ValueError`` naming
  the first that is not);
* ``"auto"``: modelopt where it applies, ours otherwise.

The Megatron model: every layer a MoE layer (SwiGLU experts, ``allgather`` dispatcher, no load-balancing
loss; a gated shared expert where HF has one), RMSNorm with the HF ``rms_norm_eps``, RoPE (``rope_theta``,
``partial_rotary_factor``), GQA, no biases but q / k / v ones where HF has them, the router in float32
(softmax; top-k renormalized or not as the HF router), tied embeddings as in HF. Spec ``"local"``
(Megatron's modules, SequentialMLP experts; runs on CPU), ``"te"`` (Transformer Engine, TEGroupedMLP
experts) or ``"te-sequential"``; ``"auto"``: ``"te"`` where TE and CUDA exist. OLMoE's full-width q/k norm
replaces Megatron's per-head ``qk_layernorm`` with
:class:`~calib.hf.arch.full_width_norm.FullWidthRMSNorm` (tensor parallelism 1 only).

Vocabulary: the Megatron vocabulary is the HF one rounded up to a multiple of
``make_vocab_size_divisible_by × tensor_parallel`` (default 1: only what tensor parallelism needs). Padded
rows of the embedding and output layer are zero, so padded logit columns are 0 — slice
``logits[..., :hf_vocab]`` before a softmax (:func:`padded_vocab_size`).

The model carries :data:`lora.io.api.HF_ORIGIN` (:func:`calib.hf.to_hf.attach_origin`): ``lora.export``
writes it in modelopt's HF layout under the HF names (``modelopt-hf``, ``folded``; svdq/DESIGN.md §14).

Tensors: Megatron weights in ``dtype`` (default float32); logits ``model(tokens (b, s), position_ids
(b, s), None)`` are ``(b, s, V_pad / tp)`` per tensor-parallel rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calib.hf.arch import get_arch
from calib.hf.arch.base import HFArch, MoEShape, megatron_tensor
from calib.tiny_moe import SPECS
from lora.framework import compat

IMPORTERS = ("auto", "modelopt", "svdq")


def read_hf_config(hf_model_or_dir):
    """The transformers config of a model, or of a checkpoint directory's ``config.json`` (offline)."""
    if isinstance(hf_model_or_dir, (str, os.PathLike)):
        root = Path(hf_model_or_dir)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root} is not a Hugging Face checkpoint directory (no config.json)")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(root), local_files_only=True)
    cfg = getattr(hf_model_or_dir, "config", None)
    if not isinstance(hf_model_or_dir, nn.Module) or cfg is None or not hasattr(cfg, "model_type"):
        raise TypeError(
            "megatron_from_hf needs a transformers model or a checkpoint directory, got "
            f"{type(hf_model_or_dir).__name__}"
        )
    return cfg


def megatron_shape(hf_model_or_dir) -> MoEShape:
    """The :class:`~calib.hf.arch.base.MoEShape` (Megatron fields) of an HF model / directory / config;
    ``ValueError`` for an unsupported ``model_type`` or config feature."""
    cfg = hf_model_or_dir if hasattr(hf_model_or_dir, "model_type") else read_hf_config(hf_model_or_dir)
    return get_arch(cfg.model_type).read_shape(cfg)


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1, divisible_by: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by × tensor_parallel``."""
    step = divisible_by * tensor_parallel
    return -(-vocab_size // step) * step


def resolve_spec(spec: str) -> str:
    """``"auto"`` → ``"te"`` where Transformer Engine and CUDA exist, else ``"local"``."""
    if spec == "auto":
        return "te" if torch.cuda.is_available() and _have_te() else "local"
    if spec not in SPECS:
        raise ValueError(f"spec must be 'auto' or one of {SPECS}, got {spec!r}")
    if spec != "local" and not _have_te():
        raise ValueError(f"spec {spec!r} needs Transformer Engine, which is not installed")
    return spec


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def megatron_from_hf(
    hf_model_or_dir,
    *,
    spec: str = "auto",
    dtype: torch.dtype = torch.float32,
    importer: str = "auto",
    make_vocab_size_divisible_by: int = 1,
    sequence_parallel: bool | None = None,
):
    """Build the Megatron ``GPTModel`` equivalent to an HF MoE model and load its weights (see the module
    docstring). ``hf_model_or_dir``: a transformers ``PreTrainedModel`` or a local checkpoint directory.
    ``sequence_parallel``: ``None`` → on when tensor parallelism > 1. The model is returned in training mode
    (as constructed), on CUDA when available. Needs :func:`lora.framework.init_parallel` first.

    Raises ``ValueError`` before building anything for an unsupported ``model_type`` / config feature, a
    parallel layout the model cannot take, or an importer that does not apply.
    """
    from megatron.core import parallel_state

    if importer not in IMPORTERS:
        raise ValueError(f"importer must be one of {IMPORTERS}, got {importer!r}")
    cfg = read_hf_config(hf_model_or_dir)
    arch = get_arch(cfg.model_type)
    shape = arch.read_shape(cfg)
    root = None if isinstance(hf_model_or_dir, nn.Module) else Path(hf_model_or_dir)
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron_from_hf: call lora.framework.init_parallel first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    _check_parallel(shape, tp, ep)
    spec = resolve_spec(spec)
    vocab = padded_vocab_size(shape.vocab_size, tp, make_vocab_size_divisible_by)
    why_not = _modelopt_unusable(arch, cfg, root, spec, vocab != shape.vocab_size)
    if importer == "modelopt" and why_not:
        raise ValueError(f"importer='modelopt' does not apply: {why_not}")
    use_modelopt = importer == "modelopt" or (importer == "auto" and not why_not)

    model = _build(shape, spec, dtype, vocab, tp, ep, sequence_parallel)
    if use_modelopt:
        from modelopt.torch.export import import_mcore_gpt_from_hf

        import_mcore_gpt_from_hf(model, str(root), dtype=dtype)
    else:
        hf_state = _hf_state_dict(hf_model_or_dir, root, dtype)
        load_hf_weights(model, hf_state, arch, shape, vocab)
    from calib.hf.to_hf import attach_origin  # registers modelopt's HF layout for these models too

    attach_origin(model, cfg, _hf_dtype(hf_model_or_dir, cfg, dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def _hf_dtype(hf_model_or_dir, cfg, default: torch.dtype) -> torch.dtype:
    """The dtype of the HF weights: the model's parameters, else the config's ``dtype``, else ``default``."""
    if isinstance(hf_model_or_dir, nn.Module):
        p = next(hf_model_or_dir.parameters(), None)
        return p.dtype if p is not None else default
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return d if isinstance(d, torch.dtype) else default


def _check_parallel(shape: MoEShape, tp: int, ep: int) -> None:
    from lora.io.sites import check_no_pipeline

    check_no_pipeline()
    where = f"{shape.model_type} at tensor_parallel={tp}, expert_parallel={ep}"
    if shape.num_experts % ep:
        raise ValueError(f"{where}: {shape.num_experts} experts do not split over {ep} expert-parallel ranks")
    if shape.heads % tp or shape.kv_heads % tp:
        raise ValueError(
            f"{where}: {shape.heads} attention heads / {shape.kv_heads} key-value heads do not split over "
            f"{tp} tensor-parallel ranks"
        )
    if shape.qk_norm == "full_width" and tp > 1:
        raise ValueError(
            f"{where}: its q/k RMSNorm spans all heads, which tensor parallelism splits; "
            "use tensor_parallel=1"
        )


def _modelopt_unusable(arch: HFArch, cfg, root: Path | None, spec: str, padded: bool) -> str | None:
    """Why nvidia-modelopt's importer cannot load this model (``None``: it can)."""
    if arch.modelopt_arch is None:
        return f"nvidia-modelopt has no import mapping for {arch.model_type}"
    if root is None:
        return "it reads a checkpoint directory, not an in-memory model"
    archs = list(getattr(cfg, "architectures", None) or [])
    if archs[:1] != [arch.modelopt_arch]:
        return f"config architectures {archs} is not [{arch.modelopt_arch!r}]"
    if spec == "te":
        return "its mapping has no rule for TEGroupedMLP experts (spec 'te')"
    if padded:
        return "it does not pad the vocabulary"
    return None


def transformer_config(shape: MoEShape, spec: str, dtype, tp: int, ep: int, sequence_parallel):
    """The Megatron ``TransformerConfig`` of ``shape``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.moe_ffn,
        num_moe_experts=shape.num_experts,
        moe_ffn_hidden_size=shape.moe_ffn,
        moe_router_topk=shape.topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not shape.renormalize_topk,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather",  # alltoall creates a CUDA stream
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=spec == "te",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        moe_shared_expert_intermediate_size=shape.shared_ffn,
        moe_shared_expert_gate=shape.shared_ffn is not None,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        qk_layernorm=shape.qk_norm != "none",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1 if sequence_parallel is None else bool(sequence_parallel),
        use_cpu_initialization=True,  # (perform_initialization=False would skip the TP attributes too)
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=shape.init_std,
    )


def _build(shape: MoEShape, spec: str, dtype, vocab: int, tp: int, ep: int, sequence_parallel):
    from megatron.core.models.gpt import GPTModel

    from calib.hf.arch.full_width_norm import FullWidthRMSNorm

    config = transformer_config(shape, spec, dtype, tp, ep, sequence_parallel)
    theta = int(shape.rope_theta) if float(shape.rope_theta).is_integer() else shape.rope_theta
    layer_spec = compat.moe_layer_spec(shape.num_experts, spec, qk_layernorm=config.qk_layernorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=shape.max_positions,
        position_embedding_type="rope",
        rotary_percent=shape.rotary_percent,
        rotary_base=theta,
        share_embeddings_and_output_weights=shape.tie_embeddings,
    )
    if shape.qk_norm == "full_width":
        d = shape.head_dim
        for layer in model.decoder.layers:
            attn = layer.self_attention
            attn.q_layernorm = FullWidthRMSNorm(shape.heads * d, shape.norm_eps, dtype)
            attn.k_layernorm = FullWidthRMSNorm(shape.kv_heads * d, shape.norm_eps, dtype)
    return model


def _hf_state_dict(hf_model_or_dir, root: Path | None, dtype) -> dict:
    if root is None:
        return hf_model_or_dir.state_dict()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype, local_files_only=True).state_dict()


def load_hf_weights(model: nn.Module, hf_state: dict, arch: HFArch, shape: MoEShape, vocab: int) -> None:
    """Copy every parameter of the Megatron ``model`` (this rank's shard, its experts) from the HF state
    dict (see the module docstring); ``ValueError`` naming a Megatron tensor without HF source, a shape
    mismatch, or an HF tensor left unused."""
    from lora.io.sites import other_tensors

    used: set[str] = set()
    with torch.no_grad():
        for ot in other_tensors(model, skip=[]):
            name = ot.global_name()
            try:
                full = megatron_tensor(name, hf_state, arch, shape, vocab, used)
            except KeyError:
                raise ValueError(
                    f"{shape.model_type}: no HF weight maps to the Megatron tensor {name} ({ot.key})"
                ) from None
            if tuple(full.shape) != ot.full_shape:
                raise ValueError(
                    f"{shape.model_type}: {name} is {tuple(full.shape)} from the HF weights, "
                    f"{ot.full_shape} in the Megatron model"
                )
            ot.tensor.copy_(ot.local_from(full))
    if shape.tie_embeddings:
        used.add(arch.names["lm_head"])
    unused = sorted(set(hf_state) - used)
    if unused:
        raise ValueError(f"{shape.model_type}: the HF tensor {unused[0]} has no place in the Megatron model")
