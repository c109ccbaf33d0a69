"""Quarry's whisper engine alone against faster-whisper's own modes, side by side in one run
(``make bench-whisper``, or ``python -m benchmarks.bench_whisper --help``): a developer's benchmark.

The same clips: the English eval clips of at most 30 s (``tests/data/eval``, 23 clips, 213 s),
the list repeated ``--repeat`` times (6: about 21 minutes of audio), the modes taking turns. The same settings: tiny.en,
int8, beam 5, language en, text only, a CTranslate2 thread per core this process may use. Audio is
decoded before any timing; each mode is warmed on one clip first.

* ``sequential``: faster-whisper ``WhisperModel.transcribe``, clip by clip;
* ``batched-pipeline``: faster-whisper ``BatchedInferencePipeline.transcribe(clip, batch_size=B)``,
  clip by clip, without VAD as the others (it batches the windows of one recording: a clip of
  <= 30 s is one window, a batch of one);
* ``batched-pipeline+vad``: the same with its default ``vad_filter=True`` (speech chunks of a clip,
  silence cut out: not the same settings, so its WER may differ);
* ``quarry``: ``WhisperEngine.transcribe`` over the clips, B requests per call, ``batch_size=B``.

Wall seconds, RTFx (audio seconds per wall second), CPU seconds of this process (all threads;
steadier than wall time where other work shares the machine), corpus WER (whisper_english
normaliser, summed counts), and Quarry's wall and CPU seconds over each mode's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import soundfile as sf

from pipeline.config import ScoringConfig, WhisperOptions
from pipeline.engines import EngineRequest
from pipeline.engines.common import machine_threads
from pipeline.engines.whisper import WhisperEngine, resolve_model
from pipeline.records import SAMPLE_RATE_HZ as RATE
from pipeline.scoring import CorpusTally, score
from tests.conftest import EVAL_DIR, eval_rows

MODEL = "tiny.en"
LANGUAGE = "en"


@dataclass(frozen=True)
class Clip:
    id: str
    samples: np.ndarray
    reference: str


@dataclass(frozen=True)
class ModeRun:
    label: str
    audio_s: float
    wall_s: float
    cpu_s: float  # this process's CPU time, all threads: steadier than wall time on a shared machine
    wer: float

    def line(self, quarry: ModeRun) -> str:
        return (f"{self.label:<22} {self.wall_s:>8.1f} {self.audio_s / self.wall_s:>7.1f} {self.cpu_s:>7.1f} "
                f"{self.wer:>7.4f} {quarry.wall_s / self.wall_s:>12.2f} {quarry.cpu_s / self.cpu_s:>12.2f}")


HEADER = f"{'mode':<22} {'wall s':>8} {'RTFx':>7} {'CPU s':>7} {'WER':>7} {'quarry/mode':>12} {'(CPU s)':>12}"


def load_clips(max_s: float = 30.0) -> list[Clip]:
    clips = []
    for r in eval_rows(LANGUAGE):
        if r["duration_s"] > max_s:
            continue
        samples, rate = sf.read(EVAL_DIR / r["audio"], dtype="float32")
        if rate != RATE:
            raise ValueError(f"{r['audio']}: {rate} Hz, the eval clips are {RATE} Hz")
        clips.append(Clip(r["id"], samples, r["reference"]))
    return clips


def corpus_wer(clips: list[Clip], texts: list[str]) -> float:
    tally = CorpusTally(metric="wer", normalizer="whisper_english")
    for clip, text in zip(clips, texts, strict=True):
        c = score(clip.reference, text, LANGUAGE, ScoringConfig())
        tally.add(c.ref_units, c.substitutions, c.deletions, c.insertions)
    return tally.rate


def measure(modes: dict[str, Callable[[list[Clip]], list[str]]], clips: list[Clip], repeat: int) -> list[ModeRun]:
    """Each mode over the clip list ``repeat`` times, the modes taking turns round by round (the
    order rotating) so that a load that comes and goes on a shared machine falls on all of them."""
    for transcribe in modes.values():
        transcribe(clips[:1])  # warm-up: first-call allocations out of the timing
    names = list(modes)
    wall = dict.fromkeys(names, 0.0)
    cpu = dict.fromkeys(names, 0.0)
    texts: dict[str, list[str]] = {n: [] for n in names}
    for k in range(repeat):
        for name in names[k % len(names):] + names[:k % len(names)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            texts[name] += modes[name](clips)
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
    audio_s = repeat * sum(len(c.samples) for c in clips) / RATE
    return [ModeRun(n, audio_s, wall[n], cpu[n], corpus_wer(clips * repeat, texts[n])) for n in names]


def main(argv: list[str] | None = None) -> None:
    options = WhisperOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat the clip list K times (6: about 21 min of audio; default 1, 213 s)")
    parser.add_argument("--batch-size", type=int, default=options.batch_size,
                        help="B: BatchedInferencePipeline's batch_size, Quarry's whisper.batch_size and "
                        "requests per engine call")
    parser.add_argument("--modes", default="sequential,batched-pipeline,batched-pipeline+vad,quarry",
                        help="comma-separated modes to run (quarry is the ratio's base and always runs)")
    args = parser.parse_args(argv)
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    clips = load_clips()
    threads = machine_threads()
    beam = options.beam_size
    print(f"{args.repeat} x {len(clips)} English eval clips <= 30 s, "
          f"{args.repeat * sum(len(c.samples) for c in clips) / RATE:.0f} s of audio; {MODEL}, "
          f"{options.compute_type}, beam {beam}, text only, {threads} threads, B={args.batch_size}", flush=True)
    model = WhisperModel(resolve_model(MODEL), device="cpu", compute_type=options.compute_type, cpu_threads=threads)
    pipeline = BatchedInferencePipeline(model)

    def sequential(batch: list[Clip]) -> list[str]:
        return ["".join(s.text for s in model.transcribe(
            c.samples, language=LANGUAGE, beam_size=beam, without_timestamps=True)[0]).strip() for c in batch]

    def batched_pipeline(vad: bool) -> Callable[[list[Clip]], list[str]]:
        def run(batch: list[Clip]) -> list[str]:
            return ["".join(s.text for s in pipeline.transcribe(
                c.samples, language=LANGUAGE, beam_size=beam, without_timestamps=True, vad_filter=vad,
                batch_size=args.batch_size)[0]).strip() for c in batch]
        return run

    engine = WhisperEngine(MODEL, options.model_copy(update={"batch_size": args.batch_size}))

    def quarry(batch: list[Clip]) -> list[str]:
        texts = []
        for k in range(0, len(batch), args.batch_size):
            part = batch[k:k + args.batch_size]
            results = engine.transcribe([EngineRequest(c.id, c.samples, LANGUAGE) for c in part])
            texts += [r.text or "" for r in results]
        return texts

    theirs = {"sequential": sequential, "batched-pipeline": batched_pipeline(False),
              "batched-pipeline+vad": batched_pipeline(True)}
    modes = {name: theirs[name] for name in args.modes.split(",") if name in theirs} | {"quarry": quarry}
    runs = measure(modes, clips, args.repeat)
    print(HEADER)
    for run in runs:
        print(run.line(runs[-1]))
    print(f"quarry: CTranslate2 generate calls by batch size {dict(sorted(engine.generate_calls.items()))}, "
          f"clips handed to the one-by-one path {dict(engine.passed_on) or 0} (warm-up included)")


if __name__ == "__main__":
    main()
