"""Adapters on Transformer Engine grouped expert linears and ``TEGroupedMLP`` (svdq/DESIGN.md §11.2, §11.5).

A TE grouped linear runs one projection of all local experts in one call: ``forward(x (T × in_l),
m_splits) -> (out (T × out_l), bias)``; the rows of ``x`` are grouped by expert (``m_splits[i]`` rows for
local expert ``i``) and expert ``i``'s weight is the parameter ``weight{i} (out_l × in_l)``.
:class:`GroupedLoraLinear` adds to the rows of expert ``i`` the branch ``scaling · (x_i·A_iᵀ)·B_iᵀ``:

* ``shared-down`` (``A_i = A``): ONE GEMM ``h = x·Aᵀ`` over all local tokens, split by ``m_splits``, then
  ``h_i·B_iᵀ`` per expert;
* ``shared-up`` (``B_i = B``): ``h_i = x_i·A_iᵀ`` per expert, concatenated, then ONE GEMM ``h·Bᵀ``;
* ``per-expert``: both per expert.

Per-expert factors are parameters of the grouped wrapper, ``lora_down{i}`` / ``lora_up{i}`` (as TE's
``weight{i}``); shared factors belong to the :class:`LoraGroupedExperts` around the ``TEGroupedMLP``, or,
for a plain ``te.pytorch.GroupedLinear`` adapted on its own, to the grouped wrapper (``lora_down`` /
``lora_up``; local experts are then experts ``0..N-1``).

**Same adapters as on a SequentialMLP.** :class:`LoraGroupedExperts` is
:class:`lora.adapters.layers.LoraExperts` for grouped experts: same shared factors, gradient reductions
(replicated factors summed over the expert tensor-parallel group, shared ones over the expert-parallel group,
inside autograd), initialization (``init_from``), merge, adapter-file keys
(``<experts>.experts.<g>.linear_fc1.lora_up`` with the global expert index ``g``) and distributed-checkpoint
keys: for each local expert its factor is emitted as ``….experts.linear_fc1.lora_up`` with the expert axis
``(…, g, E_global)`` and the expert-data-parallel replica id, which ``TEGroupedMLP`` adds for its own
weights but not for foreign parameters. A checkpoint of a TEGroupedMLP model therefore loads into a
SequentialMLP model of the same shape, and back.

Under FP8, ``TEGroupedMLP`` pads every expert's rows before the grouped linears (``m_splits`` counts the
padding); padded rows are zero, so their branch is zero and is removed with the padding. Adapters stay in
their own dtype: the branch is plain ``F.linear``, outside TE's FP8 autocast. The parallel expert adapter
lives on :class:`LoraGroupedExperts` (its per-expert ``parallel_lora_up{i}`` under the SequentialMLP key
``….experts.parallel_lora_up``).
Adapter dropout: as on SequentialMLP (:mod:`lora.adapters.dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.adapters.layers import LAYOUT_OWNS, ExpertGroup, Factor, _Context, _new_param, _Wrapper, add_deltas
from lora.fold import delta_weight
from lora.framework.te import is_grouped, te_mode, tp_group_of
from lora.framework.tp import grad_allreduce, group_rank_size, set_tp_attributes
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP

ROLES = ("down", "up")


def _splits(m_splits) -> list[int]:
    return [int(m) for m in (m_splits.tolist() if isinstance(m_splits, Tensor) else m_splits)]


def grouped_rows_linear(x: Tensor, weights: Tensor, splits: list[int]) -> Tensor:
    """``y (T × o)`` with ``y[rows of group i] = x[rows of group i] · weights[i]ᵀ``, for ``x (T × k)`` whose
    rows come in consecutive groups of sizes ``splits`` (``sum(splits) = T``) and ``weights (N × o × k)``.

    One batched GEMM instead of ``N`` small ones: the rows are scattered into a zero-padded
    ``(N × max(splits) × k)`` tensor, multiplied by ``weightsᵀ`` with ``torch.bmm`` and gathered back
    (autograd through both). The padding costs ``N·max(splits)/T`` times the GEMM work, cheap for the
    thin adapter factors and much cheaper than a kernel launch per expert when experts are many.
    """
    n, t = len(splits), x.shape[0]
    if sum(splits) != t or weights.shape[0] != n:
        raise ValueError(f"{t} rows split as {splits} for {weights.shape[0]} weight matrices")
    longest = max(splits, default=0)
    if longest == 0:
        return x.new_zeros(t, weights.shape[1])
    counts = torch.tensor(splits, device=x.device)
    group = torch.repeat_interleave(torch.arange(n, device=x.device), counts, output_size=t)
    position = torch.arange(t, device=x.device) - (torch.cumsum(counts, 0) - counts)[group]
    padded = x.new_zeros(n, longest, x.shape[1]).index_put((group, position), x)
    return torch.bmm(padded, weights.transpose(1, 2))[group, position]


# Measured on an H200 (bench/results/te_moe_gpu_loop.json, te_moe_gpu.json; rank 32, 8192 tokens, top-2): at
# 8 experts a GEMM per expert is faster (shared-down step 11.9 ms vs 14.6 ms batched: the padded copy of the
# wide fc1 output costs more than 8 launches), at 64 experts the batched GEMM (15.6 ms vs 25.9 ms).
BATCHED_MIN_EXPERTS = 16


def per_expert_linear(x: Tensor, weights: list[Tensor], splits: list[int]) -> Tensor:
    """``y[rows of group i] = x[rows of group i] · weights[i]ᵀ`` (rows in consecutive groups of sizes
    ``splits``): one GEMM per group for few groups, :func:`grouped_rows_linear` (one batched GEMM) from
    :data:`BATCHED_MIN_EXPERTS` groups on."""
    if len(weights) >= BATCHED_MIN_EXPERTS:
        return grouped_rows_linear(x, torch.stack(weights), splits)
    if sum(splits) != x.shape[0] or len(weights) != len(splits):
        raise ValueError(f"{x.shape[0]} rows split as {splits} for {len(weights)} weight matrices")
    return torch.cat([F.linear(xi, w) for xi, w in zip(x.split(splits), weights, strict=True)])


@dataclass(eq=False)
class ExpertView:
    """Local expert ``index`` of a :class:`GroupedLoraLinear`, with the interface of
    :class:`lora.adapters.layers.ExpertLoraLinear` that the expert group uses (factors, init, merge, fold)."""

    linear: GroupedLoraLinear
    index: int

    @property
    def proj(self) -> str:
        return self.linear.proj

    @property
    def layout(self) -> str:
        return self.linear.layout

    @property
    def global_index(self) -> int:
        return self.linear.owner.first_global + self.index

    def factors(self, global_index: int | None = None) -> list[Factor]:
        return self.linear.expert_factors(self.index, global_index)

    def local_factors(self) -> tuple[Tensor, Tensor]:
        return self.linear.local_factors(self.index)

    def delta_weight(self) -> Tensor:
        A, B = self.local_factors()
        return delta_weight(B, A, self.linear.owner.scaling)

    def merge_weight(self, who: str) -> Tensor:
        """Expert ``index``'s base weight ``weight{index}`` (unquantized floating point only)."""
        base = self.linear.base
        w = getattr(base, f"weight{self.index}")
        if (
            not w.dtype.is_floating_point
            or hasattr(base, "weight_quantizer")
            or getattr(base, "is_quantized_base", False)
        ):
            raise TypeError(f"{who}: merge/unmerge needs an unquantized floating-point base weight")
        return w


