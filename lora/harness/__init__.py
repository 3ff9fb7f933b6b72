"""Megatron-core test and demo harness: the one place that knows how to run Megatron on CPU.

Used by the test suite, the examples and the quickstart::

    from lora.harness import init_parallel, build_tiny_gpt_moe, TinyMoEConfig, run_on_processes

* :func:`init_parallel` — torch.distributed (gloo on CPU, NCCL on GPU) + Megatron parallel state.
* :func:`apply_cpu_patches` — the patches Megatron needs to run without CUDA (one comment per patch).
* :func:`build_tiny_gpt_moe` — a small, seeded GPT-MoE (local spec, SequentialMLP experts, GLU, top-2).
* :func:`run_on_processes` — run a function on N spawned processes and collect their results.
* :mod:`lora.harness.compat` — everything that differs between megatron-core 0.16 and 0.19.
"""

from lora.harness.cpu_patches import apply_cpu_patches
from lora.harness.parallel import destroy_parallel, init_parallel
from lora.harness.spawn import ChildProcessError_, run_on_processes
from lora.harness.tiny_moe import TinyMoEConfig, build_tiny_gpt_moe, tiny_moe_batch

__all__ = [
    "ChildProcessError_",
    "TinyMoEConfig",
    "apply_cpu_patches",
    "build_tiny_gpt_moe",
    "destroy_parallel",
    "init_parallel",
    "run_on_processes",
    "tiny_moe_batch",
]
