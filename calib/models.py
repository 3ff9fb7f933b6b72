"""Model sources of the command line (``--model``) and the per-token language-model loss.

A source is one of

* ``tiny`` — the built-in Megatron GPT-MoE (:func:`calib.tiny_moe.build_tiny_gpt_moe`), its shape from
  :class:`~calib.tiny_moe.TinyMoEConfig` (defaults, or the fields of ``--model-config FILE.json``), its
  weights drawn from ``seed``;
* ``megatron:DIR`` — a Megatron distributed checkpoint: ``DIR/config.json`` holds TinyMoEConfig-style
  GPT-MoE fields, the rest of ``DIR`` the ``dist_checkpointing`` files of the model's
  ``sharded_state_dict`` (write one with :func:`save_megatron_model` or ``svdq save-model``);
* ``hf:DIR`` — a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``), opened offline
  with transformers' own classes and validated before loading (:mod:`calib.hf.checkpoint`); the model is the
  plain torch causal LM (module names as in transformers), or with ``backend="megatron"`` its Megatron twin
  (:func:`calib.hf.to_megatron.megatron_from_hf`). Vocabulary: the config's ``vocab_size``; sequence length:
  ``seq_len`` (default :data:`DEFAULT_HF_SEQ_LEN`, at most the config's ``max_position_embeddings``);
* ``module:function`` — a factory called with no arguments that returns an ``nn.Module`` whose
  ``forward(tokens (b, s))`` returns logits ``(b, s, vocab)`` or an object with ``.logits`` (a Hugging Face
  model works); optional ``vocab_size`` / ``seq_len`` attributes (defaults 256, and 64 — or for a model with
  a transformers config ``min(max_position_embeddings, 256)``).

Any model's forward may return the logits tensor or an object with ``.logits`` (a transformers
``ModelOutput``); a transformers model is called as ``model(input_ids=tokens, use_cache=False)``.

A :class:`ModelSource` is a small frozen dataclass that round-trips through JSON; the command line records
it in exported checkpoints so that ``--checkpoint DIR`` alone rebuilds the model. Megatron sources need
:func:`lora.framework.init_parallel` first (the commands call it).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TINY = "tiny"
MEGATRON_PREFIX = "megatron:"
CONFIG_FILE = "config.json"
MEGATRON_FORMAT = "svdq-megatron-model"
HF_PREFIX = "hf:"
BACKENDS = ("torch", "megatron")
DEFAULT_HF_SEQ_LEN = 256


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (transformers imported only if it already is:
    such a model cannot exist otherwise)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``spec``: ``"tiny"``, ``"megatron:/abs/DIR"``, ``"hf:/abs/DIR"`` or ``"module:function"``. ``config``:
    TinyMoEConfig fields for ``tiny`` / ``megatron``; for ``hf`` ``{"hf_config": config.json as a dict,
    "seq_len": int, "backend": "torch" | "megatron"}`` (so a quantized checkpoint rebuilds the architecture
    without the directory); ``None`` for factories. ``seed``: weight seed of ``tiny`` (and of an ``hf``
    architecture built without its weights), and the torch seed set before a factory is called.
    """

    spec: str
    config: dict | None = None
    seed: int = 0

    @property
    def kind(self) -> str:
        if self.spec == TINY:
            return "tiny"
        if self.spec.startswith(MEGATRON_PREFIX):
            return "megatron"
        if self.spec.startswith(HF_PREFIX):
            return "hf"
        return "factory"

    @property
    def backend(self) -> str:
        """``"megatron"`` (``tiny``, ``megatron:DIR``, ``hf`` built as its Megatron twin) or ``"torch"``."""
        if self.kind == "hf":
            return self.config["backend"]
        return "torch" if self.kind == "factory" else "megatron"

    @property
    def data_dims(self) -> tuple[int, int] | None:
        """``(vocab_size, seq_len)`` known without building the model (``None`` for factories)."""
        if self.kind == "hf":
            return int(self.config["hf_config"]["vocab_size"]), int(self.config["seq_len"])
        if self.config is None:
            return None
        return int(self.config["vocab_size"]), int(self.config["seq_len"])

    @property
    def hf_config(self) -> dict | None:
        """The ``config.json`` dict of an ``hf`` source (``None`` otherwise)."""
        return self.config["hf_config"] if self.kind == "hf" else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSource:
        if not isinstance(d, dict) or "spec" not in d:
            raise ValueError(f"model source must be a dict with a 'spec', got {d!r}")
        return cls(spec=str(d["spec"]), config=d.get("config"), seed=int(d.get("seed", 0)))


