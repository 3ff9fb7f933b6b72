"""Pieces shared by the Megatron export and load (:mod:`lora.io.svdq_export`, :mod:`lora.io.svdq_load`).

* **Sites**: where a model holds quantized layers — dense (:class:`~lora.adapters.layers.LoraLinear` over an
  :class:`~lora.base.SVDQBase`, or a bare ``SVDQBase`` without a branch, e.g. after
  ``lora.modelopt_quant.fold_adapters``) and expert groups (a ``LoraExperts`` or bare ``SequentialMLP``
  whose experts' linears are ``SVDQBase``).
* **Other tensors**: every other state-dict entry, under its global name (a ``SequentialMLP`` expert's
  local index replaced by its global one), with how it is sharded (tensor-parallel ``partition_dim``,
  gated fc1 ``[gate_k; up_k]``, expert-parallel). Transformer Engine spellings get the local spec's
  names, so that TE-spec and local-spec models read each other's exports: a fused input norm
  (``….self_attention.linear_qkv.layer_norm_weight``, or the ``input_norm`` split off it by calibration)
  is ``….input_layernorm.weight`` (``mlp.linear_fc1``'s is ``….pre_mlp_layernorm.weight``), as in
  Megatron's own checkpoint key map; a ``TEGroupedMLP`` weight ``….experts.linear_fc1.weight<i>`` is
  ``….experts.local_experts.<g>.linear_fc1.weight``. The norm of a quantized site is exported with the
  other tensors (the site's own tensors hold only the linear).

Whole tensors are gathered from tensor-parallel shards and expert-parallel ranks with
:mod:`lora.framework.tp` (``gather_dim``, ``gather_packed``, ``all_gather``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from lora.adapters.layers import ExpertGroup, ExpertLoraLinear, ExpertParallelAdapter, LoraLinear
from lora.base import SVDQBase
from lora.families import family_of
from lora.families.megatron_linear import is_glu_fc1
from lora.framework.te import is_te_grouped_mlp, tp_group_of
from lora.framework.tp import group_rank_size, take_shard

MODEL_KIND = "megatron"


# ------------------------------------------------------------------------------------------ sites


def unwrap(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, (ExpertLoraLinear, ExpertParallelAdapter, LoraLinear)) else m


def linear_bias(linear: nn.Module) -> Tensor | None:
    """The linear's bias, or ``None`` (TE keeps an empty tensor as ``bias`` when it has none)."""
    b = getattr(linear, "bias", None)
    return b if isinstance(b, Tensor) and b.numel() > 0 else None


def expert_linears(seq: nn.Module, proj: str) -> list[nn.Module]:
    """The ``linear_<proj>`` module (wrapper or bare) of every local expert of a ``SequentialMLP``."""
    return [getattr(unwrap_expert(e), f"linear_{proj}") for e in seq.local_experts]


def unwrap_expert(e: nn.Module) -> nn.Module:
    return e.base if isinstance(e, ExpertParallelAdapter) else e


