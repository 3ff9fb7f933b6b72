"""What the ``svdq`` subcommands share: model / data options, opening a model from ``--model`` or from a
quantized ``--checkpoint``, and the model source recorded in exported checkpoints.

An exported checkpoint (:func:`lora.io.svdq_export.export_quantized`) written by the command line carries, in
its user metadata, ``{"model": ModelSource.to_dict(), ...}``; :func:`open_model_and_data` rebuilds that model
(the fresh, unquantized architecture) and loads the quantized state into it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from calib.models import (
    BACKENDS,
    DEFAULT_HF_SEQ_LEN,
    ModelSource,
    build_model,
    resolve_source,
    with_options,
)

MODEL_KEY = "model"


def add_model_args(p, *, checkpoint: bool, model: bool = True) -> None:
    """``--checkpoint DIR`` (a quantized checkpoint) and / or ``--model SRC [--model-config FILE]``."""
    if checkpoint:
        p.add_argument(
            "--checkpoint", type=Path, help="quantized checkpoint directory (svdq calibrate/export)"
        )
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="skip the per-tensor checksums of --checkpoint (trusted multi-GB checkpoints; the value "
            "checks stay)",
        )
    if checkpoint and model:
        p.add_argument(
            "--trust-model-source",
            action="store_true",
            help="build the module:function factory recorded in --checkpoint (imports and calls that "
            "code; without it a recorded factory must be repeated as --model)",
        )
    if model:
        p.add_argument(
            "--model",
            default=None,
            help=MODEL_HELP + (" (default: the checkpoint's recorded model)" if checkpoint else ""),
        )
        p.add_argument("--model-config", type=Path, default=None, help="TinyMoEConfig fields (JSON file)")
        add_hf_args(p, checkpoint=checkpoint)


MODEL_HELP = (
    "'tiny' (built-in GPT-MoE), 'megatron:DIR' (config.json + dist_checkpointing files), 'hf:DIR' (a local "
    "Hugging Face checkpoint: config.json + *.safetensors, read offline, no code from it runs) or a "
    "module:function factory (an nn.Module returning logits or an object with .logits)"
)


def add_hf_args(p, *, checkpoint: bool = False) -> None:
    """``--seq-len`` and ``--backend`` (``hf:DIR`` models)."""
    recorded = "; default: the checkpoint's" if checkpoint else ""
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help=f"hf:DIR models: tokens per sequence (default {DEFAULT_HF_SEQ_LEN}, at most the config's "
        f"max_position_embeddings{recorded}); the vocabulary is the config's vocab_size",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="hf:DIR models: 'torch' (the transformers model, default) or 'megatron' (its Megatron twin)"
        + (recorded and "; default: the checkpoint's"),
    )


def add_data_args(p, tokens_default: int | None) -> None:
    """``--data``, ``--tokenizer``, JSON Lines fields (``--text-field``, ``--prompt-field``,
    ``--response-field``) and ``--tokens``."""
    p.add_argument(
        "--data",
        default="builtin",
        metavar="SRC",
        help="'builtin', a text file or directory, a JSON Lines file (.jsonl, or detected by content) or "
        "a .npy of token ids",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="PATH",
        help="tokenizer for text data: a tokenizer.json file or a local Hugging Face tokenizer directory "
        "(read offline, never remote code); default: UTF-8 bytes",
    )
    p.add_argument("--text-field", default="text", metavar="NAME", help="JSON Lines: the field with the text")
    p.add_argument(
        "--prompt-field",
        default=None,
        metavar="NAME",
        help="JSON Lines prompt / response pairs: the prompt field (no loss on its tokens)",
    )
    p.add_argument(
        "--response-field",
        default=None,
        metavar="NAME",
        help="JSON Lines prompt / response pairs: the response field (the only loss targets)",
    )
    help_tokens = "tokens to use" + ("" if tokens_default else " (default: all)")
    p.add_argument("--tokens", type=positive_int, default=tokens_default, metavar="N", help=help_tokens)


def jsonl_fields(args):
    """The :class:`calib.data.JsonlFields` of the arguments (``ValueError`` for a half pair)."""
    from calib.data import JsonlFields

    return JsonlFields(
        text=getattr(args, "text_field", "text"),
        prompt=getattr(args, "prompt_field", None),
        response=getattr(args, "response_field", None),
    )


def checkpoint_source(path: str | os.PathLike) -> ModelSource:
    """The model source recorded in a quantized checkpoint's user metadata."""
    from lora.io.svdq_export import read_export_metadata

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta = read_export_metadata(path)
    user = meta.get("user") or {}
    if MODEL_KEY not in user:
        raise ValueError(f"checkpoint {path} does not record its model source; pass --model")
    return ModelSource.from_dict(user[MODEL_KEY])


