"""Adapter fine-tuning: AdamW on the adapter parameters only, linear warmup + cosine decay, gradient-norm
clipping, bf16 autocast on CUDA (fp32 on CPU), periodic checkpoints and exact resume.

Schedule (update ``k = 0 … steps-1``, peak ``lr``, ``W = warmup``, ``m = min_lr_ratio``)::

    lr(k) = lr · (k + 1) / W                                          k < W
    lr(k) = lr · (m + (1 − m) · ½ (1 + cos(π · (k − W) / max(1, steps − W))))   otherwise

Data: the token stream is cut into ``n`` batches (:func:`calib.data.token_batches`); update ``k`` uses
batch ``perm_e[k mod n]`` with ``e = k // n`` and ``perm_e`` a permutation drawn from ``(seed, e)``, so
the data position is a function of the step.

Data parallelism and gradient accumulation (svdq/DESIGN.md §17): the global batch of update ``k`` is cut
into ``dp · grad_accum`` equal row chunks; data-parallel rank ``d`` runs chunks ``j · dp + d`` for
``j = 0 … grad_accum−1`` (:func:`micro_batches`). The loss is the global token-weighted mean: each
micro-batch contributes the sum of its target losses divided by ``T``, the number of loss targets of the
whole global batch (every rank holds that batch, so ``T`` — the sum of the micro-batches' counts over all
ranks — needs no communication; with a prompt / response mask the counts differ between micro-batches);
the adapter gradients are then summed over the data-parallel group
(:func:`lora.framework.parallel.data_parallel_group`) and so is the logged loss. So ``dp=2, grad_accum=1``
and ``dp=1, grad_accum=2`` take the same optimizer step as ``dp=1, grad_accum=1`` on that batch (to float
round-off), masked or not. ``eval_every`` evaluates held-out batches (sharded over data parallelism,
summed in float64 over all ranks) every that many updates.

Tensor and expert parallelism: the expert-parallel ranks of a data shard run the same micro-batches, so
expert factors get ``ep`` times the gradient and are scaled by ``1/ep`` (:func:`grad_layout`); the clipped
gradient norm is that of the whole model, each replicated tensor counted once (:func:`_clip_grads`). An
``ep = 2`` run takes the one-process steps (to float round-off).

A checkpoint ``checkpoints/step-000005/`` holds ``adapters.safetensors`` (:func:`lora.save_adapters`),
``optimizer.safetensors`` (AdamW moments and step counts per parameter name), ``rng.safetensors`` (torch
CPU / CUDA and Megatron RNG-tracker states, numpy's state) and ``state.json`` (step, losses, learning
rates, gradient norms, the config, the data position and fingerprint, optimizer hyperparameters, Python's
``random`` state). It is written into a temporary directory renamed at the end, so a directory named
``step-*`` is always complete; only the last ``keep`` are kept. Resuming restores all of it and the run
continues exactly as an uninterrupted one (same losses, bit for bit, on the same machine).

In a world of several processes every rank writes its own ``optimizer-rank00001.safetensors`` and
``rng-rank00001.safetensors`` into the one temporary directory (a file system all ranks see), global rank 0
writes ``adapters.safetensors`` (gathered over TP / EP, :func:`lora.save_adapters`) and ``state.json`` and
renames the directory once every rank succeeded; resuming needs the same ``tp · ep · dp`` layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calib.data import loss_targets, masked_mean
from calib.models import LoadedModel
from lora.io.atomic import atomic_output_dir, atomic_write_file, temporary_sibling
from lora.io.values import first_non_finite
from lora.model import adapter_modules, save_adapters
from svdq.config_base import ConfigBase

CHECKPOINT_FORMAT = "svdq-finetune-checkpoint"
STEP_PREFIX = "step-"


@dataclass(frozen=True)
class TrainConfig(ConfigBase):
    """Everything that determines the loss curve (see the module docstring). ``grad_clip = 0`` turns
    clipping off."""

    steps: int
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    batch: int = 8
    seed: int = 0
    dropout: float = 0.0  # adapter dropout during the run (lora.adapters.dropout)
    grad_accum: int = 1  # micro-batches per optimizer step (each loss scaled 1 / grad_accum)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be ≥ 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup >= 0, "--warmup must be ≥ 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must lie in [0, 1]"),
            (self.grad_clip >= 0, "--grad-clip must be ≥ 0 (0 = off)"),
            (self.weight_decay >= 0, "--weight-decay must be ≥ 0"),
            (self.batch >= 1, "--batch must be ≥ 1"),
            (0 <= self.dropout < 1, "--dropout must lie in [0, 1)"),
            (self.grad_accum >= 1, "--grad-accum must be ≥ 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine decay to ``lr·min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_batch_split(batch: int, dp: int, grad_accum: int) -> None:
    """``ValueError`` naming ``--batch`` unless it splits into ``dp · grad_accum`` equal micro-batches."""
    if batch % (dp * grad_accum):
        raise ValueError(
            f"--batch {batch} must be divisible by data-parallel size {dp} × --grad-accum {grad_accum} "
            f"= {dp * grad_accum} (equal micro-batches)"
        )


def micro_batches(batch: dict, dp_rank: int, dp_size: int, grad_accum: int) -> list[dict]:
    """The ``grad_accum`` micro-batches data-parallel rank ``dp_rank`` runs of a global ``batch`` (dict of
    ``(b, …)`` tensors): row chunks ``j · dp_size + dp_rank`` of ``dp_size · grad_accum`` equal chunks. Over
    all ranks and ``j`` they are the whole batch, each row once."""
    b = batch["tokens"].shape[0]
    check_batch_split(b, dp_size, grad_accum)
    size = b // (dp_size * grad_accum)
    out = []
    for j in range(grad_accum):
        lo = (j * dp_size + dp_rank) * size
        out.append({k: v[lo : lo + size] for k, v in batch.items()})  # (size, s) each
    return out


def batch_index(step: int, n_batches: int, seed: int) -> int:
    """Index of the batch used by update ``step``: a fresh permutation of the ``n_batches`` per epoch."""
    epoch, pos = divmod(step, n_batches)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n_batches, generator=g)[pos])


# ------------------------------------------------------------------------------------------ adapter files


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameter name → parameter of every adapter factor: the factors of :mod:`lora` adapters and the
    ``lora_down`` / ``lora_up`` branch of every :class:`svdq.SVDQLinear`
    (:func:`lora.model.branch_parameters`)."""
    from lora.model import adapter_factors, branch_parameters

    ids = {id(f.param) for f in adapter_factors(model).values()}
    ids.update(id(p) for p in branch_parameters(model).values())
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def write_json(path: str | os.PathLike, obj) -> Path:
    """JSON file written atomically (:func:`lora.io.atomic.atomic_write_file`)."""
    text = json.dumps(obj, indent=1)
    return atomic_write_file(path, lambda tmp: tmp.write_text(text))


