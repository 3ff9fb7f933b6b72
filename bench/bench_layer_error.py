"""Benchmark: INT4 W4A16 (group 64) output error per layer of a trained MoE — RTN, ours, modelopt.

Every quantizable linear of the trained Hugging Face Qwen3-MoE ``calib/assets/qwen3-moe-tiny``: the
attention projections q / k / v / o of each decoder layer and each expert's fused ``gate_up`` (256 → 256)
and ``down`` (128 → 256) weight, each as a standalone ``nn.Linear``. Forward hooks on the unquantized
model capture each layer's real inputs: calibration inputs from the calibration windows (base train split)
and held-out inputs from the evaluation windows (base held-out split); an expert's inputs are the tokens the
router sends to it (``down``: ``silu(gate) · up`` of the unquantized expert). Also the quickstart's Megatron
GPT-MoE ``calib/assets/quickstart-moe`` (``linear_qkv`` 256 → 768, ``linear_proj``, each local expert's
``linear_fc1`` 256 → 256 and ``linear_fc2`` 128 → 256), with the quickstart's calibration / held-out windows.

Rows per layer (float32, weights only, activations unquantized):

* ``RTN``: round-to-nearest int4 g64;
* ``ours rtn`` / ``ours auto``: :func:`svdq.quantize` of the standalone layer, ``SVDQConfig(weight_format=
  "int4-g64", act_format="none", rank=32)`` with ``residual_quant`` rtn / auto (GPTQ where it helps);
  ``--extra`` adds variants (refine steps, no whitening, …);
* ``modelopt AWQ + SVDQuant r32``: ``mtq.quantize`` with ``INT4_AWQ_CFG`` at block 64 and the algorithm
  ``{"method": "svdquant", "lowrank": 32}`` (as bench/bench_accuracy.py), forward loop over the calibration
  inputs;
* ``modelopt AWQ``: ``INT4_AWQ_CFG`` at block 64 alone;
* ``modelopt RTN (max)``: the same quantizers with the ``max`` algorithm (modelopt's round-to-nearest), a
  check of its int4 grid against ours (row ``RTN``).

Per layer: relative output error ``‖y − y_ref‖/‖y_ref‖`` on the held-out inputs (``y_ref`` the unquantized
layer) and seconds. Aggregates per row: geometric mean over layers of ``err_row / err_modelopt_svdquant``
and ``Σ‖y − y_ref‖² / Σ‖y − y_ref‖²_modelopt`` (summed squared output errors over all layers).

    python bench/bench_layer_error.py            # writes bench/results/layer_error_cpu_int4.json
    python bench/bench_layer_error.py --extra --name layer_error_cpu_int4_extra   # + the options sweep
    python bench/bench_layer_error.py --models hf --calib-tokens 2048 --name layer_error_cpu_int4_hf_calib2048
    python bench/bench_layer_error.py --models hf --layers "*layers.0.*"
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svdq  # noqa: E402
from bench.common import modelopt_config, write_result  # noqa: E402
from svdq import SVDQConfig  # noqa: E402
from svdq.formats import fake_quant  # noqa: E402

WEIGHT_FORMAT = "int4-g64"
BLOCK = 64
REF = "modelopt AWQ + SVDQuant r32"  # the row every ratio is taken against


def _base(rank: int) -> SVDQConfig:
    return SVDQConfig(weight_format=WEIGHT_FORMAT, act_format="none", rank=rank)


def ours_variants(rank: int, extra: bool) -> dict[str, SVDQConfig]:
    base = _base(rank)
    rows = {"ours rtn": base, "ours auto": base.replace(residual_quant="auto")}
    if extra:
        rows.update(
            {
                "ours gptq": base.replace(residual_quant="gptq"),
                "ours rtn, refine x4": base.replace(refine_steps=4),
                "ours auto, refine x4": base.replace(residual_quant="auto", refine_steps=4),
                "ours rtn, no whiten": base.replace(whiten=False),
                "ours auto, sample 2048": base.replace(residual_quant="auto", sample_tokens=2048),
                "ours auto, damp 0.05": base.replace(residual_quant="auto", damp=0.05),
                "ours auto, damp 0.1": base.replace(residual_quant="auto", damp=0.1),
                "ours auto, refine x4, damp 0.1": base.replace(
                    residual_quant="auto", refine_steps=4, damp=0.1
                ),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- capture


@torch.no_grad()
def capture(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Inputs ``(tokens, in)`` of every attention projection and expert projection over ``batches``."""
    got: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):

            def lin_hook(m, args, name=name):
                got.setdefault(name, []).append(args[0].detach().flatten(0, -2).float())  # (T, in)

            handles.append(mod.register_forward_pre_hook(lin_hook))
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and not isinstance(mod, nn.Linear):

            def exp_hook(m, args, name=name):
                x, top_k_index = args[0].float(), args[1]  # (T, H), (T, k)
                for e in range(m.gate_up_proj.shape[0]):
                    tok = (top_k_index == e).any(-1).nonzero().flatten()  # (T_e,)
                    if tok.numel() == 0:
                        continue
                    xe = x[tok]  # (T_e, H)
                    gate, up = (xe @ m.gate_up_proj[e].float().T).chunk(2, dim=-1)  # (T_e, I) each
                    got.setdefault(f"{name}.{e}.gate_up", []).append(xe)
                    got.setdefault(f"{name}.{e}.down", []).append(m.act_fn(gate) * up)  # (T_e, I)

            handles.append(mod.register_forward_pre_hook(exp_hook))
    try:
        for b in batches:
            model(input_ids=b["tokens"], position_ids=b["position_ids"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``(out, in)`` weight of every layer :func:`capture` names."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[name] = mod.weight.detach().float()
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and not isinstance(mod, nn.Linear):
            for e in range(mod.gate_up_proj.shape[0]):
                out[f"{name}.{e}.gate_up"] = mod.gate_up_proj[e].detach().float()  # (2I, H)
                out[f"{name}.{e}.down"] = mod.down_proj[e].detach().float()  # (H, I)
    return out


# -------------------------------------------------------------------------------------------- rows


def linear_of(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def chunks(x: torch.Tensor, n: int = 2048):
    return [x[i : i + n] for i in range(0, x.shape[0], n)]


def loop_over(x: torch.Tensor):
    @torch.no_grad()
    def loop(m: nn.Module) -> None:
        for c in chunks(x):
            m(c)

    return loop


@torch.no_grad()
def errors(model: nn.Module, x_test: torch.Tensor, y_ref: torch.Tensor) -> dict:
    y = torch.cat([model(c) for c in chunks(x_test)]).float()  # (N, out)
    sq = (y - y_ref).pow(2).sum().item()
    return {"rel_error": math.sqrt(sq / y_ref.pow(2).sum().item()), "sq_error": sq}


def row_rtn(W, x_cal, x_test, y_ref):
    t0 = time.perf_counter()
    lin = linear_of(fake_quant(W, WEIGHT_FORMAT))
    return {**errors(lin, x_test, y_ref), "seconds": time.perf_counter() - t0}


def row_ours(W, x_cal, x_test, y_ref, cfg: SVDQConfig):
    model = nn.Sequential(linear_of(W))
    t0 = time.perf_counter()
    svdq.quantize(model, cfg, loop_over(x_cal), progress=False, report=False)
    secs = time.perf_counter() - t0
    s = model[0].svdq_summary
    keep = ("alpha", "whitened", "residual_quant", "final_error", "step_errors")
    return {**errors(model, x_test, y_ref), "seconds": secs, **{k: s[k] for k in keep}}


def modelopt_cfg(algorithm: dict | None) -> dict:
    return modelopt_config("INT4_AWQ_CFG", algorithm, BLOCK)


def row_modelopt(W, x_cal, x_test, y_ref, algorithm: dict | None):
    import modelopt.torch.quantization as mtq

    model = nn.Sequential(linear_of(W))
    t0 = time.perf_counter()
    model = mtq.quantize(model, modelopt_cfg(algorithm), loop_over(x_cal))
    return {**errors(model, x_test, y_ref), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ summary


def aggregate(layers: dict, rows: list[str]) -> dict:
    out = {}
    for r in rows:
        have = [v for v in layers.values() if r in v and REF in v and v[REF]["rel_error"] > 0]
        if not have:
            continue
        logs = [math.log(v[r]["rel_error"] / v[REF]["rel_error"]) for v in have]
        out[r] = {
            "geomean_ratio_vs_modelopt_svdquant": math.exp(sum(logs) / len(logs)),
            "sum_sq_ratio_vs_modelopt_svdquant": sum(v[r]["sq_error"] for v in have)
            / sum(v[REF]["sq_error"] for v in have),
            "mean_rel_error": sum(v[r]["rel_error"] for v in have) / len(have),
            "layers_at_or_below_0.85x": sum(v[r]["rel_error"] <= 0.85 * v[REF]["rel_error"] for v in have),
            "layers": len(have),
            "seconds": sum(v[r]["seconds"] for v in have),
        }
    return out


def kind_of(name: str) -> str:
    """``model/projection``, e.g. ``qwen3-moe-tiny/q_proj``."""
    return f"{model_of(name)}/{name.rsplit('.', 1)[-1]}"


def model_of(name: str) -> str:
    return name.split("/", 1)[0]


def hf_layers(calib_tokens: int, eval_tokens: int):
    """``(weights, calibration inputs, held-out inputs)`` by layer name of qwen3-moe-tiny."""
    from bench.bench_hf_moe import ASSET, batches_of, load

    calib, held = batches_of(128, calib_tokens, eval_tokens, 16, "cpu")
    model = load(ASSET, "cpu", torch.float32)
    return weights_of(model), capture(model, calib), capture(model, held)


MEGATRON_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def quickstart_layers(seed: int = 0):
    """The same for the quickstart's Megatron GPT-MoE (its own calibration windows, 8 × 8 × 128 tokens, and
    held-out windows, as bench/bench_accuracy.py ``quickstart``): ``linear_qkv`` / ``linear_proj`` and each
    local expert's ``linear_fc1`` / ``linear_fc2`` (SequentialMLP: one module per expert)."""
    from calib.corpus import eval_windows, random_windows, stdlib_split
    from calib.pretrain import load_pretrained, read_pretrained_config
    from calib.quickstart import QuickstartConfig, _new_model

    qc = QuickstartConfig(seed=seed)
    cfg = read_pretrained_config()
    split = stdlib_split()
    held = eval_windows(split.base_heldout, cfg.seq_len, qc.batch, qc.eval_tokens, "cpu")
    gen = torch.Generator().manual_seed(seed)
    calib = [
        random_windows(split.base_train, qc.batch, cfg.seq_len, gen, "cpu") for _ in range(qc.calib_batches)
    ]
    model = _new_model(cfg, None, seed)
    load_pretrained(model)
    model.eval()
    mods = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in MEGATRON_LINEARS}
    weights = {n: m.weight.detach().float() for n, m in mods.items()}  # (out, in)

    @torch.no_grad()
    def run(batches):
        got: dict[str, list[torch.Tensor]] = {}

        def hook(m, args, name):
            x = args[0].detach().flatten(0, -2).float()  # (T, in)
            if x.shape[0]:
                got.setdefault(name, []).append(x)

        handles = [m.register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n, m in mods.items()]
        try:
            for b in batches:
                model(b["tokens"], b["position_ids"], None)
        finally:
            for h in handles:
                h.remove()
        return {k: torch.cat(v) for k, v in got.items()}

    return weights, run(calib), run(held)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["hf", "quickstart"], choices=["hf", "quickstart"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=8192, help="HF model (the quickstart uses its own)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="HF model")
    p.add_argument("--layers", nargs="+", default=["*"], help="fnmatch patterns on layer names")
    p.add_argument("--extra", action="store_true", help="also the extra ours variants (options sweep)")
    p.add_argument("--no-modelopt", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default="layer_error_cpu_int4")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    W_all, x_cal_all, x_held_all = {}, {}, {}
    for model_name in args.models:
        if model_name == "hf":
            got = hf_layers(args.calib_tokens, args.eval_tokens)
        else:
            from lora.framework.parallel import destroy_parallel, init_parallel

            init_parallel(seed=0)
            try:
                got = quickstart_layers()
            finally:
                destroy_parallel()
        prefix = {"hf": "qwen3-moe-tiny", "quickstart": "quickstart-moe"}[model_name]
        for d, new in zip((W_all, x_cal_all, x_held_all), got):
            d.update({f"{prefix}/{k}": v for k, v in new.items()})
    names = [n for n in W_all if any(fnmatch.fnmatch(n, pat) for pat in args.layers)]
    variants = ours_variants(args.rank, args.extra)
    rows = ["RTN", *variants] + ([] if args.no_modelopt else [REF, "modelopt AWQ", "modelopt RTN (max)"])
    layers: dict[str, dict] = {}
    # warm-up (first-call costs, modelopt's setup) outside the timings
    g = torch.Generator().manual_seed(0)
    W0, x0 = torch.randn(128, 128, generator=g), torch.randn(1024, 128, generator=g)  # (out, in), (N, in)
    row_ours(W0, x0, x0, x0 @ W0.T, _base(8).replace(residual_quant="auto"))
    if not args.no_modelopt:
        row_modelopt(W0, x0, x0, x0 @ W0.T, {"method": "svdquant", "lowrank": 8})
    print(f"{len(names)} layers; rows: {rows}", flush=True)
    for name in names:
        W = W_all[name]  # (out, in)
        x_cal, x_test = x_cal_all.get(name), x_held_all.get(name)  # (N, in)
        if x_cal is None or x_test is None:
            print(f"{name}: no calibration or held-out tokens, skipped")
            continue
        y_ref = x_test @ W.T  # (N_test, out)
        res = {"shape": list(W.shape), "calib_tokens": x_cal.shape[0], "test_tokens": x_test.shape[0]}
        res["RTN"] = row_rtn(W, x_cal, x_test, y_ref)
        for label, cfg in variants.items():
            res[label] = row_ours(W, x_cal, x_test, y_ref, cfg)
        if not args.no_modelopt:
            res[REF] = row_modelopt(W, x_cal, x_test, y_ref, {"method": "svdquant", "lowrank": args.rank})
            res["modelopt AWQ"] = row_modelopt(W, x_cal, x_test, y_ref, None)
            # modelopt's own round-to-nearest at block 64: checks its int4 grid against ours (row RTN)
            res["modelopt RTN (max)"] = row_modelopt(W, x_cal, x_test, y_ref, {"method": "max"})
        layers[name] = res
        line = "  ".join(f"{r.split(' r32')[0]} {res[r]['rel_error']:.4f}" for r in rows if r in res)
        print(f"{name:<52} {tuple(W.shape)} n={x_cal.shape[0]:>5}  {line}", flush=True)

    agg = {"all": aggregate(layers, rows)}
    for m in sorted({model_of(n) for n in layers}):
        agg[m] = aggregate({n: v for n, v in layers.items() if model_of(n) == m}, rows)
    for k in sorted({kind_of(n) for n in layers}):
        agg[k] = aggregate({n: v for n, v in layers.items() if kind_of(n) == k}, rows)
    print()
    for group, a in agg.items():
        for r, v in a.items():
            print(
                f"{group:<30} {r:<30} geomean ×{v['geomean_ratio_vs_modelopt_svdquant']:.3f}  "
                f"Σsq ×{v['sum_sq_ratio_vs_modelopt_svdquant']:.3f}  mean rel {v['mean_rel_error']:.4f}  "
                f"≤0.85×: {v['layers_at_or_below_0.85x']}/{v['layers']}  {v['seconds']:.1f} s"
            )
    path = write_result(
        args.name,
        {
            "models": args.models,
            "weight_format": WEIGHT_FORMAT,
            "act_format": "none",
            "rank": args.rank,
            "calib_tokens": args.calib_tokens,
            "eval_tokens": args.eval_tokens,
            "reference_row": REF,
            "modelopt_config": None
            if args.no_modelopt
            else modelopt_cfg({"method": "svdquant", "lowrank": args.rank}),
            "ours_configs": {k: v.to_dict() for k, v in variants.items()},
            "aggregate": agg,
            "layers": layers,
            "total_seconds": time.perf_counter() - t_start,
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
