"""Cost of the optional features, each stage alone, as RTFx (audio seconds per second of work) on
the English eval clips (``python -m benchmarks.bench_features``): a developer's benchmark.

* language ID: high-pass + VAD + whisper ``base`` on the first speech (the decode stage's share);
* diarization: high-pass + VAD + Resemblyzer windows + clustering (the decode stage's share);
* word timestamps: whisper tiny.en with and without ``word_timestamps`` (the engine's extra work);
* redaction: milliseconds per transcript (the RedactStage's / driver's share).

One thread each, as in the decode actors; every model is loaded (and warmed on one clip) first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import EVAL_DIR, eval_rows  # noqa: E402

RATE = 16_000


def _timed(fn, clips) -> float:
    fn(clips[0])
    busy = 0.0
    for clip in clips:
        started = time.perf_counter()
        fn(clip)
        busy += time.perf_counter() - started
    return sum(len(c) for c in clips) / RATE / busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=10, help="English eval clips to use")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from pipeline.config import DiarizeConfig, RedactConfig, WhisperOptions
    from pipeline.diarize import load_diarizer
    from pipeline.engines import EngineRequest
    from pipeline.engines.whisper import WhisperEngine
    from pipeline.langid import detect_language
    from pipeline.redact import load_redactor
    from pipeline.speech import whole_recording_speech

    rows = eval_rows("en")[: args.clips]
    clips = [sf.read(EVAL_DIR / r["audio"], dtype="float32")[0] for r in rows]
    audio_s = sum(len(c) for c in clips) / RATE
    print(f"{len(clips)} English eval clips, {audio_s:.0f} s of audio; RTFx of each stage alone (1 thread):")

    def langid(x):
        detect_language(*whole_recording_speech(x))

    print(f"  language ID (whisper base, first speech):  RTFx {_timed(langid, clips):7.1f}")
    diarizer = load_diarizer(DiarizeConfig(enabled=True))
    print(f"  diarization (Resemblyzer + clustering):      RTFx {_timed(lambda x: diarizer.diarize(*whole_recording_speech(x)), clips):7.1f}")
    engine = WhisperEngine("tiny.en", WhisperOptions(cpu_threads=1))
    plain = _timed(lambda x: engine.transcribe([EngineRequest("b", x, "en")]), clips)
    words = _timed(lambda x: engine.transcribe([EngineRequest("b", x, "en", words=True)]), clips)
    print(f"  whisper tiny.en without / with words:        RTFx {plain:7.1f} / {words:.1f} "
          f"(words cost {plain / words - 1:.0%} more engine time)")
    redactor = load_redactor(RedactConfig(entities=["CREDIT_CARD", "PHONE_NUMBER", "EMAIL_ADDRESS", "US_SSN",
                                                    "IBAN_CODE"]))
    texts = [r["reference"] for r in rows]
    redactor.find(texts[0])
    started = time.perf_counter()
    for t in texts:
        redactor.replace(t, redactor.find(t))
    per_row = (time.perf_counter() - started) / len(texts)
    print(f"  redaction (Presidio, spoken numbers):        {per_row * 1000:.1f} ms per transcript "
          f"(RTFx {audio_s / len(texts) / per_row:.0f})")


if __name__ == "__main__":
    main()
