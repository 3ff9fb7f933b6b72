"""What :func:`svdq.quantize` targets, and an account of everything it leaves in 16 bits.

:func:`scan_model` walks the model once and sorts every module that owns parameters:

* **targets** — ``nn.Linear`` modules (exactly that type) and fused experts modules a registered handler
  understands (:func:`svdq.experts.handler_for`), whose name matches an ``include`` pattern and no
  ``exclude`` one;
* **left in 16 bits**, each with its reason: ``"excluded by pattern"`` (a target type the patterns leave
  out), ``"router"`` (see below), ``"embedding"``, ``"norm"`` (class name contains ``Norm``),
  ``"convolution"``, ``"unsupported fused experts"`` (with ``allow_unsupported``) and ``"not a linear"``
  (any other parameter owner, e.g. a bare 2-D weight);
* **unsupported** — a module owning a parameter of ``ndim ≥ 3`` (other than a convolution) that no handler
  understands: a ``ValueError`` naming it, its class and the supported classes, unless
  ``allow_unsupported=True``.

**Routers stay 16-bit.** Routing decisions are discrete: a small weight error flips the top-k choice, and a
router is a tiny share of the parameters. A module is a router when its name matches
:data:`ROUTER_PATTERNS` (``*router``, ``*.gate`` — the Mixtral / Qwen / OLMoE / DeepSeek router —, and
Qwen2-MoE's ``*shared_expert_gate``, an ``nn.Linear(H, 1)``) or its class name contains ``Router``; such an
``nn.Linear`` is never targeted, whatever the include patterns (the same rule as nvidia-modelopt's default
exclusions). ``gate_proj`` is not a router (``*.gate`` matches the whole last name only).

:class:`Coverage` (attached as ``model.svdq_coverage``) counts parameters once each (tied weights once):
the quantized ones are the weights of the replaced modules (biases stay 16-bit and count as not quantized).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from svdq.experts.handlers import handler_for, supported_classes

__all__ = ["ROUTER_PATTERNS", "Coverage", "is_router", "scan_model"]

ROUTER_PATTERNS: tuple[str, ...] = ("*router", "*.gate", "gate", "*shared_expert_gate")

EXCLUDED = "excluded by pattern"
ROUTER = "router"
EMBEDDING = "embedding"
NORM = "norm"
CONV = "convolution"
UNSUPPORTED = "unsupported fused experts"
OTHER = "not a linear"


def is_router(name: str, module: nn.Module) -> bool:
    return "Router" in type(module).__name__ or any(fnmatch.fnmatchcase(name, p) for p in ROUTER_PATTERNS)


def _selected(name: str, include, exclude) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
        fnmatch.fnmatchcase(name, p) for p in exclude
    )


@dataclass
class Coverage:
    """Parameter counts of a quantized model. ``quantized``: ``{module name: quantized weight elements}``
    (linears and experts); ``kept``: ``[(name, class, reason, parameter elements)]`` of every parameter
    owner left in 16 bits; ``total_params``: all parameters of the model before quantization."""

    total_params: int
    quantized: dict[str, int] = field(default_factory=dict)
    experts: tuple[str, ...] = ()
    kept: list[tuple[str, str, str, int]] = field(default_factory=list)

    @property
    def quantized_params(self) -> int:
        return sum(self.quantized.values())

    @property
    def share(self) -> float:
        """Quantized share of all parameters."""
        return self.quantized_params / self.total_params if self.total_params else 0.0

    def params_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, reason, n in self.kept:
            out[reason] = out.get(reason, 0) + n
        return out

    @property
    def non_embedding_share(self) -> float:
        """Quantized share of the parameters outside embeddings."""
        rest = self.total_params - self.params_by_reason().get(EMBEDDING, 0)
        return self.quantized_params / rest if rest else 0.0

    def to_dict(self) -> dict:
        return {
            "total_params": self.total_params,
            "quantized_params": self.quantized_params,
            "share": self.share,
            "non_embedding_share": self.non_embedding_share,
            "quantized": dict(self.quantized),
            "experts": list(self.experts),
            "kept": [{"name": n, "class": c, "reason": r, "params": p} for n, c, r, p in self.kept],
        }

    def summary(self) -> str:
        """The printed report: counts, and every module left in 16 bits (norms summarized)."""
        n_exp = len(self.experts)
        lines = [
            f"svdq.quantize: {self.quantized_params:,} of {self.total_params:,} parameters quantized "
            f"({100 * self.share:.1f}%; {100 * self.non_embedding_share:.1f}% of non-embedding) in "
            f"{len(self.quantized) - n_exp} linear layers and {n_exp} experts modules"
        ]
        norms = [k for k in self.kept if k[2] == NORM]
        others = [k for k in self.kept if k[2] != NORM]
        if others or norms:
            lines.append("left in 16 bits:")
        for name, cls, reason, n in others:
            lines.append(f"  {name or '<model>'} ({cls}, {n:,} params): {reason}")
        if norms:
            lines.append(f"  {len(norms)} norm modules ({sum(k[3] for k in norms):,} params): norm")
        return "\n".join(lines)


@dataclass
class Scan:
    linears: dict[str, nn.Linear]
    experts: dict[str, tuple[nn.Module, object]]
    coverage: Coverage


def scan_model(model: nn.Module, include, exclude, allow_unsupported: bool = False) -> Scan:
    """Targets and the coverage account of ``model`` (see the module docstring); nothing is changed."""
    seen: set[int] = set()

    def take(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cov = Coverage(total_params=total)
    linears: dict[str, nn.Linear] = {}
    experts: dict[str, tuple[nn.Module, object]] = {}
    claimed: list[str] = []
    unsupported = []
    for name, m in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        own = list(m.parameters(recurse=False))
        h = handler_for(m)
        cls = type(m).__name__
        if h is not None:
            claimed.append(name)
            params = list(m.parameters())
            if _selected(name, include, exclude):
                W1, W2, _, _ = h.weights(m)
                experts[name] = (m, h)
                cov.quantized[name] = W1.numel() + W2.numel()
                take(params)
            else:
                cov.kept.append((name, cls, EXCLUDED, take(params)))
            continue
        if not own:
            continue
        if type(m) is nn.Linear:
            if is_router(name, m):
                cov.kept.append((name, cls, ROUTER, take(own)))
            elif _selected(name, include, exclude):
                linears[name] = m
                cov.quantized[name] = m.weight.numel()
                take(own)
            else:
                cov.kept.append((name, cls, EXCLUDED, take(own)))
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            cov.kept.append((name, cls, CONV, take(own)))
        elif any(p.dim() >= 3 for p in own):
            if not allow_unsupported:
                shapes = [(n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)]
                unsupported.append((name, cls, shapes))
            cov.kept.append((name, cls, UNSUPPORTED, take(own)))
        elif isinstance(m, nn.Embedding | nn.EmbeddingBag):
            cov.kept.append((name, cls, EMBEDDING, take(own)))
        elif "Norm" in cls:
            cov.kept.append((name, cls, NORM, take(own)))
        elif is_router(name, m):
            cov.kept.append((name, cls, ROUTER, take(own)))
        else:
            cov.kept.append((name, cls, OTHER, take(own)))
    if unsupported:
        name, cls, params = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        supported = supported_classes() or ["none importable (is transformers installed?)"]
        raise ValueError(
            f"{name or '<model>'} ({cls}) owns fused parameters {params} that no experts handler understands"
            f"{more}; supported classes: {', '.join(supported)}. Register a handler "
            "(svdq.experts.register_experts_handler) or pass allow_unsupported=True to leave it in 16 bits"
        )
    cov.experts = tuple(experts)
    return Scan(linears, experts, cov)
