"""The pipeline's stages: plain callables over Arrow batches, each declaring the column groups
(``records.py``) it reads and the groups it adds.

None of them knows Ray exists (plan.py wires them); each can be unit-tested on a pyarrow table.
Every stage keeps every row: a failure sets ``status`` / ``error`` and later stages pass the row on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import pyarrow as pa

from .audio import AudioError, downmix, load_audio
from .config import AudioConfig, DiarizeConfig, EngineConfig, RedactConfig, ScoringConfig, SegmentConfig, TaskConfig
from .diarize.turns import as_regions, clip, main_speaker, speaker_columns
from .engines import EngineRequest, EngineResult, is_engine_dead, load_engine
from .errors import CannotRun
from .meter import BusyClock, EngineFigures
from .records import (DECODED, ENGINE, KEYWORDS, LANGID, OK, OUTPUT, PREPARED, RECORDING, REDACTED, SAMPLE_RATE_HZ,
                      SAMPLES, SCORE, SEGMENT, SPEAKERS, TEXT, WORDS, ColumnGroup, Status, null_row, schema_of)
from .scrub import redact_text, redact_uri
from .scoring import score_row
from .segment import plan_segments, speech_regions

log = logging.getLogger("quarry")

# The groups a row holds after each stage.
DECODED_ROW = PREPARED + (DECODED, SEGMENT, LANGID, SAMPLES)
INFERRED_ROW = PREPARED + (DECODED, SEGMENT, LANGID, TEXT, ENGINE, WORDS)
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

    The analyses of the whole recording run here too, before it is cut (the only place it is whole):
    language ID of rows without a language (``task.detect_language``: pipeline/langid.py) and
    speaker diarization of mono recordings (``diarize``: pipeline/diarize/); each segment then
    carries its language, its speaker regions and its main speaker. Their models load once per
    worker process.
    """

    reads: ClassVar[tuple[ColumnGroup, ...]] = PREPARED
    adds: ClassVar[tuple[ColumnGroup, ...]] = (DECODED, SEGMENT, LANGID, SAMPLES)

    def __init__(self, audio: AudioConfig, segment: SegmentConfig, storage_options: dict[str, Any],
                 extras: list[pa.Field] | tuple[pa.Field, ...], *, task: TaskConfig | None = None,
                 diarize: DiarizeConfig | None = None):
        self.audio = audio
        self.segment = segment
        self.storage_options = storage_options
        self.task = task or TaskConfig()
        self.diarize = diarize or DiarizeConfig()
        self.schema = schema_of(DECODED_ROW, extras)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        out: list[dict] = []
        for row in batch.to_pylist():
            for piece in self._rows(row):
                out.append(piece)
                if len(out) >= self.segment.rows_per_batch:
                    yield self._table(out)
                    out = []
        if out:
            yield self._table(out)

    def _table(self, rows: list[dict]) -> pa.Table:
        """The rows as a table; their ``samples`` (float32 arrays, or None) are copied once, straight
        into the column's buffer (no ``bytes`` per row)."""
        pieces = [row.pop("samples") for row in rows]
        name = SAMPLES.names[0]
        at = self.schema.get_field_index(name)
        table = pa.Table.from_pylist(rows, schema=self.schema.remove(at))
        return table.add_column(at, self.schema.field(at), samples_column(pieces))

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
        try:
            regions = self._analyse(row, downmix(decoded.samples) if split else decoded.samples)
        except CannotRun:
            raise  # a model that cannot load fails the job, as an engine that cannot does
        except Exception as e:  # noqa: BLE001 - a failure on this recording is this row's (one row, as a decode failure)
            row["status"], row["error"] = Status.DECODE_ERROR.value, f"cannot analyse the audio: {type(e).__name__}: {e}"
            yield row
            return
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
                own = clip(regions, seg.start_s, seg.end_s) if regions is not None else None
                yield {
                    **row,
                    "channel": channel,
                    "segment_index": seg.index,
                    "n_segments": len(segments),
                    "start_s": seg.start_s,
                    "end_s": seg.end_s,
                    "seam_overlap_s": seg.overlap_before / SAMPLE_RATE_HZ,
                    "speech": speech if seg.index == 0 else None,
                    "segment_speaker": main_speaker(as_regions(own)) if own is not None else None,
                    "speaker_regions": own,
                    "samples": samples[seg.start:seg.end],  # a view: copied once, into the column
                }

    def _analyse(self, row: dict, samples: np.ndarray):
        """Language ID and diarization of the whole recording; the speaker regions (or None)."""
        want_language = self.task.detect_language and not row["language"]
        if not (want_language or self.diarize.enabled):
            return None
        from .speech import whole_recording_speech

        clean, speech = whole_recording_speech(samples)
        if want_language:
            from .langid import detect_language

            row["language"], row["language_probability"] = detect_language(
                clean, speech, self.task.language_id_model, self.task.language_id_s)
        if not self.diarize.enabled:
            return None
        from .diarize import load_diarizer

        return load_diarizer(self.diarize).diarize(clean, speech)

    def _channel_name(self, index: int) -> str:
        names = self.audio.channel_names
        return names[index] if index < len(names) else f"ch{index}"


