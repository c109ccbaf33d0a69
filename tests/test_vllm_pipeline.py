"""The whole line with ``engine.name: vllm``: a tiny random Granite Speech served by vLLM's CPU
build inside a Ray actor, real clips, per-row tasks and keywords from the manifest.

Random weights give garbage text, so this proves mechanics end to end: every row comes out once,
each row's own task and keywords reach the prompt vLLM ran for that row, different audio gives
different text, identical audio gives the same text wherever it sits in the manifest (as far as
batch-variant arithmetic allows), and rows the engine cannot serve carry a reason.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import load_config
from pipeline.engines.base import EngineRequest
from pipeline.plan import run_job

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_summary, read_transcripts, write_jsonl
from .tiny_models import TEST_MAX_MODEL_LEN, shared_granite_engine

pytestmark = pytest.mark.vllm


def vllm_cfg(model: str, *extra: str):
    return load_config(None, [
        "engine.name=vllm", f"engine.model={model}", "engine.batch_size=1", "engine.cpus_per_replica=1",
        f"engine.vllm.max_model_len={TEST_MAX_MODEL_LEN}", "engine.vllm.max_num_seqs=8",
        "engine.vllm.dtype=float32", "engine.vllm.enforce_eager=true", "engine.vllm.cpu_kv_cache_gib=0.5",
        *extra,
    ])


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_session):
    """One pipeline run over a manifest that mixes languages, tasks, keywords and bad rows."""
    checkpoint, engine = shared_granite_engine(tmp_path_factory)
    folder = tmp_path_factory.mktemp("vllm-job")
    picked = {}
    for row in eval_rows():
        if row["language"] in ("en", "fr", "de") and row["duration_s"] < 15:
            picked.setdefault(row["language"], []).append(row)
    en, fr, de = picked["en"][:3], picked["fr"][0], picked["de"][0]
    for r in (*en, fr, de):
        shutil.copy(EVAL_DIR / r["audio"], folder)
    samples, rate = sf.read(EVAL_DIR / en[0]["audio"], dtype="float32")
    minute = np.tile(samples, int(np.ceil(60 * rate / len(samples))))[: 60 * rate]
    sf.write(folder / "minute.wav", minute, rate, subtype="FLOAT")
    name = lambda r: r["audio"].rsplit("/", 1)[-1]  # noqa: E731
    rows = [
        {"id": "en-plain", "audio": name(en[0]), "language": "en", "reference": en[0]["reference"]},
        {"id": "fr-plain", "audio": name(fr), "language": "fr"},
        {"id": "en-to-fr", "audio": name(en[1]), "language": "en", "task": "translate", "target_language": "fr"},
        {"id": "en-keywords", "audio": name(en[2]), "language": "en", "keywords": "Quarry, Ray\n<|audio|>"},
        {"id": "de-to-en", "audio": name(de), "language": "de", "task": "translate", "target_language": "en"},
        {"id": "fr-to-de", "audio": name(fr), "language": "fr", "task": "translate", "target_language": "de"},
        {"id": "too-long", "audio": "minute.wav", "language": "en"},
        {"id": "en-plain-again", "audio": name(en[0]), "language": "en"},
    ]
    manifest = write_jsonl(folder / "manifest.jsonl", rows)
    out = folder / "out"
    # segment.max_s above what max_model_len holds: the minute-long row reaches the engine whole
    # and must come back too_long (by default it would be cut into 30 s segments first).
    result = run_job(vllm_cfg(str(checkpoint), "task.keywords=[Granite]", "segment.max_s=90"), str(manifest), str(out))
    return rows, read_transcripts(out).set_index("id"), result, engine


def test_every_row_once_with_its_status(job):
    rows, out, result, _ = job
    assert sorted(out.index) == sorted(r["id"] for r in rows)
    assert out["status"].to_dict() == {
        "en-plain": "ok", "fr-plain": "ok", "en-to-fr": "ok", "en-keywords": "ok", "de-to-en": "ok",
        "fr-to-de": "unsupported_task", "too-long": "too_long", "en-plain-again": "ok",
    }
    assert "max_model_len" in out.loc["too-long", "error"]
    assert (out["engine"] == "vllm").all()
    summary = result.summary.model_dump()
    assert summary["n_input"] == len(rows) == summary["n_ok"] + sum(summary["n_failed_by_reason"].values())
    assert summary["engine"] == "vllm"


def test_each_rows_task_and_keywords_reach_its_prompt(job):
    _, out, _, engine = job
    prompt = out["prompt"].to_dict()
    assert "can you transcribe the speech into a written format? Keywords: Granite<|end_of_text|>" in prompt["en-plain"]
    assert "translate the speech to French" in prompt["en-to-fr"]
    assert "translate the speech to English" in prompt["de-to-en"]
    # job-level keywords first, then the row's own, stripped of what is not keyword text
    assert "Keywords: Granite, Quarry, Ray<|end_of_text|>" in prompt["en-keywords"]
    assert prompt["en-keywords"].count("<|audio|>") == 1
    assert out.loc[["fr-to-de", "too-long"], "prompt"].isna().all()  # never sent to the model
    # the prompt stored is the one the builder renders for that row's own options
    expected = engine.prompts.build(EngineRequest(id="x", samples=np.zeros(16000, np.float32), language="en",
                                                  task="translate", target_language="fr", keywords=("Granite",)))
    assert prompt["en-to-fr"] == expected


def test_outputs_belong_to_their_own_audio(job):
    _, out, _, _ = job
    ok = out[out["status"] == "ok"]
    assert ok["text"].str.len().gt(0).all() and ok["avg_logprob"].lt(0).all()
    distinct = ok.drop(index="en-plain-again")["text"]
    assert distinct.nunique() == len(distinct), distinct.to_dict()  # different audio, different text
    # Same audio, same prompt: the same greedy text, as far as arithmetic lets it be. The engine loop
    # batches requests from several calls together, and vLLM's CPU kernels are not batch-invariant,
    # so a random model's near-tied logits may part ways late in a long output. The two copies must
    # still agree for longer than any two outputs of different audio do: a row answered with another
    # row's output would agree with that row instead.
    again = out.loc["en-plain-again", "text"]
    shared = lambda a, b: len(os.path.commonprefix([a, b]))  # noqa: E731
    with_own = shared(again, out.loc["en-plain", "text"])
    with_others = {i: shared(again, t) for i, t in distinct.drop(index="en-plain").items()}
    assert with_own >= 32 and with_own > max(with_others.values()), (with_own, with_others)
    assert out.loc["en-plain", "wer"] is not None and out.loc["en-plain", "ref_words"] > 0
