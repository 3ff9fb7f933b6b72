"""Shared pieces of the adapter tests: an in-process single-rank Megatron world, tiny models, and a
float64 reference of an adapted ``SequentialMLP`` computed by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calib.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe
from lora.adapters.layers import ExpertLoraLinear, ExpertParallelAdapter, LoraExperts

CFG = TinyMoEConfig()


def tiny_model(seed: int = 1, **cfg):
    return build_tiny_gpt_moe(TinyMoEConfig(**cfg) if cfg else CFG, seed=seed)


def rng_snapshot():
    """Every RNG state a forward may draw from: Megatron's tracker states, the CPU and the CUDA generator."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return get_cuda_rng_tracker().get_states(), torch.get_rng_state(), cuda


def rng_restore(snapshot) -> None:
    """Put back the states of :func:`rng_snapshot` (the next forward draws what the snapshotted one drew)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states, cpu, cuda = snapshot
    get_cuda_rng_tracker().set_states(dict(states))
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def lm_loss(model, batch):
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float().mean()


def unwrap(m):
    return m.base if isinstance(m, (ExpertLoraLinear, ExpertParallelAdapter)) else m


def reference_experts(group: LoraExperts, x: torch.Tensor, counts: list[int], probs: torch.Tensor):
    """The adapted experts' output in float64, written out from the formulas::

        h1 = x_i·W1_iᵀ + s·(x_i·A1ᵀ)·B1ᵀ ;  a = silu(gate)·up · p ;  y_i = a·W2_iᵀ + s·(a·A2ᵀ)·B2ᵀ
             + s·p·(x_i·A_pᵀ)·B_p,iᵀ

    Returns ``(out (N × hidden) float64, leaves)`` with ``leaves`` the float64 copies of the adapter
    factors (global key → tensor requiring grad) for gradient comparisons.
    """
    s = group.scaling
    leaves = {f.key: f.param.detach().double().requires_grad_() for f in group.factors()}
    name = group.adapter_name

    def factor(proj: str, role: str, g: int):
        shared = f"{name}.{'parallel' if proj == 'parallel' else 'linear_' + proj}.lora_{role}"
        if shared in leaves:
            return leaves[shared]
        return leaves[
            f"{name}.experts.{g}.{'parallel' if proj == 'parallel' else 'linear_' + proj}.lora_{role}"
        ]

    outs = []
    x64, p64 = x.double(), probs.double()
    for i, (xi, pi) in enumerate(zip(x64.split(counts), p64.split(counts))):
        g = group.first_global + i
        mlp = unwrap(group.base.local_experts[i])
        W1 = unwrap(mlp.linear_fc1).weight.detach().double()
        W2 = unwrap(mlp.linear_fc2).weight.detach().double()
        h1 = xi @ W1.T
        if group.fc1_layout is not None:
            h1 = h1 + s * (xi @ factor("fc1", "down", g).T) @ factor("fc1", "up", g).T
        gate, up = h1.chunk(2, dim=-1)
        a = F.silu(gate) * up * pi[:, None]
        y = a @ W2.T
        if group.fc2_layout is not None:
            y = y + s * (a @ factor("fc2", "down", g).T) @ factor("fc2", "up", g).T
        if group.parallel:
            y = y + s * pi[:, None] * ((xi @ factor("parallel", "down", g).T) @ factor("parallel", "up", g).T)
        outs.append(y)
    return torch.cat(outs), leaves
