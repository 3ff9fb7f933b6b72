"""What an architecture file declares: the Megatron shape of a Hugging Face MoE config and where its
weights live in the Hugging Face state dict.

* :class:`MoEShape`: the HF config read into the fields a Megatron GPT-MoE needs (every layer a MoE layer,
  SwiGLU experts, RMSNorm, RoPE, no biases).
* :class:`HFArch`: one architecture: its ``model_type``, a function reading an HF config into a
  :class:`MoEShape` (``ValueError`` naming the config field for anything Megatron cannot express), the
  HF tensor names (:data:`HF_NAMES`, ``{}`` where the layer index goes) and, where nvidia-modelopt's
  importer covers the architecture, its architecture name there.
* :func:`megatron_tensor`: the whole (unsharded, every expert) Megatron tensor of a canonical name — the
  local spec's name with the global expert index (``decoder.layers.<l>.mlp.experts.local_experts.<g>.…``) —
  from the HF state dict.

HF tensors (transformers 5, fused experts), all ``dtype`` of the HF model:

* ``model.embed_tokens.weight`` (V, H); ``lm_head.weight`` (V, H) unless tied; norms (H,)
* ``self_attn.{q,k,v,o}_proj.weight``: q (nh·d, H), k / v (ng·d, H), o (H, nh·d)
* ``self_attn.{q,k}_norm.weight``: per head (d,) or over the whole projection (nh·d,) / (ng·d,)
* ``mlp.gate.weight`` (E, H); ``mlp.experts.gate_up_proj`` (E, 2I, H), gate rows first;
  ``mlp.experts.down_proj`` (E, H, I)
* optional: ``self_attn.{q,k,v}_proj.bias`` (nh·d,) / (ng·d,); a shared expert
  ``mlp.shared_expert.{gate,up}_proj.weight`` (Is, H), ``down_proj.weight`` (H, Is) and its gate
  ``mlp.shared_expert_gate.weight`` (1, H) (output scaled by ``sigmoid(gate · x)``: Megatron's
  ``moe_shared_expert_gate``, ``shared_experts.gate_weight``)

The way back (Megatron → HF names, for modelopt's HF layout, :mod:`calib.hf.to_hf`): :func:`hf_module`
(a name key's module), :func:`qkv_rows` (which fused rows are q / k / v), :func:`hf_linear_parts` (a
quantized Megatron linear → its HF linears and rows), :func:`hf_experts_module` (an experts module's HF
name) and :func:`hf_tensors` (every other Megatron tensor → its HF tensors, the inverse of
:func:`megatron_tensor`).

Megatron's fused ``linear_qkv.weight`` is ``(ng·(nh/ng + 2)·d, H)``: per query group its query heads, then
its key head, then its value head; an expert's ``linear_fc1.weight`` is ``[gate; up]`` (2I, H).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

QK_NORMS = ("none", "per_head", "full_width")

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_norm": "model.layers.{}.input_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
    "pre_mlp_norm": "model.layers.{}.post_attention_layernorm.weight",
    "router": "model.layers.{}.mlp.gate.weight",
    "gate_up": "model.layers.{}.mlp.experts.gate_up_proj",
    "down": "model.layers.{}.mlp.experts.down_proj",
    # optional parts (biases of q / k / v; a shared expert with a sigmoid gate)
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "shared_gate": "model.layers.{}.mlp.shared_expert.gate_proj.weight",
    "shared_up": "model.layers.{}.mlp.shared_expert.up_proj.weight",
    "shared_down": "model.layers.{}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{}.mlp.shared_expert_gate.weight",
}


@dataclass(frozen=True)
class MoEShape:
    """A Megatron GPT-MoE read from an HF config.

    ``renormalize_topk``: the top-k routing weights are renormalized to sum to one (Megatron's softmax over
    the top-k logits); otherwise they are the softmax over all experts (``moe_router_pre_softmax``).
    ``qk_norm``: ``"none"``, ``"per_head"`` (RMSNorm over each head, Megatron's ``qk_layernorm``) or
    ``"full_width"`` (RMSNorm over the whole q / k projection, across heads). ``qkv_bias``: biases on the
    q / k / v projections (not on the output projection). ``shared_ffn``: intermediate size of a shared
    expert with a sigmoid gate (``None``: none).
    """

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_experts: int
    topk: int
    moe_ffn: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float
    rotary_percent: float
    tie_embeddings: bool
    renormalize_topk: bool
    qk_norm: str
    init_std: float = 0.02
    qkv_bias: bool = False
    shared_ffn: int | None = None

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MoEShape.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{self.model_type}: num_attention_heads={self.heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}"
            )


@dataclass(frozen=True)
class HFArch:
    """One HF architecture (see the module docstring)."""

    model_type: str
    read_shape: Callable[[object], MoEShape]
    names: dict = field(default_factory=lambda: dict(HF_NAMES))
    modelopt_arch: str | None = None


# ------------------------------------------------------------------------------------ config helpers


def require(cfg, model_type: str, name: str, ok: Callable[[object], bool], want: str) -> None:
    """``ValueError`` naming the field when ``cfg.<name>`` (absent: ``None``) fails ``ok``."""
    value = getattr(cfg, name, None)
    if not ok(value):
        raise ValueError(f"{model_type}: config {name}={value!r} is not supported (needs {want})")


def rope(cfg, model_type: str) -> tuple[float, float]:
    """``(rope_theta, rotary_percent)`` of plain RoPE; ``ValueError`` for scaled RoPE (YaRN, linear, …)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"{model_type}: rope_type={rope_type!r} is not supported (needs plain RoPE)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    return float(theta), float(partial if partial is not None else 1.0)


def head_dim(cfg) -> int:
    d = getattr(cfg, "head_dim", None)
    return int(d) if d else cfg.hidden_size // cfg.num_attention_heads


def common_checks(cfg, model_type: str) -> None:
    """Features none of the Megatron GPT-MoE builds here express: other activations, attention biases,
    sliding windows."""
    require(cfg, model_type, "hidden_act", lambda v: v == "silu", "'silu'")
    require(cfg, model_type, "attention_bias", lambda v: not v, "no attention bias")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"{model_type}: config sliding_window={window!r} is not supported (needs None)")