def model_source(args) -> ModelSource:
    """The source the arguments name: ``--model`` (with ``--model-config``), else the one recorded in
    ``--checkpoint``'s metadata. Nothing is built."""
    options = {"seq_len": getattr(args, "seq_len", None), "backend": getattr(args, "backend", None)}
    if args.model is not None:
        return resolve_source(args.model, args.model_config, getattr(args, "seed", 0), **options)
    if args.model_config is not None:
        raise ValueError("--model-config needs --model")
    if getattr(args, "checkpoint", None) is None:
        raise ValueError("pass --checkpoint DIR or --model SRC")
    source = checkpoint_source(args.checkpoint)
    check_trusted(source, args.checkpoint, getattr(args, "trust_model_source", False))
    return with_options(source, **options)


def check_trusted(source: ModelSource, checkpoint, trusted: bool) -> None:
    """``ValueError`` for a ``module:function`` factory recorded in a checkpoint unless ``trusted``: a file
    never makes svdq import or call code (the built-in sources ``tiny``, ``megatron:DIR``, ``hf:DIR`` are
    data and need no trust)."""
    if source.kind == "factory" and not trusted:
        raise ValueError(
            f"checkpoint {checkpoint} records the model factory {source.spec!r}; svdq does not import code "
            f"a file names: repeat it as --model {source.spec} or pass --trust-model-source"
        )


def load_data(args, vocab_size: int, seq_len: int, batch: int, device=None):
    """``(ids (N,), batches)`` of ``--data`` / ``--tokenizer`` / JSON Lines fields / ``--tokens`` for a model
    of that vocabulary and sequence length (input errors raise here, naming the file); prompt / response
    data puts a ``loss_mask`` in every batch."""
    from calib.data import load_stream, token_batches

    ids, mask = load_stream(
        args.data, vocab_size, max_tokens=args.tokens, tokenizer=args.tokenizer, fields=jsonl_fields(args)
    )
    return ids, token_batches(ids, seq_len, batch, device=device, mask=mask)


def open_model_and_data(args, batch: int | None, *, trainable: bool = False):
    """``(LoadedModel, ids, batches)`` for the arguments (call after ``init_parallel``); ``batch=None``:
    no data (``ids``, ``batches`` are ``None``).

    The data is read and validated *before* the model's weights are loaded whenever the source's config
    tells the vocabulary (``tiny``, ``megatron:DIR``, ``hf:DIR``); a factory model is built first to learn it.
    Then: the architecture of the source, the quantized state of ``--checkpoint`` (a checkpoint that does
    not fit the model raises naming the layer or tensor), and ``--adapters FILE`` if given.
    """
    from calib.train import load_adapter_file
    from lora.model import adapter_file_format

    source = model_source(args)
    ckpt = getattr(args, "checkpoint", None)
    if ckpt is not None and not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    adapters = getattr(args, "adapters", None)
    if adapters is not None:
        adapter_file_format(adapters)
    ids = batches = None
    if source.data_dims is not None and batch is not None:  # the config knows the vocabulary
        device = "cuda" if torch.cuda.is_available() else None
        ids, batches = load_data(args, *source.data_dims, batch, device)
    lm = build_model(source, load_weights=ckpt is None)  # the checkpoint holds every tensor
    if ids is None and batch is not None:
        ids, batches = load_data(args, lm.vocab_size, lm.seq_len, batch, device_of(lm.model))
    if ckpt is not None:
        from lora.io.container import verification
        from lora.io.svdq_export import load_quantized

        with verification(not getattr(args, "no_verify", False)):
            load_quantized(lm.model, ckpt, trainable=trainable, progress=getattr(args, "progress", False))
    if adapters is not None:
        load_adapter_file(lm.model, adapters)
    return lm, ids, batches


def device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def parse_size(text: str) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"1GiB"``, ``"4096"`` (decimal and binary units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit (e.g. 2GB, 500MB)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"size {text!r}: use a positive number with B, KB, MB, GB, TB or KiB, MiB, GiB")
    return int(value * units[unit])


# ------------------------------------------------------------------------------ argument validation


def _number(text: str, kind, what: str, ok, bound: str):
    import argparse
    import math

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _number(text, int, "an integer", lambda v: v >= 1, "≥ 1")


