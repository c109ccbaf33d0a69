"""The feed's efficiency, side by side in one run (``make bench-feed``, or
``python -m benchmarks.bench_feed --help``): how fast the pipeline moves audio when the model costs
nothing (engine ``fake``), against a plain single-core loop doing the same work on the same files.

* **raw loop**: for each file, read its bytes, decode with libsndfile, downmix, resample to 16 kHz
  with soxr at the job's quality (HQ): one core, no Ray. Run before and after the pipeline; the
  mean of the two is the reference (the machine's speed drifts between runs).
* **pipeline**: a real ``quarry run`` over the same files in a child process, engine ``fake``.
  Reported two ways: the whole job (the child's wall time, start-up and Ray's shut-down included)
  and the steady state, from the rows' own ``finished_at`` (stamped per batch by the engine
  stage): the audio of the rows finished after the first batch, over the time from the first
  batch's finish to the last one's.
* **per-core efficiency**: pipeline steady RTFx / (cores x raw RTFx); 1.0 would mean every core
  decodes as fast as the plain loop. Printed beside it, what bounds it on the machine at hand: the
  raw loop run on every core at once (cores share caches and memory bandwidth), and the raw loop
  with the pipeline's segmentation added (VAD over recordings longer than ``segment.max_s``, work
  the plain loop does not do).
* **rows per second**: a job over many 1-second clips (one row each): the per-row cost of the
  pipeline (whole job, start-up included, and steady).

The mixed corpus is made once from the evaluation clips (``tests/data/eval``) and cached: each clip
in turn as FLAC 16 kHz mono, MP3 44.1 kHz stereo or Opus 48 kHz mono (cycled until the corpus
holds ``--minutes`` of audio).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import soxr

from pipeline.audio import downmix
from pipeline.records import SAMPLE_RATE_HZ as RATE
from pipeline.summary import JobSummary

from .jobs import run_logged

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "tests" / "data" / "eval"
CACHE = Path(tempfile.gettempdir()) / "quarry-bench-feed"
FORMATS = ("flac", "mp3", "opus")
STARTUP = re.compile(r"start-up: (.*)")
PHASE = re.compile(r"([a-z][a-z ]*?) ([0-9.]+) s")


def _clips() -> list[Path]:
    rows = [json.loads(line) for line in (EVAL / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return [EVAL / r["audio"] for r in rows]


def _write(clip: Path, fmt: str, dest: Path) -> None:
    samples, rate = sf.read(clip, dtype="float32")
    if fmt == "flac":
        shutil.copyfile(clip, dest)
    elif fmt == "mp3":
        x = soxr.resample(samples, rate, 44100, quality="HQ")
        sf.write(dest, np.stack([x, 0.8 * x], axis=1), 44100, format="MP3", subtype="MPEG_LAYER_III")
    else:
        sf.write(dest, soxr.resample(samples, rate, 48000, quality="HQ"), 48000, format="OGG", subtype="OPUS")


def mixed_corpus(minutes: float) -> Path:
    """The manifest of the mixed corpus (made once, then reused from the cache)."""
    folder = CACHE / f"mixed-{minutes:g}min"
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    clips, lines, total = _clips(), [], 0.0
    i = 0
    while total < minutes * 60:
        clip = clips[i % len(clips)]
        fmt = FORMATS[(i + i // len(clips)) % len(FORMATS)]  # every clip in every format in turn
        name = f"{i:05d}_{clip.stem}.{fmt}"
        _write(clip, fmt, folder / name)
        total += sf.info(clip).duration
        lines.append(json.dumps({"id": f"{i:05d}", "audio": name}))
        i += 1
    manifest.write_text("\n".join(lines) + "\n")  # last: the marker that the corpus is complete
    return manifest


def short_corpus(rows: int) -> Path:
    """A manifest of ``rows`` 1-second clips (FLAC 16 kHz, the eval clips' first seconds, cycled)."""
    folder = CACHE / "one-second"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / f"manifest-{rows}.jsonl"
    if manifest.exists():
        return manifest
    clips = _clips()[:20]
    for k, clip in enumerate(clips):
        if not (folder / f"{k:02d}.flac").exists():
            samples, rate = sf.read(clip, dtype="float32", frames=RATE)
            sf.write(folder / f"{k:02d}.flac", samples, rate)
    manifest.write_text("".join(json.dumps({"id": f"s{i:06d}", "audio": f"{i % len(clips):02d}.flac"}) + "\n"
                                for i in range(rows)))
    return manifest


def _names(manifest: Path) -> list[str]:
    return [json.loads(line)["audio"] for line in manifest.read_text().splitlines() if line.strip()]


def _loop(folder: Path, names: list[str], quality: str = "HQ", segment: bool = False) -> float:
    """The plain loop over ``names``; the seconds of audio it decoded. With ``segment``, each
    recording is also cut as the pipeline cuts it by default (``plan_segments`` with the default
    ``segment`` settings: VAD over those longer than ``max_s``)."""
    from pipeline.config import SegmentConfig
    from pipeline.segment import plan_segments

    cut = SegmentConfig()

    audio_s = 0.0
    for name in names:
        data = (folder / name).read_bytes()
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        mono = downmix(x)  # the pipeline's own downmix: the loop is as fast as it can be
        out = soxr.resample(mono, rate, RATE, quality=quality) if rate != RATE else mono
        if segment:
            plan_segments(out, max_s=cut.max_s, min_s=cut.min_s, overlap_s=cut.overlap_s, vad=cut.vad)
        audio_s += len(out) / RATE
    return audio_s


def raw_loop(manifest: Path, quality: str = "HQ", segment: bool = False) -> tuple[float, float]:
    """(audio seconds, wall seconds) of the plain loop over the manifest's files, on one core."""
    started = time.perf_counter()
    audio_s = _loop(manifest.parent, _names(manifest), quality, segment)
    return audio_s, time.perf_counter() - started


def raw_parallel(manifest: Path, processes: int) -> float:
    """RTFx of the plain loop run in ``processes`` processes at once, each over its share of the
    files: what this machine's cores give together (they share caches and memory bandwidth)."""
    import multiprocessing

    names = _names(manifest)
    shares = [names[k::processes] for k in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.starmap(_loop, [(manifest.parent, share[:2]) for share in shares])  # imports, warm caches
        started = time.perf_counter()
        audio_s = sum(pool.starmap(_loop, [(manifest.parent, share) for share in shares]))
        return audio_s / (time.perf_counter() - started)


@dataclass(frozen=True)
class JobRun:
    rows: int
    n_ok: int
    audio_s: float
    process_wall_s: float  # the child process: interpreter start, imports, run_job, Ray's shut-down
    job_wall_s: float  # run_job's own
    startup: dict[str, float]  # run_job's phases up to the first rows at the driver

    @property
    def startup_s(self) -> float:
        return sum(self.startup.values())

    steady_audio_s: float  # audio of the rows finished after the first batch ...
    steady_s: float  # ... over the time from the first batch's finish to the last's
    steady_rows: int


def quarry_job(manifest: Path, out: Path, sets: list[str]) -> JobRun:
    wall, log = run_logged(manifest, out, sets)
    found = STARTUP.search(log)
    if not found:
        raise RuntimeError(f"no start-up line in the job's log:\n{log[-3000:]}")
    summary = JobSummary.read(str(out))
    # The steady state, from the rows' own finish times (the engine stage stamps each batch):
    # the rows finished after the first batch, over the time from its finish to the last one's.
    table = pq.read_table(out / "transcripts", columns=["finished_at", "duration_s"]).to_pandas()
    finished = (table["finished_at"] - table["finished_at"].min()).dt.total_seconds()  # from the first batch
    later = finished > 0
    return JobRun(summary.n_input, summary.n_ok, summary.audio_s, wall, summary.job_wall_s,
                  {k: float(v) for k, v in PHASE.findall(found.group(1)) if k != "total"},
                  float(table.loc[later, "duration_s"].sum()), max(1e-9, float(finished.max())), int(later.sum()))


def _phases(run: JobRun) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in run.startup.items()) + f" (total {run.startup_s:.1f} s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=120.0, help="audio in the mixed corpus (default 120)")
    parser.add_argument("--short-rows", type=int, default=2000, help="1-second clips in the rows-per-second job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for the pipeline's jobs (always: engine.name=fake)")
    args = parser.parse_args(argv)
    sets = ["engine.name=fake", "output.progress_interval_s=1000", *args.overrides]
    cores = os.cpu_count() or 1
    manifest = mixed_corpus(args.minutes)
    short = short_corpus(args.short_rows)
    print(f"corpus: {manifest.parent} ({args.minutes:g} min: FLAC 16 kHz mono, MP3 44.1 kHz stereo, Opus 48 kHz)")
    print(f"settings: {' '.join(sets)}; {cores} cores", flush=True)

    raw_audio, raw_wall = raw_loop(manifest)
    print(f"raw loop (1 core), before: {raw_audio:.0f} s of audio in {raw_wall:.2f} s, RTFx {raw_audio / raw_wall:.0f}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="quarry-bench-feed-"))
    try:
        feed = quarry_job(manifest, work / "feed", sets)
        rows = quarry_job(short, work / "rows", sets)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw_audio2, raw_wall2 = raw_loop(manifest)
    print(f"raw loop (1 core), after: {raw_audio2:.0f} s of audio in {raw_wall2:.2f} s, "
          f"RTFx {raw_audio2 / raw_wall2:.0f}")
    raw_rtfx = (raw_audio / raw_wall + raw_audio2 / raw_wall2) / 2

    steady = feed.steady_audio_s / feed.steady_s
    print(f"pipeline: {feed.n_ok}/{feed.rows} rows ok, {feed.audio_s:.0f} s of audio; whole job "
          f"{feed.process_wall_s:.1f} s -> RTFx {feed.audio_s / feed.process_wall_s:.0f}; run_job {feed.job_wall_s:.1f} s "
          f"-> RTFx {feed.audio_s / feed.job_wall_s:.0f}; steady {feed.steady_s:.1f} s -> RTFx {steady:.0f}")
    print(f"pipeline start-up: {_phases(feed)}")
    print(f"per-core efficiency (steady): {steady:.0f} / ({cores} x {raw_rtfx:.0f}) = {steady / (cores * raw_rtfx):.2f}")
    print(f"per-core efficiency (whole job): {feed.audio_s / feed.process_wall_s / (cores * raw_rtfx):.2f}")
    # What bounds that figure on this machine, measured here too: the raw loop on every core at
    # once (cores share caches and memory bandwidth), and the work the pipeline does that the raw
    # loop does not (segmentation: VAD over the recordings longer than segment.max_s).
    parallel = raw_parallel(manifest, cores)
    seg_audio, seg_wall = raw_loop(manifest, segment=True)
    print(f"raw loop on {cores} cores at once: RTFx {parallel:.0f} = {parallel / raw_rtfx:.2f} x one core; "
          f"pipeline steady / that: {steady / parallel:.2f}")
    print(f"raw loop with the pipeline's segmentation (1 core): RTFx {seg_audio / seg_wall:.0f} "
          f"({raw_rtfx / (seg_audio / seg_wall):.2f} x the raw loop's time)")
    print(f"rows per second (1-second clips): {rows.n_ok}/{rows.rows} ok; whole job {rows.process_wall_s:.1f} s -> "
          f"{rows.rows / rows.process_wall_s:.0f} rows/s; run_job {rows.job_wall_s:.1f} s -> "
          f"{rows.rows / rows.job_wall_s:.0f} rows/s; steady {rows.steady_s:.1f} s -> {rows.steady_rows / rows.steady_s:.0f} rows/s")
    print(f"rows job start-up: {_phases(rows)}")


if __name__ == "__main__":
    main()
