"""Open a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``) offline, validated.

    ckpt = open_checkpoint("path/to/DIR")        # every check below; nothing built but a meta-device model
    model = load_model("path/to/DIR")            # open_checkpoint, then transformers' from_pretrained
    model = build_model_from_config(ckpt.config)  # same architecture, random weights (restored later)

The directory is read with transformers' own classes only: ``trust_remote_code=False`` (no code from the
directory ever runs; an ``auto_map`` is ignored), ``local_files_only=True`` (no network). Weights are read
from safetensors only (never a pickle).

**Checks**, in this order, each failure a one-line ``ValueError`` (``FileNotFoundError`` for a missing
directory) naming the file or tensor, before any weight is read:

1. ``config.json`` exists and holds a JSON object;
2. its ``model_type`` is known to transformers and has a causal LM (``AutoModelForCausalLM``'s mapping; the
   message lists the supported model types), its ``architectures`` (if given) name that causal-LM class;
3. a weights file: ``model.safetensors``, or ``model.safetensors.index.json`` whose ``weight_map`` names
   existing shards (each tensor found in the shard the index names);
4. every safetensors header parses (8-byte little-endian length, a JSON object, per tensor a known dtype,
   an integer shape and data offsets inside the file matching ``numel × itemsize``);
5. the tensors match the model the config builds (built on the ``meta`` device, no memory): judged by
   transformers' own loading code run on meta tensors of the header shapes (its renamings and weight
   conversions, e.g. per-expert ``experts.0.gate_proj.weight`` on disk → fused ``experts.gate_up_proj`` in
   memory; tied weights such as ``lm_head.weight`` may be absent). When it reports a problem, the message
   names the checkpoint tensor: the header is compared with the model's state dict in the on-disk layout
   (what ``save_pretrained`` writes, :func:`transformers.core_model_loading.revert_weight_conversion`) or in
   the in-memory layout, whichever the checkpoint uses — a missing, an unexpected or a wrongly shaped tensor.

Tensors of the loaded model (:func:`load_model`): float32 by default (``dtype``), shapes as in the model's
``state_dict()`` (fused experts ``(E, 2·I, H)`` / ``(E, H, I)`` where transformers fuses them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# safetensors dtype names -> bytes per element (sub-byte float4 packs two per byte: counted as 0.5)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its file, dtype name and shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class HFCheckpoint:
    """A validated checkpoint directory: ``config`` (the parsed ``config.json``), the causal-LM class name,
    the weights files and every tensor's :class:`TensorInfo` (checkpoint names)."""

    root: Path
    config: dict
    architecture: str
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings and progress bars off (our errors are the one line that matters)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def causal_lm_classes() -> dict[str, str]:
    """``{model_type: causal-LM class name}`` of transformers' ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def read_config(root: str | os.PathLike) -> tuple[dict, str]:
    """``(config.json as a dict, causal-LM class name)`` of the directory ``root``, checks 1–2 of the
    module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {root} does not exist")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist (a Hugging Face checkpoint directory needs its config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config, check_architecture(config, path)


