"""The pipeline's stages: plain callables over Arrow batches, each declaring the columns it adds.

None of them knows Ray exists (plan.py wires them); each can be unit-tested on a pyarrow table.
Every stage keeps every row: a failure sets ``status`` / ``error`` and later stages pass the row on.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from .audio import AudioError, load_audio
from .config import AudioConfig, EngineConfig, ScoringConfig, TaskConfig
from .engines import EngineRequest, EngineResult, load_engine
from .manifest import PREPARED_FIELDS
from .records import Status, transcript_schema
from .scoring import score

OK = Status.OK.value

DECODED_FIELDS = (
    pa.field("duration_s", pa.float64()),
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
    pa.field("samples", pa.large_binary()),  # float32 mono 16 kHz, raw bytes
)
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
    """Fetch + decode + downmix + resample (CPU tasks). Adds DECODED_FIELDS."""

    def __init__(self, audio: AudioConfig, storage_options: dict[str, Any], extras: list[pa.Field]):
        self.audio = audio
        self.storage_options = storage_options
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(DECODED_FIELDS) + list(extras))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row.update(duration_s=None, source_sample_rate=None, source_channels=None, samples=None)
            if row["status"] != OK:
                continue
            try:
                decoded = load_audio(
                    row["audio"],
                    self.storage_options,
                    target_rate=self.audio.sample_rate,
                    quality=self.audio.resample_quality,
                    max_duration_s=self.audio.max_duration_s,
                )
            except AudioError as e:
                row["status"], row["error"] = str(e.status), str(e)
                continue
            row["duration_s"] = decoded.duration_s
            row["source_sample_rate"] = decoded.source_sample_rate
            row["source_channels"] = decoded.source_channels
            row["samples"] = decoded.samples.astype(np.float32, copy=False).tobytes()
        return pa.Table.from_pylist(rows, schema=self.schema)


class InferenceStage:
    """Runs the engine (one replica per actor). Replaces ``samples`` with INFERRED_FIELDS.

    A batch goes to the engine in ONE call, longest clip first: engines that pad a batch to its
    longest clip (Whisper's encoder, Granite's) or schedule in arrival order (vLLM) then work on
    clips of similar length together. Results are mapped back to their rows by position.
    """

    def __init__(self, engine: EngineConfig, extras: list[pa.Field], task: TaskConfig | None = None):
        self.engine = load_engine(engine, task)  # once per actor, never per batch
        self.schema = pa.schema(list(PREPARED_FIELDS) + list(DECODED_FIELDS[:-1]) + list(INFERRED_FIELDS) + list(extras))

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
    """Scores rows that have a reference; casts to the output schema (records.transcript_schema)."""

    def __init__(self, scoring: ScoringConfig, extras: list[pa.Field]):
        self.scoring = scoring
        self.schema = transcript_schema(extras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row.pop("keywords", None)
            row.update(metric=None, normalizer=None, ref_words=None, substitutions=None, deletions=None, insertions=None, wer=None)
            if row["status"] != OK or not row["reference"] or row["task"] != "transcribe":
                continue
            counts = score(row["reference"], row["text"], row["language"], self.scoring)
            row.update(
                metric=counts.metric,
                normalizer=counts.normalizer,
                ref_words=counts.ref_units,
                substitutions=counts.substitutions,
                deletions=counts.deletions,
                insertions=counts.insertions,
                wer=counts.rate,
            )
        return pa.Table.from_pylist(rows, schema=self.schema)


