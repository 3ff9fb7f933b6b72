"""Adapters on quantized Megatron linears: nvidia-modelopt (``mtq.quantize``) in either order, and the
*fold* of an adapter into a quantized base (re-quantize ``W_q + scaling·B·A``, report the added error).

    import modelopt.torch.quantization as mtq
    from lora import LoraConfig, add_adapters
    from lora.modelopt_quant import modelopt_quantize, fold_adapters

    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, loop); add_adapters(model, cfg)   # (a) quantize, then adapt
    add_adapters(model, cfg); modelopt_quantize(model, mtq.INT8_DEFAULT_CFG, loop)  # (b) adapt, then quantize
    report = fold_adapters(model, forward_loop=loop)   # {name: {"weight_err": …, "output_err": …}}

**How modelopt meets the wrappers** (modelopt 0.47, megatron-core 0.16/0.19; see the tests):

* modelopt converts modules whose *exact* type is registered (``ColumnParallelLinear``,
  ``RowParallelLinear``, ``SequentialMLP``, ``MLP``, …) in place (class swap, same object). Our wrappers
  are not registered, so it converts the Megatron linear held as ``.base`` and leaves the wrapper alone.
  Its quantization patches Megatron's GEMM function *inside the base's forward*; the adapter branch is
  computed by the wrapper outside it with ``F.linear`` on plain parameters, and modelopt inserts no
  quantizer for parameters, only for modules. So **adapters stay unquantized** in both orders without
  any configuration (:func:`exclude_adapters` adds a ``*lora*`` disable entry as a guard only).
* Order (a) (quantize, then :func:`lora.add_adapters`) works as is: the converted classes subclass the
  Megatron ones. ``merge_adapters`` refuses these bases; use :func:`fold_adapters`.
* Order (b) with plain ``mtq.quantize`` quantizes the same modules with the same quantizers, and when the
  adapters contribute nothing at calibration time (``init="kaiming"``: ``lora_up = 0``) the result equals
  order (a) bit for bit. Three differences remain, which :func:`modelopt_quantize` removes by quantizing the
  *unwrapped* model (:func:`unwrapped_adapters`): (1) quantizer names gain ``.base.`` segments
  (``…linear_qkv.base.weight_quantizer``), so a ``quant_cfg`` pattern such as
  ``"*linear_qkv.weight_quantizer"`` silently misses; (2) modelopt's ``SequentialMLP`` setup seeds the
  expert linears' ``_parallel_state`` by attribute *write* on ``local_experts[i].linear_fc1`` — the
  wrapper, which keeps it — so the expert linears get the dense data/tensor-parallel groups and no
  expert-parallel group (wrong amax synchronization under expert parallelism); (3) the calibration
  forward runs through the adapters (choose with ``calibrate_with_adapters``).
* State-dict and ``sharded_state_dict`` keys are the same in both orders (wrappers keep their base's
  keys), quantizer ``_amax`` / ``_extra_state`` included. modelopt's own state (``mto.modelopt_state``)
  records module names: ``mto.restore_from_modelopt_state`` on an adapted model fails ("Unmatched keys")
  unless run inside :func:`unwrapped_adapters` (save it there too).
* SVDQuant bases (:mod:`lora.base`, ``is_quantized_base``) are already quantized: :func:`modelopt_quantize`
  disables modelopt's quantizers inside them.

**Fold** (:func:`fold_adapters`). For an adapter on a quantized base with effective weight ``W_q`` (raw
input coordinates), the folded weight is ``W_fold = Q(W_q + scaling·B·A)`` in the base's own format, the
adapter is removed, and the added error is reported per linear against the unfolded adapted layer:

* ``weight_err = ‖W_fold − T‖ / ‖T‖`` with ``T = W_q + scaling·B·A`` (float64);
* ``delta_rel = ‖scaling·B·A‖ / ‖T‖`` (the error of simply dropping the adapter, for scale);
* with ``forward_loop``: ``act_weight_err = ‖X·(W_fold − T)ᵀ‖ / ‖X·Tᵀ‖`` on the layer's captured raw
  inputs ``X``, and ``output_err = ‖y_fold − y‖ / ‖y‖``, the actual layer outputs before and after (this
  one includes activation quantization).

Bases: a modelopt-quantized linear (``W_q = Q_w(W̃)·diag(p)``, ``p`` the input quantizer's
``pre_quant_scale`` if any; the stored weight becomes ``T·diag(1/p)`` and the weight quantizer is
re-calibrated on it, max calibration, synchronized over tensor parallelism as modelopt does); an SVDQuant
base (residual ``R`` in smoothed coordinates, ``W_q = Q(R)·diag(1/s)``; the residual becomes
``Q(R + scaling·B·A·diag(s))``); or a plain floating-point base holding already-quantized values, with
``weight_format`` given (the generic path, :func:`fold_weight`). Weight errors are global under tensor
parallelism; input-based errors need tensor-parallel size 1.
"""

