"""One front door for models on disk: ``lora.export`` writes a quantized model in a format, ``lora.load``
reads back what svdq can read, detecting the format.

    import lora
    lora.export(model, "out/")                                   # format="svdq": our checkpoint format
    report = lora.export(model, "out/", format="folded", forward_loop=loop).report
    lora.load(fresh_model, "out/")                               # svdq checkpoints and adapter files

**Formats** (:data:`EXPORTERS`: format → model kind → :class:`Exporter`; each format lives in its own
module, :func:`register_exporter` adds one):

* ``svdq`` — :func:`lora.io.svdq_export.export_quantized` (torch and Megatron models): packed 4-bit
  residuals, scales, smoothing and the adapters, loading back exactly (:func:`load`).
* ``folded`` — the adapters folded into the 4-bit residuals (rank 0). Megatron models:
  :func:`lora.io.folded.export_folded`, written in the svdq format (:func:`load` reads it); torch models
  (:class:`svdq.SVDQLinear` layers): :func:`lora.io.folded_hf.export_folded_hf`, modelopt's HF NVFP4 layout.
  Both return the fold report (:attr:`Exported.report`).
* ``modelopt-hf`` — :func:`lora.io.modelopt_hf.export_modelopt_hf` (torch models): nvidia-modelopt's HF
  layout for NVFP4 SVDQuant; Megatron models imported from Hugging Face: ``calib.hf.to_hf`` (below).
* ``compressed-tensors`` — :func:`lora.io.compressed_tensors.export_compressed_tensors` (torch models,
  fused experts too): the branch folded into NVFP4 weights written by the compressed-tensors library
  (``nvfp4-pack-quantized``, what vLLM / transformers read); returns the fold report.
* ``peft`` — :func:`lora.io.peft.export_peft` (torch models, fused experts too): the branches as a PEFT
  LoRA adapter, with the residual base it applies to in ``base/``.

**Megatron models imported from Hugging Face** (kind ``"megatron-hf"``, a refinement of ``"megatron"``): a
Megatron model carrying the attribute :data:`HF_ORIGIN` (set by ``calib.hf.to_megatron.megatron_from_hf``)
uses the exporters registered for ``"megatron-hf"`` and, for a format without one, those of
``"megatron"`` (:data:`KIND_PARENTS`). ``calib.hf.to_hf`` registers ``modelopt-hf`` and ``folded`` for it on
import (modelopt's HF layout under the Hugging Face model's names; lora never imports calib), so the
Megatron ``folded`` (svdq format) stays what Megatron models not built from Hugging Face get.

``options`` are the exporter's keyword arguments (see each function); an unknown format, a format that
does not apply to the model kind or an option the exporter does not take raises a one-line ``ValueError``
before any work. :func:`supported_options` picks, from a general set of settings, those an exporter
takes (what the command line does). Every exporter writes atomically (:mod:`lora.io.atomic`).

**Load** (:func:`load`): an svdq checkpoint directory (formats ``svdq`` and Megatron ``folded``) →
:func:`lora.io.svdq_export.load_quantized`; an adapter file (``svdq-lora``, or the older ``svdq-params``)
→ :func:`lora.model.load_adapters`. The HF layouts (``modelopt-hf``, torch ``folded``, ``peft``) are for
other engines: :func:`detect_format` names them and :func:`load` refuses them with a one-line
``ValueError``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

MODEL_KINDS = ("torch", "megatron", "megatron-hf")
KIND_PARENTS = {"megatron-hf": "megatron"}  # a kind without its own exporter for a format uses its parent's
HF_ORIGIN = "svdq_hf_origin"  # attribute of a Megatron model imported from Hugging Face (module docstring)


@dataclass(frozen=True)
class Exporter:
    """One format for one model kind: ``fn(model, out_dir, **options)``; ``layout``: what is written where
    the format name does not say it (for messages); ``returns_report``: ``fn`` returns a fold report."""

    format: str
    kind: str
    fn: Callable[..., Any]
    layout: str | None = None
    returns_report: bool = False
    fused_experts: bool = False  # writes svdq.SVDQExperts (fused Hugging Face experts) too

    def takes(self, option: str) -> bool:
        """Whether ``fn`` has a keyword argument ``option``."""
        params = inspect.signature(self.fn).parameters
        return option in params and option not in ("model", "out_dir")


@dataclass
class Exported:
    """What :func:`export` wrote: the directory, the format and model kind, the layout (or ``None``), the
    exporter's return value, and the fold report for ``folded`` (else ``None``)."""

    out_dir: Path
    format: str
    kind: str
    layout: str | None
    result: Any
    report: dict[str, dict] | None


EXPORTERS: dict[str, dict[str, Exporter]] = {}
_NOT_FOR: dict[str, str] = {}  # format -> why it does not apply to the kinds it lacks ({format} placeholders)


