"""Adapter modules on Megatron linears and ``SequentialMLP`` experts.

Every branch computes ``delta = scaling · (x · Aᵀ) · Bᵀ`` with ``A = lora_down (r × in)`` reading the raw
input and ``B = lora_up (out × r)``; shapes below are per rank (``_l``: this rank's shard).

* :class:`LoraLinear` — on a ``ColumnParallelLinear`` / ``RowParallelLinear``; ``forward(x, *args,
  **kwargs) -> (out + delta, bias)`` keeps Megatron's contract.
* :class:`LoraExperts` — on a ``SequentialMLP``; its experts' ``linear_fc1`` / ``linear_fc2`` get an
  :class:`ExpertLoraLinear` each and, optionally, each expert an :class:`ExpertParallelAdapter`.

**Wrappers are transparent.** A wrapper holds the frozen base as ``.base`` (``named_parameters`` shows
``….base.weight``), forwards unknown attributes to it, and its ``state_dict`` / ``load_state_dict`` /
``sharded_state_dict`` use the base's keys unchanged (``….linear_fc1.weight``) plus its own
(``….linear_fc1.lora_up``), so checkpoints of the unadapted model load into the adapted one.

**Tensor parallelism** (group ``g``: the base's TP group; the expert-TP group for experts). Factors are
sharded like the base weight: column-parallel (weight split along out) → ``lora_up (out_l × r)`` split,
``lora_down (r × in)`` replicated; row-parallel (split along in) → ``lora_down (r × in_l)`` split,
``lora_up (out × r)`` replicated. The communication mirrors the base and keeps autograd exact:

* column, input replicated: ``h = copy_to(x·Aᵀ)`` (backward all-reduces ``dh``, so ``dA`` and the
  adapter's ``dx`` are complete); under sequence parallelism ``h = gather_from_sp(x_l·Aᵀ)`` (all-gather
  forward, reduce-scatter backward) with ``A``'s gradient summed over ``g``; expert linears (the base
  does no communication) sum ``A``'s gradient over ``g`` and leave ``dx`` partial like the base does.
  ``gather_output`` gathers the delta like the output.
* row: ``h_l = x_l·A_lᵀ`` is a partial sum; ``h = reduce_from(h_l)`` (all-reduce), or
  ``reduce_scatter_to_sp(h_l)`` under sequence parallelism (then ``B``'s gradient is summed over ``g``).
  For experts the base output is itself a partial sum reduced later by the token dispatcher, so the
  partial delta ``h_l·Bᵀ`` is added as is — each rank adds its share, the sum is the delta once.

**Experts.** Factors shared by the experts of a layer are owned by :class:`LoraExperts`; per-expert
factors by the expert's own wrapper (so the checkpoint gets the expert axis, see :mod:`lora.sharded`).
fc1 shared-down runs ONE GEMM ``h = X·Aᵀ`` over all permuted local tokens before the experts, split by
``tokens_per_expert``; each expert then adds ``h_i·B_iᵀ`` to its fc1 output. Branches inside fc1/fc2
inherit the router probability (applied after the activation, before fc2); the parallel adapter
multiplies by it explicitly. Gradient rule: a factor replicated over expert-TP ranks has its gradient
summed over the expert-TP group (each rank sees one output shard / one input slice), and a factor shared
by experts has it summed over the expert-parallel group (each rank sees its experts' tokens) — inside
autograd, so the shared factor stays identical on all expert-parallel ranks, its checkpoint has one key
(:mod:`lora.sharded`), and Megatron's DDP reduces it over the expert-data-parallel group like an
expert weight (``allreduce=False`` when EP > 1, copied from the expert weights).

**Dropout** (``dropout > 0``, training only) acts on the branch input; under (expert) tensor parallelism
its masks are drawn so that a replicated input gets one mask on all ranks and a split one its own per
rank, recomputation included (:mod:`lora.adapters.dropout`).

**Limits.** Attribute *writes* on a wrapper stay
on the wrapper (reads fall through to the base). Megatron's gradient-norm clipping counts a shared
expert factor once per expert-parallel rank.

**Transformer Engine** (:mod:`lora.framework.te`). ``LoraLinear`` also wraps Megatron's
``TEColumnParallelLinear`` / ``TERowParallelLinear`` / ``TELayerNormColumnParallelLinear`` and plain
``te.pytorch.Linear`` / ``LayerNormLinear`` (returning a tensor when the base does). On a fused-norm linear
the branch reads the *normalized* input: TE's ``return_layernorm_output`` for that call, or, on a base
quantized by nvidia-modelopt (which cannot return it), :func:`lora.framework.te.fused_norm_input`. Expert TE
linears inside a ``SequentialMLP`` get Megatron's (expert) tensor-parallel group from ``_tp_group`` (TE's own
is ``None`` when Megatron does the communication). ``TEGroupedMLP`` experts: :mod:`lora.adapters.grouped`.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora import sharded as ckpt
from lora.adapters.dropout import adapter_dropout
from lora.fold import delta_weight
from lora.framework.te import (
    explicit_expert_comm,
    fused_norm_input,
    is_grouped,
    te_kind,
    te_mode,
    tp_group_of,
)
from lora.framework.tp import full_shape, grad_allreduce, group_rank_size, set_tp_attributes, take_shard
from svdq.solvers.shared_basis import PER_EXPERT, SHARED_DOWN, SHARED_UP

LAYOUT_OWNS = {  # layout -> (expert owns lora_down, expert owns lora_up)
    PER_EXPERT: (True, True),
    SHARED_DOWN: (False, True),
    SHARED_UP: (True, False),
}


# --------------------------------------------------------------------------------------------- factors


@dataclass(eq=False)
class Factor:
    """One adapter factor: the parameter, its global name and how this rank's tensor is a shard of it.

    ``key``: global name (adapter files; per-expert keys use the *global* expert index). ``attr``: the
    parameter's attribute name in its owner module. ``role``: ``"down"`` (r × in) or ``"up"`` (out × r).
    ``dim``: axis split over the (expert) tensor-parallel group of ``tp_size`` ranks, this one
    ``tp_rank`` (None: replicated);
    ``glu``: an fc1 ``lora_up`` with ``[gate; up]`` rows (see :mod:`lora.framework.tp`).
    """

    key: str
    attr: str
    param: nn.Parameter
    role: str
    dim: int | None = None
    glu: bool = False
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def full_shape(self) -> tuple[int, ...]:
        return full_shape(tuple(self.param.shape), self.dim, self.tp_size)

    def to_local(self, t: Tensor, who: str) -> Tensor:
        """``t`` as this rank's shard: ``t`` is either the whole tensor or already the local shard."""
        shape = tuple(t.shape)
        if shape == tuple(self.param.shape):
            return t
        if shape == self.full_shape:
            return take_shard(t, self.dim, self.tp_rank, self.tp_size, self.glu)
        raise ValueError(
            f"{who}: {self.key} has shape {shape}, expected {self.full_shape}"
            + (f" (or the local shard {tuple(self.param.shape)})" if self.tp_size > 1 else "")
        )