from __future__ import annotations

import contextlib
import copy
from fnmatch import fnmatch

import torch
from torch import Tensor, nn

from lora.adapters.grouped import GroupedLoraLinear
from lora.adapters.layers import ExpertGroup, ExpertLoraLinear, ExpertParallelAdapter, LoraLinear, linear_mode
from lora.fold import delta_weight, fold_errors, fold_residual, requantize, squared_sum
from lora.framework.te import tp_group_of
from lora.model import adapter_modules, remove_adapters
from svdq.formats import PackedTensor, dequantize, parse_format
from svdq.metrics import relative_error
from svdq.stats import run_with_hooks

WRAPPER_TYPES = (LoraLinear, ExpertGroup, ExpertLoraLinear, ExpertParallelAdapter, GroupedLoraLinear)
ADAPTER_EXCLUDE = {"quantizer_name": "*lora*", "enable": False}


# ------------------------------------------------------------------------------------ unwrap / quantize


def _wrapper_sites(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, wrapper)`` for every adapter wrapper below ``model``."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, WRAPPER_TYPES)
    ]


def _unwrap(sites) -> None:
    for parent, name, w in sites:
        setattr(parent, name, w.base)


def _rewrap(sites) -> None:
    for parent, name, w in reversed(sites):
        current = parent._modules[name]
        if current is not w.base:  # the module was replaced (modelopt converts in place, but be safe)
            w.base = current
        setattr(parent, name, w)


@contextlib.contextmanager
def unwrapped_adapters(model: nn.Module):
    """Inside this block ``model`` has no adapter wrappers (each sits where its base was); on exit they
    are put back around whatever module is then at their place. For modelopt calls that must see the
    plain Megatron model: ``mtq.quantize``, ``mto.modelopt_state`` / ``mto.restore_from_modelopt_state``,
    export."""
    sites = _wrapper_sites(model)
    _unwrap(sites)
    try:
        yield model
    finally:
        _rewrap(sites)


def _quant_cfg_entries(config: dict, entries: list[dict]) -> dict:
    config = copy.deepcopy(config)
    qcfg = config.get("quant_cfg")
    if isinstance(qcfg, list):
        qcfg.extend(entries)
    elif isinstance(qcfg, dict):  # the older {pattern: cfg} form
        for e in entries:
            qcfg[e["quantizer_name"]] = {"enable": e["enable"]}
    else:
        raise TypeError(f"unsupported modelopt config: quant_cfg is {type(qcfg).__name__}")
    return config


def exclude_adapters(config: dict) -> dict:
    """A copy of a modelopt config with ``{"quantizer_name": "*lora*", "enable": False}`` appended.

    A guard only: the wrappers of :mod:`lora.adapters.layers` compute the branch with ``F.linear`` on
    parameters and modelopt quantizes modules, so no quantizer is ever named ``*lora*`` today."""
    return _quant_cfg_entries(config, [dict(ADAPTER_EXCLUDE)])