def find_sites(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """``(dense, expert_groups)``: quantized dense sites ``{name: LoraLinear | SVDQBase}`` and expert groups
    ``{name: LoraExperts | SequentialMLP}`` by module name, recognised by module family
    (:mod:`lora.families`, looking through an adapter to its base). ``ValueError`` naming the module for
    an adapter on an unquantized base (merge it or save it with ``save_adapters``) or a partly quantized
    expert group."""
    dense, expert_groups = {}, {}
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        adapted = isinstance(m, (LoraLinear, ExpertGroup))
        family = family_of(m.base if adapted else m)
        if family is None:
            continue
        if family.kind == "experts" and family.name != "sequential-mlp":
            if adapted:
                raise ValueError(
                    f"{name}: adapters on unquantized TEGroupedMLP experts cannot be exported as a quantized "
                    "layer; save them with lora.save_adapters"
                )
            continue
        if family.kind == "experts":
            seq = m.base if adapted else m
            bases = [unwrap(lin) for p in ("fc1", "fc2") for lin in expert_linears(seq, p)]
            quantized = [isinstance(b, SVDQBase) for b in bases]
            if all(quantized):
                expert_groups[name] = m
            elif any(quantized):
                raise ValueError(f"{name}: only some expert linears are quantized; export needs all or none")
            elif adapted:
                raise ValueError(
                    f"{name}: adapters on unquantized experts cannot be exported as a quantized layer; "
                    "save them with lora.save_adapters"
                )
            inside.append(name)
        elif isinstance(m, LoraLinear) or family.name == "svdq-base":
            if not isinstance(unwrap(m), SVDQBase):
                raise ValueError(
                    f"{name}: an adapter on an unquantized base cannot be exported as a quantized layer; "
                    "merge it (lora.merge_adapters) or save it with lora.save_adapters"
                )
            dense[name] = m
            inside.append(name)
    return dense, expert_groups


def check_no_pipeline() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("export/load of pipeline-parallel models is not supported")


# ------------------------------------------------------------------------------------------ other tensors


@dataclass
class OtherTensor:
    """A state-dict entry that is not part of a quantized site.

    ``key``: the model's state-dict key; ``tensor``: this rank's tensor. ``dim`` / ``tp_group`` / ``glu``:
    its tensor-parallel sharding (``dim`` None: replicated). ``expert``: ``(ep_group, local index,
    local expert count)`` for a parameter of a ``SequentialMLP`` expert, whose global name uses the global
    expert index; ``template`` has ``{g}`` where that index goes.
    """

    key: str
    tensor: Tensor
    dim: int | None
    tp_group: object
    glu: bool
    expert: tuple | None
    template: str

    def global_name(self, g: int | None = None) -> str:
        if self.expert is None:
            return self.template  # the canonical name (see the module docstring)
        return self.template.format(g=self.first_global if g is None else g)

    @property
    def first_global(self) -> int:
        ep_group, index, num_local = self.expert
        return group_rank_size(ep_group)[0] * num_local + index

    @property
    def full_shape(self) -> tuple[int, ...]:
        shape = list(self.tensor.shape)
        if self.dim is not None:
            shape[self.dim] *= group_rank_size(self.tp_group)[1]
        return tuple(shape)

    def local_from(self, full: Tensor) -> Tensor:
        """This rank's shard of the whole tensor ``full``."""
        tp_rank, tp_size = group_rank_size(self.tp_group)
        return take_shard(full, self.dim, tp_rank, tp_size, self.glu)


_NORM_NAMES = (  # TE fused input norms (and the norm split off them) -> the local spec's norm modules
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
    ("self_attention.linear_qkv.input_norm.", "input_layernorm."),
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("mlp.linear_fc1.input_norm.", "pre_mlp_layernorm."),
)
_GROUPED_PARAM = re.compile(r"(weight|bias)(\d+)")


def canonical_name(key: str) -> str:
    """The export name of a (non-expert) state-dict key: TE fused-norm spellings become the local spec's
    (see the module docstring); anything else is unchanged."""
    for te_part, local_part in _NORM_NAMES:
        head, sep, tail = key.partition(te_part)
        if sep and (not head or head.endswith(".")):
            return head + local_part + tail
    return key


def is_site_norm(key: str, site: str) -> bool:
    """``key`` is the input-norm parameter of the site ``site`` (a TE fused norm, or the norm split off it):
    exported and loaded with the other tensors."""
    return key.startswith((f"{site}.layer_norm_", f"{site}.input_norm.")) and not key.endswith("_extra_state")


def _expert_template(model: nn.Module, key: str) -> tuple[tuple | None, str]:
    from megatron.core.transformer.moe.experts import SequentialMLP

    parts = key.split(".")
    grouped = _GROUPED_PARAM.fullmatch(parts[-1]) if len(parts) >= 3 else None
    if grouped and parts[-2] in ("linear_fc1", "linear_fc2"):
        mlp = model.get_submodule(".".join(parts[:-2]))
        if is_te_grouped_mlp(mlp):  # weight<i> of a TE grouped linear: local expert i's linear weight
            template = ".".join([*parts[:-2], "local_experts", "{g}", parts[-2], grouped.group(1)])
            return (mlp.ep_group, int(grouped.group(2)), mlp.num_local_experts), template
    for j in range(len(parts) - 2):
        if parts[j + 1] != "local_experts":
            continue
        seq = model.get_submodule(".".join(parts[: j + 1]))
        if isinstance(seq, SequentialMLP) and parts[j + 2].isdigit():
            index = int(parts[j + 2])
            template = ".".join([*parts[: j + 2], "{g}", *parts[j + 3 :]])
            return (seq.ep_group, index, seq.num_local_experts), template
    return None, canonical_name(key)


def other_tensors(model: nn.Module, skip: list[str]) -> list[OtherTensor]:
    """Every state-dict entry of ``model`` outside the ``skip`` prefixes (``_extra_state`` excluded), in
    state-dict order, with its sharding."""
    from megatron.core import parallel_state

    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state") or not isinstance(t, Tensor):
            continue
        if any((key == p or key.startswith(p + ".")) and not is_site_norm(key, p) for p in skip):
            continue
        module_name = key.rpartition(".")[0]
        module = model.get_submodule(module_name) if module_name else model
        dim, tp_group, glu = None, None, False
        if getattr(t, "tensor_model_parallel", False):
            dim = int(t.partition_dim)
            tp_group = tp_group_of(module) or parallel_state.get_tensor_model_parallel_group()
            glu = dim == 0 and (is_glu_fc1(model, module_name) or _is_grouped_glu_fc1(model, module_name))
        expert, template = _expert_template(model, key)
        out.append(OtherTensor(key, t.detach(), dim, tp_group, glu, expert, template))
    return out


def _is_grouped_glu_fc1(model: nn.Module, name: str) -> bool:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return attr == "linear_fc1" and is_te_grouped_mlp(parent) and bool(parent.config.gated_linear_unit)


def expert_key(group_name: str, g: int, suffix: str) -> str:
    """``<experts>.experts.<g>.<suffix>``: naming version 1 of a per-expert tensor."""
    return f"{group_name}.experts.{g}.{suffix}"