def check_architecture(config: dict, where: str | os.PathLike = CONFIG_FILE) -> str:
    """The causal-LM class name for ``config`` (its ``model_type`` / ``architectures``), or a one-line
    ``ValueError`` listing the model types ``AutoModelForCausalLM`` supports."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    classes = causal_lm_classes()
    supported = ", ".join(sorted(classes))
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{where}: no 'model_type' (transformers needs it to pick the architecture)")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is unknown to transformers {__version__} (svdq runs no code "
            f"from the checkpoint); causal LMs it supports: {supported}"
        )
    if model_type not in classes:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a causal language model in transformers "
            f"{__version__}; AutoModelForCausalLM supports: {supported}"
        )
    want = classes[model_type]
    archs = config.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"{where}: 'architectures' must be a list of class names, got {archs!r}")
        wrong = [a for a in archs if a != want]
        if wrong:
            raise ValueError(
                f"{where}: architectures {wrong} is not the causal LM of model_type {model_type!r} "
                f"(AutoModelForCausalLM builds {want}; svdq runs no code from the checkpoint)"
            )
    return want


def weight_files(root: str | os.PathLike) -> tuple[list[Path], dict[str, Path] | None]:
    """``(safetensors files, {tensor: file} from the index or None)``, check 3 of the module docstring."""
    root = Path(root)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            doc = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{index} is not valid JSON: {exc}") from None
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
        files = {}
        for name, fname in wmap.items():
            shard = root / fname
            if Path(fname).name != fname or not shard.is_file():
                raise ValueError(f"{index}: tensor {name} is in shard {fname}, which is not a file in {root}")
            files[fname] = shard
        return sorted(files.values()), {k: root / v for k, v in wmap.items()}
    single = root / SINGLE_FILE
    if single.is_file():
        return [single], None
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    if shards:
        raise ValueError(f"{root}: safetensors files {shards} but no {SINGLE_FILE} or {INDEX_FILE}")
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{root}: no safetensors weights, only {pickles}; svdq never unpickles (convert to safetensors)"
        )
    raise ValueError(f"{root}: no weights file ({SINGLE_FILE} or {INDEX_FILE})")


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file from its header alone (check 4 of the module docstring)."""
    path = Path(path)
    size = path.stat().st_size

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: safetensors header unreadable: {why}")

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad(f"the file has {size} bytes, fewer than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} does not fit the file ({size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"tensor {name}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise bad(f"tensor {name}: data_offsets {offsets!r} outside the {data_bytes} data bytes")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name}: {offsets[1] - offsets[0]} data bytes for shape {shape} of {dtype}")
        out[name] = TensorInfo(path, dtype, tuple(shape))
    return out


def config_object(config: dict):
    """The transformers config object (``AutoConfig.for_model``) of a ``config.json`` dict."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = {k: v for k, v in config.items() if k != "auto_map"}  # auto_map names code: never used
    try:
        return CONFIG_MAPPING[config["model_type"]].from_dict(fields)
    except Exception as exc:  # transformers raises ValueError / TypeError / KeyError of its own
        kind = config["model_type"]
        raise ValueError(f"{CONFIG_FILE}: transformers cannot read it as {kind}: {exc}") from None


def meta_model(config: dict) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device (names and shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    cfg = config_object(config)
    try:
        with _quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as exc:  # a config transformers reads but cannot build (e.g. heads not dividing hidden)
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = config["model_type"]
        raise ValueError(f"{CONFIG_FILE}: transformers cannot build {kind} from it: {line}") from None


def _ignored(model: nn.Module, attr: str) -> re.Pattern | None:
    patterns = set(getattr(model, attr, None) or ())
    if attr == "_keys_to_ignore_on_load_unexpected":  # transformers adds these two itself when loading
        buffers = [n for n, _ in model.named_buffers()]
        if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
            patterns.add(r"rotary_emb\.inv_freq")
        if any(b.endswith("position_ids") for b in buffers):
            patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _transformers_accepts(model: nn.Module, tensors: dict[str, TensorInfo]) -> bool | None:
    """Whether transformers' loader, run on meta tensors of the header shapes, loads every tensor of
    ``model`` with nothing missing, unexpected, mismatched or failing to convert; ``None`` when its
    internals cannot be used (another transformers version)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None
    fake = {k: torch.empty(t.shape, device="meta") for k, t in tensors.items()}  # (shape,) of the header
    try:
        with _quiet_transformers():
            mapping = get_model_conversion_mapping(model)
            cfg = LoadStateDictConfig(device_map={"": "meta"}, weight_mapping=mapping)
            info, _ = convert_and_load_state_dict_in_model(model, fake, cfg)
    except Exception:  # an internal API that changed: judge by the direct comparison only
        return None
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing_re, unexpected_re = (
        _ignored(model, "_keys_to_ignore_on_load_missing"),
        _ignored(model, "_keys_to_ignore_on_load_unexpected"),
    )
    missing = {k for k in info.missing_keys - tied if missing_re is None or not missing_re.search(k)}
    unexpected = {k for k in info.unexpected_keys if unexpected_re is None or not unexpected_re.search(k)}
    return not (missing or unexpected or info.mismatched_keys or info.conversion_errors or info.error_msgs)


