"""What the benchmarks share: one real ``quarry run`` in a child process, sampled while it runs."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def run_sampled(manifest: Path, out: Path, sets: list[str], sample: Callable[[psutil.Process], None],
                interval_s: float) -> float:
    """Run ``quarry run`` over ``manifest`` into ``out`` with the ``--set`` overrides ``sets``,
    calling ``sample`` with the driver's process every ``interval_s`` until it exits (a process
    that vanishes between samples is not an error). Returns the wall seconds; raises with the
    log's tail when the job fails."""
    return run_logged(manifest, out, sets, sample, interval_s)[0]


def run_logged(manifest: Path, out: Path, sets: list[str], sample: Callable[[psutil.Process], None] | None = None,
               interval_s: float = 0.1) -> tuple[float, str]:
    """:func:`run_sampled`, returning the wall seconds and the job's log (stdout and stderr)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest), "--output", str(out),
           "--overwrite", *[a for s in sets for a in ("--set", s)]]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            if sample:
                sample(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        time.sleep(interval_s)
    wall = time.perf_counter() - started
    log = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise RuntimeError(f"quarry run over {manifest} failed ({child.returncode}):\n{log[-3000:]}")
    return wall, log