def sample_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each row's float32 samples (``records.SAMPLES``) as a read-only view into the Arrow buffer
    that holds them (an empty array for a null)."""
    out: list[np.ndarray] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        if data is None:
            out.extend(np.zeros(0, np.float32) for _ in range(len(chunk)))
            continue
        bounds = np.frombuffer(offsets, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        raw = np.frombuffer(data, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            view = raw[bounds[i]:bounds[i + 1]] if valid[i] else raw[:0]
            # a value starting off a 4-byte boundary (a sliced buffer) is copied; all others are views
            out.append(view.view(np.float32) if view.ctypes.data % 4 == 0 else np.frombuffer(view.tobytes(), np.float32))
    return out


def samples_column(pieces: list[np.ndarray | None]) -> pa.Array:
    """``records.SAMPLES``'s column (float32 bytes per row, null where None) from float32 arrays,
    built in one copy: the arrays are concatenated into the column's data buffer."""
    kept = [np.ascontiguousarray(p, dtype=np.float32) for p in pieces if p is not None]
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([0 if p is None else p.size * 4 for p in pieces], out=offsets[1:])
    data = np.concatenate(kept).view(np.uint8) if kept else np.zeros(0, np.uint8)
    nulls = len(pieces) - len(kept)
    valid = pa.array([p is not None for p in pieces], pa.bool_()).buffers()[1] if nulls else None
    return pa.LargeBinaryArray.from_buffers(SAMPLES.fields[0].type, len(pieces),
                                            [valid, pa.py_buffer(offsets), pa.py_buffer(data)], nulls)


