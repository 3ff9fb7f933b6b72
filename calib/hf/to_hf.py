"""A calibrated Megatron model imported from Hugging Face → nvidia-modelopt's HF layout under the Hugging
Face model's names (svdq/DESIGN.md §14): what :mod:`lora.io.modelopt_hf` writes for the HF model itself.

    import calib.hf.to_hf                  # registers the exporters (megatron_from_hf imports it too)
    model = megatron_from_hf(hf, spec="local"); calibrate(model, loop, cfg)
    lora.export(model, "kept/", format="modelopt-hf", forward_loop=loop)    # NVFP4_SVD, branch kept
    lora.export(model, "fold/", format="folded", smoothing="fold", forward_loop=loop)   # plain NVFP4

**Route.** :func:`~calib.hf.to_megatron.megatron_from_hf` sets :data:`lora.io.api.HF_ORIGIN` on the model
(an :class:`HFOrigin`: a copy of the HF config and the HF weights' dtype); :func:`lora.io.api.model_kind` then
says ``"megatron-hf"``, for which this module registers ``modelopt-hf`` (:func:`export_megatron_modelopt_hf`)
and ``folded`` (:func:`export_megatron_folded_hf`); every other format (``svdq``) is the Megatron one.

**How.** The quantized sites are read as the svdq export reads them
(:func:`lora.io.svdq_export.gather_megatron`, naming version "1": whole tensors, global expert indices,
``lora_up`` with the adapter scaling), one
:class:`~lora.io.naming.LinearState` per Megatron linear; the architecture file maps them back
(:mod:`calib.hf.arch.base`: ``hf_linear_parts``, ``hf_experts_module``, ``hf_tensors``):

* ``…self_attention.linear_qkv`` → ``self_attn.q_proj / k_proj / v_proj`` (the rows of each, the grouped-query
  interleave undone), ``linear_proj`` → ``o_proj``;
* expert ``g`` of ``…mlp.experts`` → ``mlp.experts.<g>.gate_proj / up_proj`` (rows ``[0, I)`` / ``[I, 2I)`` of
  ``linear_fc1``) and ``down_proj`` (``linear_fc2``); a shared factor is every expert's own (as the HF
  export writes it); an expert without a static range gets the projection's maximum (modelopt's fallback);
* norms, embedding, output layer (vocabulary padding dropped; tied: written once), router → ``mlp.gate``.

Splitting a fused linear is :func:`lora.io.modelopt_hf_layout.split_rows` (rows exact, the fused global
scale / smoothing / input range / ``lora_a`` shared by the parts). The in-memory HF names then go through
modelopt's reverse conversion with a weightless (meta-device) HF model of the config
(:func:`lora.io.modelopt_hf.hf_checkpoint_names`), the exclusions are modelopt's rule on that model minus
the linears written quantized, and the one writer (:func:`lora.io.modelopt_hf_layout.write_modelopt_hf`)
builds both configs. ``config.json`` is the HF config's ``to_json_string(use_diff=True)`` plus
``quantization_config``. 16-bit tensors (plain weights, ``pre_quant_scale``, the branch) are written in the
HF weights' dtype.

**Fold** (``folded``): each Megatron linear's branch is folded into its residual *before* the split
(:func:`lora.fold.fold_residual`, per expert for experts), so q / k / v (gate / up) share the re-quantized
fused tensor's global scale. ``smoothing="keep"``: ``NVFP4_AWQ``, ranges unchanged; ``"fold"``: plain
``NVFP4`` (vLLM's modelopt loader), the static range of each linear becomes ``max|x|`` of its raw
(HF-semantics) inputs over ``forward_loop`` times the layer's headroom (its static range over the measured
``max|x/s|``, below). The report is keyed by Megatron linear (``…linear_qkv``,
``…mlp.experts.experts.<g>.linear_fc1``).

**down_proj's range.** Megatron applies the router probability *before* ``linear_fc2`` (the expert MLP's
``per_token_scale``, :func:`lora.framework.compat.expert_mlp_probs`), HF after ``down_proj``: the calibrated
fc2 range is that of ``h·p``, smaller than what an HF engine feeds ``down_proj`` (it would clip there). So
both exports need ``forward_loop`` when the model has quantized experts — there is no fallback (no rescaling
of the old range is right; one ``ValueError`` naming ``forward_loop``, before any work) — and measure
``max|h/s|`` (``input_scale``; ``max|h|`` for ``smoothing="fold"``) per global expert over it with the
probability divided out (:func:`calib.hf.measure.measure_hf_inputs`), times the layer's headroom — its static
range over ``max|h·p/s|`` measured in the same pass, i.e. ``SVDQConfig.act_range_margin`` (svdq/DESIGN.md
§20) when the export runs the calibration data; an expert no row reached gets the
projection's maximum (listed in ``filled_input_scale``). Every other range is the calibrated one. The
command line passes ``--data``, or the calibration data the checkpoint records.

**Parallelism.** Collective under tensor / expert (and data) parallelism: every rank gathers the whole
tensors (:func:`~lora.io.svdq_export.gather_megatron`: shards, global expert indices, router, embeddings,
output layer, norms) and runs ``forward_loop``; the measured maxima are all-reduced (MAX) over all ranks, the
rows for the fold errors gathered to rank 0; global rank 0 folds and writes (atomically; an error there is
raised on every rank) and returns the result, the other ranks ``None``. The files equal the one-process
export's (expert parallelism: bit for bit; tensor parallelism: up to float32 rounding of the measured
ranges). Pipeline parallelism is refused.

Limits: every experts module quantized (HF keeps unquantized experts fused); no parallel expert adapters;
``moe_apply_probs_on_input`` refused.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from calib.hf.arch import get_arch
from calib.hf.arch.base import HFArch, MoEShape, hf_experts_module, hf_linear_parts, hf_tensors
from lora.io import api
from lora.io.naming import LinearState, read_linear

__all__ = [
    "HFOrigin",
    "attach_origin",
    "export_megatron_folded_hf",
    "export_megatron_modelopt_hf",
    "hf_skeleton",
    "megatron_hf_linears",
]


@dataclass(frozen=True)
class HFOrigin:
    """What a Megatron model imported from HF keeps of its source: the transformers config (a copy) and
    the dtype of the HF weights."""

    config: object
    dtype: torch.dtype


def attach_origin(model: nn.Module, config, dtype: torch.dtype) -> None:
    """Mark ``model`` as imported from the HF model of ``config`` (:data:`lora.io.api.HF_ORIGIN`)."""
    setattr(model, api.HF_ORIGIN, HFOrigin(copy.deepcopy(config), dtype))


def hf_skeleton(config) -> nn.Module:
    """The HF model of ``config`` without weights (meta device): its module names and conversion mapping."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _origin(model: nn.Module) -> tuple[HFOrigin, HFArch, MoEShape]:
    origin = getattr(model, api.HF_ORIGIN, None)
    if not isinstance(origin, HFOrigin):
        raise ValueError("the model was not built by calib.hf.to_megatron.megatron_from_hf (no HF origin)")
    arch = get_arch(origin.config.model_type)
    return origin, arch, arch.read_shape(origin.config)