def init_factor(f: Factor, init: str, seed: int) -> None:
    """Fill ``f`` per ``init`` (:data:`lora.config.INITS`): kaiming-uniform (bound ``1/sqrt(fan_in)``,
    ``fan_in`` = columns of the whole tensor) drawn from a generator keyed by ``(seed, f.key)`` on the
    whole tensor, then sharded — so values do not depend on tensor or expert parallelism."""
    with torch.no_grad():
        if init == "zeros" or (init == "kaiming" and f.role == "up"):
            f.param.zero_()
            return
        shape = f.full_shape
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{f.key}".encode()))
        bound = 1.0 / math.sqrt(shape[1])
        full = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
        f.param.copy_(take_shard(full, f.dim, f.tp_rank, f.tp_size, f.glu))


def base_weight(base: nn.Module) -> Tensor | None:
    """What an adapter sizes itself on — shape, dtype, device and Megatron's ``allreduce`` flag: the base's
    ``weight``, or for a quantized base (:class:`lora.base.SVDQBase`, also behind a wrapper) its
    zero-memory ``weight_like`` (no dequantization)."""
    like = getattr(base, "weight_like", None)
    return like if like is not None else getattr(base, "weight", None)


def _new_param(shape, like: Tensor, dtype) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype or like.dtype, device=like.device))


def linear_mode(base: nn.Module) -> str:
    """``"column"`` or ``"row"`` for a Megatron (or Transformer Engine) parallel linear."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(base, ColumnParallelLinear):
        return "column"
    if isinstance(base, RowParallelLinear):
        return "row"
    mode = te_mode(base)
    if mode is not None and not is_grouped(base):
        return mode
    mode = getattr(base, "parallel_mode", None)
    if mode in ("column", "row"):
        return mode
    raise TypeError(f"{type(base).__name__} is not a Megatron Column/RowParallelLinear")


def is_linear(m: nn.Module) -> bool:
    """A Megatron or Transformer Engine linear that :class:`LoraLinear` can wrap (not a grouped one)."""
    try:
        linear_mode(m)
        return True
    except TypeError:
        return False


def check_mergeable(base: nn.Module, who: str) -> Tensor:
    """The base weight, if it is a plain floating-point weight (not quantized); else ``TypeError``."""
    w = getattr(base, "weight", None)
    quantized = hasattr(base, "weight_quantizer") or getattr(base, "is_quantized_base", False)
    if w is None or not w.dtype.is_floating_point or quantized:
        raise TypeError(f"{who}: merge/unmerge needs an unquantized floating-point base weight")
    return w


def add_deltas(parts, sign: float, who: str) -> None:
    """``W_i += sign · delta_i`` in place for every part (an expert's linear wrapper or view: its
    ``merge_weight(who)`` and ``delta_weight()``), in float32 and written back in ``W_i``'s dtype."""
    with torch.no_grad():
        for part in parts:
            w = part.merge_weight(who)
            w.copy_((w.float() + sign * part.delta_weight()).to(w.dtype))


def _pad_rows(h: Tensor, n: int) -> Tensor:
    """``h`` with zero rows appended up to ``n`` rows (experts may pad tokens for FP8/FP4)."""
    if h.shape[0] == n:
        return h
    if h.shape[0] > n:
        raise RuntimeError(f"adapter projection has {h.shape[0]} rows, the expert input {n}")
    return F.pad(h, (0, 0, 0, n - h.shape[0]))