def register_exporter(
    name: str,
    fn: Callable[..., Any],
    *,
    kinds: tuple[str, ...] = ("torch", "megatron"),
    layout: str | None = None,
    returns_report: bool = False,
    not_for: str | None = None,
    fused_experts: bool = False,
) -> None:
    """Register ``fn(model, out_dir, **options)`` as format ``name`` for the model ``kinds``. ``not_for``:
    the message for the other kinds, with ``{format}`` placeholders for format names (spelled by the
    caller of :func:`check_format`). ``fused_experts``: ``fn`` writes :class:`svdq.SVDQExperts` modules
    (a torch model holding one is refused by the other formats, instead of losing its experts)."""
    unknown = sorted(set(kinds) - set(MODEL_KINDS))
    if unknown:
        raise ValueError(f"unknown model kinds {unknown}; expected some of {list(MODEL_KINDS)}")
    for kind in kinds:
        exporter = Exporter(name, kind, fn, layout, returns_report, fused_experts)
        EXPORTERS.setdefault(name, {})[kind] = exporter
    if not_for is not None:
        _NOT_FOR[name] = not_for


def model_kind(model: nn.Module) -> str:
    """``"megatron"`` for a model with Megatron linears / experts or adapters on them (``"megatron-hf"``
    when it carries :data:`HF_ORIGIN`), else ``"torch"``."""
    from lora.families import is_megatron_model

    if not is_megatron_model(model):
        return "torch"
    return "megatron-hf" if getattr(model, HF_ORIGIN, None) is not None else "megatron"


def _exporter_for(format: str, kind: str) -> Exporter | None:
    exporter = EXPORTERS[format].get(kind)
    if exporter is None and kind in KIND_PARENTS:
        return _exporter_for(format, KIND_PARENTS[kind])
    return exporter


def _quoted(name: str) -> str:
    return f"format {name!r}"


def check_format(format: str, kind: str, spell: Callable[[str], str] = _quoted) -> Exporter:
    """The :class:`Exporter` of ``format`` for model ``kind``; a one-line ``ValueError`` for an unknown
    format (listing the known ones) or one that does not apply to ``kind``. ``spell`` writes a format
    name in the message (``"--format peft"`` on the command line)."""
    if format not in EXPORTERS:
        known = ", ".join(EXPORTERS)
        raise ValueError(f"unknown export format {format!r}; known formats: {known}")
    exporter = _exporter_for(format, kind)
    if exporter is None:
        template = _NOT_FOR.get(format)
        if template is None:
            kinds = " / ".join(EXPORTERS[format])
            raise ValueError(f"{spell(format)} is for {kinds} models, not {kind} models")
        raise ValueError(template.format_map({name: spell(name) for name in EXPORTERS}))
    return exporter


def formats_taking(option: str) -> list[str]:
    """The formats (registration order) whose exporter takes ``option`` for some model kind."""
    return [name for name, by_kind in EXPORTERS.items() if any(e.takes(option) for e in by_kind.values())]


