"""Fused Hugging Face experts (:class:`svdq.experts.SVDQExperts`) in nvidia-modelopt's HF layout: one NVFP4
linear per expert and projection, as modelopt 0.47's ``_export_fused_experts`` splits a fused module.

An experts module ``<m>`` (``concat-glu`` handler: ``gate_up_proj (E, 2I, H)`` gate rows first,
``down_proj (E, H, I)``; Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) is written as the in-memory
names ``<m>.<e>.gate_proj``, ``<m>.<e>.up_proj`` (``I × H``) and ``<m>.<e>.down_proj`` (``H × I``), each with
the tensors of :func:`lora.io.modelopt_hf_layout.nvfp4_linear_tensors` (the caller then maps them to the
checkpoint's names, e.g. Mixtral's ``block_sparse_moe.experts.<e>.w1 / w3 / w2``):

* ``weight`` / ``weight_scale``: expert ``e``'s packed residual, rows ``[0, I)`` for gate and ``[I, 2I)``
  for up (block scales are per row, so the split is exact); ``weight_scale_2``: the expert's fc1 global
  scale, the same for gate and up (vLLM fuses w1 / w3 and needs one scale — modelopt shares the fused
  amax the same way);
* ``input_scale``: the expert's static range ``input_amax[e] / (6·448)``. modelopt keeps one input
  quantizer for all experts and fills uncalibrated experts from the others; here each expert has its
  own range (what :class:`SVDQExperts` computes with), and an expert without one gets the maximum over
  the projection's calibrated experts (listed in the ``svdq`` metadata as ``filled_input_scale``);
* ``pre_quant_scale``: ``1/s`` (fc1's shared smoothing, fc2's smoothing of expert ``e``), absent when the
  smoothing is all ones and there is no branch (plain ``NVFP4``, e.g. after a fold with
  ``smoothing="fold"``);
* the branch (``NVFP4_SVD``): expert ``e``'s factors in modelopt's per-linear naming. A shared factor
  becomes each expert's own copy (shared-down: the one ``lora_down`` is every expert's ``lora_a``;
  shared-up: the one ``lora_up`` every expert's ``lora_b``); gate and up take ``lora_up`` rows
  ``[0, I)`` / ``[I, 2I)`` with the same ``lora_a``.

modelopt's own SVDQuant leaves fused experts plain NVFP4 (its ``svdquant`` only treats ``nn.Linear``-like
modules); a kept export of ours has ``NVFP4_SVD`` experts, so the layout is modelopt's per-linear
``NVFP4_SVD`` layout applied per expert. In ``hf_quant_config.json`` the experts module is one quantized
layer named ``<m>`` (modelopt names the fused module so) when both projections have one algorithm, else
each expert linear is listed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from svdq.experts import SVDQExperts
from svdq.solvers.shared_basis import SHARED_DOWN, SHARED_UP
from svdq.stats import run_with_hooks

__all__ = [
    "ExpertCapture",
    "capture_expert_inputs",
    "check_experts",
    "experts_layout_tensors",
    "experts_static_ranges",
    "svdq_experts",
]

SUPPORTED_HANDLERS = ("concat-glu",)
GLU_PARTS = ("gate_proj", "up_proj")
DOWN = "down_proj"
ForwardLoop = Callable[[nn.Module], None]


def svdq_experts(model: nn.Module) -> dict[str, SVDQExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQExperts)}


def check_experts(name: str, layer: SVDQExperts) -> None:
    """``ValueError`` naming the module unless modelopt's per-expert NVFP4 layout can hold it."""
    if layer.handler not in SUPPORTED_HANDLERS:
        raise ValueError(
            f"{name}: modelopt's per-expert HF layout is written for {list(SUPPORTED_HANDLERS)} experts "
            f"(gate rows first, no biases); this module has handler {layer.handler!r} ({layer.source_class})"
        )
    for p, proj in layer.projections().items():
        if proj.weight_format.name != "nvfp4" or proj.act_format.name != "nvfp4":
            raise ValueError(
                f"{name}.{p}: modelopt's NVFP4 layouts need nvfp4 weights and activations (W4A4); this "
                f"projection has weight={proj.weight_format}, act={proj.act_format}"
            )
        if proj.storage != "packed":
            raise ValueError(
                f"{name}.{p}: storage='fake' keeps only the dequantized residuals, not their NVFP4 codes; "
                "build the experts with storage='packed' to export them"
            )


