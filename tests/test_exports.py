"""Exports for training and labelling tools, each read back by the tool's own library.

The output is Parquet parts in the one output schema over real audio files, so lhotse can load
the audio its cuts point at. Also: DuckDB and pandas read the same transcript rows.
"""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.exports import ExportError, export
from pipeline.records import TRANSCRIPT_COLUMNS, transcript_schema

# id: (status, language, task, target_language, duration_s, sample_rate, channels, avg_logprob)
ROWS = {
    "en-short": ("ok", "en", "transcribe", None, 1.0, 16000, 1, -0.2),
    "en-stereo": ("ok", "en", "transcribe", None, 3.0, 44100, 2, -0.9),
    "de-plain": ("ok", "de", "transcribe", None, 2.0, 16000, 1, -0.3),
    "de-to-en": ("ok", "de", "translate", None, 1.5, 16000, 1, -0.4),  # Whisper translate: English text
    "fr-to-es": ("ok", "fr", "translate", "es", 2.5, 22050, 1, -0.1),
    "sv-noconf": ("ok", "sv", "transcribe", None, 0.5, 16000, 1, None),  # an engine without confidence
    "en-missing": ("missing_object", "en", "transcribe", None, None, None, None, None),
    "en-crashed": ("inference_error", "en", "transcribe", None, 2.0, 16000, 1, None),
}
OK = {k for k, v in ROWS.items() if v[0] == "ok"}
TEXT_LANGUAGE = {"en-short": "en", "en-stereo": "en", "de-plain": "de", "de-to-en": "en", "fr-to-es": "es",
                 "sv-noconf": "sv"}


def make_output(root: Path, audio_dir: Path) -> Path:
    """A Quarry output over real audio files, in two Parquet parts."""
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (row_id, (status, language, task, target, duration_s, rate, channels, logprob)) in enumerate(ROWS.items()):
        path = audio_dir / f"{row_id}.flac"
        row = dict.fromkeys(TRANSCRIPT_COLUMNS)
        row.update(id=row_id, row_index=i, audio=str(path), status=status, language=language, task=task, target_language=target,
                   reference=f"reference of {row_id}", duration_s=duration_s, source_sample_rate=rate,
                   source_channels=channels)
        if status == "ok":
            samples = np.sin(np.linspace(0, 440 * 2 * np.pi * duration_s, int(duration_s * rate)))
            sf.write(path, np.repeat(0.1 * samples[:, None], channels, axis=1), rate)
            row.update(text=f"words of {row_id}", engine="whisper", model="base", avg_logprob=logprob,
                       wer=0.25, inference_s=duration_s / 10)
            if "finished_at" in row:
                row["finished_at"] = datetime(2026, 11, 22, 9, 0, len(rows), tzinfo=timezone.utc)
        else:
            row["error"] = "no such object" if status == "missing_object" else "engine raised"
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=transcript_schema())
    (root / "transcripts").mkdir(parents=True)
    pq.write_table(table.slice(0, 5), root / "transcripts" / "part-00000.parquet")
    pq.write_table(table.slice(5), root / "transcripts" / "part-00001.parquet")
    return root


@pytest.fixture()
def output(tmp_path) -> Path:
    return make_output(tmp_path / "out", tmp_path / "audio")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: `make setup` installs the test extra", pytrace=False)


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_lhotse_export_loads_as_a_cutset_whose_audio_loads(output, tmp_path):
    lhotse = _require("lhotse")
    dest = tmp_path / "exports" / "cuts.jsonl.gz"

    result = export(str(output), "lhotse", str(dest))

    assert result.count == len(OK) and result.path == str(dest)
    assert dest.read_bytes()[:2] == b"\x1f\x8b"  # gzipped, as the name says
    cuts = {cut.id: cut for cut in lhotse.CutSet.from_jsonl(dest)}
    assert set(cuts) == OK
    for row_id, cut in cuts.items():
        _, _, _, _, duration_s, rate, channels, logprob = ROWS[row_id]
        (supervision,) = cut.supervisions
        assert supervision.text == f"words of {row_id}"
        assert supervision.language == TEXT_LANGUAGE[row_id]
        assert supervision.duration == cut.duration == pytest.approx(duration_s)
        assert (supervision.custom or {}).get("avg_logprob") == logprob
        assert cut.sampling_rate == rate
        audio = cut.load_audio()
        assert audio.shape == (channels, round(duration_s * rate))
    assert type(cuts["en-stereo"]).__name__ == "MultiCut" and type(cuts["en-short"]).__name__ == "MonoCut"


