"""The driver at scale, side by side in one run (``make bench-scale``, or
``python -m benchmarks.bench_scale --help``): jobs of N and 10 x N rows with the fake engine, each a
real ``quarry run`` in a child process, and for each the driver's peak memory (resident, and
private: the resident set counts the object-store pages the driver has read, shared memory that
grows with the blocks it has seen, not memory it holds), its CPU seconds per
output row and the rows per second the whole job reached.

The driver's CPU is sampled every 0.1 s (so the last tenth of a second of shut-down may be missed),
in two parts: its main thread, the sink (Ray Data's output iterator and all of Quarry's work per
batch: assembling, duplicate ids, writing, tallies), and the whole process, which adds start-up
and Ray Data's scheduling thread; that thread polls its tasks for as long as the job runs, so its
share grows with the wall time, not with the rows. ``marginal`` is the difference between the two
jobs over the difference in rows, which leaves out the fixed start-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

from pipeline.records import SAMPLE_RATE_HZ
from pipeline.summary import JobSummary

from .jobs import run_sampled


@dataclass(frozen=True)
class ScaleRun:
    rows: int
    wall_s: float
    driver_peak_mib: float  # resident set: counts the object-store pages it has read (shared memory)
    driver_private_mib: float  # unique set: the driver's own memory
    driver_cpu_s: float  # the whole driver process, start-up and imports included
    sink_cpu_s: float  # its main thread: the sink loop (and start-up before it)
    n_ok: int

    @property
    def cpu_us_per_row(self) -> float:
        return 1e6 * self.driver_cpu_s / self.rows

    @property
    def sink_us_per_row(self) -> float:
        return 1e6 * self.sink_cpu_s / self.rows


HEADER = (f"{'rows':>9} {'wall s':>8} {'rows/s':>8} {'driver MiB':>11} {'private MiB':>12} {'process cpu s':>14} {'us/row':>8} "
          f"{'main thread cpu s':>18} {'us/row':>8} {'ok':>9}")


def _line(r: ScaleRun) -> str:
    return (f"{r.rows:>9} {r.wall_s:>8.1f} {r.rows / r.wall_s:>8.0f} {r.driver_peak_mib:>11.0f} {r.driver_private_mib:>12.0f} "
            f"{r.driver_cpu_s:>14.2f} {r.cpu_us_per_row:>8.1f} {r.sink_cpu_s:>18.2f} {r.sink_us_per_row:>8.1f} "
            f"{r.n_ok:>9}")


def measure(manifest: Path, out: Path, rows: int, sets: list[str]) -> ScaleRun:
    seen = {"peak": 0.0, "private": 0.0, "cpu": 0.0, "main": 0.0}

    def sample(proc: psutil.Process) -> None:
        memory = proc.memory_full_info()
        seen["peak"] = max(seen["peak"], memory.rss / 2**20)
        seen["private"] = max(seen["private"], memory.uss / 2**20)
        times = proc.cpu_times()
        seen["cpu"] = times.user + times.system
        seen["main"] = next((t.user_time + t.system_time for t in proc.threads() if t.id == proc.pid), seen["main"])

    wall = run_sampled(manifest, out, sets, sample, 0.1)
    summary = JobSummary.read(str(out))
    return ScaleRun(summary.n_input, wall, seen["peak"], seen["private"], seen["cpu"], seen["main"], summary.n_ok)


def run(rows: int, sets: list[str]) -> list[ScaleRun]:
    work = Path(tempfile.mkdtemp(prefix="quarry-bench-scale-"))
    try:
        clip = work / "clip.wav"  # a tenth of a second of noise: decode costs little, the driver is what is measured
        sf.write(clip, (np.random.default_rng(0).standard_normal(SAMPLE_RATE_HZ // 10) * 0.01).astype(np.float32),
                 SAMPLE_RATE_HZ)
        results = []
        for n in (rows, rows * 10):
            manifest = work / f"m{n}.jsonl"
            with manifest.open("w") as f:
                for i in range(n):
                    f.write(json.dumps({"id": f"r{i:08d}", "audio": "clip.wav"}) + "\n")
            results.append(measure(manifest, work / f"out{n}", n, sets))
            print(_line(results[-1]), flush=True)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the smaller job (the larger has 10x)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for both jobs (defaults: fake engine, batches of 512, rows_per_file "
                             "50000)")
    args = parser.parse_args(argv)
    sets = ["engine.name=fake", "engine.batch_size=512", "segment.rows_per_batch=512", "output.rows_per_file=50000",
            "output.progress_interval_s=1000", *args.overrides]
    print(f"settings: {' '.join(sets)}")
    print(HEADER, flush=True)
    small, large = run(args.rows, sets)
    marginal = 1e6 * (large.driver_cpu_s - small.driver_cpu_s) / (large.rows - small.rows)
    marginal_sink = 1e6 * (large.sink_cpu_s - small.sink_cpu_s) / (large.rows - small.rows)
    print(f"driver peak memory, large / small: {large.driver_peak_mib / small.driver_peak_mib:.2f} resident, "
          f"{large.driver_private_mib / small.driver_private_mib:.2f} private (without the object-store pages it read)")
    print(f"driver process cpu per row: {small.cpu_us_per_row:.1f} us (small), {large.cpu_us_per_row:.1f} us "
          f"(large), marginal {marginal:.1f} us")
    print(f"driver main thread (the sink) cpu per row: {small.sink_us_per_row:.1f} us (small), "
          f"{large.sink_us_per_row:.1f} us (large), marginal {marginal_sink:.1f} us")


if __name__ == "__main__":
    main()
