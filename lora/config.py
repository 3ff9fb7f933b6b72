"""``LoraConfig``: which modules get adapters, their rank and scaling, the expert layouts, the init.

An adapted linear computes ``y = base(x) + scaling · (x · Aᵀ) · Bᵀ`` with ``A = lora_down (r × in)``,
``B = lora_up (out × r)`` and ``scaling = alpha / rank`` (``alpha=None`` means ``alpha = rank``, i.e.
scaling 1, the convention for adapters initialized from an SVD branch).

``targets`` are :func:`fnmatch.fnmatch` patterns over module names (``model.named_modules()``):

* a matched ``ColumnParallelLinear`` / ``RowParallelLinear`` (or Transformer Engine linear) gets a
  :class:`lora.adapters.layers.LoraLinear`; a plain TE ``GroupedLinear`` a
  :class:`lora.adapters.grouped.GroupedLoraLinear` (layout ``fc1_layout``);
* a matched ``SequentialMLP`` (e.g. ``"*.mlp.experts"``) gets a :class:`lora.adapters.layers.LoraExperts`: its
  experts' ``linear_fc1`` / ``linear_fc2`` get branches in ``fc1_layout`` / ``fc2_layout`` (one of
  ``svdq.solvers.shared_basis.LAYOUTS``: ``"shared-down"``, ``"shared-up"``, ``"per-expert"``, or ``None`` for
  none) and, with ``parallel_expert=True``, a parallel adapter hidden → r → hidden around each whole expert;
  a matched ``TEGroupedMLP`` gets a :class:`lora.adapters.grouped.LoraGroupedExperts` with the same branches.

Linears inside a ``SequentialMLP`` are adapted only through their experts module, never on their own.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

from svdq.config_base import ConfigBase
from svdq.solvers.shared_basis import LAYOUTS, PER_EXPERT, SHARED_DOWN, SHARED_UP

INITS = ("kaiming", "zeros", "random")

ATTENTION = ("*.self_attention.linear_qkv", "*.self_attention.linear_proj")
DENSE_MLP = ("*.mlp.linear_fc1", "*.mlp.linear_fc2")
EXPERTS = ("*.mlp.experts",)


@dataclass(frozen=True)
class LoraConfig(ConfigBase):
    """Adapter configuration (see the module docstring).

    ``init``: ``"kaiming"`` — ``A`` kaiming-uniform, ``B = 0`` (plain LoRA: the adapted model starts equal
    to the base); ``"zeros"`` — both zero (placeholders to be filled by ``init_from`` or a load; a zero
    adapter gets no gradient); ``"random"`` — both kaiming-uniform (tests, debugging). Random values are
    drawn per *global* factor name from ``seed``, so they do not depend on tensor or expert parallelism.
    ``rank_pattern``: ranks other than ``rank`` for some branches, ``{fnmatch pattern: rank}`` over branch
    names (see :meth:`rank_for`); calibration picks expert layouts per projection at an equal parameter
    budget, hence possibly different ranks for fc1 and fc2. ``scaling`` stays ``alpha / rank`` with the
    default ``rank`` for every branch.
    ``dtype``: adapter parameter dtype (``None``: the base weight's). ``dropout`` on the adapter input
    (training only; masks consistent under tensor parallelism, see :mod:`lora.adapters.dropout`).
    """

    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = ATTENTION + DENSE_MLP + EXPERTS
    fc1_layout: str | None = SHARED_DOWN
    fc2_layout: str | None = SHARED_UP
    rank_pattern: dict[str, int] = field(default_factory=dict)
    parallel_expert: bool = False
    dropout: float = 0.0
    init: str = "kaiming"
    dtype: str | None = None

    def normalize(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))

    def validate(self) -> None:
        if not _positive_int(self.rank):
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        for pattern, value in self.rank_pattern.items():
            if not isinstance(pattern, str) or not _positive_int(value):
                raise ValueError(f"rank_pattern maps patterns to positive ints, got {pattern!r}: {value!r}")
        for name in ("fc1_layout", "fc2_layout"):
            value = getattr(self, name)
            if value is not None and value not in LAYOUTS:
                raise ValueError(f"{name} must be one of {LAYOUTS} or None, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty")

    def __hash__(self) -> int:  # rank_pattern is a dict
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v for v in values))

    def rank_for(self, name: str) -> int:
        """Rank of the branch called ``name``: the value of the FIRST pattern of ``rank_pattern`` (in its
        order) that ``name`` matches (:func:`fnmatch.fnmatchcase`), else ``rank``. Branch names are those
        of their factor keys: a dense adapter's module name (``decoder.layers.0.self_attention.linear_qkv``);
        for an experts module ``N`` its projections ``N.linear_fc1`` / ``N.linear_fc2`` and its parallel
        adapter ``N.parallel``."""
        for pattern, value in self.rank_pattern.items():
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return self.rank

    @classmethod
    def _upgrade(cls, d: dict, version: int) -> dict:
        """Version 0 had ``fc1_rank`` / ``fc2_rank`` (``None``: ``rank``), the ranks of the expert
        projections; they become ``rank_pattern`` entries ``*.experts.linear_fc1`` / ``…fc2``, which match
        the expert projections of Megatron's MoE layers (``….mlp.experts``) and no dense linear (a linear
        named ``….experts.linear_fc1`` is inside an experts module, never adapted on its own)."""
        if version > 0:
            return d
        d = dict(d)
        rank = d.get("rank", cls.rank)
        pattern = dict(d.get("rank_pattern", {}))
        for proj in ("fc1", "fc2"):
            value = d.pop(f"{proj}_rank", None)
            if value is not None and value != rank:
                pattern[f"*.experts.linear_{proj}"] = value
        if pattern:
            d["rank_pattern"] = pattern
        return d

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (1 when ``alpha`` is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def has_expert_adapters(self) -> bool:
        return self.fc1_layout is not None or self.fc2_layout is not None or self.parallel_expert

    @classmethod
    def preset(cls, name: str, **overrides) -> LoraConfig:
        """A named preset (:data:`PRESETS`) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown LoRA preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


PRESETS: dict[str, dict] = {
    # attention and dense MLP linears (MoE experts untouched)
    "dense": {"targets": ATTENTION + DENSE_MLP, "fc1_layout": None, "fc2_layout": None},
    # attention + experts: fc1 with one lora_down shared by the layer's experts, fc2 with a shared lora_up
    "moe": {"targets": ATTENTION + DENSE_MLP + EXPERTS},
    # the baseline: independent LoRA on every expert linear
    "moe-per-expert": {
        "targets": ATTENTION + DENSE_MLP + EXPERTS,
        "fc1_layout": PER_EXPERT,
        "fc2_layout": PER_EXPERT,
    },
    # the upstream design: hidden → r → hidden around each whole expert (shared down, per-expert up),
    # weighted by the routing probability
    "moe-parallel": {
        "targets": ATTENTION + DENSE_MLP + EXPERTS,
        "fc1_layout": None,
        "fc2_layout": None,
        "parallel_expert": True,
    },
}
