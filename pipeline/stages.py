"""The pipeline's stages: plain callables over Arrow batches, each declaring the columns it adds.

None of them knows Ray exists (plan.py wires them); each can be unit-tested on a pyarrow table.
Every stage keeps every row: a failure sets ``status`` / ``error`` and later stages pass the row on.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .audio import AudioError, load_audio
from .config import AudioConfig, EngineConfig, ScoringConfig, SegmentConfig, TaskConfig
from .engines import SAMPLE_RATE_HZ, EngineRequest, EngineResult, load_engine
from .manifest import PREPARED_FIELDS
from .records import INTERNAL_COLUMNS, Status, transcript_schema
from .scoring import score
from .segment import plan_segments, speech_regions

OK = Status.OK.value

DECODED_FIELDS = (
    pa.field("duration_s", pa.float64()),  # the whole recording's
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
    pa.field("samples", pa.large_binary()),  # this segment: float32 mono 16 kHz, raw bytes
)
# Where a row sits in its recording. Internal: carried to the driver, which puts recordings back
# together (assemble.py); not output columns.
SEGMENT_FIELDS = (
    pa.field("recording_key", pa.string()),  # unique per input row (ids may repeat in a manifest)
    pa.field("channel", pa.string()),  # null when channels are mixed
    pa.field("n_channels", pa.int32()),  # channel streams of the recording (1 when mixed)
    pa.field("segment_index", pa.int32()),
    pa.field("n_segments", pa.int32()),  # segments of this channel
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("seam_overlap_s", pa.float64()),  # audio shared with the previous segment (fixed windows)
    pa.field("speech", pa.list_(pa.list_(pa.float64()))),  # split mode, segment 0: VAD [start_s, end_s]s
)
SEGMENT_COLUMNS = tuple(f.name for f in SEGMENT_FIELDS)
assert set(SEGMENT_COLUMNS) <= set(INTERNAL_COLUMNS), "records.INTERNAL_COLUMNS must list every internal column"
INFERRED_FIELDS = (
    pa.field("text", pa.string()),
    pa.field("engine", pa.string()),
    pa.field("model", pa.string()),
    pa.field("avg_logprob", pa.float64()),
    pa.field("inference_s", pa.float64()),
    pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
    pa.field("prompt", pa.string()),
)


class DecodeStage:
    """Fetch + decode + resample (CPU tasks), then cut recordings longer than ``segment.max_s``
    into segments, one row each: segments, not recordings, are the unit of parallel inference.

    A generator: it emits ``segment.rows_per_batch`` rows at a time, so one long recording leaves
    this stage as a stream of small blocks and its decoded audio is held once, here, while it is
    being cut. Adds DECODED_FIELDS and SEGMENT_FIELDS.
    """

    def __init__(self, audio: AudioConfig, segment: SegmentConfig, storage_options: dict[str, Any],
                 extras: list[pa.Field]):
        self.audio = audio
        self.segment = segment
        self.storage_options = storage_options
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(DECODED_FIELDS) + list(SEGMENT_FIELDS) + list(extras))

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        out: list[dict] = []
        for row in batch.to_pylist():
            for piece in self._rows(row):
                out.append(piece)
                if len(out) >= self.segment.rows_per_batch:
                    yield pa.Table.from_pylist(out, schema=self.schema)
                    out = []
        if out:
            yield pa.Table.from_pylist(out, schema=self.schema)

    def _rows(self, row: dict) -> Iterator[dict]:
        row.update(recording_key=uuid.uuid4().hex, duration_s=None, source_sample_rate=None, source_channels=None,
                   samples=None, channel=None, n_channels=1, segment_index=0, n_segments=1, start_s=0.0, end_s=None,
                   seam_overlap_s=0.0, speech=None)
        if row["status"] != OK:
            yield row
            return
        split = self.audio.channels == "split"
        try:
            decoded = load_audio(
                row["audio"],
                self.storage_options,
                target_rate=self.audio.sample_rate,
                quality=self.audio.resample_quality,
                max_duration_s=self.audio.max_duration_s,
                split_channels=split,
            )
        except AudioError as e:
            row["status"], row["error"] = str(e.status), str(e)
            yield row
            return
        row.update(duration_s=decoded.duration_s, source_sample_rate=decoded.source_sample_rate,
                   source_channels=decoded.source_channels)
        streams = decoded.samples.T if split else decoded.samples[None, :]
        row["n_channels"] = len(streams)
        for c, strided in enumerate(streams):
            samples = np.ascontiguousarray(strided)  # one channel of an interleaved array: copy it once
            channel = self._channel_name(c) if split else None
            try:
                segments = plan_segments(samples, max_s=self.segment.max_s, min_s=self.segment.min_s,
                                         overlap_s=self.segment.overlap_s, vad=self.segment.vad)
                speech = ([[a / SAMPLE_RATE_HZ, b / SAMPLE_RATE_HZ] for a, b in speech_regions(samples)]
                          if split and self.segment.vad else None)
            except Exception as e:  # noqa: BLE001 - a VAD failure is this row's, not the job's
                yield {**row, "channel": channel, "status": Status.DECODE_ERROR.value,
                       "error": f"cannot segment the audio: {type(e).__name__}: {e}"}
                continue
            for seg in segments:
                yield {
                    **row,
                    "channel": channel,
                    "segment_index": seg.index,
                    "n_segments": len(segments),
                    "start_s": seg.start_s,
                    "end_s": seg.end_s,
                    "seam_overlap_s": seg.overlap_before / SAMPLE_RATE_HZ,
                    "speech": speech if seg.index == 0 else None,
                    "samples": np.ascontiguousarray(samples[seg.start:seg.end], dtype=np.float32).tobytes(),
                }

    def _channel_name(self, index: int) -> str:
        names = self.audio.channel_names
        return names[index] if index < len(names) else f"ch{index}"


class InferenceStage:
    """Runs the engine (one replica per actor). Replaces ``samples`` with INFERRED_FIELDS.

    A batch goes to the engine in ONE call, longest clip first: engines that pad a batch to its
    longest clip (Whisper's encoder, Granite's) or schedule in arrival order (vLLM) then work on
    clips of similar length together. Results are mapped back to their rows by position.
    """

    def __init__(self, engine: EngineConfig, extras: list[pa.Field], task: TaskConfig | None = None):
        self.engine = load_engine(engine, task)  # once per actor, never per batch
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(DECODED_FIELDS[:-1]) + list(SEGMENT_FIELDS)
                                + list(INFERRED_FIELDS) + list(extras))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = sorted((row for row in rows if row["status"] == OK), key=lambda r: -len(r["samples"]))
        requests = [
            EngineRequest(
                id=row["id"],
                samples=np.frombuffer(row["samples"], dtype=np.float32),
                language=row["language"],
                task=row["task"],
                target_language=row["target_language"],
                keywords=tuple(row["keywords"] or ()),
                segment=row["n_segments"] > 1,
            )
            for row in todo
        ]
        started = time.perf_counter()
        results = self._run(requests) if requests else []
        elapsed = time.perf_counter() - started
        finished_at = datetime.now(timezone.utc)
        if len(results) != len(requests):
            raise RuntimeError(f"engine returned {len(results)} results for {len(requests)} requests")
        total_s = sum(r.duration_s for r in requests) or 1.0
        for row, req, res in zip(todo, requests, results, strict=True):
            row["text"] = res.text
            row["avg_logprob"] = res.avg_logprob
            row["prompt"] = res.prompt
            row["inference_s"] = elapsed * req.duration_s / total_s
            row["finished_at"] = finished_at
            if res.status != OK:
                row["status"], row["error"] = res.status, res.error
            elif res.language and not row["language"]:
                row["language"] = res.language
        for row in rows:
            row.pop("samples", None)
            row["engine"], row["model"] = self.engine.name, self.engine.model
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _run(self, requests: list[EngineRequest]) -> list[EngineResult]:
        try:
            return self.engine.transcribe(requests)
        except (MemoryError, SystemExit, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - isolate the failing rows by retrying one by one
            return [self._one(req) for req in requests]

    def _one(self, request: EngineRequest) -> EngineResult:
        try:
            (result,) = self.engine.transcribe([request])
            return result
        except (MemoryError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            return EngineResult(None, Status.INFERENCE_ERROR.value, f"{type(e).__name__}: {e}")


class ScoreStage:
    """Scores whole recordings that have a reference; casts to the output schema plus
    SEGMENT_FIELDS. Segments of a longer recording are scored after stitching (assemble.py)."""

    def __init__(self, scoring: ScoringConfig, extras: list[pa.Field]):
        self.scoring = scoring
        self.schema = scored_schema(extras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row.pop("keywords", None)
            row.update(metric=None, normalizer=None, ref_words=None, substitutions=None, deletions=None, insertions=None,
                       wer=None, segments=1, channel_texts=None, overlap_s=None, conversation=None)
            if row["n_segments"] != 1 or row["channel"] is not None:
                continue
            score_row(row, self.scoring)
        return pa.Table.from_pylist(rows, schema=self.schema)


def scored_schema(extras: list[pa.Field]) -> pa.Schema:
    """What reaches the driver: the output schema plus SEGMENT_FIELDS."""
    return pa.schema(list(transcript_schema(extras)) + list(SEGMENT_FIELDS))


def score_row(row: dict, scoring: ScoringConfig) -> None:
    """Fill the score columns of an output row in place (rows without a reference are left null)."""
    if row["status"] != OK or not row["reference"] or row["task"] != "transcribe":
        return
    counts = score(row["reference"], row["text"], row["language"], scoring)
    row.update(
        metric=counts.metric,
        normalizer=counts.normalizer,
        ref_words=counts.ref_units,
        substitutions=counts.substitutions,
        deletions=counts.deletions,
        insertions=counts.insertions,
        wer=counts.rate,
    )