def _layouts(model: nn.Module) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """``[(name, {tensor: shape})]``: the model's state dict in the on-disk layout (as ``save_pretrained``
    writes it) and in the in-memory layout."""
    sd = model.state_dict()
    memory = {k: tuple(v.shape) for k, v in sd.items()}
    layouts = []
    try:
        from transformers.core_model_loading import revert_weight_conversion

        disk = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(sd)).items()}
        if disk != memory:
            layouts.append(("on-disk", disk))
    except Exception:  # noqa: S110 - another transformers version: the in-memory layout only
        pass
    layouts.append(("in-memory", memory))
    return layouts


def _first_problem(model: nn.Module, tensors: dict[str, TensorInfo], root: Path) -> str | None:
    """The first difference between the checkpoint's tensors and the model's state dict (in the layout the
    checkpoint shares most names with), as one line, or ``None``."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing_re = _ignored(model, "_keys_to_ignore_on_load_missing")
    unexpected_re = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    layouts = _layouts(model)
    _, expected = max(layouts, key=lambda item: len(set(item[1]) & set(tensors)))
    arch = type(model).__name__
    for key in sorted(expected):
        if key in tensors or key in tied or (missing_re is not None and missing_re.search(key)):
            continue
        return f"{root}: tensor {key} is missing (the {arch} that config.json builds has it)"
    for key in sorted(tensors):
        if key not in expected and (unexpected_re is None or not unexpected_re.search(key)):
            return f"{tensors[key].file}: unexpected tensor {key} (the {arch} config.json builds has none)"
    for key in sorted(tensors):
        if key in expected and tuple(tensors[key].shape) != expected[key]:
            return (
                f"{tensors[key].file}: tensor {key} has shape {list(tensors[key].shape)}, the {arch} that "
                f"config.json builds expects {list(expected[key])}"
            )
    return None


def check_tensors(model: nn.Module, tensors: dict[str, TensorInfo], root: str | os.PathLike) -> None:
    """Check 5 of the module docstring for the meta-device ``model``; a one-line ``ValueError``."""
    root = Path(root)
    accepted = _transformers_accepts(model, tensors)
    if accepted:
        return
    problem = _first_problem(model, tensors, root)
    if problem is not None:
        raise ValueError(problem)
    if accepted is False:
        raise ValueError(f"{root}: transformers cannot load these tensors into {type(model).__name__}")


def open_checkpoint(root: str | os.PathLike) -> HFCheckpoint:
    """Validate the checkpoint directory ``root`` (checks 1–5 of the module docstring) without reading any
    weight; returns its :class:`HFCheckpoint`."""
    root = Path(root).expanduser()
    config, arch = read_config(root)
    files, index = weight_files(root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise ValueError(f"{f}: tensor {name} is also in {tensors[name].file}")
            tensors[name] = info
    if index is not None:
        for name, f in index.items():
            if name not in tensors or tensors[name].file != f:
                raise ValueError(f"{root / INDEX_FILE}: tensor {name} is not in the shard {f.name} it names")
        unlisted = sorted(set(tensors) - set(index))
        if unlisted:
            raise ValueError(f"{tensors[unlisted[0]].file}: tensor {unlisted[0]} is not in {INDEX_FILE}")
    check_tensors(meta_model(config), tensors, root)
    return HFCheckpoint(root, config, arch, files, tensors)


def load_model(
    root: str | os.PathLike, *, dtype: torch.dtype = torch.float32, checked: HFCheckpoint | None = None
) -> nn.Module:
    """The causal LM of the checkpoint directory ``root`` with its weights (:func:`open_checkpoint` first,
    unless ``checked`` is its result), in ``dtype`` on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    ckpt = checked or open_checkpoint(root)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.root),
            config=config_object(ckpt.config),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=dtype,
            device_map=None,
        )
    return model.eval()


def build_model_from_config(config: dict, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The causal LM of a ``config.json`` dict with weights drawn from ``seed`` (the architecture a
    quantized checkpoint is restored into), in ``dtype`` on the CPU."""
    from transformers import AutoModelForCausalLM

    check_architecture(config)
    cfg = config_object(config)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False, dtype=dtype)
    return model.eval()