# ------------------------------------------------------------------------------------ weight mapping

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")
_PLAIN = {  # canonical layer suffix -> HF name key
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_proj.weight": "o",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "pre_mlp_layernorm.weight": "pre_mlp_norm",
    "mlp.router.weight": "router",
    "mlp.shared_experts.linear_fc2.weight": "shared_down",
    "mlp.shared_experts.gate_weight": "shared_expert_gate",
}


def megatron_tensor(
    name: str, hf: dict[str, Tensor], arch: HFArch, shape: MoEShape, vocab: int, used: set[str]
) -> Tensor:
    """The whole Megatron tensor of the canonical ``name`` (see the module docstring) from the HF state
    dict ``hf``; ``vocab``: the (padded) Megatron vocabulary, extra rows zero. The HF keys read are added
    to ``used``. ``KeyError`` naming ``name`` when it has no HF counterpart."""
    names = arch.names

    def get(key: str, layer: int | None = None) -> Tensor:
        hf_name = names[key].format(layer)
        if hf_name not in hf:
            raise ValueError(f"{shape.model_type}: the HF weights have no tensor {hf_name} (for {name})")
        used.add(hf_name)
        return hf[hf_name]

    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        key = "embed" if name.startswith("embedding") or shape.tie_embeddings else "lm_head"
        return _pad_rows(get(key), vocab)  # (V_pad, H)
    if name == "decoder.final_layernorm.weight":
        return get("final_norm")
    m = _LAYER.fullmatch(name)
    if m is None:
        raise KeyError(name)
    layer, rest = int(m.group(1)), m.group(2)
    if rest in _PLAIN:
        return get(_PLAIN[rest], layer)
    if rest == "self_attention.linear_qkv.weight":
        ng, d, h = shape.kv_heads, shape.head_dim, shape.hidden
        q = get("q", layer).reshape(ng, -1, h)  # (ng, nh/ng·d, H)
        k = get("k", layer).reshape(ng, d, h)  # (ng, d, H)
        v = get("v", layer).reshape(ng, d, h)  # (ng, d, H)
        return torch.cat([q, k, v], dim=1).reshape(-1, h)  # (ng·(nh/ng + 2)·d, H)
    if rest == "self_attention.linear_qkv.bias":
        ng, d = shape.kv_heads, shape.head_dim
        q = get("q_bias", layer).reshape(ng, -1)  # (ng, nh/ng·d)
        k = get("k_bias", layer).reshape(ng, d)  # (ng, d)
        v = get("v_bias", layer).reshape(ng, d)  # (ng, d)
        return torch.cat([q, k, v], dim=1).reshape(-1)  # (ng·(nh/ng + 2)·d,)
    if rest == "mlp.shared_experts.linear_fc1.weight":
        return torch.cat([get("shared_gate", layer), get("shared_up", layer)], dim=0)  # (2Is, H)
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        g = int(e.group(1))
        if e.group(2) == "linear_fc1":
            return get("gate_up", layer)[g]  # (2I, H) = [gate; up]
        return get("down", layer)[g]  # (H, I)
    raise KeyError(name)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