@dataclass
class LoadedModel:
    """A built model and what the data pipeline needs to know about it."""

    model: nn.Module
    vocab_size: int
    seq_len: int
    megatron: bool
    source: ModelSource

    def forward_loop(self, batches: list[dict]):
        """A ``forward_loop(model)`` (the calibration convention) running ``batches`` through the model:
        ``model(tokens, position_ids, None)`` for Megatron GPT models, ``model(input_ids=tokens,
        use_cache=False)`` for transformers models, ``model(tokens)`` otherwise."""

        def loop(m: nn.Module) -> None:
            for b in batches:
                self._call(m, b)

        return loop

    def _call(self, m: nn.Module, batch: dict, **kwargs):
        if self.megatron:
            return m(batch["tokens"], batch["position_ids"], None, **kwargs)
        if is_hf_model(m):
            return m(input_ids=batch["tokens"], use_cache=False)
        return m(batch["tokens"])

    def token_losses(self, batch: dict) -> torch.Tensor:
        """Per-token cross entropy ``(b, s)`` in float32: ``-log softmax(logits)[label]`` for every
        position of ``batch["tokens"]`` / ``batch["labels"]`` (``(b, s)`` each)."""
        if self.megatron:
            return self._call(self.model, batch, labels=batch["labels"]).float()
        logits = self._call(self.model, batch)
        if not isinstance(logits, torch.Tensor) and isinstance(getattr(logits, "logits", None), torch.Tensor):
            logits = logits.logits  # a transformers ModelOutput
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != batch["labels"].shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"model {self.source.spec}: forward(tokens {tuple(batch['tokens'].shape)}) must return "
                f"logits (batch, seq, vocab) or an object with .logits, got {shape}"
            )
        flat = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        return flat.view(batch["labels"].shape)


def _tiny_config(fields: dict | None):
    from calib.tiny_moe import TinyMoEConfig

    return TinyMoEConfig.from_dict(fields or {})


