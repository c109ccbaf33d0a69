"""The whole line on a real local Ray with the fake engine: rows, order, statuses, summary."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import load_config
from pipeline.engines.fake import FakeEngine
from pipeline.plan import run_job
from pipeline.records import TRANSCRIPT_COLUMNS

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_summary, read_transcripts, write_jsonl


def fake_cfg(*extra: str):
    return load_config(None, ["engine.name=fake", "engine.batch_size=4", *extra])


@pytest.fixture()
def clips(tmp_path):
    """Six real clips copied next to a manifest that names them by relative path."""
    rows = eval_rows("en")[:6]
    audio = tmp_path / "in" / "audio"
    audio.mkdir(parents=True)
    for r in rows:
        shutil.copy(EVAL_DIR / r["audio"], audio)
    return rows, tmp_path / "in"


def test_every_row_comes_out_once_with_its_own_audio_and_carried_columns(ray_session, clips, tmp_path):
    rows, folder = clips
    manifest = write_jsonl(folder / "m.jsonl", [
        {"id": r["id"], "audio": r["audio"], "reference": r["reference"], "language": "en", "speaker": f"spk{i}", "score": i, "duration_s": "claimed"}
        for i, r in enumerate(rows)
    ])
    result = run_job(fake_cfg(), str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out").set_index("id")
    assert sorted(out.index) == sorted(r["id"] for r in rows)
    for i, r in enumerate(rows):
        samples, rate = sf.read(EVAL_DIR / r["audio"], dtype="float32")
        assert rate == 16000
        assert out.loc[r["id"], "text"] == FakeEngine.fingerprint(samples)  # right audio on the right row
        assert out.loc[r["id"], "speaker"] == f"spk{i}" and out.loc[r["id"], "score"] == str(i)
        assert out.loc[r["id"], "duration_s"] == pytest.approx(r["duration_s"], abs=0.01)
        assert out.loc[r["id"], "input_duration_s"] == "claimed"  # a clashing column is kept, renamed
    assert (out["status"] == "ok").all() and out["wer"].notna().all()
    assert result.summary.n_input == result.summary.n_ok == len(rows)
    run = result.summary.this_run  # the engine meter's figures reached the driver
    assert 0 < run.engine_start_s < run.job_wall_s and 0 < run.engine_busy_fraction <= 1


def test_output_schema_is_explicit_and_identical_on_every_file(ray_session, clips, tmp_path):
    rows, folder = clips
    # the first rows have no reference or language at all: all-null columns must stay typed
    manifest = write_jsonl(folder / "m.jsonl", [{"audio": r["audio"], **({"reference": r["reference"]} if i > 3 else {})} for i, r in enumerate(rows)])
    # one-row engine batches: rows reach the writer one block at a time, so parts close at 2 rows
    run_job(fake_cfg("output.rows_per_file=2", "engine.batch_size=1"), str(manifest), str(tmp_path / "out"))
    files = sorted((tmp_path / "out" / "transcripts").glob("*.parquet"))
    assert len(files) >= 2  # parts close at about rows_per_file rows (never inside a batch)
    schemas = {pq.read_schema(f).remove_metadata() for f in files}
    assert len(schemas) == 1
    schema = schemas.pop()
    assert tuple(schema.names[: len(TRANSCRIPT_COLUMNS)]) == TRANSCRIPT_COLUMNS
    assert schema.field("reference").type == pa.string() and schema.field("wer").type == pa.float64()


def test_missing_ids_are_derived_stably_from_the_audio_uri(ray_session, clips, tmp_path):
    rows, folder = clips
    manifest = write_jsonl(folder / "m.jsonl", [{"audio": r["audio"]} for r in rows[:2]])
    run_job(fake_cfg(), str(manifest), str(tmp_path / "a"))
    run_job(fake_cfg(), str(manifest), str(tmp_path / "b"))
    a, b = read_transcripts(tmp_path / "a"), read_transcripts(tmp_path / "b")
    assert sorted(a["id"]) == sorted(b["id"])
    assert all(i.startswith(r["id"]) for i, r in zip(sorted(a["id"]), sorted(rows[:2], key=lambda r: r["id"])))


def test_bad_rows_keep_their_place_with_a_reason_and_totals_reconcile(ray_session, clips, tmp_path):
    rows, folder = clips
    good = EVAL_DIR / rows[0]["audio"]
    data, rate = sf.read(good, dtype="int16")
    sf.write(folder / "full.wav", data, rate, subtype="PCM_16")
    raw = (folder / "full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "header_only.wav", data[:0], rate, subtype="PCM_16")  # a valid header, no frames
    (folder / "text.wav").write_text("this is not audio\n")
    manifest_rows = [
        {"id": "good-0", "audio": rows[0]["audio"], "reference": rows[0]["reference"]},
        {"id": "truncated", "audio": "truncated.wav"},
        {"id": "empty", "audio": "empty.wav"},
        {"id": "header-only", "audio": "header_only.wav"},
        {"id": "text", "audio": "text.wav"},
        {"id": "missing", "audio": "audio/does-not-exist.flac"},
        {"id": "no-audio", "reference": "x"},
        {"id": "unsupported", "audio": rows[1]["audio"], "language": "xx"},
        {"id": "fail-engine-1", "audio": rows[2]["audio"]},
        {"id": "good-1", "audio": rows[3]["audio"], "reference": rows[3]["reference"]},
    ]
    manifest = write_jsonl(folder / "m.jsonl", manifest_rows)
    with manifest.open("a") as f:
        f.write('{"id": "broken-json", "audio": \n')  # a malformed line is a row too
    result = run_job(fake_cfg(), str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out")
    broken = out[~out["id"].isin([r["id"] for r in manifest_rows])]
    assert len(broken) == 1 and broken["status"].item() == "invalid_row" and "not JSON" in broken["error"].item()
    out = out[out["id"].isin([r["id"] for r in manifest_rows])].set_index("id")
    assert sorted(out.index) == sorted(r["id"] for r in manifest_rows)
    expected = {
        "good-0": "ok", "good-1": "ok", "truncated": "decode_error", "empty": "empty_audio",
        "header-only": "empty_audio", "text": "decode_error", "missing": "missing_object",
        "no-audio": "invalid_row", "unsupported": "unsupported_task", "fail-engine-1": "inference_error",
    }
    assert out["status"].to_dict() == expected
    assert out.loc[out["status"] != "ok", "error"].notna().all()
    assert out.loc[["good-0", "good-1"], "text"].notna().all()
    s = result.summary.model_dump()
    assert s["n_input"] == len(manifest_rows) + 1
    assert s["n_input"] == s["n_ok"] + sum(s["n_failed_by_reason"].values())
    assert s["n_failed_by_reason"]["decode_error"] == 2


def test_failed_rows_over_budget_mark_the_job_failed(ray_session, clips, tmp_path):
    rows, folder = clips
    manifest = write_jsonl(folder / "m.jsonl", [{"id": "ok", "audio": rows[0]["audio"]}, {"id": "gone", "audio": "nope.wav"}])
    result = run_job(fake_cfg("output.max_failed_fraction=0.25"), str(manifest), str(tmp_path / "out"))
    assert not result.ok and result.summary.status == "failed_budget_exceeded"
    assert read_summary(tmp_path / "out")["failed_fraction"] == 0.5
    assert len(read_transcripts(tmp_path / "out")) == 2  # what completed is kept


def test_rerun_resumes_the_same_job_and_refuses_another_without_the_flag(ray_session, clips, tmp_path):
    from pipeline.output import OutputExistsError

    rows, folder = clips
    manifest = write_jsonl(folder / "m.jsonl", [{"audio": r["audio"]} for r in rows[:3]])
    first = run_job(fake_cfg(), str(manifest), str(tmp_path / "out"))
    again = run_job(fake_cfg(), str(manifest), str(tmp_path / "out"))  # same job: nothing left to do
    assert again.summary.this_run.model_dump() == {**again.summary.this_run.model_dump(), "attempt": 2, "n_committed_before": 3, "n_processed": 0}
    assert len(read_transcripts(tmp_path / "out")) == 3 and again.summary.n_input == first.summary.n_input == 3
    other = write_jsonl(folder / "other.jsonl", [{"audio": rows[3]["audio"]}])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_job(fake_cfg(), str(other), str(tmp_path / "out"))
    with pytest.raises(OutputExistsError, match="--overwrite"):  # same manifest, another engine
        run_job(fake_cfg("engine.model=other"), str(manifest), str(tmp_path / "out"))
    run_job(fake_cfg(), str(other), str(tmp_path / "out"), overwrite=True)
    assert len(read_transcripts(tmp_path / "out")) == 1


def test_duplicate_ids_keep_their_rows_and_only_the_first_is_ok(ray_session, clips, tmp_path):
    rows, folder = clips
    manifest = write_jsonl(folder / "m.jsonl", [
        {"id": "a", "audio": rows[0]["audio"]}, {"id": "b", "audio": rows[1]["audio"]},
        {"id": "a", "audio": rows[2]["audio"]}, {"audio": rows[3]["audio"]}, {"audio": rows[3]["audio"]},
    ])
    result = run_job(fake_cfg(), str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out")
    assert len(out) == 5 and sorted(out["status"]) == ["duplicate_id", "duplicate_id", "ok", "ok", "ok"]
    assert out.loc[out["status"] == "duplicate_id", "error"].str.contains("already appeared").all()
    assert out.groupby("id")["status"].apply(lambda s: (s == "ok").sum()).eq(1).all()
    assert result.summary.n_failed_by_reason == {"duplicate_id": 2}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests_with_remapped_columns(ray_session, clips, tmp_path, fmt):
    import pandas as pd

    rows, folder = clips
    frame = pd.DataFrame({"key": ["a-007", "b-008"], "path": [rows[0]["audio"], rows[1]["audio"]], "txt": [rows[0]["reference"], None], "shard": ["007", "008"]})
    manifest = folder / f"m.{fmt}"
    frame.to_csv(manifest, index=False) if fmt == "csv" else frame.to_parquet(manifest)
    cfg = fake_cfg("input.columns.audio=path", "input.columns.id=key", "input.columns.reference=txt")
    run_job(cfg, str(manifest), str(tmp_path / "out"))
    out = read_transcripts(tmp_path / "out").set_index("id")
    assert sorted(out.index) == ["a-007", "b-008"]
    assert out.loc["a-007", "shard"] == "007"  # CSV text stays text, leading zeros kept
    assert out.loc["a-007", "reference"] == rows[0]["reference"] and pd.isna(out.loc["b-008", "reference"])
