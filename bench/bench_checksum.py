"""Cost of the per-tensor CRC-32 checksums of the svdq container (:mod:`lora.io.container`) on a multi-GB
checkpoint: write time, and full-read time with and without verification (``verify=False`` /
``--no-verify``), plus the raw hash throughputs of the stdlib candidates.

    python bench/bench_checksum.py [--gib 2] [--dir /tmp]      # writes bench/results/checksum.json

The checkpoint holds ``--gib`` GiB of float32 / bfloat16 / uint8 tensors of 64 MiB. Reads come from the
page cache (the file was just written), the worst case for the checksum's relative overhead: from disk,
reading dominates. Single process, CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch

from bench.common import RESULTS, environment
from lora.io.container import CheckpointReader, write_checkpoint

MIB = 2**20


def hash_throughputs(nbytes: int = 256 * MIB) -> dict[str, float]:
    """GiB/s of each stdlib hash on one buffer of ``nbytes``."""
    buf = memoryview(torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy())
    funcs = {
        "crc32": lambda: zlib.crc32(buf),
        "adler32": lambda: zlib.adler32(buf),
        "sha1": lambda: hashlib.sha1(buf).digest(),
        "sha256": lambda: hashlib.sha256(buf).digest(),
        "blake2b": lambda: hashlib.blake2b(buf, digest_size=16).digest(),
        "md5": lambda: hashlib.md5(buf).digest(),
    }
    out = {}
    for name, f in funcs.items():
        t0 = time.perf_counter()
        f()
        out[name] = round(nbytes / 2**30 / (time.perf_counter() - t0), 3)
    return out


def make_tensors(gib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = max(1, int(gib * 1024 / 64))
    tensors = {}
    for i in range(n):
        kind = i % 3
        if kind == 0:
            tensors[f"layers.{i}.lora_down"] = torch.randn(16 * MIB, generator=g)  # 64 MiB float32
        elif kind == 1:
            tensors[f"layers.{i}.bias"] = torch.randn(32 * MIB, generator=g).bfloat16()
        else:
            tensors[f"layers.{i}.weight_packed"] = torch.randint(
                0, 256, (64 * MIB,), dtype=torch.uint8, generator=g
            )
    return tensors


def read_all(path: Path, verify: bool) -> float:
    t0 = time.perf_counter()
    with CheckpointReader(path, verify=verify) as reader:
        for name in reader.keys():
            reader.get(name)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(1)
    hashes = hash_throughputs()
    tensors = make_tensors(args.gib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        t0 = time.perf_counter()
        out = write_checkpoint(root / "ckpt", tensors, {})
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in tensors.values():
            zlib.crc32(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        checksum_s = time.perf_counter() - t0
        del tensors
        read_all(out, verify=False)  # warm the page cache
        plain = min(read_all(out, verify=False) for _ in range(2))
        verified = min(read_all(out, verify=True) for _ in range(2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "benchmark": "container per-tensor checksums (crc32)",
        "environment": environment(),
        "checkpoint_bytes": nbytes,
        "hash_gib_per_s": hashes,
        "write_s": round(write_s, 3),
        "checksum_share_of_write": round(checksum_s / write_s, 3),
        "crc32_all_tensors_s": round(checksum_s, 3),
        "read_no_verify_s": round(plain, 3),
        "read_verify_s": round(verified, 3),
        "verify_overhead_s": round(verified - plain, 3),
        "verify_overhead_ratio": round(verified / plain, 3),
        "note": "reads from the page cache (worst case for the relative overhead); value-domain checks "
        "(finite, positive scales) run in both reads",
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "checksum.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