def load_adapter_file(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """:func:`lora.load_adapters` for the command line: every problem with the file is a ``ValueError``
    naming the file and tensor (a missing tensor too), or ``FileNotFoundError``."""
    from safetensors import safe_open

    from lora.model import adapter_file_format, load_adapters

    adapter_file_format(path)
    with safe_open(str(path), framework="pt") as fh:
        bad = first_non_finite((k, fh.get_tensor(k)) for k in fh.keys())
    if bad is not None:
        raise ValueError(f"adapter file {path}: tensor {bad} holds NaN or inf")
    try:
        return load_adapters(model, path)
    except KeyError as exc:
        raise ValueError(str(exc.args[0])) from None


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-*`` directories with a ``state.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    found = [p for p in found if (p / "state.json").is_file() and p.name[len(STEP_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def remove_stale_temporaries(root: str | os.PathLike) -> None:
    """Remove temporary checkpoint directories left by a killed process (names start with ``.``)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    from megatron.core import tensor_parallel

    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = s
    tracker = tensor_parallel.get_cuda_rng_tracker()
    for name, s in tracker.get_states().items():
        tensors[f"megatron.{name}"] = s.cpu()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    state = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": cached},
        "python_random": _jsonable(random.getstate()),
    }
    return tensors, state


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    megatron = {k[len("megatron.") :]: v for k, v in tensors.items() if k.startswith("megatron.")}
    if megatron:
        tracker.set_states(megatron)
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            tensors["numpy.keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(_tupled(state["python_random"]))


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flag_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (collective over the world)."""
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _rank_file(stem: str, rank: int, world: int) -> str:
    """``optimizer.safetensors`` in a world of one process, ``optimizer-rank00003.safetensors`` otherwise."""
    return f"{stem}.safetensors" if world == 1 else f"{stem}-rank{rank:05d}.safetensors"


def _write_rank_files(tmp: Path, optimizer, names: list[str], rank: int, world: int) -> None:
    """This rank's AdamW moments and RNG states into ``tmp``; returns the JSON part of the RNG state."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    moments = {}
    for i, name in enumerate(names):
        for key, value in sd["state"].get(i, {}).items():
            moments[f"{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(moments, str(tmp / _rank_file("optimizer", rank, world)))
    rng, rng_state = _rng_tensors()
    save_file(rng, str(tmp / _rank_file("rng", rank, world)), metadata={"state": json.dumps(rng_state)})
    return rng_state


def _full_state(optimizer, names: list[str], state: dict, step: int, rng_state: dict) -> dict:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        **state,
        "step": step,
        "optimizer": {"param_names": names, "param_groups": groups},
        "rng": rng_state,
    }


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        doomed = temporary_sibling(old, "tmp-delete")
        os.replace(old, doomed)  # a checkpoint disappears atomically, then its files
        shutil.rmtree(doomed, ignore_errors=True)


def _save_checkpoint_ranks(root: Path, step: int, model, optimizer, names, state: dict, keep: int) -> Path:
    """:func:`save_checkpoint` in a world of several processes (see the module docstring)."""
    import torch.distributed as dist

    rank, world = _rank_world()
    final = root / checkpoint_name(step)
    name = [str(temporary_sibling(final)) if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    ok = True
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError:
            ok = False
    if not _all_ok(ok):
        raise OSError(f"checkpoint {final}: rank 0 could not create {tmp}")
    error = None
    try:
        save_adapters(model, tmp / "adapters.safetensors")  # collective; rank 0 writes
        rng_state = _write_rank_files(tmp, optimizer, names, rank, world)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
        error, rng_state = exc, None
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise OSError(f"checkpoint {final}: another rank failed to write its files (see its error)")

    def finish() -> None:
        full = _full_state(optimizer, names, state, step, rng_state)
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
        if final.exists():
            old = temporary_sibling(final, "tmp-old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _prune(root, keep)

    from lora.framework.tp import rank0_call

    try:
        rank0_call(finish)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: list[str],
    state: dict,
    keep: int = 3,
) -> Path:
    """Write ``root/step-<step>/`` (see the module docstring) through a temporary directory and keep the
    last ``keep`` checkpoints. ``names``: the parameter names of the optimizer's parameters, in order."""
    root = Path(root)
    if _rank_world()[1] > 1:
        return _save_checkpoint_ranks(root, step, model, optimizer, names, state, keep)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    with atomic_output_dir(final, overwrite=True) as tmp:
        save_adapters(model, tmp / "adapters.safetensors")
        rng_state = _write_rank_files(tmp, optimizer, names, 0, 1)
        full = _full_state(optimizer, names, state, step, rng_state)
        (tmp / "state.json").write_text(json.dumps(full, indent=1))
    _prune(root, keep)
    return final


def read_state(path: str | os.PathLike, required: tuple[str, ...] = ("config",)) -> dict:
    """``state.json`` of a fine-tuning checkpoint directory; ``ValueError`` naming the file when it is
    unreadable, truncated or not a JSON object."""
    f = Path(path) / "state.json"
    try:
        state = json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"fine-tuning checkpoint {path}: {f.name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{f}: not valid JSON (truncated or damaged: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{f}: not a JSON object")
    for key in required:
        if key not in state:
            raise ValueError(f"{f}: field {key!r} is missing (not a complete fine-tuning checkpoint)")
    return state


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> dict:
    """Restore adapters, optimizer state and RNG states from a :func:`save_checkpoint` directory; returns
    its ``state.json``. Raises ``ValueError`` when the checkpoint's parameters differ from ``names``."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path, ("config", "losses", "lrs", "grad_norms", "step", "optimizer", "rng"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fine-tuning checkpoint (format {state.get('format')!r})")
    saved_names = state["optimizer"]["param_names"]
    if saved_names != names:
        diff = sorted(set(saved_names) ^ set(names))[:4] or "their order"
        raise ValueError(f"{path}: the checkpoint trains other adapter parameters than this model ({diff})")
    rank, world = _rank_world()
    for stem in ("optimizer", "rng"):
        if not (path / _rank_file(stem, rank, world)).is_file():
            raise ValueError(
                f"{path}: {_rank_file(stem, rank, world)} is missing (a checkpoint of another process "
                f"layout; resume with the --tp / --ep / --dp and number of processes it was written with)"
            )
    load_adapter_file(model, path / "adapters.safetensors")
    moments = load_file(str(path / _rank_file("optimizer", rank, world)))
    sd = optimizer.state_dict()
    new_state = {}
    for i, name in enumerate(names):
        entry = {k.split("/", 1)[1]: v for k, v in moments.items() if k.split("/", 1)[0] == name}
        if entry:
            new_state[i] = entry
    groups = state["optimizer"]["param_groups"]
    sd["state"] = new_state
    sd["param_groups"] = [
        {**g, "betas": tuple(g["betas"]), "params": old["params"]}
        if "betas" in g
        else {**g, "params": old["params"]}
        for g, old in zip(groups, sd["param_groups"])
    ]
    optimizer.load_state_dict(sd)
    from safetensors import safe_open

    rng_file = str(path / _rank_file("rng", rank, world))
    with safe_open(rng_file, framework="pt") as fh:
        own = (fh.metadata() or {}).get("state")  # this rank's numpy / Python states (older files: none)
    _restore_rng(load_file(rng_file), json.loads(own) if own else state["rng"])
    return state


# ------------------------------------------------------------------------------------------ the loop


@contextlib.contextmanager
def routers_outside_autocast(model: nn.Module):
    """Run Megatron MoE routers' gating outside ``torch.autocast`` while the context is active.

    The gating is a custom autograd function (``router_gating_linear``): under autocast its forward
    matmul returns bf16, and its backward then multiplies that bf16 gradient by the fp32 weight, which
    fails. Outside autocast the gating runs in its input's dtype (or ``moe_router_dtype``) both ways.
    """
    try:
        from megatron.core.transformer.moe.router import Router
    except ImportError:  # no Megatron: nothing to guard
        yield
        return
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for r in routers:

        def gating(inp, _orig=r.gating):
            with torch.autocast("cuda", enabled=False):
                return _orig(inp)

        r.gating = gating  # instance attribute shadows the method
    try:
        yield
    finally:
        for r in routers:
            del r.gating


def _fields(config: dict) -> dict:
    """A config dict without its schema ``version`` (checkpoints written before it had none)."""
    return {k: v for k, v in config.items() if k != "version"}


def check_resumable(path: str | os.PathLike, cfg: TrainConfig, run_info: dict | None = None) -> dict:
    """Raise ``ValueError`` (listing ``{field: (was, now)}``) unless the checkpoint at ``path`` was made
    with the same :class:`TrainConfig` and, when given, the same ``run_info``; returns its state."""
    path = Path(path)
    state = read_state(path)
    now = _fields(cfg.to_dict())
    defaults = {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }
    was = {**defaults, **_fields(state.get("config", {}))}  # fields added later: their defaults
    if was != now:
        diff = {k: (v, now.get(k)) for k, v in was.items() if now.get(k) != v}
        raise ValueError(f"--resume: the checkpoint {path} was made with other settings (was, now): {diff}")
    if run_info is not None and state.get("run") != run_info:
        was = state.get("run") or {}
        keys = {**was, **run_info}
        diff = {k: (was.get(k), run_info.get(k)) for k in keys if was.get(k) != run_info.get(k)}
        raise ValueError(f"--resume: the checkpoint {path} belongs to another run (was, now): {diff}")
    return state


def _reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    """``values`` summed over the data-parallel ``group`` (in place; identity without one)."""
    import torch.distributed as dist

    if group is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def _allreduce_grads(params: list[nn.Parameter], group) -> None:
    """Sum the adapter gradients over the data-parallel ``group`` (one flat all-reduce; a missing
    gradient, e.g. of an expert that got no token on this rank, counts as zero). Each rank's loss is
    already divided by the global batch's target count, so the sum is the gradient of the global mean."""
    if group is None:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _reduce_sum(_flatten_dense_tensors(grads), group)  # (Σ numel,)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


@dataclass
class GradLayout:
    """How the adapter gradients of a tensor- / expert-parallel model relate to those of one process.

    ``ep_scale``: parameter id → ``1 / ep`` for the factors of expert layers: the expert-parallel ranks run
    the same micro-batches (svdq/DESIGN.md §17), so the dispatcher hands every expert each token ``ep``
    times and their gradients (summed over the EP group inside autograd, :mod:`lora.adapters.layers`) are
    ``ep`` times the one-process ones. ``replicas``: parameter id → how many ranks of ``group`` (the
    tensor- and expert-parallel ranks of one data shard) hold the same tensor, so the squared gradient
    norm summed over ``group`` counts every element once. ``ep_mean``: ids of the dense factors, whose
    gradients are averaged over the expert-parallel group ``ep_group``: they are the same on every EP
    rank up to round-off (a GEMM's rounding depends on a token's row in the batch, and the dispatcher puts
    each rank's copy of a token in another row), and averaging keeps the replicas bit-identical.
    ``group=None``: one model-parallel rank."""

    ep_scale: dict[int, float]
    replicas: dict[int, int]
    group: object = None
    ep_mean: frozenset = frozenset()
    ep_group: object = None


def grad_layout(model: nn.Module) -> GradLayout:
    """The :class:`GradLayout` of ``model``'s adapter factors under the current parallel state."""
    import torch.distributed as dist

    from lora.adapters.layers import ExpertGroup

    if not dist.is_initialized():
        return GradLayout({}, {})
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return GradLayout({}, {})
    ep = parallel_state.get_expert_model_parallel_world_size()
    size = parallel_state.get_expert_tensor_and_model_parallel_world_size()
    if size == 1:
        return GradLayout({}, {})
    scale, replicas, dense = {}, {}, set()
    for m in adapter_modules(model).values():
        if isinstance(m, ExpertGroup):
            shared = {id(f.param) for f in m.shared_factors()}
            for f in m.factors():
                tp_copies = 1 if f.dim is not None else f.tp_size
                replicas[id(f.param)] = tp_copies * (m.ep_size if id(f.param) in shared else 1)
                if m.ep_size > 1:
                    scale[id(f.param)] = 1.0 / m.ep_size
        else:  # a dense layer: replicated over the expert-parallel ranks
            for f in m.factors():
                replicas[id(f.param)] = (1 if f.dim is not None else f.tp_size) * ep
                dense.add(id(f.param))
    group = parallel_state.get_expert_tensor_and_model_parallel_group()
    if ep == 1:
        return GradLayout(scale, replicas, group)
    ep_group = parallel_state.get_expert_model_parallel_group()
    return GradLayout(scale, replicas, group, frozenset(dense), ep_group)


def _sync_dense_grads(params: list[nn.Parameter], layout: GradLayout) -> None:
    """Average the gradients of the dense factors over the expert-parallel group (:class:`GradLayout`);
    one flat all-reduce."""
    if layout.ep_group is None:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    dense = [p for p in params if id(p) in layout.ep_mean]
    if not dense:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    flat = _flatten_dense_tensors(grads)  # (Σ numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=layout.ep_group)
    flat.div_(dist.get_world_size(layout.ep_group))
    for p, g in zip(dense, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


def _clip_grads(params: list[nn.Parameter], max_norm: float, layout: GradLayout) -> torch.Tensor:
    """Clip the gradients to ``max_norm`` (``0``: off) by their global norm, which is returned: the norm
    of the whole model's adapter gradient over the tensor- and expert-parallel ranks of one data shard
    (``layout``), equal on those ranks; one model-parallel rank: :func:`torch.nn.utils.clip_grad_norm_`."""
    limit = max_norm if max_norm > 0 else float("inf")
    if layout.group is None:
        return torch.nn.utils.clip_grad_norm_(params, limit)
    import torch.distributed as dist

    with_grad = [p for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in with_grad:
        sq += p.grad.double().pow(2).sum() / layout.replicas.get(id(p), 1)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=layout.group)
    norm = sq.sqrt().float()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # what clip_grad_norm_ does
        for p in with_grad:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def _train_step(
    lm: LoadedModel,
    optimizer,
    names_params: list,
    batches,
    cfg: TrainConfig,
    k: int,
    on_cuda: bool,
    dp: tuple[int, int] = (0, 1),
    layout: GradLayout | None = None,
):
    """Update ``k``: set ``lr(k)``; on this data-parallel rank (``dp = (rank, size)``,
    :func:`micro_batches`) the summed target losses of each micro-batch divided by the number of targets of
    the whole global batch (bf16 autocast on CUDA), backward; gradients summed over data parallelism (so
    the step is that of the global token-weighted mean loss, prompt / response masks included); expert
    gradients divided by the expert-parallel size (``layout``, :func:`grad_layout`); clip the global
    gradient norm to ``cfg.grad_clip``, AdamW step. Returns ``(global mean loss, lr, gradient norm before
    clipping)``. ``FloatingPointError`` naming the step and the first non-finite tensor when the loss, a
    gradient or an updated adapter tensor is not finite (``names_params``: ``[(name, parameter)]``)."""
    from lora.framework.parallel import data_parallel_group

    params = [p for _, p in names_params]
    layout = layout or GradLayout({}, {})
    lr = lr_at(k, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    dp_rank, dp_size = dp
    group = data_parallel_group() if dp_size > 1 else None
    batch = batches[batch_index(k, len(batches), cfg.seed)]
    targets = loss_targets(batch)  # of the global batch (every rank holds it): Σ over ranks and micro-batches
    optimizer.zero_grad(set_to_none=True)
    local = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches(batch, dp_rank, dp_size, cfg.grad_accum):
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext():
            loss = masked_mean(lm.token_losses(mb), mb.get("loss_mask"), targets)  # prompts: no loss
        local += loss.detach().double().cpu()
        if math.isfinite(float(local)):
            loss.backward()
    device = params[0].device if group is not None else "cpu"
    value = float(_reduce_sum(local.to(device), group))
    if not math.isfinite(value):  # the same on every data-parallel rank: all raise
        raise FloatingPointError(f"step {k + 1}: the loss is {value}")
    _allreduce_grads(params, group)
    _sync_dense_grads(params, layout)
    for p in params:
        if p.grad is not None and id(p) in layout.ep_scale:
            p.grad.mul_(layout.ep_scale[id(p)])
    norm = _clip_grads(params, cfg.grad_clip, layout)
    if not math.isfinite(float(norm)):
        bad = first_non_finite((n, p.grad) for n, p in names_params if p.grad is not None)
        raise FloatingPointError(f"step {k + 1}: the gradient of {bad} is not finite")
    optimizer.step()
    bad = first_non_finite((n, p) for n, p in names_params)
    if bad is not None:
        raise FloatingPointError(f"step {k + 1}: adapter tensor {bad} became non-finite after the update")
    return value, lr, float(norm)


@torch.no_grad()
def evaluate(lm: LoadedModel, batches: list[dict]) -> dict:
    """``{"loss", "perplexity", "tokens"}`` of ``lm`` on the held-out ``batches``: data-parallel rank ``d``
    of ``n`` runs batches ``d, d+n, …``; the float64 sums of token losses and counts are all-reduced over
    the data-parallel group. Leaves the model in eval mode."""
    from lora.framework.parallel import data_parallel_group, data_parallel_rank_size

    d, n = data_parallel_rank_size()
    lm.model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # (Σ loss, tokens)
    for b in batches[d::n]:
        losses = lm.token_losses(b)  # (b, s)
        if b.get("loss_mask") is not None:  # prompt / response data: response tokens only
            losses = losses[b["loss_mask"]]
        total += torch.tensor([float(losses.double().sum()), losses.numel()], dtype=torch.float64)
    if n > 1:
        import torch.distributed as dist

        total = total.to(next(lm.model.parameters()).device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=data_parallel_group())
        total = total.cpu()
    loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    ppl = math.exp(loss) if math.isfinite(loss) else loss
    return {"loss": loss, "perplexity": ppl, "tokens": int(total[1])}


@dataclass
class FinetuneResult:
    """Per-update ``losses`` / ``lrs`` / ``grad_norms`` (all steps, resumed ones included), the step
    reached, whether the run stopped early (``stop_at``), and the held-out evaluations
    (``[{"step", "loss", "perplexity", "tokens"}]``, :func:`evaluate`)."""

    losses: list[float]
    lrs: list[float]
    grad_norms: list[float]
    step: int
    stopped: bool
    evals: list[dict] = dataclasses.field(default_factory=list)


def finetune(
    lm: LoadedModel,
    batches: list[dict],
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | os.PathLike,
    save_every: int = 5,
    keep: int = 3,
    resume_from: str | os.PathLike | None = None,
    stop_at: int | None = None,
    run_info: dict | None = None,
    progress: bool = True,
    eval_batches: list[dict] | None = None,
    eval_every: int = 0,
) -> FinetuneResult:
    """Train the adapters of ``lm.model`` for ``cfg.steps`` updates on ``batches``.

    ``run_info`` (JSON) is stored in every checkpoint under ``"run"`` and must equal the resumed
    checkpoint's (the caller puts the data fingerprint and model checkpoint there). ``stop_at``: save a
    checkpoint after that update and return (``stopped=True``). Checkpoints every ``save_every`` updates
    (0 = only at ``stop_at`` and the end). ``eval_every > 0``: :func:`evaluate` on ``eval_batches`` after
    every that many updates (logged, stored in the checkpoints and the result).

    Under data parallelism (:func:`lora.framework.parallel.data_parallel_group`) every rank passes the same
    ``batches`` (the global batches) and runs its micro-batches of each (see the module docstring).
    """
    model = lm.model
    params = adapter_parameters(model)
    if not params:
        raise ValueError("the model has no adapter parameters to train")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    for m in adapter_modules(model).values():
        m.dropout_p = cfg.dropout
    names = list(params)
    from lora.framework.parallel import data_parallel_rank_size

    dp = data_parallel_rank_size()
    layout = grad_layout(model)
    check_batch_split(batches[0]["tokens"].shape[0], dp[1], cfg.grad_accum)
    if eval_every and not eval_batches:
        raise ValueError("eval_every > 0 needs held-out eval_batches")
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_info = run_info or {}
    losses, lrs, norms, evals, start = [], [], [], [], 0
    if resume_from is not None:
        check_resumable(resume_from, cfg, run_info)
        state = load_checkpoint(resume_from, model, optimizer, names)
        start, losses, lrs, norms = state["step"], state["losses"], state["lrs"], state["grad_norms"]
        evals = state.get("evals", [])
    if stop_at is not None and stop_at <= start:
        raise ValueError(f"--stop-at {stop_at} is not after the resumed checkpoint's step {start}")
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    on_cuda = next(iter(params.values())).is_cuda
    model.train()
    show = progress and _rank_world()[0] == 0
    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not show)
    guard = routers_outside_autocast(model) if on_cuda else contextlib.nullcontext()

    def checkpoint(step):
        state = {"config": cfg.to_dict(), "run": run_info, "losses": losses, "lrs": lrs, "grad_norms": norms}
        if eval_every:
            state["evals"] = evals
        state["data_position"] = {
            "batches": len(batches),
            **dict(zip(("epoch", "index"), divmod(step, len(batches)))),
        }
        save_checkpoint(checkpoint_dir, step, model, optimizer, names, state, keep)

    last_good = [resume_from]
    try:
        with guard:
            for k in range(start, end):
                try:
                    value, lr, norm = _train_step(
                        lm, optimizer, list(params.items()), batches, cfg, k, on_cuda, dp, layout
                    )
                except FloatingPointError as exc:
                    kept = (
                        f"the last good checkpoint is {last_good[0]}" if last_good[0] else "no checkpoint yet"
                    )
                    raise FloatingPointError(f"finetune stopped at {exc}; {kept}") from None
                losses.append(value)
                lrs.append(lr)
                norms.append(norm)
                bar.update(1)
                postfix = {"loss": f"{value:.4f}", "lr": f"{lr:.2e}"}
                if eval_every and (k + 1) % eval_every == 0:
                    evals.append({"step": k + 1, **evaluate(lm, eval_batches)})
                    model.train()
                    if show:
                        tqdm.write(f"step {k + 1}: held-out loss {evals[-1]['loss']:.4f}")
                if evals:
                    postfix["eval"] = f"{evals[-1]['loss']:.4f}"
                bar.set_postfix(postfix)
                if (save_every and (k + 1) % save_every == 0) or k + 1 == end:
                    checkpoint(k + 1)
                    last_good[0] = Path(checkpoint_dir) / checkpoint_name(k + 1)
    finally:
        bar.close()
    model.eval()
    return FinetuneResult(losses, lrs, norms, end, stopped=end < cfg.steps, evals=evals)
