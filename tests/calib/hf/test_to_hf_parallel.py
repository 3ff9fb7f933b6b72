"""calib.hf.to_hf under tensor / expert parallelism: real 2-process gloo runs write the one-process export.

A calibrated Megatron twin of a tiny random Qwen3-MoE (4 experts, top-2; tests/calib/hf/test_to_hf_export.py)
is saved in the svdq format at world 1 and exported there (``modelopt-hf`` kept, ``folded`` with
``smoothing="fold"``), the forward loop running batch 0 twice. Two processes then load that checkpoint
(:func:`lora.io.svdq_export.load_quantized`) into a twin built at expert parallelism 2 (data parallel 2:
each rank runs batch 0 once, so the ranks together see what the one process saw, in the same order; with
different batches per rank the experts' GEMMs get other row counts, which changes the last bits of their
outputs) or at tensor parallelism 2 (both ranks run batch 0 twice) and export again; rank 0 writes.

Expert parallelism: every tensor (safetensors, bit for bit), ``hf_quant_config.json`` and ``config.json``
(the fold report's input-based errors included) equal the one-process export's. Tensor parallelism
reorders the GEMM reductions (float32 rounding, which now and then moves an activation across an NVFP4
rounding boundary upstream): every tensor not measured over the forward loop is equal bit for bit; the
measured ones (every ``down_proj.input_scale``; with ``smoothing="fold"`` every ``input_scale``) agree to
1e-5 relative (6 – 7 of them differ, by at most 3e-7, seen), the configs' numbers (the fold summary) to 1e-3
relative (equal, seen); the weights exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lora
from calib import CalibConfig, calibrate
from calib.hf.to_megatron import megatron_from_hf
from lora.framework.parallel import init_parallel
from tests.calib.hf.test_to_hf_export import CFG, LAYOUT, _mcore_loop, _tokens
from tests.calib.hf.test_to_megatron import batch, tiny_hf
from tests.helpers.spawn import run_on_processes

MODEL = "qwen3_moe"
MEASURED_TOL, REPORT_TOL = 1e-5, 1e-3


def _loop(batches: list[int]):
    tokens = _tokens(2)

    def loop(m) -> None:
        _, pos = batch()
        with torch.no_grad():
            for b in batches:
                m(tokens[b], pos, None)

    return loop


def _exports(model, out: Path, batches: list[int]) -> None:
    loop = _loop(batches)
    lora.export(model, out / "k", format="modelopt-hf", forward_loop=loop)
    lora.export(model, out / "f", format="folded", smoothing="fold", forward_loop=loop, verbose=False)


def _worker(rank, world, src, out, tp, ep):
    from lora.io.svdq_export import load_quantized

    torch.set_num_threads(1)
    init_parallel(tensor_parallel=tp, expert_parallel=ep)
    model = megatron_from_hf(tiny_hf(MODEL), spec="local", sequence_parallel=False).eval()
    load_quantized(model, src, progress=False)
    _exports(model, Path(out), [0] if ep > 1 else [0, 0])
    return True


def _read(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _json(d: Path, name: str) -> dict:
    return json.loads((d / name).read_text())


@pytest.fixture(scope="module")
def single(megatron_world, tmp_path_factory):
    """The svdq checkpoint and the one-process exports (in this process: world 1)."""
    root = tmp_path_factory.mktemp("single")
    model = megatron_from_hf(tiny_hf(MODEL), spec="local").eval()
    calibrate(model, _mcore_loop, CalibConfig(svdq=CFG, layout=LAYOUT, progress=False))
    lora.export(model, root / "src", format="svdq", progress=False)
    _exports(model, root, [0, 0])
    return root


def _measured(name: str, fmt: str) -> bool:
    return name.endswith(".input_scale") and (fmt == "f" or ".down_proj." in name)


def _close(a, b, tol: float, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol * max(abs(b), 1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_parallel_export_is_the_single_process_export(single, tmp_path, tp, ep):
    run_on_processes(_worker, 2, str(single / "src"), str(tmp_path), tp, ep, timeout=400)
    for fmt in ("k", "f"):
        ours, ref = _read(tmp_path / fmt), _read(single / fmt)
        assert ours.keys() == ref.keys()
        for k, v in ref.items():
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
            if ep > 1 or not _measured(k, fmt):
                assert torch.equal(ours[k], v), (fmt, k)
            else:
                rel = float((ours[k].double() - v.double()).abs() / v.double().abs())
                assert rel <= MEASURED_TOL, (fmt, k, rel)
        assert _json(tmp_path / fmt, "hf_quant_config.json") == _json(single / fmt, "hf_quant_config.json")
        c_ours, c_ref = _json(tmp_path / fmt, "config.json"), _json(single / fmt, "config.json")
        if ep > 1:
            assert c_ours == c_ref
        else:
            _close(c_ours, c_ref, REPORT_TOL, fmt)