def read_config_file(path: str | os.PathLike) -> dict:
    """TinyMoEConfig fields from a JSON file (validated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"model config {path} is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"model config {path} must hold a JSON object of TinyMoEConfig fields")
    fields = {k: v for k, v in fields.items() if k != "format"}
    try:
        return _tiny_config(fields).to_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model config {path}: {exc}") from None


def hf_source(
    root: str | os.PathLike,
    config: dict,
    seed: int = 0,
    *,
    seq_len: int | None = None,
    backend: str | None = None,
) -> ModelSource:
    """The ``hf:DIR`` source of the checkpoint directory ``root`` with its ``config.json`` dict ``config``;
    ``seq_len`` defaults to ``min(DEFAULT_HF_SEQ_LEN, max_position_embeddings)``, ``backend`` to ``torch``."""
    where = Path(root) / CONFIG_FILE
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{where}: 'vocab_size' must be a positive integer, got {vocab!r}")
    max_pos = config.get("max_position_embeddings")
    max_pos = max_pos if isinstance(max_pos, int) and max_pos > 0 else None
    if seq_len is None:
        seq_len = min(DEFAULT_HF_SEQ_LEN, max_pos or DEFAULT_HF_SEQ_LEN)
    elif seq_len < 1 or (max_pos is not None and seq_len > max_pos):
        raise ValueError(f"--seq-len {seq_len} must lie in [1, max_position_embeddings={max_pos}] of {where}")
    backend = backend or "torch"
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    fields = {"hf_config": config, "seq_len": int(seq_len), "backend": backend}
    return ModelSource(HF_PREFIX + str(Path(root).resolve()), fields, seed)


def with_options(
    source: ModelSource, *, seq_len: int | None = None, backend: str | None = None
) -> ModelSource:
    """``source`` (e.g. recorded in a checkpoint) with ``--seq-len`` / ``--backend`` applied: both apply to
    ``hf`` sources only, and a recorded backend cannot change (the checkpoint's module names are its)."""
    if source.kind != "hf":
        if seq_len is not None:
            raise ValueError(
                f"--seq-len applies to hf:DIR models; {source.spec} takes its sequence length from its config"
            )
        if backend is not None and backend != source.backend:
            raise ValueError(
                f"--backend {backend} applies to hf:DIR models; {source.spec} is a {source.backend} model"
            )
        return source
    if backend is not None and backend != source.backend:
        raise ValueError(
            f"--backend {backend}: the checkpoint holds the {source.backend} model of {source.spec}; "
            f"calibrate again with --backend {backend}"
        )
    if seq_len is None:
        return source
    root = source.spec[len(HF_PREFIX) :]
    return hf_source(root, source.hf_config, source.seed, seq_len=seq_len, backend=source.backend)


def resolve_source(
    spec: str,
    config_file: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    seq_len: int | None = None,
    backend: str | None = None,
) -> ModelSource:
    """Parse ``--model`` / ``--model-config`` (``--seq-len``, ``--backend`` for ``hf:DIR``) into a
    :class:`ModelSource` (no model is built; for ``hf:DIR`` its ``config.json`` is read and its architecture
    checked, the weights are checked when the model is built).

    Raises ``ValueError`` / ``FileNotFoundError`` naming the problem: an unknown spec, a missing
    ``DIR/config.json``, unknown config fields, ``--model-config`` with a factory or ``hf:DIR``, an
    architecture transformers has no causal LM for.
    """
    if spec.startswith(HF_PREFIX):
        from calib.hf.checkpoint import read_config

        if config_file:
            raise ValueError(
                f"--model-config applies to 'tiny' and 'megatron:DIR'; {spec} has its own config.json"
            )
        root = Path(spec[len(HF_PREFIX) :]).expanduser()
        config, _ = read_config(root)
        return hf_source(root, config, seed, seq_len=seq_len, backend=backend)
    source = _resolve_other(spec, config_file, seed)
    return with_options(source, seq_len=seq_len, backend=backend)


def _resolve_other(spec: str, config_file, seed: int) -> ModelSource:
    if spec == TINY:
        fields = read_config_file(config_file) if config_file else _tiny_config(None).to_dict()
        return ModelSource(TINY, fields, seed)
    if spec.startswith(MEGATRON_PREFIX):
        root = Path(spec[len(MEGATRON_PREFIX) :]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--model {spec}: directory {root} does not exist")
        fields = read_config_file(config_file or root / CONFIG_FILE)
        return ModelSource(MEGATRON_PREFIX + str(root.resolve()), fields, seed)
    module, _, func = spec.partition(":")
    if not module or not func:
        raise ValueError(f"--model must be 'tiny', 'megatron:DIR', 'hf:DIR' or module:function, got {spec!r}")
    if config_file:
        raise ValueError(f"--model-config applies to 'tiny' and 'megatron:DIR', not to the factory {spec}")
    return ModelSource(spec, None, seed)


def build_model(source: ModelSource, *, load_weights: bool = True) -> LoadedModel:
    """Build the model of ``source`` (weights loaded for ``megatron:DIR`` unless ``load_weights`` is
    False: a quantized checkpoint restores every tensor anyway); on CUDA it is moved there.

    A ``megatron:DIR`` whose tensors do not match the config (missing / unexpected keys, other shapes)
    raises ``ValueError`` naming the first mismatching tensor, before any weight is read; so does an
    ``hf:DIR`` (:func:`calib.hf.checkpoint.open_checkpoint`). An ``hf`` source without ``load_weights`` is
    built from its recorded ``config.json`` alone (weights drawn from ``seed``), the directory unused.
    """
    if source.kind == "hf":
        return _build_hf(source, load_weights)
    if source.kind in ("tiny", "megatron"):
        from calib.tiny_moe import build_tiny_gpt_moe

        cfg = _tiny_config(source.config)
        model = build_tiny_gpt_moe(cfg, seed=source.seed)
        if source.kind == "megatron" and load_weights:
            _load_megatron_weights(model, Path(source.spec[len(MEGATRON_PREFIX) :]))
        return LoadedModel(model, cfg.vocab_size, cfg.seq_len, True, source)
    module_name, func_name = source.spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {source.spec}: cannot import {module_name}: {exc}") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ValueError(f"--model {source.spec}: {module_name} has no callable {func_name!r}")
    torch.manual_seed(source.seed)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model {source.spec}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    if torch.cuda.is_available():
        model = model.cuda()
    return LoadedModel(model, *_factory_dims(model), False, source)


def _factory_dims(model: nn.Module) -> tuple[int, int]:
    """``(vocab_size, seq_len)`` of a factory's model: its attributes, else its transformers config
    (``vocab_size``, ``min(max_position_embeddings, DEFAULT_HF_SEQ_LEN)``), else 256 / 64."""
    config = getattr(model, "config", None) if is_hf_model(model) else None
    vocab = getattr(model, "vocab_size", None) or getattr(config, "vocab_size", None) or 256
    seq = getattr(model, "seq_len", None)
    if seq is None:
        max_pos = getattr(config, "max_position_embeddings", None)
        seq = min(DEFAULT_HF_SEQ_LEN, max_pos) if isinstance(max_pos, int) and max_pos > 0 else 64
    return int(vocab), int(seq)


def _build_hf(source: ModelSource, load_weights: bool) -> LoadedModel:
    from calib.hf import checkpoint as hf_checkpoint

    if load_weights:
        model = hf_checkpoint.load_model(source.spec[len(HF_PREFIX) :])
    else:
        model = hf_checkpoint.build_model_from_config(source.hf_config, seed=source.seed)
    vocab, seq = source.data_dims
    megatron = source.backend == "megatron"
    if megatron:
        from calib.hf.to_megatron import megatron_from_hf  # the caller initialized the parallel state

        model = megatron_from_hf(model, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return LoadedModel(model, vocab, seq, megatron, source)


def base_model_name(source: ModelSource) -> str:
    """The base model's name for adapter configs: the directory of ``hf:DIR``, else the spec."""
    return source.spec[len(HF_PREFIX) :] if source.kind == "hf" else source.spec


def hf_config_of(lm: LoadedModel) -> dict | None:
    """The Hugging Face ``config.json`` dict of a loaded model: an ``hf`` source's, or a transformers
    model's own (a factory's); ``None`` for other models."""
    if lm.source.kind == "hf":
        return lm.source.hf_config
    if is_hf_model(lm.model):
        return lm.model.config.to_dict()
    return None


def write_hf_config(lm: LoadedModel, out_dir: str | os.PathLike) -> Path | None:
    """Write ``out_dir/config.json`` (atomically) for a Hugging Face model (:func:`hf_config_of`) unless the
    exporter wrote one; returns the path, or ``None`` for other models."""
    from lora.io.atomic import atomic_write_file

    config = hf_config_of(lm)
    path = Path(out_dir) / CONFIG_FILE
    if config is None or path.exists():
        return None
    return atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))


def _load_megatron_weights(model: nn.Module, root: Path) -> None:
    from megatron.core import dist_checkpointing

    check_megatron_checkpoint(model, root)
    from lora.framework.safe_metadata import restricted_checkpoint_metadata

    with restricted_checkpoint_metadata(root):  # no arbitrary unpickling of the directory's .metadata
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(root)))


