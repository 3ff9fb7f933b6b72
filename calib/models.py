"""Model sources of the command line (``--model``) and the per-token language-model loss.

A source is one of

* ``tiny`` — the built-in Megatron GPT-MoE (:func:`calib.tiny_moe.build_tiny_gpt_moe`), its shape from
  :class:`~calib.tiny_moe.TinyMoEConfig` (defaults, or the fields of ``--model-config FILE.json``), its
  weights drawn from ``seed``;
* ``megatron:DIR`` — a Megatron distributed checkpoint: ``DIR/config.json`` holds TinyMoEConfig-style
  GPT-MoE fields, the rest of ``DIR`` the ``dist_checkpointing`` files of the model's
  ``sharded_state_dict`` (write one with :func:`save_megatron_model` or ``svdq save-model``);
* ``module:function`` — a factory called with no arguments that returns an ``nn.Module`` whose
  ``forward(tokens (b, s)) -> logits (b, s, vocab)``; optional ``vocab_size`` / ``seq_len`` attributes
  (defaults 256 / 64).

A :class:`ModelSource` is a small frozen dataclass that round-trips through JSON; the command line records
it in exported checkpoints so that ``--checkpoint DIR`` alone rebuilds the model. Megatron sources need
:func:`lora.framework.init_parallel` first (the commands call it).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TINY = "tiny"
MEGATRON_PREFIX = "megatron:"
CONFIG_FILE = "config.json"
MEGATRON_FORMAT = "svdq-megatron-model"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``spec``: ``"tiny"``, ``"megatron:/abs/DIR"`` or ``"module:function"``. ``config``: TinyMoEConfig
    fields for ``tiny`` / ``megatron`` (``None`` for factories). ``seed``: weight seed of ``tiny``, and
    the torch seed set before a factory is called.
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
        return "factory"

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
        ``model(tokens, position_ids, None)`` for Megatron GPT models, ``model(tokens)`` otherwise."""

        def loop(m: nn.Module) -> None:
            for b in batches:
                if self.megatron:
                    m(b["tokens"], b["position_ids"], None)
                else:
                    m(b["tokens"])

        return loop

    def token_losses(self, batch: dict) -> torch.Tensor:
        """Per-token cross entropy ``(b, s)`` in float32: ``-log softmax(logits)[label]`` for every
        position of ``batch["tokens"]`` / ``batch["labels"]`` (``(b, s)`` each)."""
        if self.megatron:
            return self.model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
        logits = self.model(batch["tokens"])
        if not isinstance(logits, torch.Tensor) or logits.shape[:2] != batch["labels"].shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"model {self.source.spec}: forward(tokens {tuple(batch['tokens'].shape)}) must return "
                f"logits (batch, seq, vocab), got {shape}"
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


def resolve_source(spec: str, config_file: str | os.PathLike | None = None, seed: int = 0) -> ModelSource:
    """Parse ``--model`` / ``--model-config`` into a :class:`ModelSource` (no model is built).

    Raises ``ValueError`` / ``FileNotFoundError`` naming the problem: an unknown spec, a missing
    ``DIR/config.json``, unknown config fields, ``--model-config`` with a factory.
    """
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
        raise ValueError(f"--model must be 'tiny', 'megatron:DIR' or module:function, got {spec!r}")
    if config_file:
        raise ValueError(f"--model-config applies to 'tiny' and 'megatron:DIR', not to the factory {spec}")
    return ModelSource(spec, None, seed)


def build_model(source: ModelSource, *, load_weights: bool = True) -> LoadedModel:
    """Build the model of ``source`` (weights loaded for ``megatron:DIR`` unless ``load_weights`` is
    False: a quantized checkpoint restores every tensor anyway); on CUDA it is moved there.

    A ``megatron:DIR`` whose tensors do not match the config (missing / unexpected keys, other shapes)
    raises ``ValueError`` naming the first mismatching tensor, before any weight is read.
    """
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
    vocab, seq = int(getattr(model, "vocab_size", 256)), int(getattr(model, "seq_len", 64))
    return LoadedModel(model, vocab, seq, False, source)


def _load_megatron_weights(model: nn.Module, root: Path) -> None:
    from megatron.core import dist_checkpointing

    check_megatron_checkpoint(model, root)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(root)))


def check_megatron_checkpoint(model: nn.Module, root: str | os.PathLike) -> None:
    """Compare the checkpoint's tensors (keys and global shapes, from its metadata only) with the model's
    sharded state dict; raise ``ValueError`` naming the first difference."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    root = Path(root)
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(root))
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
