"""Exports of an output's transcribed rows for training and labelling tools.

- ``lhotse``: a cuts manifest, JSONL (``CutSet.from_jsonl``): one cut per recording, covering the
  whole recording, with one supervision carrying the text.
- ``nemo``: a NeMo ASR manifest, JSONL: ``audio_filepath``, ``duration``, ``text``, ``lang``.
- ``hf``: one Parquet file that ``datasets.load_dataset("parquet", data_files=...)`` reads with an
  ``Audio`` column of paths (no audio bytes are copied), plus ``id``, ``text``, ``language``,
  ``duration_s``, ``avg_logprob``, ``reference``, ``model``.

Only ``ok`` rows with text are exported. The filters (confidence, duration, language) are pushed
down into the Parquet scan; rows stream one batch at a time to the destination, which is written
under a temporary name and moved into place. A JSONL destination ending in ``.gz`` is gzipped.

Audio paths are the output's ``audio`` column as is. The language of a row is the language of its
text: the target language for translations (``en`` for Whisper's translate task without one).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from gzip import GzipFile
from typing import Any, Iterable, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .errors import CannotRun
from .records import Status, column
from .report import open_transcripts
from .storage import atomic_open, url_to_fs

__all__ = ["ExportError", "ExportResult", "FORMATS", "export"]

Format = Literal["lhotse", "nemo", "hf"]
FORMATS: tuple[str, ...] = ("lhotse", "nemo", "hf")
_COLUMNS = ("id", "audio", "status", "text", "reference", "language", "task", "target_language", "duration_s",
            "source_sample_rate", "source_channels", "model", "avg_logprob")
_DEFAULT_TRANSLATE_LANGUAGE = "en"  # Whisper translates into English only

# The Hugging Face datasets schema: its Audio feature is stored as struct<bytes, path>, and the
# "huggingface" schema metadata tells `datasets` to read the column back as Audio.
HF_SCHEMA = pa.schema(
    [
        column("id").with_nullable(True),
        pa.field("audio", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        *(column(n) for n in ("text", "language", "duration_s", "avg_logprob", "reference", "model")),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": {
        "id": {"dtype": "string", "_type": "Value"},
        "audio": {"_type": "Audio"},
        "text": {"dtype": "string", "_type": "Value"},
        "language": {"dtype": "string", "_type": "Value"},
        "duration_s": {"dtype": "float64", "_type": "Value"},
        "avg_logprob": {"dtype": "float64", "_type": "Value"},
        "reference": {"dtype": "string", "_type": "Value"},
        "model": {"dtype": "string", "_type": "Value"},
    }}})},
)


class ExportError(CannotRun, ValueError):
    """Bad export arguments (unknown format, empty duration range, transcripts without a column)."""


@dataclass(frozen=True)
class ExportResult:
    """How many rows were exported, and where to."""

    count: int
    path: str


def export(output_uri: str, fmt: Format, dest_uri: str, *, min_avg_logprob: float | None = None,
           min_duration_s: float | None = None, max_duration_s: float | None = None,
           languages: Sequence[str] | None = None, storage_options: dict[str, Any] | None = None) -> ExportResult:
    """Export the ``ok`` rows of the output at ``output_uri`` to ``dest_uri`` in format ``fmt``.

    Filters: ``min_avg_logprob`` keeps rows whose ``avg_logprob`` is at least this (rows without
    one are dropped when it is given); ``min_duration_s`` / ``max_duration_s`` bound ``duration_s``
    (inclusive); ``languages`` keeps rows whose text is in one of these languages.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if min_duration_s is not None and max_duration_s is not None and min_duration_s > max_duration_s:
        raise ExportError(f"min_duration_s {min_duration_s} > max_duration_s {max_duration_s}: nothing to export")
    dataset = open_transcripts(output_uri, storage_options)
    missing = [c for c in _COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ExportError(f"transcripts at {output_uri} lack columns {missing}")
    predicate = _predicate(min_avg_logprob, min_duration_s, max_duration_s, languages)
    batches = dataset.to_batches(columns={**{c: ds.field(c) for c in _COLUMNS}, "text_language": _text_language()},
                                 filter=predicate, batch_size=4096)

    fs, path = url_to_fs(dest_uri, storage_options)
    with atomic_open(fs, path.rstrip("/")) as f:
        if fmt == "hf":
            count = _write_parquet(f, batches)
        else:
            to_line = _lhotse_cut if fmt == "lhotse" else _nemo_entry
            count = _write_jsonl(f, batches, to_line, gzip=path.endswith(".gz"))
    return ExportResult(count=count, path=dest_uri)


def _text_language() -> pc.Expression:
    translated = pc.coalesce(pc.equal(ds.field("task"), "translate"), pa.scalar(False))
    target = pc.coalesce(ds.field("target_language"), pa.scalar(_DEFAULT_TRANSLATE_LANGUAGE))
    return pc.if_else(translated, target, ds.field("language"))


def _predicate(min_avg_logprob: float | None, min_duration_s: float | None, max_duration_s: float | None,
               languages: Sequence[str] | None) -> pc.Expression:
    # A comparison with a null is null, and a null predicate drops the row: rows without an
    # avg_logprob or a duration are dropped by the filters that need them.
    predicate = (ds.field("status") == Status.OK.value) & ds.field("text").is_valid()
    if min_avg_logprob is not None:
        predicate &= ds.field("avg_logprob") >= min_avg_logprob
    if min_duration_s is not None:
        predicate &= ds.field("duration_s") >= min_duration_s
    if max_duration_s is not None:
        predicate &= ds.field("duration_s") <= max_duration_s
    if languages is not None:
        predicate &= _text_language().isin(list(languages))
    return predicate


def _write_jsonl(raw, batches: Iterable[pa.RecordBatch], to_line, gzip: bool) -> int:
    count = 0
    with (GzipFile(fileobj=raw, mode="wb") if gzip else nullcontext(raw)) as f:
        for batch in batches:
            lines = [json.dumps(to_line(row), ensure_ascii=False) + "\n" for row in batch.to_pylist()]
            f.write("".join(lines).encode("utf-8"))
            count += len(lines)
    return count


def _write_parquet(f, batches: Iterable[pa.RecordBatch]) -> int:
    count = 0
    with pq.ParquetWriter(f, HF_SCHEMA, compression="zstd") as writer:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            audio = pa.StructArray.from_arrays(
                [pa.nulls(batch.num_rows, pa.binary()), batch.column("audio")], fields=list(HF_SCHEMA.field("audio").type))
            table = pa.table({
                "id": batch.column("id"), "audio": audio, "text": batch.column("text"),
                "language": batch.column("text_language"), "duration_s": batch.column("duration_s"),
                "avg_logprob": batch.column("avg_logprob"), "reference": batch.column("reference"),
                "model": batch.column("model"),
            }, schema=HF_SCHEMA)
            writer.write_table(table)
            count += table.num_rows
    return count


def _nemo_entry(row: dict) -> dict:
    return {"audio_filepath": row["audio"], "duration": row["duration_s"], "text": row["text"],
            "lang": row["text_language"]}


def _lhotse_source(uri: str, channels: list[int]) -> dict:
    # lhotse reads "file" sources with soundfile and "url" sources (s3://, https://) with smart_open.
    kind = "url" if "://" in uri and not uri.startswith("file://") else "file"
    return {"type": kind, "channels": channels, "source": uri.removeprefix("file://") if kind == "file" else uri}


def _lhotse_cut(row: dict) -> dict:
    """A lhotse cut covering the whole recording, in ``Cut.to_dict`` form.

    A multi-channel source becomes a ``MultiCut`` over all its channels: Quarry transcribed the
    downmix, so the text belongs to every channel (``cut.to_mono(mono_downmix=True)`` gets it back).
    """
    duration = row["duration_s"]
    sampling_rate = row["source_sample_rate"] or 16_000
    channels = list(range(max(row["source_channels"] or 1, 1)))
    channel: int | list[int] = channels if len(channels) > 1 else 0
    recording = {
        "id": row["id"],
        "sources": [_lhotse_source(row["audio"], channels)],
        "sampling_rate": sampling_rate,
        "num_samples": round(duration * sampling_rate),
        "duration": duration,
        "channel_ids": channels,
    }
    custom = {k: row[k] for k in ("avg_logprob", "model", "reference") if row[k] is not None}
    supervision = {"id": row["id"], "recording_id": row["id"], "start": 0.0, "duration": duration,
                   "channel": channel, "text": row["text"], "language": row["text_language"]}
    if custom:
        supervision["custom"] = custom
    return {"id": row["id"], "start": 0.0, "duration": duration, "channel": channel,
            "supervisions": [supervision], "recording": recording,
            "type": "MultiCut" if len(channels) > 1 else "MonoCut"}
