"""``SVDQExperts``: the SVDQuant form of a fused (Hugging Face style) experts module, fused layout kept.

It replaces the experts module in place, with the same forward arguments (named as the handler names
them, e.g. ``(hidden_states, top_k_index, top_k_weights)``) and the same routing-weighted output
``out[t] = Σ_{slots j of t} w[t, j] · fc2_e(act(fc1_e(x[t])))``, ``e = top_k_index[t, j]`` (a slot outside
``[0, E)`` is masked: it adds nothing). Each projection ``p`` (fc1, fc2) of expert ``e`` computes
(svdq/DESIGN.md §1, §4, §13)

    y = Q_a(x / s_e) · Q_w(R_e)ᵀ  +  (x · A_eᵀ) · B_eᵀ  +  b_e

exactly as :meth:`svdq.solvers.expert_group.MoEGroupResult.expert_forward` (activation quantization per
expert: each expert's routed rows are one tensor for the per-tensor range), with one factor shared in the
shared layouts. Shapes: ``E`` experts, ``H`` hidden, ``I`` intermediate, ``out1`` fc1's rows (``2I`` for GLU),
``r`` the rank of that projection, ``dtype`` the module dtype (that of the replaced weights)::

    fc1.residual_qdata         (E, out1, H/2) uint8 …   packed Q_w(R), per expert (svdq.experts.storage)
    fc1.residual_scale         (E, out1, H/16) e4m3 …   (storage="fake": fc1.residual dtype (E, out1, H))
    fc1.residual_global_scale  (E,) float32             nvfp4 only
    fc1.smooth                 (H,) float32             shared: all experts read the same hidden state
    fc1.lora_down              shared-down (r, H) | per-expert / shared-up (E, r, H)        dtype, trainable
    fc1.lora_up                shared-down / per-expert (E, out1, r) | shared-up (out1, r)  dtype, trainable
    fc1.bias                   (E, out1) dtype or None
    fc1.input_amax             (E,) float32 or None     static max|x/s| per expert (0: that expert dynamic)
    fc2.residual_*             (E, H, I/2) … as fc1
    fc2.smooth                 (E, I) float32           per expert (private inputs)
    fc2.lora_down / lora_up    (r, I) | (E, r, I)  and  (E, H, r) | (H, r)
    fc2.bias                   (E, H) dtype or None
    fc2.input_amax             (E,) float32 or None

``act`` (no tensors) maps fc1's output ``(S, out1)`` to ``(S, I)`` (e.g. ``act(gate) · up``). Forward:
the ``S`` routed (token, slot) pairs are sorted by expert; a shared ``lora_down`` of fc1 is one GEMM over
the ``T`` tokens *before* the gather (so is fc1's smoothing); the per-expert products run through one
``torch._grouped_mm`` each where it applies (CUDA, bf16, dims multiple of 8:
:func:`svdq.experts.ops.grouped_mm_applies`; ``grouped_mm=True`` takes it wherever it fits, on any
device, ``False`` never) and a loop over the experts hit elsewhere. The routing weight multiplies fc2's
output (as Hugging Face does), so fc2's input excludes it. Activation quantization has straight-through
gradients; residuals, scales, smoothing, bias and ranges are frozen buffers, ``lora_down`` / ``lora_up``
the trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdq.experts.projection import grouped_projection
from svdq.experts.storage import ExpertResiduals
from svdq.formats import QuantFormat, parse_format
from svdq.residual import check_storage, static_range_supported
from svdq.solvers.shared_basis import PER_EXPERT, SHARED_DOWN, SHARED_UP

__all__ = ["ExpertProjection", "ProjectionState", "SVDQExperts", "install_svdq_experts"]

PROJECTIONS = ("fc1", "fc2")


def layout_of(lora_down: Tensor, lora_up: Tensor) -> str:
    """The layout a pair of factor shapes spells: 2-D ``lora_down`` = shared-down, 2-D ``lora_up`` =
    shared-up, both 3-D = per-expert."""
    if lora_down.dim() == 2 and lora_up.dim() == 3:
        return SHARED_DOWN
    if lora_down.dim() == 3 and lora_up.dim() == 2:
        return SHARED_UP
    if lora_down.dim() == 3 and lora_up.dim() == 3:
        return PER_EXPERT
    raise ValueError(
        f"factor shapes {tuple(lora_down.shape)} / {tuple(lora_up.shape)} spell no expert layout"
    )


@dataclass(frozen=True, eq=False)
class ProjectionState:
    """One projection of :class:`SVDQExperts` as tensors (shapes in the module docstring): what the
    installer takes, from a decomposition (:meth:`from_result`) or a checkpoint."""

    residual: ExpertResiduals
    smooth: Tensor
    act_format: QuantFormat
    lora_down: Tensor
    lora_up: Tensor
    bias: Tensor | None = None
    input_amax: Tensor | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "act_format", parse_format(self.act_format))
        E, out_f, in_f = self.residual.shape
        if tuple(self.smooth.shape) not in ((in_f,), (E, in_f)):
            raise ValueError(
                f"smooth has shape {tuple(self.smooth.shape)}, expected ({in_f},) or ({E}, {in_f})"
            )
        layout = layout_of(self.lora_down, self.lora_up)
        r = self.lora_down.shape[-2]
        down = (r, in_f) if layout == SHARED_DOWN else (E, r, in_f)
        up = (out_f, r) if layout == SHARED_UP else (E, out_f, r)
        if tuple(self.lora_down.shape) != down or tuple(self.lora_up.shape) != up:
            raise ValueError(
                f"{layout} factors {tuple(self.lora_down.shape)} / {tuple(self.lora_up.shape)} do not fit "
                f"the residual {(E, out_f, in_f)}: expected {down} / {up}"
            )
        if self.bias is not None and tuple(self.bias.shape) != (E, out_f):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected ({E}, {out_f})")
        if self.input_amax is not None and tuple(self.input_amax.shape) != (E,):
            raise ValueError(f"input_amax has shape {tuple(self.input_amax.shape)}, expected ({E},)")
        if self.dtype is None:
            object.__setattr__(self, "dtype", self.lora_down.dtype)

    @property
    def layout(self) -> str:
        return layout_of(self.lora_down, self.lora_up)

    @property
    def rank(self) -> int:
        return int(self.lora_down.shape[-2])

    @classmethod
    def from_result(
        cls, result, bias: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> ProjectionState:
        """From a :class:`~svdq.solvers.expert_group.MoEGroupResult` (all experts local)."""
        downs = result.shared_down if result.shared_down is not None else torch.stack(result.lora_downs)
        ups = result.shared_up if result.shared_up is not None else torch.stack(result.lora_ups)
        dtype = dtype or result.residuals[0].dtype
        return cls(
            residual=ExpertResiduals.from_packed(result.residuals),
            smooth=result.smooth,
            act_format=result.act_format,
            lora_down=downs.to(dtype),
            lora_up=ups.to(dtype),
            bias=bias,
            dtype=dtype,
        )


class ExpertProjection(nn.Module):
    """One projection (fc1 or fc2) of :class:`SVDQExperts`; its tensors are listed there."""

    def __init__(self, state: ProjectionState, storage: str = "packed"):
        super().__init__()
        check_storage(storage)
        dtype = state.dtype
        self.num_experts, self.out_features, self.in_features = state.residual.shape
        self.layout = state.layout
        self.rank = state.rank
        self.act_format = state.act_format
        self.storage = storage
        self.weight_format = state.residual.fmt
        self._residual_meta = dict(state.residual.meta)
        self.lora_down = nn.Parameter(state.lora_down.detach().to(dtype).clone())
        self.lora_up = nn.Parameter(state.lora_up.detach().to(dtype).clone())
        self.register_buffer("smooth", state.smooth.detach().float().clone())
        self.register_buffer("bias", None if state.bias is None else state.bias.detach().to(dtype).clone())
        self.register_buffer("input_amax", None)
        if state.input_amax is not None:
            self.set_input_amax(state.input_amax)
        if storage == "fake":
            self.register_buffer("residual", state.residual.dequantize(torch.float32).to(dtype))
        else:
            for key, t in state.residual.tensors.items():
                self.register_buffer(f"residual_{key}", t.detach().clone())
        self._amax_record: Tensor | None = None

    @property
    def act_range(self) -> str:
        return "dynamic" if self.input_amax is None else "static"

    def set_input_amax(self, amax: Tensor | None) -> None:
        """Static per-expert ranges ``amax (E,)`` of ``x/s`` (an entry 0: that expert stays dynamic);
        ``None``: all dynamic. ``ValueError`` for a format without a per-tensor range or a value that is not
        finite and ≥ 0."""
        if amax is None:
            self.input_amax = None
            return
        if not static_range_supported(self.act_format):
            raise ValueError(
                f"activation format {self.act_format} has no per-tensor range; static input_amax needs "
                "nvfp4 or fp8"
            )
        t = torch.as_tensor(amax).detach().to(torch.float32).reshape(-1)
        if t.numel() != self.num_experts:
            raise ValueError(
                f"input_amax must have {self.num_experts} values (one per expert), got {t.numel()}"
            )
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"input_amax must be finite and ≥ 0, got {t.tolist()}")
        self.input_amax = t.to(self.smooth.device)

    @property
    def residual_dtype(self) -> torch.dtype:
        return self.lora_down.dtype

    def packed_residual(self) -> ExpertResiduals:
        if self.storage != "packed":
            raise RuntimeError("fake storage keeps only the dequantized residual; use storage='packed'")
        tensors = {
            k[len("residual_") :]: b
            for k, b in self.named_buffers(recurse=False)
            if k.startswith("residual_")
        }
        return ExpertResiduals(self._residual_meta, tensors)

    def residual_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dequantized ``Q_w(R)`` ``(E, out, in)`` (same values in both storage modes)."""
        if self.storage == "fake":
            w = self.residual
        else:
            w = self.packed_residual().dequantize(torch.float32).to(self.residual_dtype)
        return w if dtype is None else w.to(dtype)

    def state(self) -> ProjectionState:
        """This projection as a :class:`ProjectionState` (packed storage)."""
        return ProjectionState(
            residual=self.packed_residual(),
            smooth=self.smooth,
            act_format=self.act_format,
            lora_down=self.lora_down.detach(),
            lora_up=self.lora_up.detach(),
            bias=self.bias,
            input_amax=self.input_amax,
            dtype=self.lora_down.dtype,
        )

    def forward(
        self,
        x: Tensor,
        rows: Tensor | None,
        ids: Tensor,
        counts: list[int],
        offs: Tensor,
        grouped: bool | None,
    ) -> Tensor:
        """``x``: ``(T, in)`` tokens gathered by ``rows (S,)`` (fc1), or ``(S, in)`` rows already (``rows``
        ``None``, fc2); ``ids (S,)`` the rows' experts, sorted. Returns ``(S, out)``
        (:func:`svdq.experts.projection.grouped_projection`)."""
        packed = self.storage == "packed"
        return grouped_projection(
            x,
            ids,
            counts,
            offs,
            residual=self.packed_residual() if packed else self.residual,
            smooth=self.smooth,
            act_format=self.act_format,
            input_amax=self.input_amax,
            lora_down=self.lora_down if self.rank else None,
            lora_up=self.lora_up,
            layout=self.layout,
            rows=rows,
            bias=self.bias,
            grouped=grouped,
            record=self._amax_record,
            weight_dtype=self.residual_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, "
            f"layout={self.layout}, rank={self.rank}, weight={self.weight_format}, act={self.act_format}, "
            f"storage={self.storage}, "
            f"act_range={self.act_range}"
        )


