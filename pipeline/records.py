"""The row's shape: every column, the sample rate, row statuses and ids, each defined once here
(the sample rate and statuses in ``constants.py``, re-exported here).

A row travels manifest -> prepare -> decode -> inference -> score -> driver. Its columns come in
named groups (:class:`ColumnGroup`); each stage declares the groups it reads and the groups it adds,
and every schema is composed from groups, never sliced. The output schema is the groups a reader
sees, in a fixed order, then the manifest's carried-through columns.

Every stage either passes a row on or marks it failed with a :class:`Status` and a message.
Nothing drops a row.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Plain Python, so that engines import them without pyarrow; this module's interface as before.
from .constants import OK, SAMPLE_RATE_HZ, Status  # noqa: F401
from .scrub import redact_uri

TRANSIENT = frozenset({Status.FETCH_ERROR.value, Status.INFERENCE_ERROR.value})
"""Statuses a passing fault may have caused: a rerun of the job tries such rows again."""


@dataclass(frozen=True)
class ColumnGroup:
    """Columns that travel together and are added by one stage."""

    name: str
    fields: tuple[pa.Field, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def nulls(self) -> dict[str, None]:
        """The group's columns, all null: how a stage fills the columns a failed row never got."""
        return dict.fromkeys(self.names)


# --- The groups, in output order ---------------------------------------------------------------

KEY = ColumnGroup("key", (
    pa.field("id", pa.string(), nullable=False),
    # The row's position in the manifest (JSONL: its line, 0-based): with the manifest's content,
    # the row's identity across attempts, also where ids repeat.
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("audio", pa.string()),  # the resolved audio URI
))
STATUS = ColumnGroup("status", (
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
))
TEXT = ColumnGroup("text", (
    pa.field("text", pa.string()),  # raw, never normalised
))
TASK = ColumnGroup("task", (
    pa.field("reference", pa.string()),
    pa.field("language", pa.string()),
    pa.field("task", pa.string()),
    pa.field("target_language", pa.string()),
))
DECODED = ColumnGroup("decoded", (
    pa.field("duration_s", pa.float64()),  # the whole recording's
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
))
ENGINE = ColumnGroup("engine", (
    pa.field("engine", pa.string()),
    pa.field("model", pa.string()),
    pa.field("avg_logprob", pa.float64()),
    pa.field("inference_s", pa.float64()),  # this row's share of its batch's engine wall time
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),  # when its engine batch finished
    pa.field("prompt", pa.string()),  # the rendered prompt (prompted engines), for audit
))
SCORE = ColumnGroup("score", (
    pa.field("metric", pa.string()),  # "wer" or "cer"
    pa.field("normalizer", pa.string()),
    pa.field("ref_words", pa.int64()),  # reference units: words, or characters for CER languages
    pa.field("substitutions", pa.int64()),
    pa.field("deletions", pa.int64()),
    pa.field("insertions", pa.int64()),
    pa.field("wer", pa.float64()),  # the row's error rate in `metric` units
))
RECORDING = ColumnGroup("recording", (  # long and multi-channel recordings (assemble.py)
    pa.field("segments", pa.int32()),  # segments transcribed for this recording (all channels)
    pa.field("channel_texts", pa.list_(pa.struct([
        ("channel", pa.string()), ("text", pa.string()), ("speaking_s", pa.float64()),
    ]))),  # audio.channels: split only
    pa.field("overlap_s", pa.float64()),  # split: time two or more channels speak at once
    pa.field("conversation", pa.list_(pa.struct([
        ("channel", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string()),
    ]))),  # split: every channel's segments ordered by start time
))

# Optional features (off by default: these columns are then null). Appended after the groups above.
SPEAKER_REGION = pa.struct([("speaker", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64())])
WORD = pa.struct([
    ("word", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),  # recording time
    ("probability", pa.float64()),  # the engine's (whisper) or the aligner's (CTC) confidence
    ("speaker", pa.string()),  # diarize: the speaker at the word's middle
])
SPEAKERS = ColumnGroup("speakers", (  # diarize (pipeline/diarize/): mono recordings
    pa.field("speakers", pa.list_(pa.struct([
        ("speaker", pa.string()), ("text", pa.string()), ("speaking_s", pa.float64()),
    ]))),  # per speaker (spk0 first to speak): text and talk time, as channel_texts is per channel
    pa.field("speaker_turns", pa.list_(pa.struct([
        ("speaker", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string()),
    ]))),  # speaker turns in time order (text from the words inside each turn)
))
WORDS = ColumnGroup("words", (  # output.words
    pa.field("words", pa.list_(WORD)),
))
REDACTED = ColumnGroup("redacted", (  # redact (pipeline/redact/)
    pa.field("text_redacted", pa.string()),  # `text` with each entity replaced by [TYPE]
    pa.field("redactions", pa.list_(pa.struct([
        ("entity", pa.string()), ("score", pa.float64()),
        ("start_s", pa.float64()), ("end_s", pa.float64()),  # the redacted words' time, where words exist
    ]))),
))
LANGID = ColumnGroup("langid", (  # task.detect_language
    pa.field("language_probability", pa.float64()),  # set when `language` was detected, not given
))

# --- Internal groups: carried between stages, never output -------------------------------------