def nonneg_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _number(text, int, "an integer", lambda v: v >= 0, "≥ 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, "a number", lambda v: v > 0, "> 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number ≥ 0."""
    return _number(text, float, "a number", lambda v: v >= 0, "≥ 0")


def unit_float(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(text, float, "a number", lambda v: 0 <= v <= 1, "in [0, 1]")


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``ValueError`` naming ``flag`` unless ``path`` can become a directory: it is a directory or missing,
    no ancestor is a file, and the nearest existing ancestor is writable (directories are created)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ValueError(f"{flag} {path} lies under {base}, which is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {base} is not writable")
    return path


def check_out_file(path: str | os.PathLike, flag: str) -> Path:
    """``ValueError`` naming ``flag`` unless ``path`` can be written as a file: not a directory, its
    directory exists (is a directory) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    parent = path.absolute().parent
    if not parent.exists():
        raise ValueError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: directory {parent} is not writable")
    return path


def check_free_space(path: str | os.PathLike, need: int, flag: str = "--out") -> None:
    """``ValueError`` when the file system of ``path`` (its nearest existing ancestor) has less than
    ``need`` bytes (the expected output size, plus 5 %) free."""
    import shutil

    base = _existing_ancestor(Path(path))
    free = shutil.disk_usage(base).free
    if free < need * 1.05:
        raise ValueError(
            f"{flag} {path}: {free / 1e6:.1f} MB free on {base}, the output needs about {need / 1e6:.1f} MB"
        )


def tree_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path`` (or of the file ``path``; 0 if missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def quantized_size_estimate(model: torch.nn.Module, fmt: str) -> int:
    """A low estimate of a calibrated model's checkpoint size: ``bytes_per_weight`` of the format for every
    parameter (nvfp4 / int4 ≈ 0.56, fp8 ≈ 1, none: the parameter's own size)."""
    per = {"nvfp4": 0.56, "int4": 0.56, "fp8": 1.0}.get(str(fmt).split("-")[0])
    total = 0.0
    for p in model.parameters():
        total += p.numel() * (per if per is not None else p.element_size())
    return int(total)


# ------------------------------------------------------------------------ help, logging, closed sets

LOG_NAME = "svdq"
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger(LOG_NAME)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written (the usage blocks of the module docstrings) and every option's
    default appended to its help, ``(default: X)``, unless the help already tells it or there is
    nothing to tell (no default, a flag)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or not action.option_strings
        ):
            return text
        shown = ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        return f"{text} (default: {shown})".strip().replace("%", "%%")


def configure_logging(level: str = "info", quiet: bool = False) -> None:
    """Messages of the ``svdq`` logger to stderr as ``svdq: message``, at ``level`` (``--quiet``, and every
    process but global rank 0 of a torchrun world: warnings and errors only). Calling it again replaces the
    handler (one per process)."""
    for h in list(log.handlers):
        if getattr(h, "_svdq_cli", False):
            log.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("svdq: %(message)s"))
    handler._svdq_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    other_rank = os.environ.get("RANK", "0").strip() not in ("", "0")
    wanted = getattr(logging, level.upper())
    log.setLevel(max(wanted, logging.WARNING) if quiet or other_rank else wanted)
    log.propagate = False


PROGRESS_MODES = ("auto", "always", "never")


def show_progress(quiet: bool, mode: str = "auto", stream=None) -> bool:
    """Progress bars on: never with ``--quiet`` nor on a process other than global rank 0 of a torchrun
    world (``RANK`` of the environment); ``mode`` ``"always"`` / ``"never"``, or ``"auto"``: when stderr
    (where tqdm writes) is a terminal."""
    if quiet or mode == "never" or os.environ.get("RANK", "0").strip() not in ("", "0"):
        return False
    stream = sys.stderr if stream is None else stream
    return mode == "always" or bool(getattr(stream, "isatty", lambda: False)())


def _format_choices() -> tuple[str, ...]:
    from svdq.formats.config import FORMAT_NAMES, INT4_GROUP_SIZES

    out = []
    for name in FORMAT_NAMES:
        out.append(name)
        if name == "int4":
            out += [f"int4-g{g}" for g in INT4_GROUP_SIZES]
        if name == "fp8":
            out.append("fp8-channel")
    return tuple(out)


FORMAT_CHOICES = _format_choices()  # the string forms of svdq.formats.QuantFormat


def layout_arg(text: str) -> dict:
    """argparse type of ``--layout``: one layout for both expert projections or ``fc1=L,fc2=L``
    (:func:`svdq.solvers.shared_basis.expert_layouts`); a bad value is an argparse error naming
    ``--layout`` (exit 2, before anything is loaded)."""
    from svdq.solvers.shared_basis import LAYOUT_CHOICES, expert_layouts

    try:
        return expert_layouts(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(LAYOUT_CHOICES)} or 'fc1=L,fc2=L' with L one of them, got {text!r}"
        ) from None


def add_json_arg(p) -> None:
    """``--json PATH``: the facts of the command's summary line as a JSON file (written atomically)."""
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the summary as JSON to this file"
    )


def check_json_arg(args) -> None:
    """``ValueError`` naming ``--json`` when its file cannot be written (checked before any work)."""
    if getattr(args, "json", None) is not None:
        check_out_file(args.json, "--json")


def finish(args, line: str, record: dict) -> int:
    """End a command: its one-line summary on stdout, ``record`` (JSON-serializable; the command name
    added) to ``--json`` if given. Returns 0."""
    path = getattr(args, "json", None)
    if path is not None:
        from lora.io.atomic import atomic_write_file

        text = json.dumps({"command": args.command, **record}, indent=1, default=str)
        atomic_write_file(path, lambda tmp: tmp.write_text(text))
        line += f" (summary: {path})"
    print(line, flush=True)
    return 0