def modelopt_quantize(
    model: nn.Module, config: dict, forward_loop=None, *, calibrate_with_adapters: bool = False
):
    """``mtq.quantize`` for a model that may hold adapters; returns ``model`` (quantized in place).

    The quantization runs on the unwrapped model (:func:`unwrapped_adapters`): quantizer names, parallel
    groups and ``quant_cfg`` matching are those of the plain Megatron model, so the result equals
    quantize-then-adapt. ``calibrate_with_adapters``: the calibration forward runs with the adapters
    (the activations the adapted model produces); default: without them (the base's own activations,
    as in order (a)). Adapters are never quantized; quantizers inside SVDQuant bases are disabled.
    """
    import modelopt.torch.quantization as mtq

    sites = _wrapper_sites(model)
    _unwrap(sites)
    try:
        svdq = [n for n, m in model.named_modules() if n and getattr(m, "is_quantized_base", False)]
        disable = [{"quantizer_name": f"{n}.*", "enable": False} for n in svdq]
        config = _quant_cfg_entries(config, [dict(ADAPTER_EXCLUDE), *disable])
        loop = forward_loop
        if forward_loop is not None and calibrate_with_adapters:

            def loop(m):
                # adapters back for the calibration forward only: modelopt's passes over the module
                # tree afterwards (expert amax sync, TP/DP sync) see the plain model again
                _rewrap(sites)
                try:
                    return forward_loop(m)
                finally:
                    _unwrap(sites)

        mtq.quantize(model, config, loop)
    finally:
        _rewrap(sites)
    return model


# ------------------------------------------------------------------------------------------------ fold


def is_modelopt_quantized(base: nn.Module) -> bool:
    """A module converted by ``mtq.quantize`` (it carries modelopt's weight and input quantizers)."""
    return hasattr(base, "weight_quantizer") and hasattr(base, "input_quantizer")


def fold_weight(
    w_q: Tensor,
    delta: Tensor,
    fmt,
    *,
    col_scale: Tensor | None = None,
    inputs: Tensor | None = None,
    global_amax: Tensor | float | None = None,
) -> tuple[PackedTensor, dict]:
    """The generic fold: re-quantize ``T = w_q·diag(c) + delta`` in ``fmt``.

    ``w_q`` ``(out × in)``: the dequantized base weight as stored (values on the format's grid, in the
    stored coordinates); ``col_scale`` ``c`` ``(in,)`` maps stored to raw input coordinates (raw weight
    ``= stored·diag(c)``; ``1/s`` for a smoothed SVDQuant residual, default 1); ``delta`` the adapter's
    ``scaling·B·A`` in raw coordinates. Returns the packed new stored weight ``Q(T·diag(1/c))`` (the
    dtype of ``w_q``; :func:`svdq.formats.dequantize` it) and the errors of :mod:`the module docstring
    <lora.modelopt_quant>` (``act_weight_err`` when raw ``inputs`` ``(N × in)`` are given).
    """
    packed, target, w_fold = requantize(w_q, delta, fmt, col_scale=col_scale, global_amax=global_amax)
    return packed, {"format": str(parse_format(fmt)), **fold_errors(w_fold, target, delta.double(), inputs)}


def _factors(w: nn.Module) -> tuple[Tensor, Tensor, float]:
    """``(A, B, scaling)`` of a wrapper (this rank's shards)."""
    if isinstance(w, LoraLinear):
        return w.lora_down, w.lora_up, w.scaling
    A, B = w.local_factors()
    return A, B, w._expert_group.scaling


def _delta(w: nn.Module) -> Tensor:
    """``scaling·B·A`` of a wrapper in float64 (this rank's weight shard shape)."""
    A, B, scaling = _factors(w)
    return delta_weight(B.detach(), A.detach(), scaling, torch.float64)


