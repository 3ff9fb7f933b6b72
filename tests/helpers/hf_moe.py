"""Tiny random Hugging Face MoE models (transformers, built from configs: nothing is downloaded) and
test-side references for fused experts: an exact-arithmetic SVDQExperts built from an HF experts module,
a float64 reference of an experts forward, and the round-to-nearest baseline of svdq.quantize."""

from __future__ import annotations

import torch
from torch import nn

from svdq.experts import ExpertResiduals, ProjectionState, handler_for, install_svdq_experts
from svdq.formats import fake_quant, quantize_tensor

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _config(family: str):
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            head_dim=16,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**_COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if family == "deepseek_v3":
        common = dict(_COMMON, num_key_value_heads=4)
        return tf.DeepseekV3Config(
            **common,
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "gpt_oss":
        return tf.GptOssConfig(
            **_COMMON,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        )
    raise ValueError(family)


def tiny_moe(family: str, seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """A tiny random causal LM of ``family`` (hidden 64, 4–8 experts, 2 layers), fp32, eval mode."""
    import transformers as tf

    cfg = _config(family)
    cfg._attn_implementation = "eager"
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    cls = {
        "mixtral": tf.MixtralForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "olmoe": tf.OlmoeForCausalLM,
        "deepseek_v3": tf.DeepseekV3ForCausalLM,
        "gpt_oss": tf.GptOssForCausalLM,
    }[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger than the HF init (std 0.02) so quantization errors show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name and "expert" not in name:
                continue
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
    return model


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the handled experts modules of ``model``."""
    return {n: m for n, m in model.named_modules() if handler_for(m) is not None}


def token_batches(n: int = 4, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def forward_loop_of(batches):
    def loop(model):
        for ids in batches:
            model(ids)

    return loop


def exact_projection(W: torch.Tensor, bias, layout: str, rank: int, seed: int, per_expert_smooth: bool):
    """A :class:`ProjectionState` with format ``none`` whose output equals ``x·Wᵀ (+ b)`` up to rounding:
    random smoothing and random factors ``B·A``, residual ``(W − B·A)·diag(s)``."""
    g = torch.Generator().manual_seed(seed)
    E, out_f, in_f = W.shape
    W = W.detach().double()
    s = torch.rand(E if per_expert_smooth else 1, in_f, generator=g, dtype=torch.float64) + 0.5
    A = torch.randn(E, rank, in_f, generator=g, dtype=torch.float64) * 0.1
    B = torch.randn(E, out_f, rank, generator=g, dtype=torch.float64) * 0.1
    if layout == "shared-down":
        A = A[:1].expand(E, -1, -1)
    if layout == "shared-up":
        B = B[:1].expand(E, -1, -1)
    R = (W - B @ A) * s.unsqueeze(1)
    res = ExpertResiduals.from_packed([quantize_tensor(R[i].float(), "none") for i in range(E)])
    return ProjectionState(
        residual=res,
        smooth=(s if per_expert_smooth else s[0]).float(),
        act_format="none",
        lora_down=(A[0] if layout == "shared-down" else A).float(),
        lora_up=(B[0] if layout == "shared-up" else B).float(),
        bias=None if bias is None else bias.detach().float(),
        dtype=torch.float32,
    )


def install_exact(model: nn.Module, name: str, layouts=("shared-down", "per-expert"), rank: int = 4):
    """Replace the experts module ``name`` by an :class:`SVDQExperts` of exact (format ``none``)
    projections."""
    module = model.get_submodule(name)
    h = handler_for(module)
    W1, W2, b1, b2 = h.weights(module)
    fc1 = exact_projection(W1, b1, layouts[0], rank, 1, per_expert_smooth=False)
    fc2 = exact_projection(W2, b2, layouts[1], rank, 2, per_expert_smooth=True)
    return install_svdq_experts(model, name, h, fc1, fc2, storage="packed")


def reference_experts(module: nn.Module, x, idx, w) -> torch.Tensor:
    """float64 reference of a handled experts module's output (per (token, slot) pair, masked slots
    skipped)."""
    h = handler_for(module)
    W1, W2, b1, b2 = (None if t is None else t.detach().double() for t in h.weights(module))
    act = h.activation(module)
    x64 = x.double()
    out = torch.zeros_like(x64)
    E = W1.shape[0]
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if not 0 <= e < E:
                continue
            y = W1[e] @ x64[t] + (0 if b1 is None else b1[e])
            y = W2[e] @ act(y.unsqueeze(0))[0] + (0 if b2 is None else b2[e])
            out[t] += w[t, j].double() * y
    return out


@torch.no_grad()
def rtn_quantize(model: nn.Module, weight_format: str, act_format: str, include_linear) -> nn.Module:
    """Round-to-nearest baseline in place: every quantized weight (each expert its own tensor, each linear
    one) replaced by ``fake_quant(W)``, and activations of those layers fake-quantized (per call; experts:
    per expert's routed rows via forward pre-hooks on the linears, none on experts — the RTN weight error
    dominates). ``include_linear(name)``: which nn.Linear to round (those svdq.quantize replaced)."""
    for name, m in list(model.named_modules()):
        h = handler_for(m)
        if h is not None:
            for t in h.weights(m)[:2]:
                t.copy_(torch.stack([fake_quant(t[i].float(), weight_format) for i in range(t.shape[0])]))
        elif isinstance(m, nn.Linear) and include_linear(name):
            m.weight.copy_(fake_quant(m.weight.float(), weight_format))
            m.register_forward_pre_hook(lambda mod, args: (fake_quant(args[0], act_format),))
    return model


def relative_logit_error(model: nn.Module, ref: nn.Module, batches) -> float:
    """``‖logits − logits_ref‖ / ‖logits_ref‖`` over ``batches``, in float64."""
    num = den = 0.0
    with torch.no_grad():
        for ids in batches:
            r, y = ref(ids).logits.double(), model(ids).logits.double()
            num += float((y - r).square().sum())
            den += float(r.square().sum())
    return (num / den) ** 0.5


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of ``ids (B, T)``."""
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def static_ranges_with_headroom(model: nn.Module, forward_loop) -> dict[str, torch.Tensor]:
    """Test-side reference of the raw-coordinate static ranges a ``smoothing="fold"`` export writes
    (svdq/DESIGN.md §20), float64: ``max|x| · input_amax / max|x/s|`` over ``forward_loop`` — per
    :class:`svdq.SVDQLinear` (0-d, key its name) and per expert of each projection of an
    :class:`svdq.experts.SVDQExperts` (``(E,)``, keys ``<name>.fc1`` / ``<name>.fc2``); ``max|x|`` where the
    layer has no static range."""
    from svdq.experts import SVDQExperts
    from svdq.layer import SVDQLinear

    raw: dict[str, torch.Tensor] = {}
    smoothed: dict[str, torch.Tensor] = {}
    static: dict[str, torch.Tensor | None] = {}
    handles = []

    def dense_hook(mod, args, key):
        x = args[0].double().reshape(-1, mod.in_features)  # (n, in)
        raw[key] = torch.maximum(raw[key], x.abs().max())
        smoothed[key] = torch.maximum(smoothed[key], (x / mod.smooth.double()).abs().max())

    def expert_hook(proj, args, key):
        x, rows, ids = args[0], args[1], args[2]
        x = (x if rows is None else x[rows]).double()  # (S, in)
        s = proj.smooth.double() if proj.smooth.dim() == 1 else proj.smooth.double()[ids]
        raw[key].scatter_reduce_(0, ids, x.abs().amax(-1), "amax")
        smoothed[key].scatter_reduce_(0, ids, (x / s).abs().amax(-1), "amax")

    for name, m in model.named_modules():
        if isinstance(m, SVDQLinear):
            raw[name] = torch.zeros((), dtype=torch.float64)
            smoothed[name] = torch.zeros((), dtype=torch.float64)
            static[name] = getattr(m, "input_amax", None)
            handles.append(m.register_forward_pre_hook(lambda mod, a, k=name: dense_hook(mod, a, k)))
        elif isinstance(m, SVDQExperts):
            for p, proj in m.projections().items():
                key = f"{name}.{p}"
                raw[key] = torch.zeros(proj.num_experts, dtype=torch.float64)
                smoothed[key] = torch.zeros_like(raw[key])
                static[key] = proj.input_amax
                handles.append(proj.register_forward_pre_hook(lambda mod, a, k=key: expert_hook(mod, a, k)))
    try:
        forward_loop(model)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, r in raw.items():
        layer = static[key]
        if layer is None:
            out[key] = r
            continue
        layer = layer.double()
        ok = (layer > 0) & (smoothed[key] > 0)
        out[key] = torch.where(ok, r * layer / torch.where(ok, smoothed[key], 1.0), r)
    return out
