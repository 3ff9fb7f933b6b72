"""Running the ``svdq`` command line in tests: as a real subprocess (:func:`svdq`, :func:`interrupt`) or
several commands in one spawned process (:func:`run_cli_cases`, one Megatron import for all of them)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.spawn import run_on_processes

_PATH = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(_PATH))


def svdq(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m calib.cli ARGS`` in a fresh process (the repository root importable for the factories)."""
    return subprocess.run(
        [sys.executable, "-m", "calib.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, **(env or {})},
    )


def interrupt(*args, ready, timeout: float = 120) -> tuple[int, str]:
    """Start ``svdq ARGS``, wait until ``ready(stderr so far)`` is true (its progress shows it is
    working), send SIGINT, and return ``(exit code, stderr)``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "calib.cli", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
        # a test run started in the background (`cmd &` without job control) ignores SIGINT, and its
        # children inherit that: give the child the default disposition, as an interactive shell would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")))
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(b"".join(chunks).decode(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"never became ready: {b''.join(chunks).decode(errors='replace')[-3000:]}"
                )
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


def _cases_in_process(rank, world, cases, ports=None):
    import warnings

    import torch

    from calib.cli.main import main

    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    results = []
    for i, argv in enumerate(cases):
        if ports is not None:  # a fresh rendezvous per command: a re-made process group must not meet
            os.environ["MASTER_PORT"] = str(ports[i])  # the store keys of the one before
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        results.append((code, out.getvalue(), err.getvalue()))
    return results


def run_cli_cases(cases: list[list], timeout: float = 300) -> list[tuple[int, str, str]]:
    """``calib.cli.main(argv)`` for every ``argv`` in order, in one spawned process; returns
    ``[(exit code, stdout, stderr)]``. A command that raises (not an input error) fails the caller."""
    return run_on_processes(_cases_in_process, 1, cases, timeout=timeout)[0]


def run_cli_ranks(cases: list[list], world: int, timeout: float = 300) -> list[list[tuple[int, str, str]]]:
    """:func:`run_cli_cases` on ``world`` spawned processes of one torch.distributed world (``RANK`` /
    ``WORLD_SIZE`` set as torchrun sets them): ``[rank][case] = (exit code, stdout, stderr)``."""
    from lora.framework.parallel import free_port

    ports = []
    while len(ports) < len(cases):
        port = free_port()
        if port not in ports:
            ports.append(port)
    return run_on_processes(_cases_in_process, world, cases, ports, timeout=timeout)


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N --master-port P -m calib.cli ARGS`` (a free
    local port) in a fresh process, as a user starts it."""
    from lora.framework.parallel import free_port

    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    launcher += ["--master-port", str(free_port()), "-m", "calib.cli"]
    return subprocess.run(
        [sys.executable, *launcher, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, "OMP_NUM_THREADS": "1"},
    )


def no_temporaries(root: Path) -> list[Path]:
    """Temporary files / directories left anywhere under ``root`` (names with ``.tmp``)."""
    return [p for p in Path(root).rglob("*") if ".tmp" in p.name]
