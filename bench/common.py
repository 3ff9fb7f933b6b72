"""Helpers shared by the benchmark scripts: environment record, timing, JSON output."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device name, library versions and date, recorded in every result file."""

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            try:
                mod = __import__(pkg.replace("-", "_").replace("nvidia_", ""))
                return getattr(mod, "__version__", "unknown")
            except Exception:
                return None

    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "megatron_core": version("megatron-core") or _megatron_version(),
        "nvidia_modelopt": version("nvidia-modelopt") or _modelopt_version(),
        "host": platform.node(),
    }


def _megatron_version():
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:
        return None


def _modelopt_version():
    try:
        import modelopt

        return modelopt.__version__
    except Exception:
        return None


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    """(result, seconds) of ``fn()``, synchronizing CUDA around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def median_time(fn, device, warmup: int = 1, iters: int = 10) -> float:
    """Median seconds of ``fn()`` over ``iters`` synchronized runs, after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(iters))


def write_result(name: str, payload: dict, out_dir: str | None = None) -> Path:
    """Write ``payload`` (plus the environment) atomically to ``<out_dir>/<name>.json``."""
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    os.replace(tmp, path)
    return path


def modelopt_config(name: str, algorithm: dict | None, block: int | None) -> dict:
    """A deep copy of modelopt's ``name`` config, the weight block size set to ``block`` (INT4) and the
    algorithm replaced by ``algorithm`` when given."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, name))
    if block is not None:
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = block
    if algorithm is not None:
        cfg["algorithm"] = dict(algorithm)
    return cfg
