"""What each quantized linear of a Megatron model imported from Hugging Face receives *as the Hugging Face
model computes it*, measured over ``forward_loop`` at export (svdq/DESIGN.md §14).

Megatron multiplies the router probability into the expert intermediate *before* ``linear_fc2``
(:func:`lora.framework.compat.expert_mlp_probs`); Hugging Face applies the routing weight to
``down_proj``'s *output*. So ``linear_fc2``'s input is ``h·p`` where the HF ``down_proj`` gets ``h``. A
forward pre-hook on each expert MLP keeps the probabilities it is called with (per token, in the expert's
row order, padded rows with 0); one on its ``linear_fc2`` divides each row by its probability (float32) and
skips rows whose probability is at most :func:`min_prob` of the activation dtype (padding, dropped tokens,
and probabilities so small that ``h·p`` may have been rounded to a subnormal: the division would then
magnify that rounding). Every other linear's input is the HF one as it is (q / k / v share ``linear_qkv``'s,
gate / up ``linear_fc1``'s).

Per linear (keys: dense site names, ``<experts>.experts.<g>.linear_fc1|fc2`` with ``g`` the *global* expert):

* ``raw_amax`` float32 0-d, ``max|x|``; ``smooth_amax`` float32 0-d, ``max|x/s|`` (``s`` the layer's
  smoothing; the static range of §5) — 0 for a linear that got no row; all-reduced (MAX) over every process
  (tensor-parallel shards of a row-parallel input, expert-parallel ranks owning other experts,
  data-parallel ranks with other data), so identical on every rank; ``layer_amax`` the same for the input
  the Megatron layer itself gets (``h·p`` for ``linear_fc2``), what its static range was calibrated on:
  :meth:`Measured.headroom` carries that range's margin over to the HF-semantics ranges (svdq/DESIGN.md
  §20);
* ``rows`` float32 ``(≤ max_tokens, in)`` on global rank 0 (``None`` elsewhere, or with ``max_tokens=0``):
  the first inputs, row-parallel shards gathered along the features, then the data-parallel (for experts:
  expert-parallel, then expert-data-parallel) ranks' rows in rank order — what one process running the
  ranks' batches one after the other records.

Collective: every rank calls it (``forward_loop`` runs on every rank, as in calibration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Measured", "measure_hf_inputs", "min_prob"]


def min_prob(dtype: torch.dtype) -> float:
    """Rows of ``linear_fc2`` with a router probability ``p <= min_prob`` are not measured:
    ``sqrt(finfo.tiny)`` (float32 / bfloat16 1.1e-19, float16 7.8e-3), so that a product ``h·p`` rounded to
    a subnormal adds at most ``spacing / p <= 7.7e-6`` (float16) to ``h``."""
    return float(torch.finfo(dtype).tiny) ** 0.5


@dataclass
class Measured:
    """One linear's HF-semantics input over ``forward_loop`` (module docstring)."""

    raw_amax: Tensor
    smooth_amax: Tensor
    rows: Tensor | None = None
    layer_amax: Tensor | None = None

    def headroom(self, input_amax: Tensor | float | None) -> float:
        """``input_amax / layer_amax``: how much the layer's static range exceeds ``max|x/s|`` of the input
        it got in this pass (``SVDQConfig.act_range_margin`` when the pass runs the calibration data);
        exported ranges measured here are multiplied by it. 1 without a static range or a measurement."""
        if input_amax is None or self.layer_amax is None or not float(self.layer_amax) > 0:
            return 1.0
        return float(input_amax) / float(self.layer_amax)


@dataclass
class _Slot:
    smooth: Tensor  # (in_local,) the layer's smoothing (this rank's slice)
    raw: Tensor = field(default_factory=lambda: torch.zeros(()))
    smoothed: Tensor = field(default_factory=lambda: torch.zeros(()))
    layer: Tensor = field(default_factory=lambda: torch.zeros(()))  # max|x/s| of the layer's own input
    rows: list = field(default_factory=list)
    n: int = 0

    def add(self, x: Tensor, max_tokens: int) -> None:
        if not x.shape[0]:
            return
        xf = x.float()  # (n, in_local)
        self.raw = torch.maximum(self.raw, xf.abs().amax().cpu())
        self.smoothed = torch.maximum(self.smoothed, (xf / self.smooth.float()).abs().amax().cpu())
        room = max_tokens - self.n
        if room > 0:
            self.rows.append(xf[:room].cpu().clone())
            self.n += min(room, x.shape[0])

    def local_rows(self) -> Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0, self.smooth.numel())


def _expert_sites(model: nn.Module):
    """``{group: SequentialMLP}`` of the quantized expert groups and the dense sites."""
    from lora.adapters.layers import LoraExperts
    from lora.io.sites import find_sites

    dense, groups = find_sites(model)
    return dense, {g: (m.base if isinstance(m, LoraExperts) else m) for g, m in groups.items()}


