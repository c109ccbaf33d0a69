"""Typed records and the one output schema every writer and test uses.

Every stage either passes a row on or marks it failed with a :class:`Status` and a message.
Nothing drops a row.
"""

from __future__ import annotations

from enum import Enum
import pyarrow as pa


class Status(str, Enum):
    """Per-row outcome. Everything but ``OK`` is a failure reason counted in the summary."""

    OK = "ok"
    INVALID_ROW = "invalid_row"  # manifest row unusable (no audio URI, bad field)
    DUPLICATE_ID = "duplicate_id"  # an earlier row of the job has the same id
    MISSING_OBJECT = "missing_object"  # audio object does not exist
    ACCESS_DENIED = "access_denied"  # storage refused the read
    FETCH_ERROR = "fetch_error"  # storage failed after retries
    DECODE_ERROR = "decode_error"  # bytes are not decodable audio (or truncated)
    EMPTY_AUDIO = "empty_audio"  # decodes to zero samples
    INVALID_AUDIO = "invalid_audio"  # decodes, but samples are NaN / Inf
    TOO_LONG = "too_long"  # longer than the engine or config accepts
    UNSUPPORTED_TASK = "unsupported_task"  # language / task pair the model cannot do
    INFERENCE_ERROR = "inference_error"  # the engine failed on this row

    def __str__(self) -> str:
        return self.value


# Columns every output row has, in this order, before the carried-through manifest columns.
TRANSCRIPT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("audio", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("text", pa.string()),
    pa.field("reference", pa.string()),
    pa.field("language", pa.string()),
    pa.field("task", pa.string()),
    pa.field("target_language", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
    pa.field("engine", pa.string()),
    pa.field("model", pa.string()),
    pa.field("avg_logprob", pa.float64()),
    pa.field("inference_s", pa.float64()),  # this row's share of its batch's engine wall time
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),  # when its engine batch finished
    pa.field("prompt", pa.string()),  # the rendered prompt (prompted engines), for audit
    pa.field("metric", pa.string()),  # "wer" or "cer"
    pa.field("normalizer", pa.string()),
    pa.field("ref_words", pa.int64()),  # reference units: words, or characters for CER languages
    pa.field("substitutions", pa.int64()),
    pa.field("deletions", pa.int64()),
    pa.field("insertions", pa.int64()),
    pa.field("wer", pa.float64()),  # the row's error rate in `metric` units
    # Long and multi-channel recordings (see pipeline/assemble.py); per-segment rows are in segments/.
    pa.field("segments", pa.int32()),  # segments transcribed for this recording (all channels)
    pa.field("channel_texts", pa.list_(pa.struct([
        ("channel", pa.string()), ("text", pa.string()), ("speaking_s", pa.float64()),
    ]))),  # audio.channels: split only
    pa.field("overlap_s", pa.float64()),  # split: time two or more channels speak at once
    pa.field("conversation", pa.list_(pa.struct([
        ("channel", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string()),
    ]))),  # split: every channel's segments ordered by start time
)
TRANSCRIPT_COLUMNS: tuple[str, ...] = tuple(f.name for f in TRANSCRIPT_FIELDS)
# Columns rows carry between stages but never output (stages.py); a manifest column of the same
# name is carried through renamed, like one that clashes with an output column.
INTERNAL_COLUMNS: tuple[str, ...] = (
    "samples", "keywords", "recording_key", "channel", "n_channels", "segment_index", "n_segments",
    "start_s", "end_s", "seam_overlap_s", "speech",
)


def transcript_schema(extra_fields: list[pa.Field] | tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The output schema: fixed columns, then the manifest's carried-through columns."""
    clash = [f.name for f in extra_fields if f.name in TRANSCRIPT_COLUMNS]
    if clash:
        raise ValueError(f"carried-through columns clash with output columns: {clash}")
    return pa.schema(list(TRANSCRIPT_FIELDS) + list(extra_fields))


# One row per transcribed segment: OUTPUT/segments/ (timestamps; the recording row holds the whole).
SEGMENT_TABLE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),  # the recording's id
    pa.field("channel", pa.string()),  # null when channels are mixed
    pa.field("segment_index", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("text", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("avg_logprob", pa.float64()),
)
SEGMENT_TABLE_SCHEMA = pa.schema(list(SEGMENT_TABLE_FIELDS))