def _recalibrate(wq, weight: Tensor, base: nn.Module, mode: str) -> None:
    """Max-calibrate modelopt weight quantizer ``wq`` afresh on ``weight``, then synchronize its amax over
    tensor parallelism exactly as ``max_calibrate`` does (column: axis None/-1, row: None/0; dynamic
    block formats are not synchronized)."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    if wq._calibrator is None or getattr(wq, "_dynamic", False):
        return  # dynamic range: nothing is stored
    if getattr(wq, "_use_constant_amax", False) or getattr(wq, "_constant_amax", None) is not None:
        return
    wq._calibrator.reset()
    enable_stats_collection(wq)
    wq(weight.detach())
    finish_stats_collection(wq)
    ps = getattr(base, "parallel_state", None)
    tp = getattr(ps, "tensor_parallel_group", None)
    if tp is None or not tp.is_initialized() or tp.world_size() <= 1:
        return
    if wq.block_sizes is not None and wq.block_sizes.get("type", None) == "dynamic":
        return
    if wq.axis in ([None, -1] if mode == "column" else [None, 0]) and wq.amax is not None:
        wq.sync_amax_across_distributed_group(tp)


def _fold_modelopt(base: nn.Module, delta: Tensor, recalibrate: bool, mode: str, who: str):
    from modelopt.torch.quantization.nn import TensorQuantizer

    wq, iq = base.weight_quantizer, base.input_quantizer
    w = base.weight
    if not isinstance(wq, TensorQuantizer) or getattr(wq, "is_nvfp4_static", False):
        raise NotImplementedError(f"{who}: fold supports plain TensorQuantizer weight quantizers, got {wq}")
    if not w.dtype.is_floating_point or type(w).__name__ == "QTensorWrapper":
        raise NotImplementedError(f"{who}: compressed (real-quant) weight; fold before mtq.compress")
    if any(getattr(q, "rotate_is_enabled", False) for q in (wq, iq)) or wq.pre_quant_scale is not None:
        raise NotImplementedError(f"{who}: rotated or weight-pre-scaled quantizers are not supported")
    p = iq.pre_quant_scale
    c = torch.ones(w.shape[1], dtype=torch.float64, device=w.device)
    if p is not None:
        c = p.detach().double().reshape(-1)

    def effective() -> Tensor:  # stored weight as the GEMM sees it, float64
        return (wq(w.detach()) if wq.is_enabled else w.detach()).double()

    with torch.no_grad():
        target = effective() * c + delta
        w.copy_((target / c).to(w.dtype))
        if recalibrate and wq.is_enabled:
            _recalibrate(wq, w, base, mode)
        w_fold = effective() * c
    return w_fold, target, _describe(wq)


def _describe(q) -> str:
    if not q.is_enabled:
        return "modelopt(disabled)"
    return f"modelopt(num_bits={q.num_bits}, axis={q.axis}, block_sizes={q.block_sizes})"


def _fold_svdq(base: nn.Module, w: nn.Module, weight_format, mode: str, who: str, x: Tensor | None):
    """Fold wrapper ``w``'s branch into its SVDQuant ``base`` (in place); ``(format, weight errors)``."""
    fmt = base.weight_format
    if weight_format is not None and parse_format(weight_format) != fmt:
        raise ValueError(f"{who}: the SVDQuant base is {fmt}, weight_format {weight_format} was asked for")
    A, B, scaling = _factors(w)
    with torch.no_grad():
        packed, _, errors, _, _ = fold_residual(
            base.residual_weight(),
            base.smooth,
            A,
            B,
            scaling,
            fmt=fmt,
            tp_group=tp_group_of(base),
            mode=mode,
            inputs=x,
        )
        base.set_residual(packed)
    return f"svdq({fmt})", errors


def _fold_plain(base: nn.Module, delta: Tensor, weight_format, mode: str, who: str):
    w = getattr(base, "weight", None)
    if w is None or not w.dtype.is_floating_point:
        raise TypeError(f"{who}: the base has no floating-point weight to fold into")
    if weight_format is None:
        raise TypeError(
            f"{who}: the base is not quantized; use merge_adapters(), or pass weight_format to re-quantize"
        )
    fmt = parse_format(weight_format)
    with torch.no_grad():
        packed, target, w_fold = requantize(w, delta, fmt, tp_group=tp_group_of(base), mode=mode)
        w.copy_(dequantize(packed, w.dtype))
    return w_fold, target, str(fmt)


