"""Patches that let megatron-core run on a machine without CUDA (svdq/DESIGN.md §11.1).

Megatron assumes a CUDA device in a handful of places. :func:`apply_cpu_patches` replaces exactly
those, and only when ``torch.cuda.is_available()`` is False, so a GPU run is never altered.
It is idempotent and must be called in every process (spawned children start fresh).
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


def apply_cpu_patches() -> bool:
    """Apply the CPU patches if CUDA is unavailable. Returns True when the patches are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # 1. Megatron allocates buffers with ``device=torch.cuda.current_device()`` (router, embeddings,
    #    experts, tensor-parallel layers). On CPU the "current device" is the CPU.
    torch.cuda.current_device = lambda: "cpu"

    # 2. ``torch.cuda.synchronize`` is called by dist_checkpointing.save/load; there is nothing
    #    to synchronize on CPU, and the real call raises without a CUDA driver.
    torch.cuda.synchronize = lambda *args, **kwargs: None

    # 3. The RNG tracker (dropout forks, expert-parallel init) stores CUDA generator states.
    #    Keep the same named states, but as CPU generator states, so that
    #    ``model_parallel_cuda_manual_seed`` and ``tracker.fork()`` work unchanged; the "CUDA" state that
    #    activation recomputation saves and restores is the CPU generator's.
    _patch_rng_tracker()

    # 4. The default causal mask is built with ``device="cuda"``; build it on the CPU instead.
    _patch_causal_mask()

    # 5. Megatron's optimizer (FP32Optimizer, the gradient-norm helpers) allocates its scale and norm
    #    buffers with ``device="cuda"``: those modules get a ``torch`` whose factories put them on the CPU.
    #    (``clip_grad > 0`` still asserts CUDA gradients: use ``OptimizerConfig(clip_grad=0.0)`` on CPU.)
    _patch_optimizer_devices()

    # 6. megatron-core 0.19's DDP waits on the current CUDA stream for CUDA-graph gradient events before
    #    a gradient reduction; without CUDA there are no such events: a stream whose waits do nothing.
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()

    _APPLIED = True
    return True


class _NoStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: waiting and synchronizing do nothing."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    default_name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name=default_name):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # torch.cuda.manual_seed is lazy without a driver; make it an explicit no-op for clarity.
    torch.cuda.manual_seed = lambda seed: None


def _patch_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _patch_optimizer_devices() -> None:
    import types

    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    class _CpuTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    def on_cpu(real):
        def factory(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return real(*args, device=device, **kwargs)

        return factory

    proxy = _CpuTorch("torch")
    for fn in ("tensor", "zeros", "ones", "empty", "full"):
        setattr(proxy, fn, on_cpu(getattr(torch, fn)))
    for module in (clip_grads, optimizer, utils):
        module.torch = proxy