# --------------------------------------------------------------------------------------------- wrapper


class _Wrapper(nn.Module):
    """A module holding ``base`` whose state-dict keys are the base's own (see the module docstring)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "base" or "base" not in modules:
                raise
            return getattr(modules["base"], name)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:
            raise TypeError("adapter wrappers take state_dict arguments by keyword only")
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        self.base.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        self._save_to_state_dict(destination, prefix, keep_vars)
        return destination

    def expected_keys(self) -> list[str]:
        """Global keys of the factors this adapter loads from an adapter file (its :meth:`factors`)."""
        return [f.key for f in self.factors()]

    def reset_adapter(self, init: str, seed: int) -> None:
        """Refill every factor per ``init`` (:func:`init_factor`)."""
        for f in self.factors():
            init_factor(f, init, seed)

    @property
    def tp_group_for_checkpoint(self):
        return tp_group_of(self.base)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base's sharded tensors plus this wrapper's factors (see :mod:`lora.sharded`)."""
        return ckpt.wrapper_sharded_state_dict(self, prefix, sharded_offsets, metadata, self.factors())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        own = set(self._parameters) | set(self._buffers)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix) :]
            if rest.split(".", 1)[0] in own or rest.startswith("base."):
                continue
            state_dict[f"{prefix}base.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


# ---------------------------------------------------------------------------------------- dense linear


class LoraLinear(_Wrapper):
    """LoRA on a Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` (see the module docstring).

    ``forward(x, *args, **kwargs) -> (base_out + scaling · (x·Aᵀ)·Bᵀ, bias)``; ``x`` is what the base
    receives (``[s, b, in]``, or ``[s/tp, b, in]`` under sequence parallelism, ``[.., in_l]`` for a row
    linear with ``input_is_parallel``). ``lora_down``: ``(r × in)`` column / ``(r × in_l)`` row;
    ``lora_up``: ``(out_l × r)`` column / ``(out × r)`` row. ``glu``: the base is a gated fc1 (rows
    ``[gate; up]``), which decides how ``lora_up`` shards and reshards.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        *,
        scaling: float = 1.0,
        name: str = "",
        glu: bool = False,
        dtype: torch.dtype | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(base)
        self.mode = linear_mode(base)
        weight = base_weight(base)
        if weight is None:
            raise TypeError(f"{name}: base linear has no weight parameter (skip_weight_param_allocation)")
        self.tp_rank, self.tp_size = group_rank_size(tp_group_of(base))
        out_l, in_l = weight.shape
        self.lora_down = _new_param((rank, in_l), weight, dtype)
        self.lora_up = _new_param((out_l, rank), weight, dtype)
        self.down_dim = 1 if self.mode == "row" else None
        self.up_dim = 0 if self.mode == "column" else None
        self.glu = bool(glu) and self.mode == "column"
        set_tp_attributes(self.lora_down, self.down_dim, weight)
        set_tp_attributes(self.lora_up, self.up_dim, weight)
        self.rank, self.scaling, self.dropout_p = rank, float(scaling), float(dropout)
        self.adapter_name = name
        self.enabled, self.merged = True, False

    # -- factors / init
    def factors(self) -> list[Factor]:
        common = {"tp_rank": self.tp_rank, "tp_size": self.tp_size}
        return [
            Factor(
                f"{self.adapter_name}.lora_down", "lora_down", self.lora_down, "down", self.down_dim, **common
            ),
            Factor(
                f"{self.adapter_name}.lora_up", "lora_up", self.lora_up, "up", self.up_dim, self.glu, **common
            ),
        ]

    def init_from(self, lora_down: Tensor, lora_up: Tensor) -> None:
        """Make the branch equal ``lora_up · lora_down`` (whole ``(r × in)`` / ``(out × r)`` factors, or
        this rank's shards). ``lora_up`` is stored divided by ``scaling`` (exact for scaling 1)."""
        down, up = self.factors()
        with torch.no_grad():
            down.param.copy_(down.to_local(lora_down.detach(), self.adapter_name))
            up.param.copy_(up.to_local(lora_up.detach(), self.adapter_name) / self.scaling)

    # -- forward
    @property
    def fused_norm(self) -> bool:
        """The base is a Transformer Engine linear with a fused input norm: the branch reads its output."""
        return te_kind(self.base) in ("layernorm-column", "layernorm-linear")

    def _base_forward(self, x: Tensor, args, kwargs) -> tuple[Tensor, Tensor | None, Tensor, bool]:
        """``(out, bias, branch input, returns a tuple)``. A fused-norm TE base is asked for its norm output
        (``return_layernorm_output``, for this call only: TE returns it in high precision, local to this
        rank's sequence shard) so that the branch reads the *normalized* input. A base quantized by
        nvidia-modelopt cannot return it (modelopt's output quantizer expects one tensor): the norm is then
        computed here (:func:`lora.framework.te.fused_norm_input`)."""
        b = self.base
        if getattr(b, "input_norm", None) is not None:  # an SVDQuant base split off a fused-norm TE linear
            out, bias, xn = b(x, *args, return_normalized=True, **kwargs)
            return out, bias, xn, True
        if not self.fused_norm or hasattr(b, "input_quantizer"):
            r = b(x, *args, **kwargs)
            xb = fused_norm_input(b, x) if self.fused_norm else x
            return (r[0], r[1], xb, True) if isinstance(r, tuple) else (r, None, xb, False)
        saved = b.return_layernorm_output, b.return_layernorm_output_gathered
        b.return_layernorm_output, b.return_layernorm_output_gathered = True, False
        try:
            r = b(x, *args, **kwargs)
        finally:
            b.return_layernorm_output, b.return_layernorm_output_gathered = saved
        if not isinstance(r, tuple):
            raise TypeError(f"{self.adapter_name}: the fused-norm base did not return its norm output")
        if len(r) == 3:  # (out, bias, ln): TE returns the bias itself
            return r[0], r[1], r[2], True
        first, second = r
        if isinstance(first, tuple):  # Megatron's wrapper: ((out, ln), None)
            return first[0], second, first[1], True
        return first, None, second, False  # plain TE LayerNormLinear: (out, ln)

    def forward(self, x: Tensor, *args, **kwargs):
        if not self.enabled or self.merged:
            return self.base(x, *args, **kwargs)
        out, bias, xb, as_tuple = self._base_forward(x, args, kwargs)
        if self.tp_size == 1:  # no communication (also: TE linears outside a Megatron parallel state)
            xb = self._drop(xb, split=False)
            h = F.linear(xb, self.lora_down.to(xb.dtype))
            delta = F.linear(h, self.lora_up.to(xb.dtype)) * self.scaling
        elif self.mode == "column":
            gather = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
            if gather is None:
                gather = getattr(self.base, "gather_output", False)  # TE linears never gather
            delta = self._column_delta(xb, gather)
        else:
            delta = self._row_delta(xb)
        out = out + delta.to(out.dtype)
        return (out, bias) if as_tuple else out

    def _drop(self, x: Tensor, split: bool) -> Tensor:
        """Adapter dropout on the branch input, ``split`` over the TP group or replicated on it
        (:mod:`lora.adapters.dropout`)."""
        expert = bool(getattr(self.base, "is_expert", False))
        return adapter_dropout(
            x, self.dropout_p, self.training, tp_group_of(self.base), split=split, expert=expert
        )

    def _column_delta(self, x: Tensor, gather_output: bool) -> Tensor:
        from megatron.core.tensor_parallel import mappings as m

        b, g = self.base, tp_group_of(self.base)
        own_comm = explicit_expert_comm(b) or getattr(b, "disable_grad_reduce", False)
        x = self._drop(x, split=not own_comm and getattr(b, "sequence_parallel", False))  # else replicated
        A, B = self.lora_down, self.lora_up.to(x.dtype)
        if own_comm:
            h = F.linear(x, grad_allreduce(A, g).to(x.dtype))
        elif getattr(b, "sequence_parallel", False):
            h = m.gather_from_sequence_parallel_region(F.linear(x, grad_allreduce(A, g).to(x.dtype)), group=g)
        else:
            h = m.copy_to_tensor_model_parallel_region(F.linear(x, A.to(x.dtype)), group=g)
        delta = F.linear(h, B) * self.scaling
        if gather_output:
            delta = m.gather_from_tensor_model_parallel_region(delta, group=g)
        return delta

    def _row_delta(self, x: Tensor) -> Tensor:
        from megatron.core.tensor_parallel import mappings as m

        b, g = self.base, tp_group_of(self.base)
        if not getattr(b, "input_is_parallel", True):
            x = m.scatter_to_tensor_model_parallel_region(x, group=g)
        x = self._drop(x, split=True)  # this rank's input features
        h = F.linear(x, self.lora_down.to(x.dtype))  # partial sum over the input shards
        B = self.lora_up
        if explicit_expert_comm(b):
            B = grad_allreduce(B, g)  # delta stays a partial sum, reduced with the base output later
        elif getattr(b, "sequence_parallel", False):
            h = m.reduce_scatter_to_sequence_parallel_region(h, group=g)
            B = grad_allreduce(B, g)
        else:
            h = m.reduce_from_tensor_model_parallel_region(h, group=g)
        return F.linear(h, B.to(h.dtype)) * self.scaling

    # -- merge
    def delta_weight(self) -> Tensor:
        """``scaling · B·A`` in this rank's weight shard shape, float32."""
        return delta_weight(self.lora_up, self.lora_down, self.scaling)

    def merge(self) -> None:
        """``W += scaling·B·A`` (unquantized bases only); the forward then skips the branch."""
        if self.merged:
            return
        w = check_mergeable(self.base, self.adapter_name)
        with torch.no_grad():
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """``W -= scaling·B·A`` (exact up to float rounding)."""
        if not self.merged:
            return
        w = check_mergeable(self.base, self.adapter_name)
        with torch.no_grad():
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # -- repr
    def extra_repr(self) -> str:
        return f"mode={self.mode}, rank={self.rank}, scaling={self.scaling}, enabled={self.enabled}"


# --------------------------------------------------------------------------------------------- experts


@dataclass
class _Context:
    """Per-forward state of a :class:`LoraExperts`: shared factors with their gradient reductions
    attached (one per forward, so each reduction runs once) and precomputed projections per expert."""

    shared: dict = field(default_factory=dict)
    h: dict = field(default_factory=dict)


class ExpertLoraLinear(_Wrapper):
    """The branch on local expert ``index``'s ``linear_fc1`` (``proj="fc1"``, column) or ``linear_fc2``
    (``"fc2"``, row) inside :class:`LoraExperts` ``group``; owns its per-expert factors per ``layout``
    and reads the shared ones from the group. ``delta_i = scaling · (x_i·A_iᵀ)·B_iᵀ`` (``x_i·A_iᵀ``
    precomputed by the group for fc1 shared-down)."""

    def __init__(self, base: nn.Module, expert_group: LoraExperts, proj: str, index: int, layout: str, dtype):
        super().__init__(base)
        self.mode = linear_mode(base)
        if self.mode != ("column" if proj == "fc1" else "row"):
            raise TypeError(f"{expert_group.adapter_name}: expert {proj} is a {self.mode}-parallel linear")
        object.__setattr__(self, "_expert_group", expert_group)
        self.proj, self.index, self.layout = proj, index, layout
        self.etp_rank, self.etp_size = group_rank_size(tp_group_of(base))
        weight = base_weight(base)
        out_l, in_l = weight.shape
        owns_down, owns_up = LAYOUT_OWNS[layout]
        self.down_dim = 1 if self.mode == "row" else None
        self.up_dim = 0 if self.mode == "column" else None
        r = expert_group.ranks[proj]
        if owns_down:
            self.lora_down = _new_param((r, in_l), weight, dtype)
            set_tp_attributes(self.lora_down, self.down_dim, weight)
        if owns_up:
            self.lora_up = _new_param((out_l, r), weight, dtype)
            set_tp_attributes(self.lora_up, self.up_dim, weight)

    @property
    def global_index(self) -> int:
        return self._expert_group.first_global + self.index

    def factors(self, global_index: int | None = None) -> list[Factor]:
        g = self.global_index if global_index is None else global_index
        name = f"{self._expert_group.adapter_name}.experts.{g}.linear_{self.proj}"
        common = {"tp_rank": self.etp_rank, "tp_size": self.etp_size}
        out = []
        if "lora_down" in self._parameters:
            out.append(
                Factor(f"{name}.lora_down", "lora_down", self.lora_down, "down", self.down_dim, **common)
            )
        if "lora_up" in self._parameters:
            glu = self._expert_group.glu and self.proj == "fc1"
            out.append(Factor(f"{name}.lora_up", "lora_up", self.lora_up, "up", self.up_dim, glu, **common))
        return out

    def local_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` as used on this rank (own or shared parameters, no gradient reductions)."""
        expert_group = self._expert_group
        A = self._parameters.get("lora_down")
        B = self._parameters.get("lora_up")
        A = A if A is not None else getattr(expert_group, f"{self.proj}_lora_down")
        B = B if B is not None else getattr(expert_group, f"{self.proj}_lora_up")
        return A, B

    def _own_or_shared(self, ctx: _Context, attr: str, dim: int | None) -> Tensor:
        """An own factor replicated over expert-TP ranks (``dim`` None) gets its gradient summed over the
        expert-TP group (each rank sees one output shard / input slice of it); a shared one comes from
        the group's context with its reductions attached."""
        own = self._parameters.get(attr)
        if own is None:
            return ctx.shared[f"{self.proj}_{attr}"]
        return grad_allreduce(own, tp_group_of(self.base)) if dim is None else own

    def forward(self, x: Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        expert_group = self._expert_group
        if not expert_group.enabled or expert_group.merged:
            return out, bias
        ctx = expert_group.context()
        A = self._own_or_shared(ctx, "lora_down", self.down_dim)
        B = self._own_or_shared(ctx, "lora_up", self.up_dim)
        pre = ctx.h.get(self.proj)
        if pre is not None:
            h = _pad_rows(pre[self.index], x.shape[0])
        else:
            h = F.linear(expert_group.drop(x, split=self.proj == "fc2"), A.to(x.dtype))
        delta = F.linear(h, B.to(h.dtype)) * expert_group.scaling
        return out + delta.to(out.dtype), bias

    def merge_weight(self, who: str) -> Tensor:
        """The base weight that merge / unmerge change in place."""
        return check_mergeable(self.base, who)

    def delta_weight(self) -> Tensor:
        A, B = self.local_factors()
        return delta_weight(B, A, self._expert_group.scaling)

    def extra_repr(self) -> str:
        return f"proj={self.proj}, layout={self.layout}, local_expert={self.index}"


class ExpertParallelAdapter(_Wrapper):
    """Parallel adapter around local expert ``index`` (an ``MLP``): hidden → r → hidden, shared down
    (owned by the group), per-expert ``parallel_lora_up (hidden × r)``, weighted by the routing
    probability::

        out_i = expert_i(x, p) + p · scaling · (x·A_pᵀ)·B_iᵀ

    so a top-2 token receives ``p1·B_1(A_p x) + p2·B_2(A_p x)`` after the combine. With expert tensor
    parallelism the expert output is a partial sum over its ranks: each adds ``delta / etp``."""

    def __init__(self, base: nn.Module, expert_group: LoraExperts, index: int, dtype):
        super().__init__(base)
        object.__setattr__(self, "_expert_group", expert_group)
        self.index = index
        self.etp_rank, self.etp_size = group_rank_size(base.tp_group)
        w2 = base_weight(base.linear_fc2)
        self.parallel_lora_up = _new_param((w2.shape[0], expert_group.ranks["parallel"]), w2, dtype)
        set_tp_attributes(self.parallel_lora_up, None, w2)

    @property
    def global_index(self) -> int:
        return self._expert_group.first_global + self.index

    def factors(self, global_index: int | None = None) -> list[Factor]:
        g = self.global_index if global_index is None else global_index
        key = f"{self._expert_group.adapter_name}.experts.{g}.parallel.lora_up"
        return [
            Factor(
                key,
                "parallel_lora_up",
                self.parallel_lora_up,
                "up",
                None,
                False,
                self.etp_rank,
                self.etp_size,
            )
        ]

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs):
        out, bias = self.base(hidden_states, per_token_scale, **kwargs)
        expert_group = self._expert_group
        if not expert_group.enabled:
            return out, bias
        ctx = expert_group.context()
        pre = ctx.h.get("parallel")
        if pre is not None:
            h = _pad_rows(pre[self.index], hidden_states.shape[0])
        else:
            h = F.linear(
                expert_group.drop(hidden_states), ctx.shared["parallel_lora_down"].to(hidden_states.dtype)
            )
        B = grad_allreduce(self.parallel_lora_up, self.base.tp_group)
        delta = F.linear(h, B.to(h.dtype)) * expert_group.scaling
        if per_token_scale is not None:
            delta = delta * per_token_scale.unsqueeze(-1).to(delta.dtype)
        if self.etp_size > 1:
            delta = delta / self.etp_size
        return out + delta.to(out.dtype), bias


_SHARED = {  # (proj, layout) -> attribute of the factor shared by the experts
    ("fc1", SHARED_DOWN): "fc1_lora_down",
    ("fc1", SHARED_UP): "fc1_lora_up",
    ("fc2", SHARED_DOWN): "fc2_lora_down",
    ("fc2", SHARED_UP): "fc2_lora_up",
}


class ExpertGroup(_Wrapper):
    """What adapters on the experts of one MoE layer share, whatever the experts module: the factors shared
    by its experts (this module's parameters, see :class:`LoraExperts`), the per-forward context with
    their gradient reductions, initialization from given factors, merge, and the distributed checkpoint.
    Subclasses say where one expert's weights are (``_expert_weights``), put the per-expert wrappers in
    place (``_wrap_experts``), may refuse a base (``_check_base``) and define ``expert_wrappers()`` and
    ``forward``."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        *,
        scaling: float = 1.0,
        fc1_layout: str | None = SHARED_DOWN,
        fc2_layout: str | None = SHARED_UP,
        parallel: bool = False,
        name: str = "",
        dtype: torch.dtype | None = None,
        dropout: float = 0.0,
        ranks: dict[str, int] | None = None,
    ):
        super().__init__(base)
        self._check_base(base, name, parallel)
        w1, w2 = self._expert_weights(base)  # one local expert's fc1 (2F_l × hidden), fc2 (hidden × F_l)
        self.adapter_name = name
        # the one store of the branch ranks, per projection ("fc1", "fc2", "parallel"; ``rank`` where
        # ``ranks`` has none): calibration may pick different layouts, and so different ranks at an equal
        # parameter budget, for fc1 and fc2
        self.ranks = {"fc1": rank, "fc2": rank, "parallel": rank, **(ranks or {})}
        self.scaling, self.dropout_p = float(scaling), float(dropout)
        self.fc1_layout, self.fc2_layout, self.parallel = fc1_layout, fc2_layout, bool(parallel)
        self.ep_rank, self.ep_size = group_rank_size(base.ep_group)
        self.etp_rank, self.etp_size = group_rank_size(base.tp_group)
        self.num_local = base.num_local_experts
        self.first_global = self.ep_rank * self.num_local
        self.num_global = self.ep_size * self.num_local
        self.glu = bool(base.config.gated_linear_unit)
        self.enabled, self.merged = True, False
        object.__setattr__(self, "_ctx", None)
        r1, r2, rp = self.ranks["fc1"], self.ranks["fc2"], self.ranks["parallel"]
        shapes = {
            "fc1_lora_down": ((r1, w1.shape[1]), None, w1),
            "fc1_lora_up": ((w1.shape[0], r1), 0, w1),
            "fc2_lora_down": ((r2, w2.shape[1]), 1, w2),
            "fc2_lora_up": ((w2.shape[0], r2), None, w2),
            "parallel_lora_down": ((rp, w1.shape[1]), None, w1),
        }
        self._shared_dims = {}
        for attr in self._shared_attrs():
            shape, dim, like = shapes[attr]
            setattr(self, attr, _new_param(shape, like, dtype))
            set_tp_attributes(getattr(self, attr), dim, like)
            self._shared_dims[attr] = dim
        self._wrap_experts(dtype)

    # -- what the experts module decides (subclasses)
    def _check_base(self, base: nn.Module, name: str, parallel: bool) -> None:
        """Refuse an experts module these adapters cannot work on (default: accept)."""

    def _expert_weights(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _wrap_experts(self, dtype) -> None:
        """Put the per-expert wrappers in place."""
        raise NotImplementedError

    def _shared_attrs(self) -> list[str]:
        attrs = [
            _SHARED[(proj, layout)]
            for proj, layout in (("fc1", self.fc1_layout), ("fc2", self.fc2_layout))
            if (proj, layout) in _SHARED
        ]
        return attrs + (["parallel_lora_down"] if self.parallel else [])

    def shared_factors(self) -> list[Factor]:
        out = []
        for attr in self._shared_attrs():
            proj, role = attr.split("_lora_")
            dim = self._shared_dims[attr]
            glu = self.glu and attr == "fc1_lora_up"
            key = f"{self.adapter_name}.{proj if proj == 'parallel' else 'linear_' + proj}.lora_{role}"
            out.append(Factor(key, attr, getattr(self, attr), role, dim, glu, self.etp_rank, self.etp_size))
        return out

    def factors(self) -> list[Factor]:
        return self.shared_factors() + [f for w in self.expert_wrappers() for f in w.factors()]

    def expected_keys(self) -> list[str]:
        """Keys of all global experts (those of other expert-parallel ranks included)."""
        keys = [f.key for f in self.shared_factors()]
        per_local = [w for w in self.expert_wrappers() if w.index == 0]
        for g in range(self.num_global):
            keys += [f.key for w in per_local for f in w.factors(global_index=g)]
        return keys

    # -- forward
    def drop(self, x: Tensor, split: bool = False) -> Tensor:
        """Adapter dropout on an expert branch input: fc1 and parallel-adapter inputs are replicated
        over the expert-TP group, fc2 inputs ``split`` over it (:mod:`lora.adapters.dropout`)."""
        return adapter_dropout(x, self.dropout_p, self.training, self.base.tp_group, split=split, expert=True)

    def context(self) -> _Context:
        """The current forward's context, or (an expert called outside the group's forward) a fresh
        one without precomputed projections."""
        return self._ctx if self._ctx is not None else self._shared_context()

    def _shared_context(self) -> _Context:
        ctx = _Context()
        for attr in self._shared_attrs():
            etp = [self.base.tp_group] if self._shared_dims[attr] is None else []
            ctx.shared[attr] = grad_allreduce(getattr(self, attr), *etp, self.base.ep_group)
        return ctx

    # -- init from given factors
    def init_from(self, proj: str, lora_down: Tensor, lora_up: Tensor) -> None:
        """Make the branch of ``proj`` (``"fc1"``, ``"fc2"`` or ``"parallel"``) equal the given factors.

        Shared factors are 2-D, per-expert ones stacked ``(E × …)`` over the global experts (or over the
        local ones) — the shapes of :class:`svdq.solvers.shared_basis.MoELowRank` ``A`` / ``B``. Whole tensors
        or this rank's tensor-parallel shards. ``lora_up`` is stored divided by ``scaling``.
        """
        if proj == "parallel":
            if not self.parallel:
                raise ValueError(f"{self.adapter_name}: no parallel adapter")
            layout = SHARED_DOWN
        else:
            layout = {"fc1": self.fc1_layout, "fc2": self.fc2_layout}[proj]
            if layout is None:
                raise ValueError(f"{self.adapter_name}: no adapter on {proj}")
        who = f"{self.adapter_name} ({proj}, {layout})"
        given = {"down": lora_down.detach(), "up": lora_up.detach() / self.scaling}
        owners = [w for w in self.expert_wrappers() if _wrapper_proj(w) == proj]
        with torch.no_grad():
            for f in self.shared_factors():
                if f.attr.startswith(proj + "_"):
                    t = given[f.role]
                    if t.dim() != 2:
                        raise ValueError(f"{who}: shared lora_{f.role} must be 2-D, got {tuple(t.shape)}")
                    f.param.copy_(f.to_local(t, who))
            for w in owners:
                for f in w.factors():
                    t = given[f.role]
                    if t.dim() != 3:
                        raise ValueError(
                            f"{who}: per-expert lora_{f.role} must be (E × …), got {tuple(t.shape)}"
                        )
                    f.param.copy_(f.to_local(self._expert_slice(t, w.index, who), who))

    def _expert_slice(self, t: Tensor, index: int, who: str) -> Tensor:
        if t.shape[0] == self.num_global:
            return t[self.first_global + index]
        if t.shape[0] == self.num_local:
            return t[index]
        raise ValueError(
            f"{who}: {t.shape[0]} experts given, expected {self.num_global} (or {self.num_local} local)"
        )

    # -- merge
    def merge(self) -> None:
        """Fold every expert linear's branch into its weight (parallel adapters cannot be merged)."""
        if self.merged:
            return
        if self.parallel:
            raise TypeError(
                f"{self.adapter_name}: a parallel expert adapter spans the activation; it cannot be merged"
            )
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        add_deltas(self.expert_wrappers(), sign, self.adapter_name)

    # -- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import sharded_state_dict_default

        from lora.framework import compat

        metadata = compat.ensure_dp_cp_group(metadata)
        state = sharded_state_dict_default(self.base, prefix, sharded_offsets, metadata)
        groups = (self.base.tp_group, self.base.ep_group, self.expert_dp_group())
        for f in self.shared_factors():
            key = f"{prefix}{f.attr}"
            state[key] = ckpt.shared_factor_sharded_tensor(key, f, sharded_offsets, metadata, groups)
        return state

    def expert_dp_group(self):
        """The expert-data-parallel group (replica ids of expert tensors): ``SequentialMLP.dp_group``;
        ``TEGroupedMLP`` keeps it only in its linears' process-group collection."""
        dp_group = getattr(self.base, "dp_group", None)
        if dp_group is not None:
            return dp_group
        pgs = getattr(self.base.linear_fc1, "_pg_collection", None)
        if pgs is not None and getattr(pgs, "expt_dp", None) is not None:
            return pgs.expt_dp
        from megatron.core import parallel_state

        return parallel_state.get_expert_data_parallel_group()

    def extra_repr(self) -> str:
        return (
            f"ranks={self.ranks}, fc1={self.fc1_layout}, fc2={self.fc2_layout}, parallel={self.parallel}, "
            f"experts={self.first_global}..{self.first_global + self.num_local - 1} of {self.num_global}"
        )


class LoraExperts(ExpertGroup):
    """Adapters on all local experts of one ``SequentialMLP`` (see the module docstring).

    ``forward(permuted_local_hidden_states (N × hidden), tokens_per_expert (E_local,), permuted_probs
    (N,), ...) -> (out, None)`` as the ``SequentialMLP``. Shared factors (this module's parameters):
    ``fc1_lora_down (r × hidden)`` [fc1 shared-down], ``fc1_lora_up (2F_l × r)`` [fc1 shared-up, GLU],
    ``fc2_lora_down (r × F_l)`` [fc2 shared-down], ``fc2_lora_up (hidden × r)`` [fc2 shared-up],
    ``parallel_lora_down (r × hidden)`` [parallel adapter]. ``F_l`` = ``F / etp``.
    """

    #: the grouped 4-bit forward (lora.adapters.grouped_svdq): None where it applies, False never, True
    #: always (raises where it cannot)
    grouped_svdq: bool | None = None

    def _expert_weights(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        e0 = base.local_experts[0]
        return base_weight(e0.linear_fc1), base_weight(e0.linear_fc2)

    def _wrap_experts(self, dtype) -> None:
        experts = self.base.local_experts
        for i in range(self.num_local):
            expert = experts[i]
            if self.fc1_layout is not None:
                expert.linear_fc1 = ExpertLoraLinear(
                    expert.linear_fc1, self, "fc1", i, self.fc1_layout, dtype
                )
            if self.fc2_layout is not None:
                expert.linear_fc2 = ExpertLoraLinear(
                    expert.linear_fc2, self, "fc2", i, self.fc2_layout, dtype
                )
            if self.parallel:
                experts[i] = ExpertParallelAdapter(expert, self, i, dtype)

    # -- structure
    def expert_wrappers(self) -> list[nn.Module]:
        """Per-expert adapter modules of the local experts (linears and parallel adapters)."""
        out = []
        for e in self.base.local_experts:
            if isinstance(e, ExpertParallelAdapter):
                out.append(e)
                e = e.base
            out += [m for m in (e.linear_fc1, e.linear_fc2) if isinstance(m, ExpertLoraLinear)]
        return out

    def forward(self, hidden: Tensor, tokens_per_expert: Tensor, probs: Tensor, *args, **kwargs):
        if not self.enabled or self.merged:
            return self.base(hidden, tokens_per_expert, probs, *args, **kwargs)
        from lora.adapters.grouped_svdq import grouped_applies, grouped_forward  # (imports lora.base)

        if not args and not kwargs and grouped_applies(self):  # 4-bit experts: one grouped pass
            return grouped_forward(self, hidden, tokens_per_expert, probs)
        ctx = self._shared_context()
        x = hidden
        if getattr(self.base.config, "moe_apply_probs_on_input", False):
            x = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
        counts = [int(c) for c in tokens_per_expert.tolist()] if self.num_local > 1 else [hidden.shape[0]]
        if self.fc1_layout == SHARED_DOWN:  # ONE GEMM over all local tokens, split per expert
            h = F.linear(self.drop(x), ctx.shared["fc1_lora_down"].to(x.dtype))
            ctx.h["fc1"] = torch.split(h, counts)
        if self.parallel:
            h = F.linear(self.drop(x), ctx.shared["parallel_lora_down"].to(x.dtype))
            ctx.h["parallel"] = torch.split(h, counts)
        object.__setattr__(self, "_ctx", ctx)
        try:
            return self.base(hidden, tokens_per_expert, probs, *args, **kwargs)
        finally:
            object.__setattr__(self, "_ctx", None)


def _wrapper_proj(w: nn.Module) -> str:
    return "parallel" if isinstance(w, ExpertParallelAdapter) else w.proj