def check_megatron_checkpoint(model: nn.Module, root: str | os.PathLike) -> None:
    """Compare the checkpoint's tensors (keys and global shapes, from its metadata only) with the model's
    sharded state dict; raise ``ValueError`` naming the first difference."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    root = Path(root)
    from lora.framework.safe_metadata import restricted_checkpoint_metadata

    try:
        with restricted_checkpoint_metadata(root):  # no arbitrary unpickling of the directory's .metadata
            saved = dist_checkpointing.load_tensors_metadata(str(root))
    except ValueError:
        raise
    except Exception as exc:  # megatron raises its own CheckpointingException / FileNotFoundError
        raise ValueError(f"{root} is not a Megatron distributed checkpoint: {exc}") from None

    def leaves(tree):
        for v in tree.values() if isinstance(tree, dict) else tree:
            if isinstance(v, dict | list | tuple):
                yield from leaves(v)
            else:
                yield v

    expected = {}
    for sh in leaves(model.sharded_state_dict()):
        if isinstance(sh, ShardedTensorFactory):
            sh = sh.build()
            for t in leaves(sh) if isinstance(sh, dict | list | tuple) else [sh]:
                if isinstance(t, ShardedTensor):
                    expected[t.key] = tuple(t.global_shape)
        elif isinstance(sh, ShardedTensor):
            expected[sh.key] = tuple(sh.global_shape)
    found = {k: tuple(v.global_shape) for k, v in saved.items()}
    where = f"the model config does not match the Megatron checkpoint {root}"
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]} is missing from the checkpoint")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{where}: the checkpoint has tensor {extra[0]} that the model does not")
    for key in sorted(expected):
        if expected[key] != found[key]:
            raise ValueError(
                f"{where}: {key} has shape {found[key]} in the checkpoint, {expected[key]} in the model"
            )


def save_megatron_model(
    model: nn.Module, config, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``model`` (a Megatron GPT-MoE built for the TinyMoEConfig ``config``, without adapters) as a
    ``megatron:DIR`` source: ``config.json`` + ``dist_checkpointing`` files, into a temporary directory
    renamed to ``out_dir`` at the end. Single process (call under ``if __name__ == "__main__":`` in
    scripts: megatron's checkpoint writer may spawn workers)."""
    from megatron.core import dist_checkpointing

    from lora.model import adapter_modules

    if adapter_modules(model):
        raise ValueError("save_megatron_model: the model has adapters; it writes plain base models only")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    _tiny_config(cfg_dict)  # validates the fields
    from lora.io.atomic import atomic_output_dir

    with atomic_output_dir(out, overwrite) as tmp:
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps({**cfg_dict, "format": MEGATRON_FORMAT}, indent=1))
    return out
