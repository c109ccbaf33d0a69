"""The whisper engine batches clips through CTranslate2 (pipeline/engines/whisper_batch.py).

* The first-window rules, on made-up generate results (only the tokenizer and feature sizes of
  tiny.en are used, no decoding): a window that ends mid-segment or would fall back to a higher
  temperature is handed on, a silent window gives no text.
* ``cpu_threads: 0`` means every core this process may use.
* Real decoding (slow): a mixed batch on the multilingual ``base`` comes back one result per
  request, in order, each with the text faster-whisper's own ``transcribe`` gives that request
  alone; English clips with tiny.en go through one generate call per ``batch_size`` clips and
  never through the one-by-one path.
"""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import WhisperOptions
from pipeline.engines import EngineRequest
from pipeline.engines.common import machine_threads
from pipeline.engines.whisper import WhisperEngine, resolve_model

from .conftest import EVAL_DIR, eval_rows

RATE = 16_000


def _clip(row: dict) -> np.ndarray:
    return sf.read(EVAL_DIR / row["audio"], dtype="float32")[0]


@pytest.fixture(scope="module")
def tiny_batcher():
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    from pipeline.engines.whisper_batch import WindowBatcher

    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=1)
    return WindowBatcher(model, beam_size=5), Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")


def _result(tokens: list[int], avg_logprob: float, no_speech_prob: float = 0.01):
    """A CTranslate2 generate result as faster-whisper reads it (score = sum / (n + 1) / n)."""
    n = len(tokens)
    return SimpleNamespace(sequences_ids=[tokens], scores=[avg_logprob * (n + 1) / n], no_speech_prob=no_speech_prob)


def test_first_window_rules_hand_on_what_faster_whisper_would_decode_further(tiny_batcher):
    batcher, tok = tiny_batcher
    ts = tok.timestamp_begin  # <|0.00|>; each step is 20 ms, two feature frames
    words = tok.encode(" The quick brown fox jumps over the lazy dog.")
    frames = 1000  # a 10 s clip

    finished = batcher._answer(tok, _result([ts, *words, ts + 150, ts + 150, *words, ts + 400], -0.2), frames)
    assert finished.text == "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
    assert finished.avg_logprob == pytest.approx(-0.2)
    # Ends in text after a closed segment: faster-whisper decodes a second window from 3.0 s.
    assert batcher._answer(tok, _result([ts, *words, ts + 150, ts + 150, *words], -0.2), frames) is None
    # Improbable, or too repetitive (gzip ratio > 2.4): the next temperature.
    assert batcher._answer(tok, _result(words, -1.5), frames) is None
    assert batcher._answer(tok, _result(words * 12, -0.1), frames) is None
    assert batcher.passed_on == Counter(next_window=1, temperature=2)
    # Improbable and probably not speech: silence, no segment, no log-probability.
    silent = batcher._answer(tok, _result(words, -1.5, no_speech_prob=0.9), frames)
    assert (silent.text, silent.avg_logprob) == ("", None)
    # Probably not speech but probable text: kept.
    assert batcher._answer(tok, _result(words, -0.3, no_speech_prob=0.9), frames).text.startswith("The quick")


def test_a_clip_fits_one_batch_window_up_to_exactly_30_seconds(tiny_batcher):
    batcher, _ = tiny_batcher
    assert batcher.fits(np.zeros(30 * RATE, np.float32))
    assert not batcher.fits(np.zeros(30 * RATE + 1, np.float32))


def test_cpu_threads_zero_means_every_core_this_process_may_use():
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})  # a process held to one core (a cgroup, taskset)
        assert machine_threads() == 1
    finally:
        os.sched_setaffinity(0, cores)
    assert machine_threads() == len(cores)
    assert WhisperOptions().cpu_threads == 0
    with pytest.raises(ValueError):
        WhisperOptions(batch_size=0)


@pytest.mark.slow
def test_mixed_batch_comes_back_in_order_with_each_requests_own_faster_whisper_text():
    en = [r for r in eval_rows("en") if r["duration_s"] <= 30]
    long_en = next(r for r in eval_rows("en") if r["duration_s"] > 30)
    de, fr = eval_rows("de")[0], eval_rows("fr")[0]
    requests = [
        EngineRequest("en", _clip(en[0]), "en"),
        EngineRequest("de", _clip(de), "de"),
        EngineRequest("unknown-language", _clip(en[1]), "xx"),
        EngineRequest("detect", _clip(de), None),  # detected as de: decoded in one batch with "de"
        EngineRequest("keywords", _clip(en[2]), "en", keywords=("Quarry", "whisper")),
        EngineRequest("longer-than-30s", _clip(long_en), "en"),
        EngineRequest("words", _clip(en[3]), "en", words=True),
        EngineRequest("silence", np.zeros(5 * RATE, np.float32), "en"),
        EngineRequest("segment", _clip(en[-1]), "en", segment=True),  # with timestamps
        EngineRequest("translate", _clip(fr), "fr", task="translate"),
        EngineRequest("fr", _clip(fr), "fr-FR"),
    ]
    engine = WhisperEngine("base", WhisperOptions())
    results = engine.transcribe(requests)

    assert len(results) == len(requests)
    assert [r.status for r in results] == ["ok", "ok", "unsupported_task", *["ok"] * 8]
    assert "xx" in results[2].error and results[2].text is None
    # One detection call; decoding groups: en (en + silence), de (de + detect), keywords, segment,
    # translate, fr. The longer clip and the words request went one by one.
    assert engine.generate_calls == Counter({1: 5, 2: 2})
    # A temperature fallback samples: its text differs run to run, so equality would mean nothing.
    assert engine.passed_on["temperature"] == 0
    by_id = dict(zip((q.id for q in requests), results, strict=True))
    assert by_id["detect"].language == "de" and by_id["translate"].language == "fr"
    assert by_id["silence"].text == "" and by_id["silence"].avg_logprob is None
    assert by_id["words"].words and by_id["en"].words is None
    for req, got in zip(requests, results, strict=True):
        if got.status != "ok":
            continue
        alone = engine._one(req)  # faster-whisper's WhisperModel.transcribe on this request alone
        assert (got.text, got.language) == (alone.text, alone.language), req.id
        assert got.avg_logprob == pytest.approx(alone.avg_logprob, abs=1e-4), req.id


@pytest.mark.slow
def test_english_clips_go_through_one_generate_call_per_batch_and_never_one_by_one(monkeypatch):
    rows = [r for r in eval_rows("en") if r["duration_s"] <= 12][:5]
    requests = [EngineRequest(r["id"], _clip(r), "en") for r in rows]
    engine = WhisperEngine("tiny.en", WhisperOptions(batch_size=4))
    one_by_one = []
    monkeypatch.setattr(engine, "_one", lambda req: one_by_one.append(req.id) or pytest.fail(f"{req.id} went alone"))

    results = engine.transcribe(requests)

    assert engine.generate_calls == Counter({4: 1, 1: 1}) and not one_by_one
    assert [r.status for r in results] == ["ok"] * 5 and all(r.text and r.language == "en" for r in results)
    assert all(r.avg_logprob is not None for r in results)
