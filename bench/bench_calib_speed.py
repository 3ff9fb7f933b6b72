"""Benchmark: calibration speed of a MiniLM-sized model and a Mixtral-8x7B-shaped layer stack, per phase.

Models are built from transformers configs (random init, no download):

* ``minilm``: ``BertModel`` of MiniLM-L6's shape (hidden 384, 6 layers, 12 heads, intermediate 1536,
  vocabulary 30522), calibrated by :func:`svdq.quantize` (NVFP4 W4A4, rank 32: the defaults) and by
  nvidia-modelopt's ``mtq.quantize(model, NVFP4_SVDQUANT_DEFAULT_CFG, forward_loop)`` (rank 32) on the same
  model and batches of random token ids. modelopt's NVFP4 fake quantization needs CUDA: on CPU its row
  records the error.
* ``mixtral``: ``MixtralModel`` with ``--layers`` decoder layers of Mixtral-8x7B's shape (hidden 4096,
  intermediate 14336, 8 experts, top-2; ``--shape tiny``: hidden 256, intermediate 896), calibrated by ours
  (fused HF experts, :mod:`svdq.experts`).

Per model: ``seconds`` = median end-to-end wall time of ``--repeats`` calibrations (timing off; CUDA
synchronized before and after), a per-layer and per-phase breakdown from one more run under
:func:`svdq.timing.collect` (synchronizing at phase boundaries, so its total is a little larger), and with
``--count-ops`` the dispatched aten operations and host synchronizations (``.item()`` / ``float()`` /
``bool()`` of a tensor, ``.tolist()``, ``nonzero``) per phase: a machine-independent measure of the
per-layer overhead that dominates small layers on a GPU.

    python bench/bench_calib_speed.py                            # CUDA defaults: results/calib_speed_gpu.json
    python bench/bench_calib_speed.py --device cpu --shape tiny  # CPU smoke run: results/calib_speed_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svdq  # noqa: E402
from bench.common import sync, write_result  # noqa: E402
from svdq import timing  # noqa: E402

SHAPES = {  # name: (MiniLM layers, Mixtral hidden, Mixtral intermediate)
    "full": (6, 4096, 14336),
    "tiny": (2, 256, 896),
}
SYNC_OPS = ("_local_scalar_dense", "nonzero")  # aten ops that wait for the device (plus Tensor.tolist)


def minilm(layers: int, device, dtype) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
    )
    return BertModel(cfg).to(device, dtype).eval()


def mixtral(layers: int, hidden: int, intermediate: int, device, dtype) -> nn.Module:
    from transformers import MixtralConfig, MixtralModel

    torch.manual_seed(0)
    heads = max(hidden // 128, 4)
    cfg = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    return MixtralModel(cfg).to(device, dtype).eval()


def token_batches(n: int, batch: int, seq: int, vocab: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(n)]


def forward_loop(batches):
    @torch.no_grad()
    def loop(model: nn.Module) -> None:
        for ids in batches:
            model(input_ids=ids)

    return loop


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops and host synchronizations per (layer, phase) of :mod:`svdq.timing`."""

    def __init__(self, timings: timing.Timings):
        super().__init__()
        self.t = timings
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()

    def key(self) -> tuple[str, str]:
        stack = self.t._stack
        return (stack[-1][0], stack[-1][1]) if stack else (timing.MODEL, "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        k = self.key()
        self.ops[k] += 1
        if func.__name__.split(".")[0] in SYNC_OPS:
            self.syncs[k] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run) -> dict:
    """Aten ops / host syncs of ``run()`` per layer and phase (``Tensor.tolist`` counted by a wrapper)."""
    orig = torch.Tensor.tolist
    with timing.collect(sync_cuda=False) as t:
        counter = OpCounter(t)

        def tolist(self):
            counter.syncs[counter.key()] += 1
            return orig(self)

        torch.Tensor.tolist = tolist
        try:
            with counter:
                run()
        finally:
            torch.Tensor.tolist = orig
    by_layer: dict = defaultdict(lambda: {"ops": {}, "syncs": {}})
    for (lay, ph), n in counter.ops.items():
        by_layer[lay]["ops"][ph] = n
    for (lay, ph), n in counter.syncs.items():
        by_layer[lay]["syncs"][ph] = n
    return {
        "total_ops": sum(counter.ops.values()),
        "total_syncs": sum(counter.syncs.values()),
        "layers": dict(by_layer),
    }