def _expert_factors(proj, e: int) -> tuple[Tensor | None, Tensor | None]:
    """Expert ``e``'s ``(lora_down (r, in), lora_up (out, r))`` (``None`` at rank 0)."""
    if proj.rank == 0:
        return None, None
    down = proj.lora_down if proj.layout == SHARED_DOWN else proj.lora_down[e]
    up = proj.lora_up if proj.layout == SHARED_UP else proj.lora_up[e]
    return down.detach(), up.detach()


def experts_layout_tensors(
    name: str, layer: SVDQExperts, ranges: dict[str, Tensor], factor_keys: str = "quantizer"
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, {expert linear: quant_algo})`` of one experts module under the in-memory names
    ``<name>.<e>.gate_proj / up_proj / down_proj`` (module docstring). ``ranges``: ``{"fc1" | "fc2":
    input_amax (E,)}`` with every entry > 0."""
    from lora.io.modelopt_hf_layout import nvfp4_linear_tensors

    check_experts(name, layer)
    tensors: dict[str, Tensor] = {}
    algos: dict[str, str] = {}
    E, inter = layer.num_experts, layer.intermediate_size
    parts = {"fc1": [(GLU_PARTS[0], slice(0, inter)), (GLU_PARTS[1], slice(inter, 2 * inter))]}
    parts["fc2"] = [(DOWN, slice(None))]
    for p, proj in layer.projections().items():
        residual = proj.packed_residual()
        t = residual.tensors
        dtype = proj.lora_down.dtype
        for e in range(E):
            smooth = proj.smooth if proj.smooth.dim() == 1 else proj.smooth[e]  # (in,)
            down, up = _expert_factors(proj, e)
            for part, rows in parts[p]:
                lin = f"{name}.{e}.{part}"
                out, algo = nvfp4_linear_tensors(
                    lin,
                    t["qdata"][e, rows],  # (rows, in/2)
                    t["scale"][e, rows],  # (rows, in/16)
                    t["global_scale"][e],
                    ranges[p][e],
                    smooth=smooth,
                    lora_down=down,
                    lora_up=None if up is None else up[rows],
                    bias=None if proj.bias is None else proj.bias[e, rows],
                    dtype=dtype,
                    factor_keys=factor_keys,
                )
                tensors.update(out)
                algos[lin] = algo
    return tensors, algos


def quantized_layer_names(name: str, algos: dict[str, str]) -> dict[str, str]:
    """The experts module's entry for ``hf_quant_config``: ``{name: algo}`` for one algorithm (as modelopt
    names a fused experts module), else the per-expert linears."""
    kinds = set(algos.values())
    return {name: next(iter(kinds))} if len(kinds) == 1 else dict(algos)


class ExpertCapture:
    """Pre-hooks on the projections of experts modules collecting, per (module, projection) and expert,
    ``max|x|`` and ``max|x/s|`` over every call and the first ``max_tokens`` raw input rows."""

    def __init__(self, experts: dict[str, SVDQExperts], max_tokens: int = 0):
        self.experts, self.max_tokens = experts, max_tokens
        self.amax: dict[tuple[str, str], Tensor] = {}
        self.amax_smoothed: dict[tuple[str, str], Tensor] = {}
        self.rows: dict[tuple[str, str], list[list[Tensor]]] = {}

    def hooks(self) -> list:
        handles = []
        for name, layer in self.experts.items():
            for p, proj in layer.projections().items():
                key = (name, p)
                E = proj.num_experts
                self.amax[key] = torch.zeros(E, dtype=torch.float32, device=proj.smooth.device)
                self.amax_smoothed[key] = torch.zeros_like(self.amax[key])
                self.rows[key] = [[] for _ in range(E)]
                hook = lambda m, args, key=key: self._hook(m, args, key)  # noqa: E731
                handles.append(proj.register_forward_pre_hook(hook))
        return handles

    def _hook(self, proj, args, key) -> None:
        x, rows, ids = args[0], args[1], args[2]
        xg = (x if rows is None else x[rows]).detach()  # (S, in)
        if xg.shape[0] == 0:
            return
        xf = xg.float()
        s = proj.smooth if proj.smooth.dim() == 1 else proj.smooth[ids]
        self.amax[key].scatter_reduce_(0, ids, xf.abs().amax(-1), "amax")
        self.amax_smoothed[key].scatter_reduce_(0, ids, (xf / s).abs().amax(-1), "amax")
        if self.max_tokens > 0:
            for e in torch.unique(ids).tolist():
                have = sum(t.shape[0] for t in self.rows[key][e])
                room = self.max_tokens - have
                if room > 0:
                    self.rows[key][e].append(xg[ids == e][:room].clone())

    def inputs(self, key) -> list[Tensor | None]:
        """Expert-indexed raw input rows ``(n_e, in)`` (``None``: the expert got no token)."""
        return [torch.cat(r) if r else None for r in self.rows[key]]


def capture_expert_inputs(
    model: nn.Module, experts: dict[str, SVDQExperts], forward_loop: ForwardLoop, max_tokens: int = 0
) -> ExpertCapture:
    """Run ``forward_loop(model)`` once with :class:`ExpertCapture` hooks; returns the capture."""
    cap = ExpertCapture(experts, max_tokens)
    run_with_hooks(model, forward_loop, cap.hooks())
    return cap


def experts_static_ranges(
    model: nn.Module, experts: dict[str, SVDQExperts], forward_loop: ForwardLoop | None
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, list[int]]]]:
    """``({module: {"fc1" | "fc2": input_amax (E,) all > 0}}, {module: {proj: experts filled}})``.

    Per expert: the projection's static range; missing ones (dynamic, or 0: no token in the range pass)
    measured over ``forward_loop`` when given; still missing ones get the maximum over the projection's
    experts (modelopt's fallback for uncalibrated experts). A projection with no range at all is a
    ``ValueError`` naming it."""
    ranges: dict[str, dict[str, Tensor]] = {}
    missing: dict[tuple[str, str], Tensor] = {}
    for name, layer in experts.items():
        ranges[name] = {}
        for p, proj in layer.projections().items():
            amax = proj.input_amax
            amax = torch.zeros(proj.num_experts) if amax is None else amax.detach().float().cpu()
            ranges[name][p] = amax.clone()
            if bool((amax <= 0).any()):
                missing[(name, p)] = amax <= 0
    if missing and forward_loop is not None:
        cap = capture_expert_inputs(model, {n: experts[n] for n, _ in missing}, forward_loop)
        for key, where in missing.items():
            measured = cap.amax_smoothed[key].cpu()
            ranges[key[0]][key[1]] = torch.where(where, measured, ranges[key[0]][key[1]])
    filled: dict[str, dict[str, list[int]]] = {}
    for name, by_proj in ranges.items():
        for p, amax in by_proj.items():
            if not bool(torch.isfinite(amax).all()):
                raise ValueError(f"{name}.{p}: activation ranges are not finite ({amax.tolist()})")
            zero = amax <= 0
            if bool(zero.all()):
                how = (
                    "no expert received a non-zero input in forward_loop"
                    if forward_loop is not None
                    else "calibrate with static activation ranges (svdq.quantize(..., "
                    "act_range='static')) or pass forward_loop= to measure them"
                )
                raise ValueError(
                    f"{name}.{p}: no expert has a static activation range (input_amax), which modelopt's "
                    f"input_scale needs; {how}"
                )
            if bool(zero.any()):
                by_proj[p] = torch.where(zero, amax.max(), amax)
                filled.setdefault(name, {})[p] = torch.nonzero(zero).flatten().tolist()
    return ranges, filled


def experts_meta(layer: SVDQExperts, filled: dict[str, list[int]] | None = None) -> dict:
    """The ``svdq`` metadata of one experts module (handler, expert count, per projection the layout,
    rank and the experts whose input_scale was filled)."""
    out = {
        "handler": layer.handler,
        "class": layer.source_class,
        "num_experts": layer.num_experts,
        "projections": {},
    }
    for p, proj in layer.projections().items():
        out["projections"][p] = {
            "layout": proj.layout,
            "rank": proj.rank,
            "filled_input_scale": (filled or {}).get(p, []),
        }
    return out