def _experts_without_loop(model: nn.Module, forward_loop, what: str) -> None:
    """``ValueError`` when ``model`` has quantized experts and no ``forward_loop`` is given: their
    ``down_proj`` ranges are measured over it (module docstring)."""
    from lora.io.sites import find_sites

    groups = find_sites(model)[1]
    if groups and forward_loop is None:
        raise ValueError(
            f"{what} of a Megatron model imported from HF needs forward_loop: down_proj's input_scale "
            f"({next(iter(groups))} and every experts module) is measured over it without the router "
            "probability Megatron multiplies into linear_fc2's input"
        )


# ------------------------------------------------------------------------------------ Megatron linears


class _Tensors:
    """Naming-v1 tensors in memory, read through :func:`lora.io.naming.read_linear` (its checks)."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.t = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.t

    def check(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], who: str = "") -> None:
        t = self.t.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise ValueError(f"{who}: tensor {name} is {got}, expected {(dtype, tuple(shape))}")

    def get(self, name: str) -> Tensor:
        return self.t[name]


@dataclass
class MegatronLinears:
    """Every quantized linear of a Megatron model as whole :class:`LinearState` s: ``dense`` by site,
    ``experts[group][proj]`` a list over global experts; ``layouts[group][proj]``: ``(layout, rank)``;
    ``filled[group][proj]``: experts whose static range was filled; ``other``: every other tensor."""

    dense: dict[str, LinearState]
    experts: dict[str, dict[str, list[LinearState]]]
    layouts: dict[str, dict[str, tuple[str | None, int]]]
    filled: dict[str, dict[str, list[int]]]
    other: dict[str, Tensor]


def megatron_hf_linears(model: nn.Module, measured: dict | None = None) -> MegatronLinears | None:
    """The quantized linears of ``model`` read as the svdq export reads them (module docstring); with
    ``measured`` (:func:`calib.hf.measure.measure_hf_inputs`) each expert ``linear_fc2``'s static range is
    the measured HF-semantics ``max|h/s|``. Collective under tensor / expert parallelism: the linears on
    global rank 0, ``None`` on the other ranks."""
    import torch.distributed as dist

    from lora.io.svdq_export import gather_megatron

    tensors, doc = gather_megatron(model)
    for group, meta in doc["expert_groups"].items():
        if meta.get("parallel"):
            raise ValueError(f"{group}: a parallel expert adapter has no place in modelopt's HF layout")
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return _linears(tensors, doc, measured)


def _linears(tensors: dict[str, Tensor], doc: dict, measured: dict | None) -> MegatronLinears:
    reader = _Tensors(tensors)
    dense = {site: read_linear(reader, site, meta) for site, meta in doc["layers"].items()}
    experts, layouts, filled = {}, {}, {}
    for group, meta in doc["expert_groups"].items():
        experts[group], layouts[group] = {}, {}
        for proj, pmeta in meta["projections"].items():
            states = []
            for g in range(meta["num_experts"]):
                prefix = f"{group}.experts.{g}.linear_{proj}"
                st = read_linear(reader, prefix, dict(pmeta, input_amax=pmeta["input_amax"][g]), False)
                down = up = None
                if pmeta["rank"] > 0:
                    shared = f"{group}.linear_{proj}"
                    down = tensors.get(f"{prefix}.lora_down", tensors.get(f"{shared}.lora_down"))
                    up = tensors.get(f"{prefix}.lora_up", tensors.get(f"{shared}.lora_up"))
                    if down is None or up is None:
                        raise ValueError(f"{prefix}: the branch factors are missing")
                amax = st.input_amax
                if measured is not None and proj == "fc2":  # HF semantics: h, not h·p (module docstring)
                    m = measured[prefix]  # with the static range's headroom (svdq/DESIGN.md §20)
                    amax = m.smooth_amax * m.headroom(st.input_amax) if float(m.smooth_amax) > 0 else None
                states.append(
                    LinearState(st.residual, st.smooth, st.act_format, down, up, st.bias, amax, st.dtype)
                )
            states, gaps = _fill_ranges(f"{group}.linear_{proj}", states)
            experts[group][proj], layouts[group][proj] = states, (pmeta["layout"], pmeta["rank"])
            if gaps:
                filled.setdefault(group, {})[proj] = gaps
    other = {k: tensors[k] for k in doc["other_tensors"]}
    return MegatronLinears(dense, experts, layouts, filled, other)


def _with_amax(st: LinearState, amax: Tensor | None) -> LinearState:
    return LinearState(
        st.residual, st.smooth, st.act_format, st.lora_down, st.lora_up, st.bias, amax, st.dtype
    )


def _fill_ranges(who: str, states: list[LinearState]) -> tuple[list[LinearState], list[int]]:
    """Experts without a static range (or 0) get the maximum over the others (modelopt's fallback)."""
    amax = [None if s.input_amax is None else float(s.input_amax) for s in states]
    known = [a for a in amax if a is not None and a > 0]
    if not known:
        raise ValueError(
            f"{who}: no expert has a static activation range (input_amax), which modelopt's input_scale "
            "needs; calibrate with act_range='static'"
        )
    gaps = [g for g, a in enumerate(amax) if a is None or a <= 0]
    top = torch.tensor(max(known), dtype=torch.float32)
    return [_with_amax(s, top) if g in gaps else s for g, s in enumerate(states)], gaps


# ------------------------------------------------------------------------------------ to HF names


def _hf_linears(lin: MegatronLinears, arch: HFArch, shape: MoEShape):
    """``(linears {HF in-memory linear: LinearState}, {HF experts module: [its linears]}, sources
    {HF linear: Megatron linear})``."""
    from lora.io.modelopt_hf_experts import DOWN, GLU_PARTS
    from lora.io.modelopt_hf_layout import split_rows

    linears, experts, sources = {}, {}, {}
    for site, st in lin.dense.items():
        try:
            parts = hf_linear_parts(site, arch, shape)
        except KeyError:
            raise ValueError(
                f"{shape.model_type}: the quantized Megatron linear {site} has no HF linear"
            ) from None
        whole = [n for n, r in parts.items() if r is None]
        split = split_rows(st, {n: r for n, r in parts.items() if r is not None}) if not whole else {}
        for n in parts:
            linears[n] = st if n in whole else split[n]
            sources[n] = site
    for group, by_proj in lin.experts.items():
        try:
            module = hf_experts_module(group, arch)
        except KeyError:
            raise ValueError(
                f"{shape.model_type}: the Megatron experts module {group} has no HF one"
            ) from None
        experts[module] = []
        for g, (fc1, fc2) in enumerate(zip(by_proj["fc1"], by_proj["fc2"], strict=True)):
            inter = fc1.shape[0] // 2
            rows = {GLU_PARTS[0]: torch.arange(inter), GLU_PARTS[1]: torch.arange(inter, 2 * inter)}
            pieces = {**split_rows(fc1, rows), DOWN: fc2}
            for part, st in pieces.items():
                n = f"{module}.{g}.{part}"
                linears[n], sources[n] = st, f"{group}.experts.{g}.linear_{'fc2' if part == DOWN else 'fc1'}"
                experts[module].append(n)
    return linears, experts, sources


def _cast(st: LinearState, dtype: torch.dtype) -> LinearState:
    """``st`` with its 16-bit parts (branch, bias; the written pre_quant_scale) in ``dtype``."""
    down = None if st.lora_down is None else st.lora_down.to(dtype)
    up = None if st.lora_up is None else st.lora_up.to(dtype)
    bias = None if st.bias is None else st.bias.to(dtype)
    return LinearState(st.residual, st.smooth, st.act_format, down, up, bias, st.input_amax, dtype)


def _write(model, out_dir, lin: MegatronLinears, *, factor_keys, metadata, overwrite, export_format, extra):
    from lora.io.modelopt_hf import excluded_modules, hf_checkpoint_names
    from lora.io.modelopt_hf_experts import quantized_layer_names
    from lora.io.modelopt_hf_layout import FACTOR_KEYS, linear_state_tensors, producer, write_modelopt_hf

    if factor_keys not in FACTOR_KEYS:
        raise ValueError(f"factor_keys must be one of {sorted(FACTOR_KEYS)}, got {factor_keys!r}")
    origin, arch, shape = _origin(model)
    linears, experts, sources = _hf_linears(lin, arch, shape)
    tensors: dict[str, Tensor] = {}
    per_linear: dict[str, str] = {}
    for name, st in linears.items():
        t, per_linear[name] = linear_state_tensors(name, _cast(st, origin.dtype), factor_keys=factor_keys)
        tensors.update(t)
    in_experts = {n for names in experts.values() for n in names}
    algos = {n: a for n, a in per_linear.items() if n not in in_experts}
    for module, names in experts.items():
        algos.update(quantized_layer_names(module, {n: per_linear[n] for n in names}))
    for name, t in lin.other.items():
        try:
            mapped = hf_tensors(name, t, arch, shape)
        except KeyError:
            raise ValueError(f"{shape.model_type}: the Megatron tensor {name} has no HF tensor") from None
        tensors.update({k: v.detach().to(origin.dtype).cpu().contiguous().clone() for k, v in mapped.items()})
    skeleton = hf_skeleton(origin.config)
    excluded = [n for n in excluded_modules(skeleton) if n not in linears]
    ranks = Counter(st.rank for st in linears.values() if st.rank > 0)
    lora_rank = next(iter(ranks)) if factor_keys == "module" and len(ranks) == 1 else None
    svdq_meta = {
        "producer": producer(),
        "export_format": export_format,
        "model_kind": "megatron",
        "layers": {
            n: {"quant_algo": per_linear[n], "rank": linears[n].rank, "megatron": sources[n]}
            for n in linears
            if n not in in_experts
        },
        "experts": {
            hf_experts_module(group, arch): {
                "megatron": group,
                "num_experts": len(by_proj["fc1"]),
                "projections": {
                    p: {
                        "layout": lin.layouts[group][p][0],
                        "rank": lin.layouts[group][p][1],
                        "filled_input_scale": lin.filled.get(group, {}).get(p, []),
                    }
                    for p in by_proj
                },
            }
            for group, by_proj in lin.experts.items()
        },
        "user": metadata or {},
        **(extra or {}),
    }
    tensors, algos, excluded = hf_checkpoint_names(skeleton, tensors, algos, excluded)
    config = json.loads(origin.config.to_json_string(use_diff=True))
    return write_modelopt_hf(
        out_dir,
        tensors,
        algos,
        excluded,
        config,
        svdq=svdq_meta,
        lora_rank=lora_rank,
        overwrite=overwrite,
    )


def export_megatron_modelopt_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    forward_loop=None,
    factor_keys: str = "quantizer",
    metadata: dict | None = None,
    overwrite: bool = False,
) -> dict | None:
    """Write the calibrated Megatron ``model`` (imported from HF) in modelopt's HF layout with the branch
    kept (``NVFP4_SVD``), under the HF model's names (module docstring); returns ``hf_quant_config`` (on
    global rank 0; ``None`` on the other ranks). ``forward_loop`` (required when the model has quantized
    experts) measures every ``down_proj``'s ``input_scale`` in the HF semantics. Collective under tensor /
    expert parallelism (rank 0 writes). ``ValueError`` (one line, nothing written) for a missing
    ``forward_loop``, a dense layer without a static activation range, a linear or tensor without HF
    counterpart."""
    from lora.framework.tp import rank0_call
    from lora.io.modelopt_hf_layout import FACTOR_KEYS
    from lora.io.sites import check_no_pipeline

    check_no_pipeline()
    if factor_keys not in FACTOR_KEYS:
        raise ValueError(f"factor_keys must be one of {sorted(FACTOR_KEYS)}, got {factor_keys!r}")
    _origin(model)
    _experts_without_loop(model, forward_loop, "format 'modelopt-hf'")
    measured = None
    if forward_loop is not None:
        from calib.hf.measure import measure_hf_inputs

        measured = measure_hf_inputs(model, forward_loop)
    lin = megatron_hf_linears(model, measured)

    def write():
        return _write(
            model,
            out_dir,
            lin,
            factor_keys=factor_keys,
            metadata=metadata,
            overwrite=overwrite,
            export_format="modelopt-hf",
            extra=None,
        )

    return rank0_call(write)