def supported_options(format: str, kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``settings`` that the exporter of ``format`` for ``kind`` takes."""
    exporter = check_format(format, kind)
    return {k: v for k, v in settings.items() if exporter.takes(k)}


def export(model: nn.Module, out_dir: str | os.PathLike, format: str = "svdq", **options) -> Exported:
    """Write ``model`` to ``out_dir`` in ``format`` (module docstring); returns an :class:`Exported`.

    Collective under tensor / expert parallelism for Megatron models, like the exporters. Raises a
    one-line ``ValueError`` before any work for an unknown format, a format that does not apply to the
    model kind, or an option the format's exporter does not take.
    """
    kind = model_kind(model)
    exporter = check_format(format, kind)
    unknown = [k for k in options if not exporter.takes(k)]
    if unknown:
        takes = sorted(p for p in inspect.signature(exporter.fn).parameters if exporter.takes(p))
        raise ValueError(
            f"format {format!r} ({kind} models) takes no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(takes)}"
        )
    from lora.io.values import first_non_finite

    bad = first_non_finite(model.named_parameters())  # adapters, 16-bit weights (buffers checked per format)
    if bad is not None:
        raise ValueError(f"parameter {bad} holds NaN or inf: refusing to export a non-finite model")
    if not exporter.fused_experts:
        from svdq.experts import SVDQExperts

        fused = [n for n, m in model.named_modules() if isinstance(m, SVDQExperts)]
        if fused:
            takes = sorted(f for f in EXPORTERS if getattr(_exporter_for(f, kind), "fused_experts", False))
            raise ValueError(
                f"format {format!r} does not write fused experts (svdq.SVDQExperts at {fused[0]}"
                f"{f' and {len(fused) - 1} more' if len(fused) > 1 else ''}); formats that do: {takes}"
            )
    result = exporter.fn(model, out_dir, **options)
    report = result if exporter.returns_report else None
    return Exported(Path(out_dir), format, kind, exporter.layout, result, report)


# ------------------------------------------------------------------------------------------ load


def detect_format(path: str | os.PathLike) -> str:
    """What ``path`` holds, from its metadata: ``"svdq"`` (a checkpoint directory or its
    ``model.safetensors`` / index file), ``"adapters"`` (a ``svdq-lora`` / ``svdq-params`` file),
    ``"modelopt-hf"`` (a directory with ``hf_quant_config.json``: ``modelopt-hf`` or torch ``folded``) or
    ``"peft"`` (a directory with ``adapter_config.json``). ``FileNotFoundError`` for a missing path,
    ``ValueError`` for anything else."""
    from lora.io.container import INDEX_FILE, SINGLE_FILE

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_dir():
        if (p / "hf_quant_config.json").is_file():  # it has a model.safetensors too, in its own layout
            return "modelopt-hf"
        if (p / "adapter_config.json").is_file():
            return "peft"
        if (p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file():
            from lora.io.container import read_metadata

            read_metadata(p)  # validates: an svdq checkpoint, or a ValueError naming the field
            return "svdq"
        raise ValueError(f"{p}: no svdq checkpoint, modelopt HF export or PEFT adapter in this directory")
    if p.name.endswith(".json"):
        return "svdq"
    from safetensors import safe_open

    from lora.model import FILE_FORMAT, OLD_PARAMS_FORMAT

    try:
        with safe_open(str(p), framework="pt") as fh:
            fmt = (fh.metadata() or {}).get("format")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ValueError(f"{p} is not a safetensors file: {exc}") from None
    if fmt in (FILE_FORMAT, OLD_PARAMS_FORMAT):
        return "adapters"
    if fmt == "svdq":
        return "svdq"
    raise ValueError(f"{p}: metadata format {fmt!r} is neither an svdq checkpoint nor an adapter file")


def load(model: nn.Module, path: str | os.PathLike, **options):
    """Load ``path`` into ``model`` by its detected format (:func:`detect_format`); returns what the loader
    returns: the checkpoint metadata (:func:`lora.io.svdq_export.load_quantized`: ``trainable``, ``storage``,
    ``progress``) or the adapter names (:func:`lora.model.load_adapters`: ``strict``, ``seed``). The HF
    layouts raise a one-line ``ValueError`` (they are read by modelopt / PEFT / inference engines)."""
    fmt = detect_format(path)
    if fmt == "svdq":
        from lora.io.svdq_export import load_quantized

        return load_quantized(model, path, **options)
    if fmt == "adapters":
        from lora.model import load_adapters

        return load_adapters(model, path, **options)
    reader = {"modelopt-hf": "nvidia-modelopt or an inference engine", "peft": "peft.PeftModel"}[fmt]
    raise ValueError(f"{path} is a {fmt} export; svdq does not load it back (read it with {reader})")


# ------------------------------------------------------------------------------------------ formats


def _register_builtin() -> None:
    from lora.io.compressed_tensors import export_compressed_tensors
    from lora.io.folded import export_folded
    from lora.io.folded_hf import export_folded_hf
    from lora.io.modelopt_hf import export_modelopt_hf
    from lora.io.peft import export_peft
    from lora.io.svdq_export import export_quantized

    register_exporter("svdq", export_quantized, fused_experts=True)
    register_exporter("folded", export_folded, kinds=("megatron",), layout="svdq format", returns_report=True)
    register_exporter(
        "folded",
        export_folded_hf,
        kinds=("torch",),
        layout="modelopt HF NVFP4 layout",
        returns_report=True,
        fused_experts=True,
    )
    register_exporter(
        "modelopt-hf",
        export_modelopt_hf,
        kinds=("torch",),
        not_for="{modelopt-hf}: the modelopt HF layout and PEFT adapters are for dense torch models "
        "(svdq.SVDQLinear layers, NVFP4 W4A4) and Megatron models imported from Hugging Face "
        "(calib.hf.to_megatron), not Megatron models; use {svdq} (adapters kept) "
        "or {folded} (adapters merged into the 4-bit weights)",
        fused_experts=True,
    )
    register_exporter(
        "peft",
        export_peft,
        kinds=("torch",),
        layout="PEFT LoRA adapter + base/ (residual base)",
        fused_experts=True,
        not_for="{peft}: PEFT adapters are for dense torch models and Hugging Face models with fused "
        "experts (svdq.SVDQLinear, svdq.SVDQExperts), not Megatron models; use {svdq} (adapters kept) "
        "or {folded}",
    )
    register_exporter(
        "compressed-tensors",
        export_compressed_tensors,
        kinds=("torch",),
        layout="compressed-tensors nvfp4-pack-quantized, branch folded",
        returns_report=True,
        fused_experts=True,
        not_for="{compressed-tensors}: the compressed-tensors export is for torch / Hugging Face models "
        "(svdq.SVDQLinear, svdq.SVDQExperts), not Megatron models; use {svdq} or {folded}",
    )


_register_builtin()
