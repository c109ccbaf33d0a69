"""Output: Parquet transcripts and segments with the one explicit schema, committed part by part.

The driver is the sink: it receives already-transcribed batches (text only, no audio), writes them
in parts of at most ``rows_per_file`` rows, and keeps running totals. It holds one part's rows
at a time, never the job (plus an 8-byte hash per id, to mark duplicate ids). Each part is
written under a temporary name and then moved into place, so a reader never sees half a file,
and a rerun resumes from the committed parts (see :class:`TranscriptWriter`).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import CannotRun
from .records import SEGMENT_TABLE_SCHEMA, Status, id_hashes
from .storage import TEMP_PREFIX, join_uri, url_to_fs, write_atomic
from .summary import SUMMARY_NAME, JobTally


class OutputExistsError(CannotRun, RuntimeError):
    """The output holds another job's results and overwrite was not asked for."""


JOB_MARKER = "_quarry_job.json"  # which job owns this output, and how many attempts it has had
INPUTS_NAME = "inputs.jsonl"  # the manifest a job wrote for itself (--audio discovery, call-center's join)


@dataclass(frozen=True)
class ResumeState:
    """What an output already holds when a job (re)starts."""

    attempt: int  # 1 for a fresh output, 2+ for a rerun that resumes
    committed_files: int
    committed_rows: int
    committed_ids: np.ndarray  # sorted uint64 hashes of the ids already written