def test_nemo_export_follows_the_nemo_manifest_schema(output, tmp_path):
    dest = tmp_path / "nemo.jsonl"

    result = export(str(output), "nemo", str(dest))

    entries = _jsonl(dest)
    assert result.count == len(entries) == len(OK)
    for entry in entries:
        assert set(entry) == {"audio_filepath", "duration", "text", "lang"}
        assert isinstance(entry["audio_filepath"], str) and Path(entry["audio_filepath"]).exists()
        assert isinstance(entry["duration"], float) and entry["duration"] > 0
        assert isinstance(entry["text"], str) and entry["text"]
    by_path = {Path(e["audio_filepath"]).stem: e for e in entries}
    assert {k: e["lang"] for k, e in by_path.items()} == TEXT_LANGUAGE
    assert by_path["en-stereo"]["duration"] == 3.0


def test_hf_export_loads_with_datasets_as_an_audio_column_of_paths(output, tmp_path):
    datasets = _require("datasets")
    dest = tmp_path / "hf" / "train.parquet"

    result = export(str(output), "hf", str(dest))

    loaded = datasets.load_dataset("parquet", data_files=str(dest), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert result.count == loaded.num_rows == len(OK)
    assert isinstance(loaded.features["audio"], datasets.Audio)
    rows = {r["id"]: r for r in loaded.cast_column("audio", datasets.Audio(decode=False))}
    assert set(rows) == OK
    for row_id, row in rows.items():
        assert row["audio"]["path"] == str(tmp_path / "audio" / f"{row_id}.flac") and row["audio"]["bytes"] is None
        assert row["language"] == TEXT_LANGUAGE[row_id]
        assert row["text"] == f"words of {row_id}"
        assert row["duration_s"] == ROWS[row_id][4]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, OK),
        ({"min_avg_logprob": -0.35}, {"en-short", "de-plain", "fr-to-es"}),  # no confidence: dropped
        ({"min_duration_s": 1.5}, {"en-stereo", "de-plain", "de-to-en", "fr-to-es"}),
        ({"max_duration_s": 1.5}, {"en-short", "de-to-en", "sv-noconf"}),
        ({"min_duration_s": 1.0, "max_duration_s": 2.0}, {"en-short", "de-plain", "de-to-en"}),
        ({"languages": ["en"]}, {"en-short", "en-stereo", "de-to-en"}),  # the language of the text
        ({"languages": ["es", "sv"]}, {"fr-to-es", "sv-noconf"}),
        ({"languages": ["en"], "min_avg_logprob": -0.5, "max_duration_s": 2.0}, {"en-short", "de-to-en"}),
        ({"languages": ["xx"]}, set()),
    ],
)
@pytest.mark.parametrize("fmt", ["lhotse", "nemo", "hf"])
def test_filters_keep_ok_rows_within_confidence_duration_and_language(output, tmp_path, fmt, filters, expected):
    dest = tmp_path / f"export.{'parquet' if fmt == 'hf' else 'jsonl'}"

    result = export(str(output), fmt, str(dest), **filters)

    if fmt == "hf":
        ids = set(pd.read_parquet(dest)["id"])
    elif fmt == "nemo":
        ids = {Path(e["audio_filepath"]).stem for e in _jsonl(dest)}
    else:
        ids = {e["id"] for e in _jsonl(dest)}
    assert ids == expected and result.count == len(expected)


def test_export_rejects_an_unknown_format_and_an_empty_duration_range(output, tmp_path):
    with pytest.raises(ExportError, match="unknown export format"):
        export(str(output), "kaldi", str(tmp_path / "x"))
    with pytest.raises(ExportError, match="nothing to export"):
        export(str(output), "nemo", str(tmp_path / "x.jsonl"), min_duration_s=5, max_duration_s=1)
    assert not list(tmp_path.glob("x*"))


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # raised inside duckdb's own .df() under pandas 3
def test_duckdb_and_pandas_read_the_same_transcript_rows(output):
    duckdb = _require("duckdb")
    parts = sorted((output / "transcripts").glob("part-*.parquet"))
    assert len(parts) == 2

    from_duckdb = duckdb.sql(
        f"SELECT * FROM read_parquet('{output}/transcripts/part-*.parquet') ORDER BY id").df()
    from_pandas = pd.read_parquet(output / "transcripts").sort_values("id").reset_index(drop=True)

    assert list(from_duckdb.columns) == list(from_pandas.columns) == list(TRANSCRIPT_COLUMNS)
    assert len(from_duckdb) == len(ROWS)
    assert _records(from_duckdb) == _records(from_pandas)


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as plain values; the libraries spell a missing value differently (None, NaN, NaT)."""
    return [{k: None if not isinstance(v, (list, np.ndarray)) and pd.isna(v) else v for k, v in row.items()}
            for row in frame.to_dict("records")]