class SVDQExperts(nn.Module):
    """See the module docstring. ``arg_names``: the forward's three argument names (from the handler);
    ``handler``: the handler's name and ``source_class`` the replaced class (recorded in exports)."""

    def __init__(
        self,
        fc1: ProjectionState,
        fc2: ProjectionState,
        act: nn.Module,
        *,
        arg_names: Sequence[str] = ("hidden_states", "top_k_index", "top_k_weights"),
        storage: str = "packed",
        handler: str = "",
        source_class: str = "",
    ):
        super().__init__()
        E, out1, H = fc1.residual.shape
        E2, H2, inter = fc2.residual.shape
        if E2 != E or H2 != H:
            raise ValueError(f"fc1 {(E, out1, H)} and fc2 {(E2, H2, inter)} do not form one experts module")
        if fc1.smooth.dim() != 1:
            raise ValueError("fc1's smoothing must be shared (H,): all experts read the same hidden state")
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, inter
        self.fc1 = ExpertProjection(fc1, storage)
        self.fc2 = ExpertProjection(fc2, storage)
        self.act = act
        self.arg_names = tuple(arg_names)
        self.handler, self.source_class = handler, source_class
        self.grouped_mm: bool | None = None  # None: torch._grouped_mm where it applies; True / False: force

    @property
    def storage(self) -> str:
        return self.fc1.storage

    def projections(self) -> dict[str, ExpertProjection]:
        return {"fc1": self.fc1, "fc2": self.fc2}

    def set_input_amax(self, fc1: Tensor | None = None, fc2: Tensor | None = None) -> None:
        """Static per-expert activation ranges of both projections (see
        :meth:`ExpertProjection.set_input_amax`)."""
        self.fc1.set_input_amax(fc1)
        self.fc2.set_input_amax(fc2)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for proj in (self.fc1, self.fc2) for p in (proj.lora_down, proj.lora_up)]

    def forward(self, *args, **kwargs) -> Tensor:
        from svdq.experts.handlers.base import parse_routing

        x, idx, w = parse_routing(self.arg_names, args, kwargs)
        E, k = self.num_experts, idx.shape[-1]
        flat = idx.reshape(-1)
        key = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))  # masked slots -> E
        order = torch.argsort(key, stable=True)
        counts_t = torch.bincount(key, minlength=E + 1)[:E]
        counts = counts_t.tolist()  # the one host sync
        n = sum(counts)
        order = order[:n]
        ids, rows = key[order], order // k  # (S,) experts (sorted), tokens
        offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
        h = self.act(self.fc1(x, rows, ids, counts, offs, self.grouped_mm))  # (S, I)
        y = self.fc2(h, None, ids, counts, offs, self.grouped_mm)  # (S, H)
        y = y * w.reshape(-1)[order].unsqueeze(-1)  # the routing weight, after fc2
        out = torch.zeros_like(x)
        return out.index_add_(0, rows, y.to(x.dtype))

    def extra_repr(self) -> str:
        return f"handler={self.handler!r}, source={self.source_class}, experts={self.num_experts}"


def install_svdq_experts(
    model: nn.Module,
    name: str,
    handler,
    fc1: ProjectionState,
    fc2: ProjectionState,
    storage: str = "packed",
) -> SVDQExperts:
    """Replace the experts module at ``name`` of ``model`` (one ``handler`` handles) by an
    :class:`SVDQExperts` of the given projections, on the replaced module's device; returns it. The one
    installer: :func:`svdq.quantize` calls it with decomposition results, ``lora.io`` loaders with
    tensors read from a checkpoint."""
    old = model.get_submodule(name)
    W1, _, _, _ = handler.weights(old)
    layer = SVDQExperts(
        fc1,
        fc2,
        handler.activation(old),
        arg_names=handler.arg_names,
        storage=storage,
        handler=handler.name,
        source_class=type(old).__name__,
    ).to(W1.device)
    model.set_submodule(name, layer)
    return layer