# ------------------------------------------------------------------------------------ fold


def _fold(who: str, st: LinearState, smoothing: str, x: Tensor | None, raw_amax: Tensor | None):
    """``(rank-0 LinearState, errors)``: the branch folded into the residual
    (:func:`lora.fold.fold_residual`)."""
    from lora.fold import fold_residual
    from svdq.formats import dequantize

    res = st.residual
    q = dequantize(res, torch.float32)  # (out, in)
    out_f, in_f = st.shape
    A = st.lora_down if st.lora_down is not None else q.new_zeros(0, in_f)
    B = st.lora_up if st.lora_up is not None else q.new_zeros(out_f, 0)
    packed, smooth, errors, _, _ = fold_residual(
        q, st.smooth, A, B, fmt=res.fmt, smoothing=smoothing, quant_dtype=res.dtype, inputs=x
    )
    amax = st.input_amax if smoothing == "keep" else raw_amax
    folded = LinearState(packed, smooth, st.act_format, None, None, st.bias, amax, st.dtype)
    return folded, {"format": str(res.fmt), "smoothing": smoothing, "rank": st.rank, **errors}


def export_megatron_folded_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    smoothing: str = "keep",
    forward_loop=None,
    max_tokens: int = 4096,
    metadata: dict | None = None,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, dict] | None:
    """Fold every branch of the calibrated Megatron ``model`` (imported from HF) into its 4-bit residual and
    write modelopt's HF layout (``smoothing="keep"``: ``NVFP4_AWQ``; ``"fold"``: plain ``NVFP4``, needs
    ``forward_loop`` for the raw input ranges) under the HF model's names (module docstring); returns the
    fold report ``{Megatron linear: errors}`` (with ``forward_loop`` also the input-based errors of
    :func:`lora.fold.fold_errors`) on global rank 0, ``None`` on the other ranks. ``forward_loop`` is
    required when the model has quantized experts (``down_proj``'s range). ``model`` is not changed; nothing
    is written on error. Collective under tensor / expert parallelism (rank 0 folds and writes)."""
    from lora.fold import SMOOTHING_MODES, format_report
    from lora.framework.tp import rank0_call
    from lora.io.folded_hf import fold_summary_meta
    from lora.io.sites import check_no_pipeline

    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")
    if smoothing == "fold" and forward_loop is None:
        raise ValueError("smoothing='fold' needs forward_loop to measure the raw input ranges (max|x|)")
    check_no_pipeline()
    _origin(model)
    _experts_without_loop(model, forward_loop, "format 'folded'")
    captured: dict = {}
    if forward_loop is not None:
        from calib.hf.measure import measure_hf_inputs

        captured = measure_hf_inputs(model, forward_loop, max_tokens=max_tokens)
    lin = megatron_hf_linears(model, captured or None)

    def fold_and_write() -> dict[str, dict]:
        source = {
            "layers": {s: {"rank": st.rank} for s, st in lin.dense.items()},
            "experts": {
                g: {p: {"layout": lo, "rank": r} for p, (lo, r) in by.items()}
                for g, by in lin.layouts.items()
            },
        }
        report: dict[str, dict] = {}

        def fold_one(key: str, st: LinearState) -> LinearState:
            if st.rank == 0 and smoothing == "keep":
                return st
            m = captured.get(key)
            x, raw = (None, None) if m is None else (m.rows, m.raw_amax)
            if raw is not None and st.input_amax is not None and float(m.smooth_amax) > 0:
                # the (HF-semantics) static range over the measured max|x/s| is the layer's headroom
                raw = raw * (st.input_amax / m.smooth_amax)
            folded, report[key] = _fold(key, st, smoothing, x, raw if raw is not None and raw > 0 else None)
            return folded

        dense = {site: fold_one(site, st) for site, st in lin.dense.items()}
        experts, filled = {}, {}
        for group, by_proj in lin.experts.items():
            experts[group] = {}
            for proj, states in by_proj.items():
                new = [fold_one(f"{group}.experts.{g}.linear_{proj}", st) for g, st in enumerate(states)]
                new, gaps = _fill_ranges(f"{group}.linear_{proj}", new)
                experts[group][proj] = new
                if gaps:
                    filled.setdefault(group, {})[proj] = gaps
        layouts = {g: {p: (lo, 0) for p, (lo, _) in by.items()} for g, by in lin.layouts.items()}
        folded = MegatronLinears(dense, experts, layouts, filled, lin.other)
        extra = {"smoothing": smoothing, "fold": fold_summary_meta(report), "source": source}
        _write(
            model,
            out_dir,
            folded,
            factor_keys="quantizer",
            metadata=metadata,
            overwrite=overwrite,
            export_format="folded",
            extra=extra,
        )
        if verbose:
            print(f"svdq folded export to {out_dir} (smoothing={smoothing}); error added by the fold:")
            print(format_report(report))
        return report

    return rank0_call(fold_and_write)


def _register() -> None:
    api.register_exporter(
        "modelopt-hf",
        export_megatron_modelopt_hf,
        kinds=("megatron-hf",),
        layout="modelopt HF NVFP4_SVD layout, Hugging Face names",
    )
    api.register_exporter(
        "folded",
        export_megatron_folded_hf,
        kinds=("megatron-hf",),
        layout="modelopt HF NVFP4 layout, Hugging Face names",
        returns_report=True,
    )


_register()
