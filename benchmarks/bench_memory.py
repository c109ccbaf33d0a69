"""Peak memory of real jobs, side by side in one run (``make bench-memory``, or
``python -m benchmarks.bench_memory --help``): a developer's benchmark, not part of the product.

Two comparisons, each a real ``quarry run`` in a child process whose whole process tree (the
driver, the local Ray it starts, every worker and actor) is sampled for resident memory:

* **streaming**: a manifest of N rows and one of 10 x N rows (the same clips, cycled). A job that
  streams uses about the same memory for both; one that materialises grows ~10x.
* **one long recording**: a single recording of ``--hours`` hours (clips joined with pauses),
  cut into segments and transcribed across the actor pool.

The engine is ``fake`` by default: the figures are the pipeline's own, not a model's weights.
Resident memory counts the pages of Ray's shared object store that a process touched, so the
tree total is an upper bound.
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
import soxr

from pipeline.records import SAMPLE_RATE_HZ as RATE
from pipeline.summary import JobSummary

from .jobs import run_sampled

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIPS = REPO / "data" / "demo"  # a folder with manifest.jsonl and the clips it names


@dataclass(frozen=True)
class MemoryRun:
    label: str
    rows: int
    audio_s: float
    wall_s: float
    peak_tree_mib: float  # the most the whole process tree held at once
    peak_driver_mib: float
    n_ok: int

    def line(self) -> str:
        return (f"{self.label:<34} {self.rows:>7} {self.audio_s / 3600:>8.2f} {self.wall_s:>8.1f} "
                f"{self.peak_driver_mib:>12.0f} {self.peak_tree_mib:>12.0f} {self.n_ok:>7}")


HEADER = f"{'job':<34} {'rows':>7} {'audio h':>8} {'wall s':>8} {'driver MiB':>12} {'tree MiB':>12} {'ok':>7}"


def measure(label: str, manifest: Path, out: Path, overrides: list[str]) -> MemoryRun:
    peak = {"tree": 0.0, "driver": 0.0}

    def sample(proc: psutil.Process) -> None:
        driver = proc.memory_info().rss
        tree = driver + sum(c.memory_info().rss for c in proc.children(recursive=True) if c.is_running())
        peak["tree"], peak["driver"] = max(peak["tree"], tree / 2**20), max(peak["driver"], driver / 2**20)

    wall = run_sampled(manifest, out, overrides, sample, 0.2)
    summary = JobSummary.read(str(out))
    return MemoryRun(label, summary.n_input, summary.audio_s, wall, peak["tree"], peak["driver"], summary.n_ok)


def _clips(eval_dir: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in (eval_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if sf.info(eval_dir / r["audio"]).duration < 30][:limit]


def run(eval_dir: Path, rows: int, hours: float, overrides: list[str]) -> list[MemoryRun]:
    eval_dir = eval_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="quarry-bench-memory-"))
    try:
        clips = _clips(eval_dir, 40)
        results = []
        for n in (rows, rows * 10):
            manifest = work / f"m{n}.jsonl"
            with manifest.open("w") as f:
                for i in range(n):
                    clip = clips[i % len(clips)]
                    f.write(json.dumps({"id": f"r{i:07d}", "audio": str(eval_dir / clip["audio"])}) + "\n")
            results.append(measure(f"manifest of {n} clips", manifest, work / f"out{n}", overrides))
        if hours > 0:
            long_path = work / "long.flac"
            rng = np.random.default_rng(0)
            with sf.SoundFile(long_path, "w", RATE, 1, format="FLAC") as f:  # written in pieces
                written = 0
                while written < hours * 3600 * RATE:
                    for clip in clips:
                        audio, rate = sf.read(eval_dir / clip["audio"], dtype="float32", always_2d=True)
                        mono = audio.mean(axis=1)
                        if rate != RATE:
                            mono = soxr.resample(mono, rate, RATE)
                        piece = np.concatenate([mono, (rng.standard_normal(RATE) * 1e-4)])
                        f.write(piece.astype(np.float32))
                        written += len(piece)
            manifest = work / "long.jsonl"
            manifest.write_text(json.dumps({"id": "long", "audio": str(long_path)}) + "\n")
            results.append(measure(f"one {hours:g} h recording", manifest, work / "out-long", overrides))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak memory of real jobs: N vs 10 x N rows (streaming), and one "
                                     "long recording. Each job runs as `quarry run` in a child process; its whole "
                                     "process tree is sampled for resident memory every 0.2 s.")
    parser.add_argument("--clips", type=Path, default=DEFAULT_CLIPS,
                        help="a folder with manifest.jsonl and the clips it names (default: data/demo)")
    parser.add_argument("--rows", type=int, default=200, help="rows of the small manifest (the large one has 10x)")
    parser.add_argument("--hours", type=float, default=1.0, help="length of the long recording (0 to skip)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for the measured jobs (default engine: fake)")
    args = parser.parse_args(argv)
    print(HEADER)
    for result in run(args.clips, args.rows, args.hours, ["engine.name=fake", *args.overrides]):
        print(result.line(), flush=True)


if __name__ == "__main__":
    main()