class InferenceStage:
    """Runs the engine (one replica per actor). Reads ``samples`` (and drops them), adds the
    transcript and who made it, then scores the rows (:class:`ScoreStage`, in this actor, on the
    rows it has just built): a stage of its own would cost the driver a task and a block to
    schedule per batch, nearly a third of its CPU per row, for work this light.

    Takes a whole block (Ray Data's ``batch_size=None``; a large job's blocks hold many engine
    batches) and returns it as one table: a block returned in many small pieces would reach the
    driver as a table of as many chunks, which Ray deserialises chunk by chunk (docs/design.md).
    The block's rows are sorted longest clip first and cut into batches of ``engine.batch_size``:
    engines that pad a batch to its longest clip (Whisper's encoder, Granite's) then work on clips
    of similar length together. A batch goes to the engine in ONE call; results are mapped back to
    their rows by position.

    Asynchronous, so that the model never waits for the pipeline: Ray Data hands an actor several
    blocks at once, and up to ``engine.batches_in_flight`` batches (of all of them together)
    are with the engine while the rest wait converted. An engine that schedules requests
    continuously (vLLM: ``transcribe_async``) gets each batch's requests as soon as it is let in,
    so they join its running batch across batch boundaries; any other engine runs one batch at a
    time on a model thread, the next already queued behind it.

    ``report``: called with this replica's :class:`~pipeline.meter.EngineFigures` at most every
    ``REPORT_S`` seconds and whenever it runs dry (plan.py carries them to the driver).
    """

    reads: ClassVar[tuple[ColumnGroup, ...]] = DECODED_ROW
    adds: ClassVar[tuple[ColumnGroup, ...]] = (TEXT, ENGINE, WORDS)
    REPORT_S = 2.0

    def __init__(self, engine: EngineConfig, extras: list[pa.Field] | tuple[pa.Field, ...],
                 task: TaskConfig | None = None, words: bool = False,
                 report: Callable[[EngineFigures], None] | None = None, scoring: ScoringConfig | None = None):
        began = time.time()
        self.engine = load_engine(engine, task)  # once per actor, never per batch
        # One call on a second of silence: first-call costs (allocations, kernel selection) are
        # start-up, paid before the first batch arrives.
        self.engine.transcribe([EngineRequest(id="warm-up", samples=np.zeros(SAMPLE_RATE_HZ, np.float32))])
        self.words = words  # ask the engine for word timestamps (output.words, or diarize)
        self.batch_size = engine.batch_size
        self._slots = asyncio.Semaphore(engine.batches_in_flight)  # engine calls in flight, all blocks together
        self.score = ScoreStage(scoring or ScoringConfig(), extras)
        self.clock = BusyClock(began, time.time())
        self._report = report
        self._reported_at = 0.0
        if report:
            report(self.clock.figures())  # its start-up, for the driver's start-up line
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="quarry-engine")

    async def __call__(self, block: pa.Table) -> pa.Table:
        audio = sample_views(block.column(SAMPLES.names[0]))  # views of the Arrow buffer: no copy of the audio
        rows = block.drop_columns(list(SAMPLES.names)).to_pylist()
        for row, samples in zip(rows, audio, strict=True):
            row.update(null_row(*self.adds), samples=samples)
        todo = sorted((row for row in rows if row["status"] == OK), key=lambda r: -len(r["samples"]))
        size = self.batch_size
        await asyncio.gather(*(self._batch(todo[i:i + size]) for i in range(0, len(todo), size)))
        for row in rows:
            row.pop("samples", None)
            row["engine"], row["model"] = self.engine.name, self.engine.model
        self.score(rows)
        return pa.Table.from_pylist(rows, schema=self.score.schema)

    async def _batch(self, todo: list[dict[str, Any]]) -> None:
        """One engine call over ``todo`` (rows, longest first), once one of the replica's
        ``batches_in_flight`` slots is free; fills the rows in place."""
        requests = [
            EngineRequest(
                id=row["id"],
                samples=row["samples"],
                language=row["language"],
                task=row["task"],
                target_language=row["target_language"],
                keywords=tuple(row["keywords"] or ()),
                segment=row["n_segments"] > 1,
                words=self.words,
            )
            for row in todo
        ]
        async with self._slots:
            started = time.perf_counter()
            results = await self._metered(requests)
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
            if res.words is not None and res.status == OK:  # to recording time
                at = row["start_s"] or 0.0
                row["words"] = [{"word": w.word, "start_s": round(at + w.start_s, 3), "end_s": round(at + w.end_s, 3),
                                 "probability": w.probability, "speaker": None} for w in res.words]

    async def _metered(self, requests: list[EngineRequest]) -> list[EngineResult]:
        self.clock.start(len(requests))
        try:
            return await self._run(requests)
        finally:
            self.clock.stop()
            now = time.monotonic()
            if self._report and (self.clock.in_flight == 0 or now - self._reported_at >= self.REPORT_S):
                self._reported_at = now
                self._report(self.clock.figures())

    async def _call(self, requests: list[EngineRequest]) -> list[EngineResult]:
        concurrent = getattr(self.engine, "transcribe_async", None)
        if concurrent is not None:
            return await concurrent(requests)
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self.engine.transcribe, requests)

    async def _run(self, requests: list[EngineRequest]) -> list[EngineResult]:
        try:
            return await self._call(requests)
        except (MemoryError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - isolate the failing rows by retrying one by one
            self._die_if_dead(e)
            return [await self._one(req) for req in requests]

    async def _one(self, request: EngineRequest) -> EngineResult:
        try:
            (result,) = await self._call([request])
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
        retries its batches on a fresh replica."""
        if is_engine_dead(error):
            log.error("engine died (%s: %s); ending this replica so that Ray replaces it",
                      type(error).__name__, error)
            logging.shutdown()
            os._exit(70)


class ScoreStage:
    """Scores recordings that are whole in one row (most clips) against their reference, and
    shapes rows to :func:`scored_schema`. A recording cut into segments is scored once it is put
    back together (assemble.py); both go through :func:`pipeline.scoring.score_row`.

    Diarized rows (``speaker_regions`` set) get their words' speakers here, and a whole recording
    its ``speakers`` and ``speaker_turns`` (a stitched one gets them on the driver).

    Works on row dicts in place: :class:`InferenceStage` calls it on the rows it is about to
    return, so the rows are converted to Arrow once.
    """

    reads: ClassVar[tuple[ColumnGroup, ...]] = INFERRED_ROW
    adds: ClassVar[tuple[ColumnGroup, ...]] = (SCORE, RECORDING, SPEAKERS, REDACTED)

    def __init__(self, scoring: ScoringConfig, extras: list[pa.Field] | tuple[pa.Field, ...]):
        self.scoring = scoring
        self.schema = scored_schema(extras)

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        """Score and shape ``rows`` (dicts of :data:`INFERRED_ROW`) in place."""
        for row in rows:
            for name in KEYWORDS.names:
                row.pop(name, None)
            row.update(null_row(*self.adds), segments=1)
            whole = row["n_segments"] == 1 and row["channel"] is None
            if whole:
                score_row(row, self.scoring)
            if row["speaker_regions"] is not None:
                speakers, turns, row["words"] = speaker_columns(as_regions(row["speaker_regions"]), row["words"])
                if whole and row["status"] == OK:
                    row["speakers"], row["speaker_turns"] = speakers, turns


class RedactStage:
    """PII redaction of recordings that are whole in one row (CPU tasks; pipeline/redact/): fills
    ``records.REDACTED`` and, with ``redact.drop_text``, leaves the raw text out. Stitched
    recordings are redacted once put back together, on the driver (assemble.py), as redacting a
    segment alone would miss a card number read across a cut."""

    reads: ClassVar[tuple[ColumnGroup, ...]] = SCORED_ROW
    fills: ClassVar[tuple[ColumnGroup, ...]] = (REDACTED,)

    def __init__(self, redact: RedactConfig, extras: list[pa.Field] | tuple[pa.Field, ...]):
        self.redact = redact
        self.schema = scored_schema(extras)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .redact import load_redactor, redact_row

        redactor = load_redactor(self.redact)  # once per worker process
        rows = batch.to_pylist()
        for row in rows:
            if row["n_segments"] == 1 and row["channel"] is None:
                redact_row(row, redactor, self.redact)
        return pa.Table.from_pylist(rows, schema=self.schema)