def _fold_targets(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(m, LoraLinear):
        return [(name, m)]
    if m.parallel:
        raise TypeError(f"{name}: a parallel expert adapter spans the activation; it cannot be folded")
    return [(f"{name}.experts.{w.global_index}.linear_{w.proj}", w) for w in m.expert_wrappers()]


def _tp_size(w: nn.Module) -> int:
    return w.tp_size if isinstance(w, LoraLinear) else w.etp_size


def fold_adapters(
    model: nn.Module,
    pattern: str = "*",
    *,
    weight_format=None,
    forward_loop=None,
    max_tokens: int = 4096,
    recalibrate: bool = True,
) -> dict[str, dict]:
    """Fold the adapters matching ``pattern`` into their quantized bases and remove them.

    Returns ``{linear: errors}`` keyed by the adapter name for a dense linear and
    ``<experts adapter>.experts.<global expert>.linear_fc1|fc2`` for expert linears; ``errors`` holds
    ``format``, ``weight_err``, ``delta_rel`` and, with ``forward_loop`` (run once, before folding, to
    capture each adapted linear's inputs and outputs, at most ``max_tokens`` rows each),
    ``act_weight_err``, ``output_err`` and ``tokens`` (see the module docstring).

    ``weight_format``: the format for plain floating-point bases (whose weight is taken as the already
    dequantized ``W_q``); quantized bases use their own (an SVDQuant base of another format is an error).
    ``recalibrate``: re-run max calibration of a modelopt weight quantizer on the folded weight (else its
    old ranges clip it). Adapters must be enabled and unmerged; parallel expert adapters cannot be folded.
    """
    chosen = {n: m for n, m in adapter_modules(model).items() if fnmatch(n, pattern)}
    targets = []
    for name, m in chosen.items():
        if m.merged or not m.enabled:
            raise RuntimeError(f"{name}: fold needs an enabled, unmerged adapter")
        targets += _fold_targets(name, m)
    captured: dict[str, list] = {}
    if forward_loop is not None:
        if any(_tp_size(w) > 1 for _, w in targets):
            raise NotImplementedError("input-based fold errors need tensor parallel size 1")
        captured = _capture(model, targets, forward_loop, max_tokens)
    report = {}
    for key, w in targets:
        base = w.base
        mode = linear_mode(base)
        x, y = captured.get(key, (None, None))
        if getattr(base, "is_quantized_base", False):
            fmt, errors = _fold_svdq(base, w, weight_format, mode, key, x)
        else:
            delta = _delta(w)
            if is_modelopt_quantized(base):
                w_fold, target, fmt = _fold_modelopt(base, delta, recalibrate, mode, key)
            else:
                w_fold, target, fmt = _fold_plain(base, delta, weight_format, mode, key)
            errors = fold_errors(w_fold, target, delta, x, tp_group_of(base))
        report[key] = {"format": fmt, **errors}
        if x is not None and x.shape[0]:
            with torch.no_grad():
                y_fold = base(x)[0]
            report[key]["output_err"] = relative_error(squared_sum(y_fold - y), squared_sum(y))
            report[key]["tokens"] = int(x.shape[0])
    for name in chosen:
        remove_adapters(model, name)
    return report


def _capture(model, targets, forward_loop, max_tokens: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Inputs and (adapted) outputs of each target wrapper over ``forward_loop``, as 2-D row blocks."""
    rows: dict[str, list] = {key: [[], [], 0] for key, _ in targets}
    handles = []
    for key, w in targets:

        def hook(mod, args, out, key=key):
            slot = rows[key]
            room = max_tokens - slot[2]
            if room <= 0:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])[:room]
            y = out[0].detach()
            y = y.reshape(-1, y.shape[-1])[: x.shape[0]]
            # copies: Megatron adds the residual into a linear's output in place (eval, no grad)
            slot[0].append(x.clone())
            slot[1].append(y.clone())
            slot[2] += x.shape[0]

        handles.append(w.register_forward_hook(hook))
    run_with_hooks(model, forward_loop, handles)
    return {k: (torch.cat(v[0]), torch.cat(v[1])) for k, v in rows.items() if v[0]}