def measure_hf_inputs(model: nn.Module, forward_loop, *, max_tokens: int = 0) -> dict[str, Measured]:
    """Run ``forward_loop(model)`` once (no gradients) and return the HF-semantics inputs of every
    quantized linear (module docstring). ``ValueError`` naming the experts module where the router
    probability scales the experts' input (``moe_apply_probs_on_input``)."""
    from lora.framework.compat import expert_mlp_probs, probs_scale_expert_input
    from lora.framework.tp import group_rank_size
    from lora.io.sites import unwrap, unwrap_expert
    from svdq.stats import run_with_hooks

    dense, groups = _expert_sites(model)
    for g, seq in groups.items():
        if probs_scale_expert_input(seq.config):
            raise ValueError(
                f"{g}: moe_apply_probs_on_input scales the experts' input by the router probability; "
                "the Hugging Face model has no such input to measure"
            )
    slots: dict[str, _Slot] = {}
    handles = []

    def watch(key: str, module: nn.Module, probs_of=None) -> None:
        slot = slots[key] = _Slot(unwrap(module).smooth.detach())

        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # (n, in_local)
            if x.shape[0]:
                slot.layer = torch.maximum(slot.layer, (x.float() / slot.smooth.float()).abs().amax().cpu())
            p = probs_of() if probs_of is not None else None
            if p is not None:
                if p.shape[0] != x.shape[0]:
                    raise ValueError(f"{key}: {x.shape[0]} input rows but {p.shape[0]} router probabilities")
                keep = p > min_prob(x.dtype)
                x = x[keep].float() / p[keep].float().unsqueeze(-1)  # h = (h·p) / p
            slot.add(x, max_tokens)

        handles.append(module.register_forward_pre_hook(hook))

    order: list[str] = list(dense)  # the same on every rank: every global expert, local or not
    for site in dense:
        watch(site, model.get_submodule(site))
    for group, seq in groups.items():
        ep_rank, ep_size = group_rank_size(seq.ep_group)
        first = ep_rank * seq.num_local_experts
        n_global = seq.num_local_experts * ep_size
        order += [f"{group}.experts.{g}.linear_{p}" for g in range(n_global) for p in ("fc1", "fc2")]
        for i, e in enumerate(seq.local_experts):
            mlp, probs = unwrap_expert(e), {}

            def stash(mod, args, kwargs, probs=probs):
                probs["p"] = expert_mlp_probs(args, kwargs)

            handles.append(mlp.register_forward_pre_hook(stash, with_kwargs=True))
            key = f"{group}.experts.{first + i}"
            watch(f"{key}.linear_fc1", mlp.linear_fc1)
            watch(f"{key}.linear_fc2", mlp.linear_fc2, lambda probs=probs: probs.get("p"))
    with torch.no_grad():
        run_with_hooks(model, forward_loop, handles)

    amax = torch.zeros(len(order), 3)  # (K, 3): max|x|, max|x/s|, the layer's own max|x/s|
    for k, key in enumerate(order):
        if key in slots:
            amax[k, 0], amax[k, 1], amax[k, 2] = slots[key].raw, slots[key].smoothed, slots[key].layer
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = next(model.parameters()).device
        reduced = amax.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        amax = reduced.cpu()
    out = {
        key: Measured(amax[k, 0].clone(), amax[k, 1].clone(), layer_amax=amax[k, 2].clone())
        for k, key in enumerate(order)
    }
    if max_tokens > 0:
        _gather_rows(model, dense, groups, slots, out, max_tokens)
    return out


# ------------------------------------------------------------------------------------ rows to rank 0


def _rows_of(x: Tensor, group, device) -> list[Tensor]:
    """Every rank's ``x`` ``(n_r, w)`` (the same ``w``, any ``n_r``) in ``group``'s rank order."""
    from lora.framework.tp import all_gather, group_rank_size

    if group_rank_size(group)[1] == 1:
        return [x]
    sizes = [int(s) for s in all_gather(torch.tensor([x.shape[0]], device=device), group)]
    pad = torch.zeros(max(sizes), x.shape[1], device=device)  # (n_max, w)
    pad[: x.shape[0]] = x.to(device)
    return [p[:n].cpu() for p, n in zip(all_gather(pad, group), sizes, strict=True)]


def _features(x: Tensor, group, device) -> Tensor:
    """A row-parallel input's feature shards (the same rows on every rank) joined along the features."""
    return torch.cat(_rows_of(x, group, device), dim=1)


def _gather_rows(model, dense, groups, slots, out, max_tokens: int) -> None:
    from megatron.core import parallel_state

    from lora.framework.tp import group_rank_size, split_dim
    from lora.io.sites import unwrap

    device = next(model.parameters()).device
    writer = not dist.is_initialized() or dist.get_rank() == 0
    tp_group = dp_group = None
    if parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dp_group = parallel_state.get_data_parallel_group()

    def keep(key: str, parts: list[Tensor]) -> None:
        if writer:
            rows = torch.cat(parts)[:max_tokens]
            out[key].rows = rows if rows.shape[0] else None

    for site in dense:
        x = slots[site].local_rows()
        if split_dim(unwrap(model.get_submodule(site)).inner) == 1:
            x = _features(x, tp_group, device)
        keep(site, _rows_of(x, dp_group, device))
    for group, seq in groups.items():
        n_local = seq.num_local_experts
        first = group_rank_size(seq.ep_group)[0] * n_local
        edp_group = getattr(seq, "dp_group", None)  # expert-data-parallel
        for i in range(n_local):
            for proj in ("fc1", "fc2"):
                x = slots[f"{group}.experts.{first + i}.linear_{proj}"].local_rows()
                if proj == "fc2":
                    x = _features(x, seq.tp_group, device)
                by_rank = _rows_of(x, seq.ep_group, device)  # entry r: expert r·n_local + i
                for r, rows in enumerate(by_rank):
                    key = f"{group}.experts.{r * n_local + i}.linear_{proj}"
                    keep(key, _rows_of(rows, edp_group, device))