KEYWORDS = ColumnGroup("keywords", (
    pa.field("keywords", pa.list_(pa.string())),  # the job's keywords, then the row's
))
SAMPLES = ColumnGroup("samples", (
    pa.field("samples", pa.large_binary()),  # this segment: float32 mono SAMPLE_RATE_HZ, raw bytes
))
SEGMENT = ColumnGroup("segment", (  # where a row sits in its recording; the driver reassembles
    pa.field("channel", pa.string()),  # null when channels are mixed
    pa.field("n_channels", pa.int32()),  # channel streams of the recording (1 when mixed)
    pa.field("segment_index", pa.int32()),
    pa.field("n_segments", pa.int32()),  # segments of this channel
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("seam_overlap_s", pa.float64()),  # audio shared with the previous segment (fixed windows)
    pa.field("speech", pa.list_(pa.list_(pa.float64()))),  # split mode, segment 0: VAD [start_s, end_s]s
    pa.field("segment_speaker", pa.string()),  # diarize: who speaks most of this segment
    pa.field("speaker_regions", pa.list_(SPEAKER_REGION)),  # diarize: who speaks when, inside this segment
))

# What each stage of the row's journey holds (stages.py declares reads / adds against these).
PREPARED = (KEY, STATUS, TASK, KEYWORDS)
OUTPUT = (KEY, STATUS, TEXT, TASK, DECODED, ENGINE, SCORE, RECORDING, SPEAKERS, WORDS, REDACTED, LANGID)
INTERNAL = (KEYWORDS, SAMPLES, SEGMENT)

TRANSCRIPT_COLUMNS: tuple[str, ...] = tuple(n for g in OUTPUT for n in g.names)
INTERNAL_COLUMNS: tuple[str, ...] = tuple(n for g in INTERNAL for n in g.names)
_FIELDS: dict[str, pa.Field] = {f.name: f for g in OUTPUT + INTERNAL for f in g.fields}


def column(name: str) -> pa.Field:
    """The field of a row column by name, for tables derived from rows (segments, analytics, exports)."""
    return _FIELDS[name]


def schema_of(groups: Iterable[ColumnGroup], extras: Iterable[pa.Field] = ()) -> pa.Schema:
    """The schema of rows holding ``groups`` (in that order), then the carried-through ``extras``."""
    return pa.schema([f for g in groups for f in g.fields] + list(extras))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema`` (its columns, in order, with their types): selected and cast only
    where it differs, as the driver does this to every block and a cast checks every column."""
    if table.schema.names != schema.names:
        table = table.select(schema.names)
    return table if table.schema.equals(schema, check_metadata=True) else table.cast(schema)


def keep(table: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.Table:
    """The rows of ``table`` where ``mask`` is true; the table itself (no copy) when that is every row."""
    return table if pc.all(mask).as_py() and mask.null_count == 0 else table.filter(mask)


def null_row(*groups: ColumnGroup) -> dict[str, Any]:
    """Every column of ``groups``, null."""
    row: dict[str, Any] = {}
    for group in groups:
        row.update(group.nulls())
    return row


def transcript_schema(extra_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """The output schema: fixed columns, then the manifest's carried-through columns."""
    extra_fields = list(extra_fields)
    clash = [f.name for f in extra_fields if f.name in TRANSCRIPT_COLUMNS]
    if clash:
        raise ValueError(f"carried-through columns clash with output columns: {clash}")
    return schema_of(OUTPUT, extra_fields)


def carried_name(name: str) -> str:
    """A manifest column's name in the output: ``input_<name>`` where it clashes with a column of
    the row (output or internal), so nothing the manifest holds is dropped or overwritten."""
    return f"input_{name}" if name in _FIELDS else name


# One row per transcribed segment: OUTPUT/segments/ (timestamps; the recording row holds the whole).
SEGMENT_TABLE_SCHEMA = pa.schema([column(n) for n in (
    "id", "row_index", "channel", "segment_index", "start_s", "end_s", "text", "status", "error", "avg_logprob",
    "segment_speaker", "words")])


# --- Ids -----------------------------------------------------------------------------------------

def stable_id(audio_uri: str) -> str:
    """A readable id that is stable across runs: file stem + hash of the full URI. The stem is
    taken from the URI without its credentials (:func:`redact.redact_uri`), so a presigned token
    never becomes part of an id."""
    stem = posixpath.splitext(posixpath.basename(redact_uri(audio_uri).rstrip("/")))[0] or "audio"
    return f"{stem}-{hashlib.sha1(audio_uri.encode()).hexdigest()[:10]}"


def id_hashes(ids: Iterable[str | None]) -> np.ndarray:
    """8-byte hashes of row ids (uint64): how committed and seen ids are kept compactly."""
    ids = list(ids)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b((i or "").encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64, count=len(ids),
    )


class RowSet:
    """A set of manifest positions (``row_index``) as a packed bitmap: one bit per manifest row,
    so a million-row job's committed rows take 125 KB, whatever their ids."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.bits = np.zeros((n_rows + 7) // 8, np.uint8)

    def add(self, positions: np.ndarray | Iterable[int]) -> None:
        at = np.asarray(positions, dtype=np.int64)
        if at.size and (at.min() < 0 or at.max() >= self.n_rows):
            raise ValueError(f"row positions outside 0..{self.n_rows - 1}")
        np.bitwise_or.at(self.bits, at >> 3, (1 << (at & 7)).astype(np.uint8))

    def contains(self, positions: np.ndarray | Iterable[int]) -> np.ndarray:
        at = np.asarray(positions, dtype=np.int64)
        inside = (at >= 0) & (at < self.n_rows)
        out = np.zeros(at.shape, dtype=bool)
        out[inside] = (self.bits[at[inside] >> 3] >> (at[inside] & 7)) & 1 == 1
        return out

    def __len__(self) -> int:
        return int(np.unpackbits(self.bits).sum())