class TranscriptWriter:
    """Writes ``<output>/transcripts/part-AAA-NNNNN.parquet`` files from a stream of batches.

    Exactly once, resumably: each part is written under a temporary name and moved into place, so
    a part that exists is complete (the part is the unit of commit). A rerun of the same job (same
    manifest and result-affecting config, recorded in ``_quarry_job.json``) finds the committed
    ids, the job skips them, and new parts carry the next attempt number, so nothing is written
    twice. Pending rows are committed every ``rows_per_file`` rows or ``flush_interval_s``
    seconds, whichever comes first: a crash loses at most that much finished work.
    """

    def __init__(self, output_uri: str, schema: pa.Schema, storage_options: dict[str, Any], rows_per_file: int,
                 flush_interval_s: float = 60.0):
        self.output_uri = output_uri
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self.fs, self.root = url_to_fs(output_uri, storage_options)
        self.dir = self.root.rstrip("/") + "/transcripts"
        self.segments_dir = self.root.rstrip("/") + "/segments"
        self._pending_segments: list[pa.Table] = []
        self.marker = self.root.rstrip("/") + "/" + JOB_MARKER
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self._seen = set()  # id hashes written by this attempt, to mark duplicate ids
        self.attempt = 1
        self.files: list[str] = []  # parts written by this attempt

    def prepare(self, overwrite: bool, job_key: dict[str, Any] | None = None) -> ResumeState:
        """Claim the output for the job described by ``job_key``; return what is already there.

        An output of the same job is resumed; an output of another job (or of an unknown one) is
        refused unless ``overwrite``, which deletes it first.
        """
        summary = self.root.rstrip("/") + "/" + SUMMARY_NAME
        subtitles = self.root.rstrip("/") + "/subtitles"
        existing = [p for p in (self.dir, self.segments_dir, subtitles, summary, self.marker) if self.fs.exists(p)]
        job_key = job_key or {}
        previous = self._read_marker() if self.fs.exists(self.marker) else None
        if existing and overwrite:
            for path in existing:
                self.fs.rm(path, recursive=True)
            existing, previous = [], None
        elif existing and (previous is None or previous.get("job") != job_key):
            what = "another job's" if previous else "results of unknown origin"
            raise OutputExistsError(
                f"output {self.output_uri} holds {what} ({', '.join(existing)}); a rerun resumes only the same "
                "manifest with the same engine, task and scoring settings; pass --overwrite to replace it"
            )
        self.fs.makedirs(self.dir, exist_ok=True)
        self.fs.makedirs(self.segments_dir, exist_ok=True)
        parts = self.committed_parts()
        committed = {p.rsplit("/", 1)[-1] for p in parts}
        for leftover in self.fs.glob(f"{self.dir}/{TEMP_PREFIX}*") + [  # interrupted writes, never committed
            p for p in self.fs.glob(f"{self.segments_dir}/*.parquet") if p.rsplit("/", 1)[-1] not in committed
        ]:
            self.fs.rm(leftover)
        ids = self._read_ids(parts)
        self.attempt = (previous or {}).get("attempts", 0) + 1
        marker = json.dumps({"job": job_key, "attempts": self.attempt}, indent=2).encode()
        write_atomic(self.marker, marker, fs=self.fs)
        return ResumeState(self.attempt, len(parts), len(ids), np.unique(id_hashes(ids)))

    def committed_parts(self) -> list[str]:
        return sorted(self.fs.glob(f"{self.dir}/part-*.parquet"))

    def _read_marker(self) -> dict[str, Any]:
        with self.fs.open(self.marker, "r") as f:
            return json.load(f)

    def _read_ids(self, parts: list[str]) -> list[str]:
        ids: list[str] = []
        for path in parts:
            with self.fs.open(path, "rb") as f:
                ids.extend(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        return ids

    def write(self, batch: pa.Table, segments: pa.Table | None = None) -> pa.Table:
        """Queue recording rows (and their segment rows, committed in the same part) for writing;
        returns the rows as written (duplicate ids marked)."""
        batch = self._mark_duplicates(batch.cast(self.schema))
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if segments is not None and segments.num_rows:
            self._pending_segments.append(segments.cast(SEGMENT_TABLE_SCHEMA))
        if self._pending_rows >= self.rows_per_file or (
                self._pending_rows and time.monotonic() - self._last_flush > self.flush_interval_s):
            self._flush_pending()
        return batch

    def _flush_pending(self) -> None:
        # One part may exceed rows_per_file by less than a batch: a part is a recording-complete unit.
        self._flush(pa.concat_tables(self._pending) if self._pending else self.schema.empty_table())
        self._pending, self._pending_rows = [], 0

    def _mark_duplicates(self, batch: pa.Table) -> pa.Table:
        """A row whose id an earlier row of this job already used keeps its place, with status
        ``duplicate_id``: every input row still comes out once, and ids stay a usable key."""
        hashes = id_hashes(batch.column("id").to_pylist())
        dup = []
        for h in hashes.tolist():
            dup.append(h in self._seen)
            self._seen.add(h)
        if not any(dup):
            return batch
        mask = pa.array(dup)
        ids = batch.column("id")
        status = pc.if_else(mask, pa.scalar(Status.DUPLICATE_ID.value), batch.column("status"))
        error = pc.if_else(mask, pc.binary_join_element_wise(
            "id ", ids, " already appeared earlier in the manifest; only its first row is transcribed", ""),
            batch.column("error"))
        batch = batch.set_column(batch.schema.get_field_index("status"), "status", status)
        return batch.set_column(batch.schema.get_field_index("error"), "error", error).cast(self.schema)

    def close(self) -> None:
        if self._pending_rows or self._pending_segments or not (self.files or self.committed_parts()):
            self._flush_pending()  # an empty job still gets one (empty) file

    def _flush(self, table: pa.Table) -> None:
        """Segments first, then the transcripts part under the same name: the transcripts part is
        the commit, and a segments part without one is an interrupted write (removed on resume)."""
        name = f"part-{self.attempt:03d}-{len(self.files):05d}.parquet"
        segments = (pa.concat_tables(self._pending_segments) if self._pending_segments
                    else SEGMENT_TABLE_SCHEMA.empty_table())
        self._pending_segments = []
        self._put(segments, f"{self.segments_dir}/{name}")
        self._put(table, f"{self.dir}/{name}")
        self.files.append(join_uri(self.output_uri, "transcripts", name))
        self._last_flush = time.monotonic()

    def _put(self, table: pa.Table, path: str) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        write_atomic(path, buffer.getvalue(), fs=self.fs)


def tally_output(writer: TranscriptWriter) -> JobTally:
    """Totals over every committed part (all attempts): the summary's source of truth."""
    tally = JobTally()
    for path in writer.committed_parts():
        with writer.fs.open(path, "rb") as f:
            tally.add(pq.read_table(f, columns=list(JobTally.COLUMNS)))
    return tally
