"""What the pipeline costs on top of the engine, and how busy it keeps the model
(``python -m benchmarks.bench_overhead``; part of ``make bench``).

For each engine, side by side in one run, on the same English eval clips (repeated to at least
``--minutes`` of audio, clips within Whisper's 30 s window so that every engine takes them):

* **engine alone**: the engine in a process of its own, the clips decoded up front, transcribed
  in its best mode (vLLM: every request at once; others: batches of ``engine.batch_size``),
  after one warm-up call;
* **job**: ``quarry run`` over a manifest of the same clips (decoded, cut and scored by the
  pipeline), the fixed start-up (job start to the first request reaching an engine, from the
  engines' meters) reported apart from the steady state (the rest of the job's wall).

It prints, per engine: overhead = steady-state job wall / engine-alone wall (target <= 1.10), the
engine's busy fraction inside its actor over the job (target >= 0.95), and the start-up. Each side
runs in a child process, so neither holds the other's model or threads. The two sides alternate
``--repeats`` times per engine (alone, job, alone, job, ...) and the overhead given is the median of
the pairs' ratios, every pair printed: on a small machine one pair varies by +-10 % from run to run.

Engines: ``whisper`` (faster-whisper tiny.en, offline) and ``vllm`` (vLLM's CPU build running
real Whisper weights: tiny.en converted back from CTranslate2 by pipeline.tools.ct2_to_hf).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.paths import EVAL_DIR  # noqa: E402

WINDOW_S = 30.0
# The job's vLLM replica holds twice max_num_seqs requests (EngineConfig.batches_in_flight: 8
# batches of the embedded default's 16); the engine alone has every request at once.
VLLM_SETS = ["engine.vllm.max_model_len=448", "engine.vllm.max_num_seqs=64", "engine.vllm.dtype=float32",
             "engine.vllm.enforce_eager=true", "engine.vllm.cpu_kv_cache_gib=1", "engine.vllm.temperature=0"]


def clips(minutes: float) -> list[dict]:
    """English eval rows within one window, repeated (ids made unique) to >= ``minutes`` of audio."""
    rows = [json.loads(line) for line in (EVAL_DIR / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["language"] == "en" and r["duration_s"] <= WINDOW_S]
    out, total, k = [], 0.0, 0
    while total < minutes * 60:
        for r in rows:
            out.append({"id": f"{r['id']}#{k}", "audio": str(EVAL_DIR / r["audio"]), "reference": r["reference"],
                        "language": "en"})
            total += r["duration_s"]
        k += 1
    return out


def engine_sets(engine: str, cache: Path) -> list[str]:
    if engine == "whisper":
        return ["engine.name=whisper", "engine.model=tiny.en"]
    from pipeline.engines.whisper import resolve_model
    from pipeline.tools.ct2_to_hf import convert

    checkpoint = cache / "tiny-en-hf"
    if not (checkpoint / "config.json").exists():
        convert(Path(resolve_model("tiny.en")), checkpoint)
    return ["engine.name=vllm", f"engine.model={checkpoint}", *VLLM_SETS]


def engine_alone(manifest: Path, sets: list[str]) -> dict:
    """In this (child) process: decode the manifest's clips, warm up, time the engine alone."""
    import soundfile as sf

    from pipeline.config import load_config
    from pipeline.engines import EngineRequest, load_engine

    cfg = load_config(None, sets)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    requests = [EngineRequest(id=r["id"], samples=sf.read(r["audio"], dtype="float32")[0], language="en")
                for r in rows]
    engine = load_engine(cfg.engine, cfg.task)
    engine.transcribe(requests[:1])
    batch = len(requests) if cfg.engine.name == "vllm" else cfg.engine.batch_size
    started = time.perf_counter()
    ok = 0
    for i in range(0, len(requests), batch):
        ok += sum(r.status == "ok" for r in engine.transcribe(requests[i:i + batch]))
    return {"wall_s": time.perf_counter() - started, "rows": len(requests), "ok": ok,
            "audio_s": sum(r.duration_s for r in requests)}


def alone(manifest: Path, sets: list[str]) -> dict:
    """:func:`engine_alone` in a child process of its own."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_overhead", "--alone", str(manifest),
                           json.dumps(sets)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"engine alone failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job(manifest: Path, out: Path, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest), "--output", str(out),
           "--overwrite", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"quarry run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    run = summary["this_run"]
    startup = [line.split("start-up: ", 1)[1] for line in proc.stderr.splitlines() if "start-up: " in line]
    return {"wall_s": run["job_wall_s"], "engine_start_s": run["engine_start_s"],
            "busy": run["engine_busy_fraction"], "rows": summary["n_input"], "ok": summary["n_ok"],
            "phases": startup[0] if startup else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="whisper,vllm", help="comma-separated: whisper, vllm")
    parser.add_argument("--minutes", type=float, default=20.0, help="audio per engine, minutes")
    parser.add_argument("--repeats", type=int, default=3, help="alone/job pairs per engine, alternated")
    parser.add_argument("--set", action="append", default=[], help="extra config override for both sides")
    parser.add_argument("--alone", nargs=2, metavar=("MANIFEST", "SETS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alone:  # the child process that times the engine alone
        print(json.dumps(engine_alone(Path(args.alone[0]), json.loads(args.alone[1]))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = clips(args.minutes)
    results = []
    with tempfile.TemporaryDirectory(prefix="quarry-bench-overhead-") as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
            sets = engine_sets(engine, tmp) + args.set
            for _ in range(args.repeats):
                results.append((engine, alone(manifest, sets), job(manifest, tmp / f"out-{engine}", sets)))
    audio_min = results[0][1]["audio_s"] / 60 if results else 0.0
    print(f"{len(rows)} clips, {audio_min:.1f} min of English audio, {os.cpu_count()} CPUs; "
          f"{args.repeats} alone/job pairs per engine, alternated")
    print(f"{'engine':<9}{'alone s':>9}{'job s':>8}{'start-up s':>12}{'steady s':>10}{'overhead':>10}"
          f"{'busy':>8}  rows ok (alone / job)")
    ratios: dict[str, list[float]] = {}
    for engine, a, j in results:
        steady = j["wall_s"] - j["engine_start_s"]
        ratios.setdefault(engine, []).append(steady / a["wall_s"])
        print(f"{engine:<9}{a['wall_s']:>9.1f}{j['wall_s']:>8.1f}{j['engine_start_s']:>12.1f}{steady:>10.1f}"
              f"{steady / a['wall_s']:>10.2f}{j['busy']:>8.1%}  {a['ok']}/{a['rows']} / {j['ok']}/{j['rows']}")
    for engine, each in ratios.items():
        print(f"{engine} overhead, median of {len(each)} pairs: {statistics.median(each):.2f} "
              f"(range {min(each):.2f}-{max(each):.2f})")
    for engine, _, j in results:
        print(f"{engine} start-up phases: {j['phases']}")


if __name__ == "__main__":
    main()
