"""SVDQuant on Megatron linears: the quantized residual becomes the frozen base, the branch the adapter.

nvidia-modelopt's SVDQuant works on ``nn.Linear`` only (Megatron linears return ``(out, bias)``). Here a
``LoraLinear`` (or an expert's ``ExpertLoraLinear``) keeps its Megatron linear, whose weight is replaced
by the quantized residual, wrapped in :class:`SVDQBase` which quantizes the input::

    out = Q_a(x / s) · Q_w(R)ᵀ        (the Megatron linear's own forward: TP communication unchanged)
    y   = out + (x · Aᵀ) · Bᵀ          (the adapter, reading the raw input)

**Tensor parallelism.** The decomposition is done on the *full* weight and full-feature input
statistics, on every rank alike (:func:`lora.framework.tp.gather_full_weight`, the input transform
:func:`lora.framework.full_input.full_input` for :func:`svdq.stats.collect_input_stats`), and each
rank keeps its shard: residual rows (column-parallel) or columns (row-parallel), smoothing slice, and the
adapter factors sharded by ``init_from``. So the branch of a sharded weight is the branch of the full
weight, and TP=2 reproduces TP=1. The dynamic per-tensor activation range is all-reduced (MAX) over the
tensor-parallel group so that activation quantization does not depend on the TP size either.

**Activation range.** ``input_amax`` (float32 scalar buffer, ``None`` = dynamic) fixes the per-tensor
range of ``Q_a`` (NVFP4 global scale / FP8 per-tensor scale) to a calibrated ``max|x/s|`` — the whole
tensor's, identical on every tensor-parallel rank (:func:`calibrate_input_ranges`); no per-call reduction
is needed then. Values beyond it clip as the format does. Block / group scales stay per call.

**Experts.** The same holds for expert linears under expert tensor parallelism (fc1 column-parallel with
``[gate_k; up_k]`` shards, fc2 row-parallel): :func:`lora.install.install_experts` shards a full-weight
residual.

Storage (shared with ``svdq.SVDQLinear``: :mod:`svdq.residual` lists the tensors): ``"fake"`` keeps
``Q_w(R)`` dequantized as the (frozen) Megatron weight; ``"packed"`` keeps the 4-bit codes and scales and
dequantizes them for each forward (the transient copy is freed after backward).
Distributed checkpoints of quantized bases are not written by ``sharded_state_dict`` (it raises): export
them with the checkpoint format instead; adapter-only checkpoints (``save_adapters``) work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora.adapters.layers import linear_mode
from lora.framework.te import tp_group_of
from lora.framework.tp import group_rank_size
from svdq.formats import PackedTensor, QuantFormat, parse_format, trusted_inputs
from svdq.residual import (
    ResidualStorage,
    StaticActRange,
    check_storage,
    quantize_activation,
    static_range_supported,
)
from svdq.stats import record_input_amax


class SVDQBase(StaticActRange, ResidualStorage, nn.Module):
    """A Megatron Column/RowParallelLinear whose weight is an SVDQuant residual (see the module docstring).

    ``inner``: the Megatron linear (its weight is replaced). ``residual``: this rank's packed ``Q_w(R)``
    shard ``(out_l × in_l)``. ``smooth``: ``s`` for this rank's input features ``(in_l,)``.
    ``input_amax``: static activation range (``None``: dynamic; see :meth:`set_input_amax`).
    ``input_norm``: the norm split off a TE linear with a fused input norm (:mod:`lora.framework.te_convert`),
    applied first. ``forward(x, *args, **kwargs) -> (out, bias)`` like the Megatron linear.
    """

    is_quantized_base = True

    def __init__(
        self,
        inner: nn.Module,
        residual: PackedTensor,
        smooth: Tensor,
        act_format,
        storage="packed",
        input_norm: nn.Module | None = None,
    ):
        super().__init__()
        check_storage(storage)
        self.input_norm = input_norm
        self.parallel_mode = linear_mode(inner)
        weight = inner.weight
        if tuple(residual.shape) != tuple(weight.shape):
            raise ValueError(f"residual shard {tuple(residual.shape)} != weight shard {tuple(weight.shape)}")
        self.inner = inner
        self.act_format: QuantFormat = parse_format(act_format)
        self.register_buffer("smooth", smooth.detach().float().to(weight.device).clone())
        self.register_buffer("input_amax", None)  # None: dynamic activation range
        dtype, device = weight.dtype, weight.device
        self._dtype = dtype
        self._init_residual(residual, storage, dtype, device)  # fake: inner.weight; packed: residual_<key>
        if storage == "packed":  # the weight is dequantized for each forward (_forward_normalized)
            inner.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        # Megatron's DDP flag (False on expert weights): adapters built on this base copy it
        self._weight_attrs = {k: getattr(weight, k) for k in ("allreduce",) if hasattr(weight, k)}

    def _keep_dequantized(self, weight: Tensor) -> None:
        self.inner.weight = nn.Parameter(weight, requires_grad=False)

    def _dequantized(self) -> Tensor:
        return self.inner.weight

    @property
    def residual_dtype(self) -> torch.dtype:
        """The base dtype (the Megatron linear's weight dtype at construction)."""
        return self._dtype

    def quantize_input(self, x: Tensor) -> Tensor:
        """``Q_a(x / s)``. Per-tensor range (nvfp4, fp8): ``input_amax`` if set, else that of the whole
        input (all-reduced MAX over the tensor-parallel group). Per-token fp8 (``fp8-channel``) on a
        row-parallel linear: each token's range over all its feature shards (all-reduced MAX)."""
        ga = self.input_amax
        tp_group = tp_group_of(self.inner)
        if ga is None and group_rank_size(tp_group)[1] > 1:
            xs = StaticActRange.smoothed_input(self, x)  # x is already normalized here
            if static_range_supported(self.act_format):  # (an expert may get no token: amax 0)
                ga = xs.detach().abs().amax().float() if xs.numel() else xs.new_zeros((), dtype=torch.float32)
            elif self.act_format.name == "fp8" and self.parallel_mode == "row":
                ga = xs.detach().abs().amax(dim=-1).float()
            if ga is not None:
                dist.all_reduce(ga, op=dist.ReduceOp.MAX, group=tp_group)
                ga = torch.where(ga > 0, ga, torch.ones_like(ga))
        with trusted_inputs():
            return quantize_activation(x, self.smooth, self.act_format, ga)

    def smoothed_input(self, x: Tensor) -> Tensor:
        """``norm(x) / s`` for this module's input ``x`` (``x / s`` without ``input_norm``)."""
        return StaticActRange.smoothed_input(self, self.input_norm(x) if self.input_norm is not None else x)

    def forward(self, x: Tensor, *args, return_normalized: bool = False, **kwargs):
        """``(out, bias)``; with ``return_normalized`` also the input the GEMM path saw (``input_norm(x)``,
        or ``x``), for an adapter whose branch must read it."""
        xn = self.input_norm(x) if self.input_norm is not None else x
        out = self._forward_normalized(xn, *args, **kwargs)
        return (*out, xn) if return_normalized else out

    def _forward_normalized(self, x: Tensor, *args, **kwargs):
        xq = self.quantize_input(x)
        if self.storage == "fake":
            return self.inner(xq, *args, **kwargs)
        placeholder = self.inner.weight
        self.inner.weight = nn.Parameter(self.residual_weight(), requires_grad=False)
        try:
            return self.inner(xq, *args, **kwargs)
        finally:
            self.inner.weight = placeholder

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "inner" or "inner" not in modules:
                raise
            return getattr(modules["inner"], name)

    @property
    def weight(self) -> Tensor:  # what adapters see as "the base weight"
        return self.residual_weight()

    @property
    def weight_like(self) -> Tensor:
        """A zero-memory stand-in for the weight shard ``(out_l × in_l)``: its dtype, device and Megatron
        attributes (``allreduce``), without dequantizing (what adapters are built on)."""
        like = torch.empty((), dtype=self._dtype, device=self.smooth.device).expand(self._shape)
        for key, value in self._weight_attrs.items():
            setattr(like, key, value)
        return like

    def sharded_state_dict(self, *args, **kwargs):
        raise NotImplementedError(
            "quantized SVDQuant bases are exported with the svdq checkpoint format, not dist_checkpointing; "
            "save the adapters with lora.save_adapters"
        )

    def extra_repr(self) -> str:
        return (
            f"{self.parallel_mode}, shape={self._shape}, weight={self.weight_format}, act={self.act_format}, "
            f"storage={self.storage}, act_range={self.act_range}"
        )


# ----------------------------------------------------------------------------------- activation ranges


def calibrate_input_ranges(
    model: nn.Module, forward_loop, bases: dict[str, SVDQBase], extra_group=None, margin: float = 1.0
) -> dict[str, float | None]:
    """Static activation ranges: run ``forward_loop(model)`` once (the bases as they are, normally
    dynamic), record each base's ``max|x/s|``, all-reduce it (MAX) over the base's tensor-parallel group
    and fix ``margin · max|x/s|`` with :meth:`SVDQBase.set_input_amax` (``margin ≥ 1``: headroom for inputs
    above the calibrated maximum, ``SVDQConfig.act_range_margin``, svdq/DESIGN.md §20). Returns
    ``{name: amax}``, the range each base now uses (margin included); ``None`` (range left
    dynamic) for bases whose format has no per-tensor range or that saw no token (e.g. an expert that no
    calibration token was routed to). Every rank must call it with the same ``bases`` in the same order.
    ``extra_group``: a further group to all-reduce (MAX) over, e.g. data parallelism (ranks fed other data).
    """
    if not margin >= 1.0:
        raise ValueError(f"calibrate_input_ranges: margin must be ≥ 1, got {margin}")
    static = {n: b for n, b in bases.items() if static_range_supported(b.act_format)}
    local = record_input_amax(model, static, forward_loop, check_finite=False)  # NaN / Inf → inf
    out: dict[str, float | None] = dict.fromkeys(bases)
    bad = []
    for name, base in static.items():
        a = local[name]
        a = torch.zeros((), device=base.smooth.device) if a is None else a.clone()
        if group_rank_size(tp_group_of(base.inner))[1] > 1:
            dist.all_reduce(a, op=dist.ReduceOp.MAX, group=tp_group_of(base.inner))
        if extra_group is not None and dist.get_world_size(extra_group) > 1:
            dist.all_reduce(a, op=dist.ReduceOp.MAX, group=extra_group)
        value = float(a)
        if value == float("inf"):  # the same on every rank of the group: all of them raise below
            bad.append(name)
            continue
        base.set_input_amax(a * margin if value > 0 else None)
        out[name] = float(base.input_amax) if value > 0 else None
    if bad:  # after all reductions, so that no rank is left waiting in one
        raise ValueError(f"{bad[0]}: calibration activations contain NaN or Inf (activation-range pass)")
    return out
