"""SVDQuant on Megatron linears: the quantized residual becomes the frozen base, the branch the adapter.

nvidia-modelopt's SVDQuant works on ``nn.Linear`` only (Megatron linears return ``(out, bias)``). Here a
``LoraLinear`` (or an expert's ``ExpertLoraLinear``) keeps its Megatron linear, whose weight is replaced
by the quantized residual, wrapped in :class:`SVDQBase` which quantizes the input::

    out = Q_a(x / s) · Q_w(R)ᵀ        (the Megatron linear's own forward: TP communication unchanged)
    y   = out + (x · Aᵀ) · Bᵀ          (the adapter, reading the raw input)

**Tensor parallelism.** The decomposition is done on the *full* weight and full-feature input
statistics, on every rank alike (:func:`gather_full_weight`, :func:`collect_megatron_stats`), and each
rank keeps its shard: residual rows (column-parallel) or columns (row-parallel), smoothing slice, and the
adapter factors sharded by ``init_from``. So the branch of a sharded weight is the branch of the full
weight, and TP=2 reproduces TP=1. The dynamic per-tensor activation range is all-reduced (MAX) over the
tensor-parallel group so that activation quantization does not depend on the TP size either.

**Activation range.** ``input_amax`` (float32 scalar buffer, ``None`` = dynamic) fixes the per-tensor
range of ``Q_a`` (NVFP4 global scale / FP8 per-tensor scale) to a calibrated ``max|x/s|`` — the whole
tensor's, identical on every tensor-parallel rank (:func:`calibrate_input_ranges`); no per-call reduction
is needed then. Values beyond it clip as the format does. Block / group scales stay per call.

**Experts.** The same holds for expert linears under expert tensor parallelism (fc1 column-parallel with
``[gate_k; up_k]`` shards, fc2 row-parallel): :func:`install_expert_base` shards a full-weight residual.

Storage: ``"fake"`` keeps ``Q_w(R)`` dequantized as the (frozen) Megatron weight; ``"packed"`` keeps the
4-bit codes and scales and dequantizes them for each forward (the transient copy is freed after backward).
Distributed checkpoints of quantized bases are not written by ``sharded_state_dict`` (it raises): export
them with the checkpoint format instead; adapter-only checkpoints (``save_adapters``) work.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lora.adapters.layers import linear_mode
from lora.framework.te import explicit_expert_comm, fused_norm_input, tp_group_of
from lora.framework.te_convert import is_fused_norm_linear, split_fused_norm
from lora.framework.tp import group_rank_size, take_shard
from svdq.formats import PackedTensor, QuantFormat, dequantize, fake_quant, parse_format, trusted_inputs
from svdq.layer import StaticActRange, static_range_supported
from svdq.quantize import record_input_amax
from svdq.solvers.linear import SVDQResult
from svdq.stats import InputStats, run_with_hooks

STORAGE_MODES = ("fake", "packed")


class SVDQBase(StaticActRange, nn.Module):
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
        if storage not in STORAGE_MODES:
            raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
        self.input_norm = input_norm
        self.parallel_mode = linear_mode(inner)
        weight = inner.weight
        if tuple(residual.shape) != tuple(weight.shape):
            raise ValueError(f"residual shard {tuple(residual.shape)} != weight shard {tuple(weight.shape)}")
        self.inner = inner
        self.storage = storage
        self.act_format: QuantFormat = parse_format(act_format)
        self.weight_format = residual.fmt
        self.register_buffer("smooth", smooth.detach().float().to(weight.device).clone())
        self.register_buffer("input_amax", None)  # None: dynamic activation range
        self._residual_meta = residual.meta()
        dtype, device = weight.dtype, weight.device
        deq = dequantize(residual.to(device), torch.float32).to(dtype)
        if storage == "fake":
            inner.weight = nn.Parameter(deq, requires_grad=False)
        else:
            for key, t in residual.to_tensors().items():
                self.register_buffer(f"residual_{key}", t.to(device).clone())
            inner.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        self._shape, self._dtype = tuple(residual.shape), dtype

    def set_residual(self, packed: PackedTensor) -> None:
        """Replace the residual shard (same shape), in this base's storage mode (used by folding)."""
        if tuple(packed.shape) != self._shape:
            raise ValueError(f"residual shape {tuple(packed.shape)} != {self._shape}")
        device = self.smooth.device
        self._residual_meta = packed.meta()
        self.weight_format = packed.fmt
        if self.storage == "fake":
            with torch.no_grad():
                self.inner.weight.copy_(dequantize(packed.to(device), torch.float32).to(self._dtype))
            return
        for key in [k for k in self._buffers if k.startswith("residual_")]:
            del self._buffers[key]
        for key, t in packed.to_tensors().items():
            self.register_buffer(f"residual_{key}", t.to(device).clone())

    def packed_residual(self) -> PackedTensor:
        if self.storage != "packed":
            raise RuntimeError("fake storage keeps only the dequantized residual")
        tensors = {k[len("residual_") :]: b for k, b in self.named_buffers() if k.startswith("residual_")}
        return PackedTensor.from_tensors(tensors, self._residual_meta)

    def residual_weight(self) -> Tensor:
        """Dequantized ``Q_w(R)`` shard in the base dtype (identical in both storage modes)."""
        if self.storage == "fake":
            return self.inner.weight
        return dequantize(self.packed_residual(), torch.float32).to(self._dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        """``Q_a(x / s)``. Per-tensor range (nvfp4, fp8): ``input_amax`` if set, else that of the whole
        input (all-reduced MAX over the tensor-parallel group). Per-token fp8 (``fp8-channel``) on a
        row-parallel linear: each token's range over all its feature shards (all-reduced MAX)."""
        xs = StaticActRange.smoothed_input(self, x)  # x is already normalized here
        ga = self.input_amax
        tp_group = tp_group_of(self.inner)
        if ga is None and group_rank_size(tp_group)[1] > 1:
            if static_range_supported(self.act_format):  # (an expert may get no token: amax 0)
                ga = xs.detach().abs().amax().float() if xs.numel() else xs.new_zeros((), dtype=torch.float32)
            elif self.act_format.name == "fp8" and self.parallel_mode == "row":
                ga = xs.detach().abs().amax(dim=-1).float()
            if ga is not None:
                dist.all_reduce(ga, op=dist.ReduceOp.MAX, group=tp_group)
                ga = torch.where(ga > 0, ga, torch.ones_like(ga))
        with trusted_inputs():
            return fake_quant(xs, self.act_format, global_amax=ga)

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


# ----------------------------------------------------------------------------------- full tensors


def _gather(t: Tensor, dim: int, group) -> Tensor:
    tp_size = group_rank_size(group)[1]
    if tp_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp_size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def split_dim(linear: nn.Module) -> int:
    """Axis along which a Megatron linear's weight is sharded: 0 (column) or 1 (row)."""
    return 0 if linear_mode(linear) == "column" else 1


def gather_full_weight(linear: nn.Module, glu: bool = False) -> Tensor:
    """The full ``(out × in)`` weight of a tensor-parallel linear, identical on every rank.

    ``glu``: a gated fc1 whose shards are ``[gate_k; up_k]``: the full weight is ``[gate; up]``.
    """
    w = linear.weight.detach()
    tp_group = tp_group_of(linear)
    dim = split_dim(linear)
    if not glu or dim != 0 or group_rank_size(tp_group)[1] == 1:
        return _gather(w, dim, tp_group)
    gate, up = w.chunk(2, dim=0)
    return torch.cat([_gather(gate, 0, tp_group), _gather(up, 0, tp_group)], dim=0)


def shard_packed(p: PackedTensor, dim: int, tp_rank: int, tp_size: int, glu: bool = False) -> PackedTensor:
    """Shard ``tp_rank`` of ``tp_size`` of a packed ``(out × in)`` tensor along ``dim`` (lossless: codes and
    scales are sliced, the per-tensor scale is kept)."""
    if tp_size == 1:
        return p
    out_f, in_f = p.shape
    shape = (out_f // tp_size, in_f) if dim == 0 else (out_f, in_f // tp_size)
    tensors = {}
    for key, t in p.to_tensors().items():
        if t.dim() < 2:  # per-tensor scale
            tensors[key] = t
        else:
            tensors[key] = take_shard(t, dim, tp_rank, tp_size, glu).contiguous()
    meta = dict(p.meta())
    meta["shape"] = list(shape)
    return PackedTensor.from_tensors(tensors, meta)


# ----------------------------------------------------------------------------------- statistics


def register_stats_hooks(
    linears: dict[str, nn.Module], sample_tokens: int = 512, seed: int = 0
) -> tuple[dict[str, InputStats], list]:
    """Forward pre-hooks that accumulate full-feature :class:`InputStats` of Megatron linears.

    A hook sees its linear's local input (for a TE linear with a fused input norm, the norm's output,
    computed by :func:`lora.framework.te.fused_norm_input`): sequence-parallel column inputs are gathered
    along the sequence (not those of expert linears: the token dispatcher already hands every expert-TP rank
    the same tokens), row-parallel inputs along the features (``input_is_parallel``), so every tensor-parallel
    rank accumulates the statistics of the full input ``(tokens × in)`` (calibration only). Returns the
    statistics and the hook handles (remove them when done).
    """
    stats, handles = {}, []
    for name, lin in linears.items():
        in_f = lin.weight.shape[1] * (group_rank_size(tp_group_of(lin))[1] if split_dim(lin) == 1 else 1)
        stats[name] = InputStats(in_f, sample_size=sample_tokens, seed=seed)

        def hook(mod, args, st=stats[name], lin=lin):
            x = args[0].detach()
            if is_fused_norm_linear(lin):  # a TE linear with a fused input norm: the GEMM reads norm(x)
                x = fused_norm_input(lin, x)
            # expert linears (explicit_expert_comm) get whole, already dispatched token sets
            sp = getattr(lin, "sequence_parallel", False) and not explicit_expert_comm(lin)
            if split_dim(lin) == 0 and sp:
                x = _gather(x, 0, tp_group_of(lin))
            elif split_dim(lin) == 1 and getattr(lin, "input_is_parallel", True):
                x = _gather(x, x.dim() - 1, tp_group_of(lin))
            st.update(x)

        handles.append(lin.register_forward_pre_hook(hook))
    return stats, handles


def collect_megatron_stats(
    linears: dict[str, nn.Module], forward_loop, model: nn.Module, sample_tokens: int = 512, seed: int = 0
) -> dict[str, InputStats]:
    """Run ``forward_loop(model)`` with :func:`register_stats_hooks` on ``linears``; returns their stats."""
    stats, handles = register_stats_hooks(linears, sample_tokens, seed)
    run_with_hooks(model, forward_loop, handles)
    return stats


# ----------------------------------------------------------------------------------- install


def install_svdq_base(adapter: nn.Module, result: SVDQResult, act_format, storage: str = "packed", glu=False):
    """Turn ``adapter`` (a :class:`~lora.adapters.layers.LoraLinear` on a Megatron or TE linear) into an
    SVDQuant layer from the full-weight ``result``: its base becomes :class:`SVDQBase` holding this rank's
    residual shard, and its branch ``result.lora_up · result.lora_down`` (sharded by ``init_from``). A TE
    linear with a fused input norm is split first (:func:`lora.framework.te_convert.split_fused_norm`)."""
    inner = adapter.base
    if isinstance(inner, SVDQBase):
        raise ValueError(f"{getattr(adapter, 'adapter_name', '')}: the base is already quantized")
    norm = None
    if is_fused_norm_linear(inner):  # quantize between the norm and the GEMM
        norm, inner = split_fused_norm(inner)
    dim = split_dim(inner)
    tp_rank, tp_size = group_rank_size(tp_group_of(inner))
    residual = shard_packed(result.residual, dim, tp_rank, tp_size, glu and dim == 0)
    smooth = take_shard(result.smooth, 0, tp_rank, tp_size) if dim == 1 else result.smooth
    adapter.base = SVDQBase(inner, residual, smooth, act_format, storage, input_norm=norm)
    adapter.init_from(result.lora_down, result.lora_up)
    return adapter


def install_expert_base(
    wrapper: nn.Module, residual: PackedTensor, smooth: Tensor, act_format, storage: str = "packed", glu=False
) -> SVDQBase:
    """Quantize the base of an expert adapter ``wrapper`` (``ExpertLoraLinear``) from the expert's *full*
    packed residual ``(out × in)`` and smoothing ``(in,)``: this expert-TP rank keeps its shard (rows of
    a column-parallel fc1, ``[gate_k; up_k]`` when ``glu``; columns and the smoothing slice of a
    row-parallel fc2). The branch is set separately (``LoraExperts.init_from``)."""
    inner = wrapper.base
    if isinstance(inner, SVDQBase):
        raise ValueError(f"{getattr(wrapper, 'adapter_name', '')}: the base is already quantized")
    dim = split_dim(inner)
    tp_rank, tp_size = group_rank_size(tp_group_of(inner))
    shard = shard_packed(residual, dim, tp_rank, tp_size, glu and dim == 0)
    s = take_shard(smooth, 0, tp_rank, tp_size) if dim == 1 else smooth
    wrapper.base = SVDQBase(inner, shard, s, act_format, storage)
    return wrapper.base


# ----------------------------------------------------------------------------------- activation ranges


def calibrate_input_ranges(
    model: nn.Module, forward_loop, bases: dict[str, SVDQBase]
) -> dict[str, float | None]:
    """Static activation ranges: run ``forward_loop(model)`` once (the bases as they are, normally
    dynamic), record each base's ``max|x/s|``, all-reduce it (MAX) over the base's tensor-parallel group
    and fix it with :meth:`SVDQBase.set_input_amax`. Returns ``{name: amax}``; ``None`` (range left
    dynamic) for bases whose format has no per-tensor range or that saw no token (e.g. an expert that no
    calibration token was routed to). Every rank must call it with the same ``bases`` in the same order.
    """
    static = {n: b for n, b in bases.items() if static_range_supported(b.act_format)}
    local = record_input_amax(model, static, forward_loop, check_finite=False)  # NaN / Inf → inf
    out: dict[str, float | None] = dict.fromkeys(bases)
    bad = []
    for name, base in static.items():
        a = local[name]
        a = torch.zeros((), device=base.smooth.device) if a is None else a.clone()
        if group_rank_size(tp_group_of(base.inner))[1] > 1:
            dist.all_reduce(a, op=dist.ReduceOp.MAX, group=tp_group_of(base.inner))
        value = float(a)
        if value == float("inf"):  # the same on every rank of the group: all of them raise below
            bad.append(name)
            continue
        base.set_input_amax(a if value > 0 else None)
        out[name] = value if value > 0 else None
    if bad:  # after all reductions, so that no rank is left waiting in one
        raise ValueError(f"{bad[0]}: calibration activations contain NaN or Inf (activation-range pass)")
    return out