# ------------------------------------------------------------------------------------ the way back


def hf_module(arch: HFArch, key: str, layer: int | None = None) -> str:
    """The HF module (in-memory name) holding the tensor of name key ``key`` (``….weight`` stripped)."""
    name = arch.names[key].format(layer)
    return name[: -len(".weight")] if name.endswith(".weight") else name.rpartition(".")[0]


def qkv_rows(shape: MoEShape) -> dict[str, Tensor]:
    """``{"q", "k", "v": row indices into linear_qkv}``: per query group its ``nh/ng`` query heads, its key
    head, its value head (the interleave of :func:`megatron_tensor` undone)."""
    ng, d = shape.kv_heads, shape.head_dim
    per = shape.heads // ng
    idx = torch.arange(ng * (per + 2) * d).reshape(ng, per + 2, d)  # (ng, nh/ng + 2, d)
    return {
        "q": idx[:, :per].reshape(-1),  # (nh·d,) in HF head order
        "k": idx[:, per].reshape(-1),  # (ng·d,)
        "v": idx[:, per + 1].reshape(-1),  # (ng·d,)
    }


def _layer_rest(name: str) -> tuple[int, str]:
    m = _LAYER.fullmatch(name)
    if m is None:
        raise KeyError(name)
    return int(m.group(1)), m.group(2)


def hf_linear_parts(site: str, arch: HFArch, shape: MoEShape) -> dict[str, Tensor | None]:
    """``{HF linear: rows of the Megatron linear (None: all)}`` for a quantized dense Megatron linear
    ``site`` (canonical name); ``KeyError`` for a linear without HF counterpart."""
    layer, rest = _layer_rest(site)
    if rest == "self_attention.linear_qkv":
        return {hf_module(arch, p, layer): r for p, r in qkv_rows(shape).items()}
    if rest == "self_attention.linear_proj":
        return {hf_module(arch, "o", layer): None}
    if rest == "mlp.shared_experts.linear_fc1":
        n = shape.shared_ffn
        return {
            hf_module(arch, "shared_gate", layer): torch.arange(n),
            hf_module(arch, "shared_up", layer): torch.arange(n, 2 * n),
        }
    if rest == "mlp.shared_experts.linear_fc2":
        return {hf_module(arch, "shared_down", layer): None}
    raise KeyError(site)


def hf_experts_module(group: str, arch: HFArch) -> str:
    """The HF fused experts module of the Megatron experts module ``decoder.layers.<l>.mlp.experts``."""
    layer, rest = _layer_rest(group)
    if rest != "mlp.experts":
        raise KeyError(group)
    return hf_module(arch, "gate_up", layer)


def hf_tensors(name: str, t: Tensor, arch: HFArch, shape: MoEShape) -> dict[str, Tensor]:
    """``{HF tensor name: tensor}`` of the whole Megatron tensor ``name`` (canonical, not part of a
    quantized linear): the inverse of :func:`megatron_tensor`, vocabulary padding dropped. A tied output
    layer gives nothing (HF writes the embedding once). ``KeyError`` for a tensor without HF counterpart
    (e.g. the weights of an unquantized experts module, which HF keeps fused)."""
    names = arch.names
    if name == "embedding.word_embeddings.weight":
        return {names["embed"]: t[: shape.vocab_size]}  # (V, H)
    if name == "output_layer.weight":
        return {} if shape.tie_embeddings else {names["lm_head"]: t[: shape.vocab_size]}
    if name == "decoder.final_layernorm.weight":
        return {names["final_norm"]: t}
    layer, rest = _layer_rest(name)
    if rest in _PLAIN:
        return {names[_PLAIN[rest]].format(layer): t}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        leaf = "" if rest.endswith("weight") else "_bias"
        return {names[f"{p}{leaf}"].format(layer): t[r] for p, r in qkv_rows(shape).items()}
    if rest == "mlp.shared_experts.linear_fc1.weight":
        n = shape.shared_ffn
        return {names["shared_gate"].format(layer): t[:n], names["shared_up"].format(layer): t[n:]}
    raise KeyError(name)