class GroupedLoraLinear(_Wrapper):
    """The branch on a TE grouped linear (see the module docstring).

    ``forward(x, m_splits, *args, **kwargs)`` returns what the base returns (``(out, bias)`` for Megatron's
    wrappers, ``out`` for a plain TE ``GroupedLinear``) with the branch added to ``out``. Per-expert
    factors: ``lora_down{i} (r × in_l)`` / ``lora_up{i} (out_l × r)``. Inside a :class:`LoraGroupedExperts`
    (``expert_group``, ``proj`` = ``"fc1"`` / ``"fc2"``) shared factors and the scaling / enabled state
    come from the group; on its own (``expert_group=None``) this module is the adapter (``adapter_name``,
    ``scaling``, ``enabled``, ``merge()``, …) and owns the shared factor.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        *,
        layout: str = SHARED_DOWN,
        expert_group: LoraGroupedExperts | None = None,
        proj: str | None = None,
        scaling: float = 1.0,
        name: str = "",
        glu: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(base)
        if not is_grouped(base):
            raise TypeError(
                f"{name or proj}: {type(base).__name__} is not a Transformer Engine grouped linear"
            )
        if layout not in LAYOUT_OWNS:
            raise ValueError(f"{name or proj}: layout must be one of {sorted(LAYOUT_OWNS)}, got {layout!r}")
        object.__setattr__(self, "_expert_group", expert_group)
        self.mode = te_mode(base)
        self.proj, self.layout, self.rank = proj, layout, rank
        self.num_local = int(base.num_gemms)
        self.etp_rank, self.etp_size = group_rank_size(tp_group_of(base))
        w0 = base.weight0
        out_l, in_l = w0.shape
        self.down_dim = 1 if self.mode == "row" else None
        self.up_dim = 0 if self.mode == "column" else None
        self.glu = bool(glu) and self.mode == "column"
        owns_down, owns_up = LAYOUT_OWNS[layout]
        for i in range(self.num_local):
            if owns_down:
                setattr(self, f"lora_down{i}", _new_param((rank, in_l), w0, dtype))
                set_tp_attributes(getattr(self, f"lora_down{i}"), self.down_dim, w0)
            if owns_up:
                setattr(self, f"lora_up{i}", _new_param((out_l, rank), w0, dtype))
                set_tp_attributes(getattr(self, f"lora_up{i}"), self.up_dim, w0)
        if expert_group is None:  # adapted on its own: this module is the adapter
            if self.etp_size > 1:
                raise ValueError(f"{name}: a grouped linear adapted on its own needs tensor parallel size 1")
            self.adapter_name, self.scaling = name, float(scaling)
            self.enabled, self.merged = True, False
            self.first_global, self.num_global = 0, self.num_local
            if not owns_down:
                self.lora_down = _new_param((rank, in_l), w0, dtype)
            if not owns_up:
                self.lora_up = _new_param((out_l, rank), w0, dtype)

    # -- structure
    @property
    def owner(self):
        """The module holding the adapter state: the expert group, or this module on its own."""
        return self._expert_group if self._expert_group is not None else self

    def expert_views(self) -> list[ExpertView]:
        return [ExpertView(self, i) for i in range(self.num_local)]

    def _key(self, global_index: int, role: str) -> str:
        if self._expert_group is not None:
            return f"{self._expert_group.adapter_name}.experts.{global_index}.linear_{self.proj}.lora_{role}"
        return f"{self.adapter_name}.experts.{global_index}.lora_{role}"

    def expert_factors(self, index: int, global_index: int | None = None) -> list[Factor]:
        """The factors local expert ``index`` owns (keys with its global index, or ``global_index``)."""
        g = self.owner.first_global + index if global_index is None else global_index
        out = []
        for role in ROLES:
            attr = f"lora_{role}{index}"
            if attr in self._parameters:
                dim = self.down_dim if role == "down" else self.up_dim
                glu = self.glu and role == "up"
                out.append(
                    Factor(
                        self._key(g, role),
                        attr,
                        self._parameters[attr],
                        role,
                        dim,
                        glu,
                        self.etp_rank,
                        self.etp_size,
                    )
                )
        return out

    def shared_factors(self) -> list[Factor]:
        """On its own: the shared factor owned here (inside a group the group owns it)."""
        if self._expert_group is not None:
            return []
        out = []
        for role in ROLES:
            p = self._parameters.get(f"lora_{role}")
            if p is not None:
                out.append(Factor(f"{self.adapter_name}.lora_{role}", f"lora_{role}", p, role))
        return out

    def factors(self) -> list[Factor]:
        return self.shared_factors() + [f for i in range(self.num_local) for f in self.expert_factors(i)]

    def local_factors(self, index: int) -> tuple[Tensor, Tensor]:
        """``(A_i, B_i)`` of local expert ``index`` (own or shared parameters, no gradient reductions)."""
        return self._factor(None, "down", index), self._factor(None, "up", index)

    def _factor(self, ctx: _Context | None, role: str, index: int) -> Tensor:
        own = self._parameters.get(f"lora_{role}{index}")
        if own is not None:
            dim = self.down_dim if role == "down" else self.up_dim
            if ctx is None or dim is not None:
                return own
            return grad_allreduce(own, tp_group_of(self.base))  # replicated over expert-TP ranks
        if self._expert_group is None:
            return self._parameters[f"lora_{role}"]
        attr = f"{self.proj}_lora_{role}"
        return ctx.shared[attr] if ctx is not None else getattr(self._expert_group, attr)

    # -- adapter API on its own (inside a group the group provides it; see also _Wrapper)
    def init_from(self, lora_down: Tensor, lora_up: Tensor) -> None:
        """On its own: shared factors 2-D, per-expert ones stacked ``(N × …)``; ``lora_up`` divided by
        ``scaling``."""
        given = {"down": lora_down.detach(), "up": lora_up.detach() / self.scaling}
        with torch.no_grad():
            for f in self.shared_factors():
                f.param.copy_(f.to_local(given[f.role], self.adapter_name))
            for i in range(self.num_local):
                for f in self.expert_factors(i):
                    f.param.copy_(f.to_local(given[f.role][i], self.adapter_name))

    def merge(self) -> None:
        if not self.merged:
            self._add_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False

    def _add_delta(self, sign: float) -> None:
        add_deltas(self.expert_views(), sign, self.adapter_name)

    # -- forward
    def forward(self, x: Tensor, m_splits, *args, **kwargs):
        r = self.base(x, m_splits, *args, **kwargs)
        out, bias, as_tuple = (r[0], r[1], True) if isinstance(r, tuple) else (r, None, False)
        owner = self.owner
        if owner.enabled and not owner.merged:
            ctx = owner.context() if self._expert_group is not None else None
            delta = self.branch(x, _splits(m_splits), ctx)
            out = out + delta.view(out.shape).to(out.dtype)
        return (out, bias) if as_tuple else out

    def branch(self, x: Tensor, splits: list[int], ctx: _Context | None = None) -> Tensor:
        """``(T × out_l)``: the rows of expert ``i`` get ``scaling · (x_i·A_iᵀ)·B_iᵀ`` (see the module
        docstring for the GEMMs per layout; per-expert products by :func:`per_expert_linear`)."""
        x2 = x.reshape(-1, x.shape[-1])
        if self._expert_group is not None:
            x2 = self._expert_group.drop(x2, split=self.mode == "row")
        dt = x2.dtype

        def factors(role: str) -> list[Tensor]:  # per-expert factors
            return [self._factor(ctx, role, i).to(dt) for i in range(self.num_local)]

        if self.layout == SHARED_DOWN:
            h = F.linear(x2, self._factor(ctx, "down", 0).to(dt))
            delta = per_expert_linear(h, factors("up"), splits)
        elif self.layout == SHARED_UP:
            h = per_expert_linear(x2, factors("down"), splits)
            delta = F.linear(h, self._factor(ctx, "up", 0).to(dt))
        else:
            delta = per_expert_linear(per_expert_linear(x2, factors("down"), splits), factors("up"), splits)
        return delta * self.owner.scaling

    # -- checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base's sharded state plus, per local expert, its factors under the SequentialMLP expert keys
        (see the module docstring): TP axis as the base weight, expert axis ``(…, g, E_global)``, replica
        id ``(pp, tp, expert-DP rank)``; a GLU ``lora_up`` through Megatron's swiglu factory."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from lora.framework import compat

        if self._expert_group is None:
            raise NotImplementedError(
                f"{self.adapter_name}: distributed checkpoints of a grouped linear adapted on its own; "
                "use save_adapters"
            )
        metadata = compat.ensure_dp_cp_group(metadata)
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = metadata.get("singleton_local_shards", False)
        expert_group = self._expert_group
        edp_rank = group_rank_size(expert_group.expert_dp_group())[0]
        for i in range(self.num_local):
            g = expert_group.first_global + i
            if singleton:
                offsets, expert_prefix = tuple(sharded_offsets), f"{g}.{prefix}"
            else:
                offsets = (*sharded_offsets, (len(sharded_offsets), g, expert_group.num_global))
                expert_prefix = prefix
            for f in self.expert_factors(i):
                name = f"{i}.lora_{f.role}"
                sub = make_sharded_tensors_for_checkpoint(
                    {name: f.param},
                    "",
                    {name: f.dim} if f.dim is not None else {},
                    offsets,
                    tp_group=tp_group_of(self.base),
                    dp_cp_group=metadata["dp_cp_group"],
                )
                replace_prefix_for_sharding(sub, f"{i}.", expert_prefix)
                sh = sub[name]
                sh.replica_id = (*sh.replica_id[:2], edp_rank)
                if f.glu:
                    sh = apply_swiglu_sharded_factory(sh, offsets, singleton)
                state[f"{prefix}{f.attr}"] = sh
        return state

    def extra_repr(self) -> str:
        return f"proj={self.proj}, layout={self.layout}, rank={self.rank}, experts={self.num_local}"


class ParallelView:
    """Local expert ``index``'s parallel adapter inside a :class:`LoraGroupedExperts`: its
    ``parallel_lora_up{index} (hidden × r)``, with the interface of
    :class:`lora.adapters.layers.ExpertParallelAdapter` that the expert group uses."""

    proj = "parallel"

    def __init__(self, expert_group: LoraGroupedExperts, index: int):
        self.expert_group, self.index = expert_group, index

    @property
    def global_index(self) -> int:
        return self.expert_group.first_global + self.index

    def factors(self, global_index: int | None = None) -> list[Factor]:
        g = self.global_index if global_index is None else global_index
        key = f"{self.expert_group.adapter_name}.experts.{g}.parallel.lora_up"
        param = self.expert_group._parameters[f"parallel_lora_up{self.index}"]
        return [
            Factor(key, f"parallel_lora_up{self.index}", param, "up", None, False, *self.expert_group.etp)
        ]


class LoraGroupedExperts(ExpertGroup):
    """Adapters on all local experts of one ``TEGroupedMLP``: :class:`lora.adapters.layers.LoraExperts` for
    grouped experts (see the module docstring). ``forward`` as the ``TEGroupedMLP``; its ``linear_fc1`` /
    ``linear_fc2`` become :class:`GroupedLoraLinear` wrappers holding the per-expert factors; shared
    factors (same names and shapes as on ``LoraExperts``) are this module's parameters, and so are the
    parallel adapter's per-expert ``parallel_lora_up{i} (hidden × r)``::

        out += p · scaling · (x·A_pᵀ)·B_iᵀ      (rows of expert i; one GEMM for x·A_pᵀ; ÷ etp)

    with ``x`` the experts' input and ``p`` the routing probability (as :class:`ExpertParallelAdapter`)."""

    def _check_base(self, base: nn.Module, name: str, parallel: bool) -> None:
        if getattr(base, "_with_fused_impl", False):
            raise ValueError(
                f"{name}: TEGroupedMLP runs TE's fused op path (use_transformer_engine_op_fuser=True), "
                "which bypasses its grouped linears; set use_transformer_engine_op_fuser=False"
            )

    def _expert_weights(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        return base.linear_fc1.weight0, base.linear_fc2.weight0

    def _wrap_experts(self, dtype) -> None:
        for proj, layout in (("fc1", self.fc1_layout), ("fc2", self.fc2_layout)):
            if layout is not None:
                lin = getattr(self.base, f"linear_{proj}")
                wrapper = GroupedLoraLinear(
                    lin,
                    self.ranks[proj],
                    layout=layout,
                    expert_group=self,
                    proj=proj,
                    glu=self.glu,
                    dtype=dtype,
                )
                setattr(self.base, f"linear_{proj}", wrapper)
        if self.parallel:
            w2 = self._expert_weights(self.base)[1]
            for i in range(self.num_local):
                setattr(
                    self, f"parallel_lora_up{i}", _new_param((w2.shape[0], self.ranks["parallel"]), w2, dtype)
                )
                set_tp_attributes(getattr(self, f"parallel_lora_up{i}"), None, w2)

    @property
    def etp(self) -> tuple[int, int]:
        return self.etp_rank, self.etp_size

    def expert_wrappers(self) -> list:
        """Per-expert views: the parallel adapter (if any), then the grouped fc1 / fc2, per local expert."""
        linears = [getattr(self.base, f"linear_{p}") for p in ("fc1", "fc2")]
        linears = [m for m in linears if isinstance(m, GroupedLoraLinear)]
        out = []
        for i in range(self.num_local):
            out += [ParallelView(self, i)] if self.parallel else []
            out += [ExpertView(m, i) for m in linears]
        return out

    def forward(self, hidden: Tensor, tokens_per_expert: Tensor, probs: Tensor, *args, **kwargs):
        if not self.enabled or self.merged:
            return self.base(hidden, tokens_per_expert, probs, *args, **kwargs)
        ctx = self._shared_context()
        object.__setattr__(self, "_ctx", ctx)
        try:
            out, bias = self.base(hidden, tokens_per_expert, probs, *args, **kwargs)
        finally:
            object.__setattr__(self, "_ctx", None)
        if self.parallel:
            out = out + self._parallel_delta(ctx, hidden, _splits(tokens_per_expert), probs).to(out.dtype)
        return out, bias

    def _parallel_delta(self, ctx: _Context, hidden: Tensor, splits: list[int], probs: Tensor) -> Tensor:
        x, p = hidden, probs
        if getattr(self.base.config, "moe_apply_probs_on_input", False):  # as TEGroupedMLP does
            x, p = (probs.unsqueeze(-1) * hidden).to(hidden.dtype), torch.ones_like(probs)
        h = F.linear(self.drop(x), ctx.shared["parallel_lora_down"].to(x.dtype))
        ups = [
            grad_allreduce(self._parameters[f"parallel_lora_up{i}"], self.base.tp_group)
            for i in range(self.num_local)
        ]
        delta = per_expert_linear(h, [B.to(h.dtype) for B in ups], splits) * self.scaling
        delta = delta * p.unsqueeze(-1).to(delta.dtype)
        return delta / self.etp_size if self.etp_size > 1 else delta

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The expert group's state, plus each local expert's ``parallel_lora_up`` under the SequentialMLP
        key (``….experts.parallel_lora_up``) with the expert axis and expert-DP replica id."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        from lora.framework import compat

        metadata = compat.ensure_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.parallel:
            return state
        if metadata.get("singleton_local_shards", False):
            raise NotImplementedError(f"{self.adapter_name}: singleton_local_shards with a parallel adapter")
        edp_rank = group_rank_size(self.expert_dp_group())[0]
        for i in range(self.num_local):
            offsets = (*sharded_offsets, (len(sharded_offsets), self.first_global + i, self.num_global))
            name = f"{prefix}experts.parallel_lora_up"
            sub = make_sharded_tensors_for_checkpoint(
                {name: self._parameters[f"parallel_lora_up{i}"]},
                "",
                {},
                offsets,
                tp_group=self.base.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            sh = sub[name]
            sh.replica_id = (*sh.replica_id[:2], edp_rank)
            state[f"{prefix}parallel_lora_up{i}"] = sh
        return state
