"""The pipeline's stages: plain callables over Arrow batches, each declaring the column groups
(``records.py``) it reads and the groups it adds.

None of them knows Ray exists (plan.py wires them); each can be unit-tested on a pyarrow table.
Every stage keeps every row: a failure sets ``status`` / ``error`` and later stages pass the row on.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, ClassVar, Iterator

import numpy as np
import pyarrow as pa

from .audio import AudioError, load_audio
from .config import AudioConfig, EngineConfig, ScoringConfig, SegmentConfig, TaskConfig
from .engines import EngineRequest, EngineResult, is_engine_dead, load_engine
from .records import (DECODED, ENGINE, KEYWORDS, OK, OUTPUT, PREPARED, RECORDING, SAMPLE_RATE_HZ, SAMPLES, SCORE,
                      SEGMENT, TEXT, ColumnGroup, Status, null_row, schema_of)
from .redact import redact_text, redact_uri
from .scoring import score_row
from .segment import plan_segments, speech_regions

log = logging.getLogger("quarry")

# The groups a row holds after each stage.
DECODED_ROW = PREPARED + (DECODED, SEGMENT, SAMPLES)
INFERRED_ROW = PREPARED + (DECODED, SEGMENT, TEXT, ENGINE)
SCORED_ROW = OUTPUT + (SEGMENT,)  # what reaches the driver: the output columns, and where the row sits


def scored_schema(extras: list[pa.Field] | tuple[pa.Field, ...]) -> pa.Schema:
    """What reaches the driver (assemble.py): the output schema plus ``records.SEGMENT``."""
    return schema_of(SCORED_ROW, extras)


class DecodeStage:
    """Fetch + decode + resample (CPU tasks), then cut recordings longer than ``segment.max_s``
    into segments, one row each: segments, not recordings, are the unit of parallel inference.

    A generator: it emits ``segment.rows_per_batch`` rows at a time, so one long recording leaves
    this stage as a stream of small blocks and its decoded audio is held once, here, while it is
    being cut.
    """

    reads: ClassVar[tuple[ColumnGroup, ...]] = PREPARED
    adds: ClassVar[tuple[ColumnGroup, ...]] = (DECODED, SEGMENT, SAMPLES)

    def __init__(self, audio: AudioConfig, segment: SegmentConfig, storage_options: dict[str, Any],
                 extras: list[pa.Field] | tuple[pa.Field, ...]):
        self.audio = audio
        self.segment = segment
        self.storage_options = storage_options
        self.schema = schema_of(DECODED_ROW, extras)

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
        row.update(null_row(*self.adds))
        row.update(n_channels=1, segment_index=0, n_segments=1, start_s=0.0, seam_overlap_s=0.0)
        uri, row["audio"] = row["audio"], redact_uri(row["audio"])  # read with it, never output it
        if row["status"] != OK:
            yield row
            return
        split = self.audio.channels == "split"
        try:
            decoded = load_audio(
                uri,
                self.storage_options,
                max_bytes=self.audio.max_bytes,
                timeout_s=self.audio.read_timeout_s,
                target_rate=SAMPLE_RATE_HZ,
                quality=self.audio.resample_quality,
                max_duration_s=self.audio.max_duration_s,
                split_channels=split,
                budget_bytes=self.audio.decode_budget_mb * 2**20,
            )
        except AudioError as e:
            row["status"], row["error"] = str(e.status), redact_text(str(e))
            yield row
            return
        except Exception as e:  # noqa: BLE001 - whatever else went wrong with this recording is its own
            row["status"], row["error"] = Status.DECODE_ERROR.value, redact_text(f"{row['audio']}: {type(e).__name__}: {e}")
            yield row
            return
        row.update(duration_s=decoded.duration_s, source_sample_rate=decoded.source_sample_rate,
                   source_channels=decoded.source_channels)
        streams = decoded.samples.T if split else decoded.samples[None, :]
        del decoded
        row["n_channels"] = len(streams)
        for c, strided in enumerate(streams):
            channel = self._channel_name(c) if split else None
            try:
                samples = np.ascontiguousarray(strided)  # one channel of an interleaved array: copy it once
                segments = plan_segments(samples, max_s=self.segment.max_s, min_s=self.segment.min_s,
                                         overlap_s=self.segment.overlap_s, vad=self.segment.vad)
                speech = ([[a / SAMPLE_RATE_HZ, b / SAMPLE_RATE_HZ] for a, b in speech_regions(samples)]
                          if split and self.segment.vad else None)
            except Exception as e:  # noqa: BLE001 - a VAD failure (or MemoryError) is this row's, not the job's
                yield {**row, "channel": channel, "status": Status.DECODE_ERROR.value,
                       "error": redact_text(f"cannot segment the audio: {type(e).__name__}: {e}")}
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
    """Runs the engine (one replica per actor). Reads ``samples`` (and drops them), adds the
    transcript and who made it.

    A batch goes to the engine in ONE call, longest clip first: engines that pad a batch to its
    longest clip (Whisper's encoder, Granite's) or schedule in arrival order (vLLM) then work on
    clips of similar length together. Results are mapped back to their rows by position.
    """

    reads: ClassVar[tuple[ColumnGroup, ...]] = DECODED_ROW
    adds: ClassVar[tuple[ColumnGroup, ...]] = (TEXT, ENGINE)

    def __init__(self, engine: EngineConfig, extras: list[pa.Field] | tuple[pa.Field, ...],
                 task: TaskConfig | None = None):
        self.engine = load_engine(engine, task)  # once per actor, never per batch
        self.schema = schema_of(INFERRED_ROW, extras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row.update(null_row(*self.adds))
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
        except Exception as e:  # noqa: BLE001 - isolate the failing rows by retrying one by one
            self._die_if_dead(e)
            return [self._one(req) for req in requests]

    def _one(self, request: EngineRequest) -> EngineResult:
        try:
            (result,) = self.engine.transcribe([request])
            return result
        except (MemoryError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001
            self._die_if_dead(e)
            return EngineResult(None, Status.INFERENCE_ERROR.value, f"{type(e).__name__}: {e}")

    @staticmethod
    def _die_if_dead(error: Exception) -> None:
        """An engine that died would turn every later row on this replica into inference_error:
        end the actor's process instead, so that Ray restarts it (``engine.max_restarts``) and
        retries its batch on a fresh replica."""
        if is_engine_dead(error):
            log.error("engine died (%s: %s); ending this replica so that Ray replaces it",
                      type(error).__name__, error)
            logging.shutdown()
            os._exit(70)


class ScoreStage:
    """Scores recordings that are whole in one row (most clips) against their reference, and
    shapes rows to :func:`scored_schema`. A recording cut into segments is scored once it is put
    back together (assemble.py); both go through :func:`pipeline.scoring.score_row`."""

    reads: ClassVar[tuple[ColumnGroup, ...]] = INFERRED_ROW
    adds: ClassVar[tuple[ColumnGroup, ...]] = (SCORE, RECORDING)

    def __init__(self, scoring: ScoringConfig, extras: list[pa.Field] | tuple[pa.Field, ...]):
        self.scoring = scoring
        self.schema = scored_schema(extras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            for name in KEYWORDS.names:
                row.pop(name, None)
            row.update(null_row(*self.adds), segments=1)
            if row["n_segments"] == 1 and row["channel"] is None:
                score_row(row, self.scoring)
        return pa.Table.from_pylist(rows, schema=self.schema)