def breakdown(t: timing.Timings) -> dict:
    layers = {k: {p: round(s, 5) for p, s in v.items()} for k, v in t.as_dict().items()}
    per_layer = {k: round(sum(v.values()), 5) for k, v in layers.items() if k != timing.MODEL}
    return {
        "total_seconds": round(sum(t.totals().values()), 4),
        "phase_totals": {p: round(s, 4) for p, s in t.totals().items()},
        "layer_seconds": per_layer,
        "layers": layers,
    }


def measure(make_model, quantize, device, repeats: int, ops: bool) -> dict:
    """Median seconds of ``quantize(fresh model)`` over ``repeats``, the phase breakdown of one more run
    and, with ``ops``, op / sync counts of another."""
    base = make_model()
    secs = []
    for _ in range(repeats):
        m = copy.deepcopy(base)
        sync(device)
        t0 = time.perf_counter()
        quantize(m)
        sync(device)
        secs.append(time.perf_counter() - t0)
        del m
    row = {"seconds": round(statistics.median(secs), 4), "all_seconds": [round(s, 4) for s in secs]}
    m = copy.deepcopy(base)
    with timing.collect() as t:
        quantize(m)
    row["breakdown"] = breakdown(t)
    if ops:
        row["op_counts"] = count_ops(lambda: quantize(copy.deepcopy(base)))
    return row


def modelopt_quantize(loop, rank: int):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_SVDQUANT_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "svdquant", "lowrank": rank}

    def run(model):
        return mtq.quantize(model, cfg, loop)

    return run


def _row(rows: dict, name: str, fn) -> None:
    print(f"--- {name}", flush=True)
    try:
        rows[name] = fn()
        b = rows[name]["breakdown"]
        print(f"{name:<40} {rows[name]['seconds']:.3f} s  phases {b['phase_totals']}", flush=True)
    except Exception as exc:  # a failing row is recorded, the others still run
        traceback.print_exc()
        rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: full on CUDA, tiny on CPU")
    p.add_argument("--models", nargs="+", default=["minilm", "mixtral"], choices=["minilm", "mixtral"])
    p.add_argument("--layers", type=int, default=None, help="Mixtral decoder layers (default 2; tiny: 1)")
    p.add_argument("--minilm-layers", type=int, default=None, help="default 6; tiny: 2")
    p.add_argument("--batches", type=int, default=None, help="calibration batches (default 8; CPU 4)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed calibrations per row (default 3; CPU 1)")
    p.add_argument("--count-ops", action="store_true", help="also count aten ops and host syncs per phase")
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    gpu = args.device.startswith("cuda")
    shape = args.shape or ("full" if gpu else "tiny")
    bert_layers, hidden, inter = SHAPES[shape]
    bert_layers = args.minilm_layers or bert_layers
    moe_layers = args.layers or (2 if shape == "full" else 1)
    n_batches = args.batches or (8 if gpu else 4)
    repeats = args.repeats or (3 if gpu else 1)
    config = svdq.SVDQConfig(weight_format="nvfp4", act_format="nvfp4", rank=args.rank)

    def ours(loop):
        return lambda m: svdq.quantize(m, config, loop, progress=False, report=False)

    rows: dict = {}
    meta: dict = {}
    if "minilm" in args.models:
        data = token_batches(n_batches, args.batch, args.seq, 30522, args.device)
        loop = forward_loop(data)
        make = lambda: minilm(bert_layers, args.device, torch.float32)  # noqa: E731
        meta["minilm"] = {"layers": bert_layers, "dtype": "float32", "linears": 6 * bert_layers + 1}
        _row(rows, "minilm ours", lambda: measure(make, ours(loop), args.device, repeats, args.count_ops))
        if not args.no_modelopt:
            _row(
                rows,
                "minilm modelopt NVFP4_SVDQUANT_DEFAULT_CFG",
                lambda: measure(make, modelopt_quantize(loop, args.rank), args.device, repeats, False),
            )
    if "mixtral" in args.models:
        dtype = torch.bfloat16 if gpu else torch.float32
        data = token_batches(n_batches, args.batch, args.seq, 1024, args.device)
        loop = forward_loop(data)
        make = lambda: mixtral(moe_layers, hidden, inter, args.device, dtype)  # noqa: E731
        meta["mixtral"] = {"layers": moe_layers, "hidden": hidden, "intermediate": inter, "dtype": str(dtype)}
        _row(rows, "mixtral ours", lambda: measure(make, ours(loop), args.device, repeats, args.count_ops))
    name = args.name or f"calib_speed_{'gpu' if gpu else 'cpu'}"
    path = write_result(
        name,
        {
            "device_arg": args.device,
            "shape": shape,
            "models": meta,
            "svdq_config": config.to_dict(),
            "calib_batches": n_batches,
            "batch": args.batch,
            "seq_len": args.seq,
            "repeats": repeats,
            "rows": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
