"""The grouped forward of a Megatron ``SequentialMLP`` whose experts hold 4-bit SVDQuant bases
(svdq/DESIGN.md §16): all local experts in one pass instead of a Python loop over experts.

:class:`lora.adapters.layers.LoraExperts` takes this path (:func:`grouped_applies`) when every local expert's
``linear_fc1`` / ``linear_fc2`` is a packed :class:`lora.base.SVDQBase` of one format (adapted or not), expert
tensor parallelism is 1, the expert linears have no bias, there is no parallel adapter and no FP8 / FP4
padding, and no module under the ``SequentialMLP`` (nor it) has forward hooks — statistics and range passes
hook the bases, so they see the per-expert loop. Each projection is
:func:`svdq.experts.projection.grouped_projection` over the permuted rows (sorted by local expert, as
Megatron's dispatcher hands them over): one activation quantization per expert's rows, one grouped 4-bit
product, fc1's shared ``lora_down`` as ONE GEMM over all local tokens; the activation and the routing
probability follow Megatron's ``MLP.forward`` (the probability multiplies the activation output, before
``linear_fc2``). It computes what the per-expert loop computes — the same quantization of each expert's rows,
products in another order (tests: within fp32 accumulation tolerance, forward and backward) — and keeps every
tensor where it is, so checkpoints, adapter files and exports do not change.

Tensors read per forward (``E`` local experts, ``H`` hidden, ``F`` expert ffn, ``2F`` for GLU fc1)::

    fc1 residuals   stacked from each base: ExpertResiduals (E, 2F, H)   (a transient copy, ~4.5 bits/weight)
    fc1 smooth      float32 (H,) when all experts share it, else (E, H)
    fc2 residuals   ExpertResiduals (E, H, F);  fc2 smooth float32 (E, F) or (F,)
    input_amax      float32 (E,) per projection (0: that expert dynamic) or None
    factors         shared (r, ·) from the group's context (gradient reductions attached), per-expert
                    ones stacked (E, ·, r) — gradients flow back to each expert's parameter
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.base import SVDQBase
from lora.framework.tp import group_rank_size
from svdq.experts.projection import grouped_projection
from svdq.experts.storage import ExpertResiduals
from svdq.kernels.glu_act import swiglu_prob, swiglu_prob_applies
from svdq.solvers.shared_basis import PER_EXPERT, SHARED_DOWN, SHARED_UP

__all__ = ["grouped_applies", "grouped_forward"]

PROJ_ATTR = {"fc1": "linear_fc1", "fc2": "linear_fc2"}


def _base_of(linear: nn.Module) -> nn.Module:
    """The module under an expert adapter wrapper (``ExpertLoraLinear.base``), else the linear itself."""
    from lora.adapters.layers import ExpertLoraLinear

    return linear.base if isinstance(linear, ExpertLoraLinear) else linear


def _bases(group, proj: str) -> list[nn.Module]:
    return [_base_of(getattr(e, PROJ_ATTR[proj])) for e in group.base.local_experts]


def grouped_applies(group) -> bool:
    """Whether ``group`` (a :class:`~lora.adapters.layers.LoraExperts`) can take the grouped path (see the
    module docstring); ``group.grouped_svdq = False`` turns it off, ``True`` makes a case that cannot take it
    raise."""
    from lora.adapters.layers import ExpertParallelAdapter

    choice = getattr(group, "grouped_svdq", None)
    if choice is False:
        return False
    why = _why_not(group, ExpertParallelAdapter)
    if why and choice is True:
        raise RuntimeError(f"{group.adapter_name or 'experts'}: grouped 4-bit forward requested, but {why}")
    return why is None


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _why_not(group, parallel_cls) -> str | None:
    config = group.base.config
    if _has_hooks(group.base):  # the loop calls every module; hooks (e.g. statistics passes) must fire
        return "expert modules have forward hooks"
    if group.parallel or any(isinstance(e, parallel_cls) for e in group.base.local_experts):
        return "the experts have a parallel adapter"
    if group_rank_size(group.base.tp_group)[1] > 1:
        return "expert tensor parallelism is > 1"
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        return "FP8 / FP4 padding of expert rows"
    if getattr(config, "use_te_activation_func", False):
        return "Transformer Engine activation functions"
    for proj in ("fc1", "fc2"):
        bases = _bases(group, proj)
        if not all(isinstance(b, SVDQBase) for b in bases):
            return f"not every expert's {proj} is a 4-bit SVDQuant base"
        b0 = bases[0]
        for b in bases:
            if b.storage != "packed":
                return f"{proj} bases are not in packed storage"
            if b.input_norm is not None or getattr(b.inner, "bias", None) is not None:
                return f"{proj} bases have a fused norm or a bias"
            if b._residual_meta != b0._residual_meta or b.act_format != b0.act_format:
                return f"{proj} bases differ in format or shape"
    return None


def _stack_smooth(group, proj: str, bases: list[SVDQBase]) -> Tensor:
    """``(in,)`` when every expert has the same smoothing (one division per token), else ``(E, in)``. The
    result is kept on ``group`` until a smoothing tensor is replaced or modified in place (frozen buffers:
    one comparison, and its host sync, per change rather than per forward)."""
    first = bases[0].smooth
    if all(b.smooth is first for b in bases[1:]):
        return first
    tensors = [b.smooth for b in bases]
    versions = [t._version for t in tensors]
    cache = group.__dict__.setdefault("_grouped_smooth", {})
    hit = cache.get(proj)  # (tensors, versions, value); holding the tensors keeps their identities unique
    if hit and len(hit[0]) == len(tensors) and all(map(operator.is_, hit[0], tensors)) and hit[1] == versions:
        return hit[2]
    stacked = torch.stack(tensors)  # (E, in)
    value = first if bool((stacked == first).all()) else stacked  # one host sync, not one per expert
    cache[proj] = (tensors, versions, value)
    return value


def _stack_amax(bases: list[SVDQBase]) -> Tensor | None:
    """Static ranges ``(E,)`` (0 where an expert is dynamic), or ``None`` when all are dynamic."""
    if all(b.input_amax is None for b in bases):
        return None
    zero = torch.zeros((), dtype=torch.float32, device=bases[0].smooth.device)
    return torch.stack([zero if b.input_amax is None else b.input_amax.reshape(()) for b in bases])


def _factors(group, ctx, proj: str) -> tuple[Tensor | None, Tensor | None, str]:
    """``(lora_down, lora_up, layout)`` of ``proj`` as :func:`grouped_projection` takes them; ``None``
    factors when the projection has no adapter."""
    layout = group.fc1_layout if proj == "fc1" else group.fc2_layout
    if layout is None or not group.ranks[proj]:
        return None, None, SHARED_DOWN
    wrappers = [getattr(e, PROJ_ATTR[proj]) for e in group.base.local_experts]
    if layout in (SHARED_DOWN, PER_EXPERT):
        B = torch.stack([w._own_or_shared(ctx, "lora_up", w.up_dim) for w in wrappers])  # (E, out, r)
    else:
        B = ctx.shared[f"{proj}_lora_up"]  # (out, r)
    if layout in (SHARED_UP, PER_EXPERT):
        A = torch.stack([w._own_or_shared(ctx, "lora_down", w.down_dim) for w in wrappers])  # (E, r, in)
    else:
        A = ctx.shared[f"{proj}_lora_down"]  # (r, in)
    return A, B, layout


def _activation(config, h: Tensor, probs: Tensor) -> Tensor:
    """Megatron ``MLP.forward``'s activation (unfused form) and the routing probability: ``(S, F)``. SwiGLU
    without clamping takes the fused kernel where it applies (:mod:`svdq.kernels.glu_act`: the same values,
    one pass forward and one backward)."""
    clamp = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0)
    if config.gated_linear_unit and config.activation_func is F.silu and clamp is None:
        if swiglu_prob_applies(h, probs):
            return swiglu_prob(h, probs, offset)
    if config.gated_linear_unit:
        gate, linear = torch.chunk(h, 2, dim=-1)
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            linear = linear.clamp(min=-clamp, max=clamp)
        out = config.activation_func(gate) * (linear + offset)
    else:
        out = config.activation_func(h)
    return (out * probs.unsqueeze(-1)).to(h.dtype)


def grouped_forward(group, hidden: Tensor, tokens_per_expert: Tensor, probs: Tensor) -> tuple[Tensor, None]:
    """``(out (N, H), None)`` of the ``SequentialMLP`` under ``group`` for permuted ``hidden (N, H)``,
    ``tokens_per_expert (E,)`` and ``probs (N,)`` (what ``SequentialMLP.forward`` returns)."""
    config = group.base.config
    x = hidden
    if getattr(config, "moe_apply_probs_on_input", False):
        x = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
        probs = torch.ones_like(probs)
    E = group.num_local
    counts = [int(c) for c in tokens_per_expert.reshape(E).tolist()]  # no device sync when on the CPU
    counts_t = tokens_per_expert.to(device=x.device, dtype=torch.long).reshape(E)
    ids = torch.repeat_interleave(torch.arange(E, device=x.device), counts_t)  # (N,)
    offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
    ctx = group._shared_context()
    h = x
    for proj in ("fc1", "fc2"):
        bases = _bases(group, proj)
        A, B, layout = _factors(group, ctx, proj)
        branch_x = group.drop(h, split=proj == "fc2") if A is not None else None
        h = grouped_projection(
            h,
            ids,
            counts,
            offs,
            residual=ExpertResiduals.from_packed([b.packed_residual() for b in bases]),
            smooth=_stack_smooth(group, proj, bases),
            act_format=bases[0].act_format,
            input_amax=_stack_amax(bases),
            lora_down=A,
            lora_up=B,
            layout=layout,
            scaling=group.scaling,
            branch_x=branch_x,
            weight_dtype=bases[0].residual_dtype,
            ranges_static=all(b.input_amax is not None for b in bases),
        )
        if proj == "fc1":
            h = _activation(config, h, probs)
    return h, None
