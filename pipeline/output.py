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
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .claim import Claim
from .errors import CannotRun
from .records import SEGMENT_TABLE_SCHEMA, TRANSIENT, RowSet, Status, conform, id_hashes
from .storage import TEMP_PREFIX, join_uri, url_to_fs, write_atomic
from .summary import SUMMARY_NAME, JobTally


log = logging.getLogger("quarry")


class OutputExistsError(CannotRun, RuntimeError):
    """The output holds another job's results and overwrite was not asked for."""


JOB_MARKER = "_quarry_job.json"  # which job owns this output, and how many attempts it has had
INPUTS_NAME = "inputs.jsonl"  # the manifest a job wrote for itself (--audio discovery, call-center's join)


@dataclass(frozen=True)
class ResumeState:
    """What an output already holds when a job (re)starts."""

    attempt: int  # 1 for a fresh output, 2+ for a rerun that resumes
    committed_files: int
    committed: RowSet  # manifest positions of the rows already written (final answers only)
    healed_rows: int  # rows an earlier attempt ended with a transient status, given back to this one

    @property
    def committed_rows(self) -> int:
        return len(self.committed)


class SeenIds:
    """Ids already written by this job, as 8-byte hashes in a sorted array plus a small sorted
    buffer (merged when it grows past an eighth of the array): compact, and checked a batch at a
    time with vectorised searches, never a Python set."""

    def __init__(self, hashes: np.ndarray | None = None):
        self._main = np.unique(hashes) if hashes is not None else np.empty(0, np.uint64)
        self._buffer = np.empty(0, np.uint64)

    def __len__(self) -> int:
        return len(self._main) + len(self._buffer)

    def _contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for array in (self._main, self._buffer):
            if len(array):
                at = np.minimum(np.searchsorted(array, values), len(array) - 1)
                found |= array[at] == values
        return found

    def add_batch(self, hashes: np.ndarray) -> np.ndarray:
        """Add a batch's id hashes; returns which rows repeat an id seen before (earlier in this
        batch or in an earlier one)."""
        unique, first = np.unique(hashes, return_index=True)
        repeated = np.ones(len(hashes), dtype=bool)
        repeated[first] = False
        known = self._contains(unique)
        repeated |= known[np.searchsorted(unique, hashes)]
        self._buffer = np.union1d(self._buffer, unique[~known])
        if len(self._buffer) > max(4096, len(self._main) // 8):
            self._main, self._buffer = np.union1d(self._main, self._buffer), np.empty(0, np.uint64)
        return repeated


class TranscriptWriter:
    """Writes ``<output>/transcripts/part-AAA-NNNNN.parquet`` files from a stream of batches.

    Exactly once, resumably: a part appears only when complete (:func:`storage.write_atomic`), so
    the part is the unit of commit. A rerun of the same job (same manifest content and
    result-affecting config, recorded in ``_quarry_job.json``) reads the committed rows' positions
    column by column; the job skips them, and new parts carry the next attempt number, so nothing
    is written twice. Rows an earlier attempt ended with a transient status (:data:`TRANSIENT`) are
    first removed from their parts (each part rewritten whole, atomically), so the rerun redoes
    them and readers see one row per input row, the latest answer. Pending rows are committed every
    ``rows_per_file`` rows or ``flush_interval_s`` seconds, whichever comes first: a crash loses at
    most that much finished work.
    """

    def __init__(self, output_uri: str, schema: pa.Schema, storage_options: dict[str, Any], rows_per_file: int,
                 flush_interval_s: float = 60.0, claim: Claim | None = None):
        self.output_uri = output_uri
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self.claim = claim
        self.fs, self.root = url_to_fs(output_uri, storage_options)
        self.dir = self.root.rstrip("/") + "/transcripts"
        self.segments_dir = self.root.rstrip("/") + "/segments"
        self._pending_segments: list[pa.Table] = []
        self.marker = self.root.rstrip("/") + "/" + JOB_MARKER
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_flush = time.monotonic()
        self._seen = SeenIds()  # ids written by this job, to mark duplicate ids
        self.attempt = 1
        self.files: list[str] = []  # parts written by this attempt

    def prepare(self, overwrite: bool, job_key: dict[str, Any], n_rows: int) -> ResumeState:
        """Take over the output for the job described by ``job_key`` (the caller holds its claim);
        return what is already there. An output of the same job is resumed (its transient rows
        healed); an output of another job (or of an unknown one) is refused unless ``overwrite``,
        which deletes it first. ``n_rows``: the manifest's rows (positions are below it)."""
        summary = self.root.rstrip("/") + "/" + SUMMARY_NAME
        subtitles = self.root.rstrip("/") + "/subtitles"
        existing = [p for p in (self.dir, self.segments_dir, subtitles, summary, self.marker) if self.fs.exists(p)]
        previous = self._read_marker() if self.fs.exists(self.marker) else None
        if existing and overwrite:
            for path in existing:
                self.fs.rm(path, recursive=True)
            existing, previous = [], None
        elif existing and (previous is None or previous.get("job") != job_key):
            differs = _differences(previous.get("job", {}), job_key) if previous else []
            what = (f"another job's results (it differs in {'; '.join(differs)})" if previous
                    else f"results of unknown origin ({', '.join(existing)})")
            raise OutputExistsError(
                f"output {self.output_uri} holds {what}; a rerun resumes only the same manifest content with the "
                "same settings; pass --overwrite to replace it")
        if self.fs.exists(summary):  # an earlier attempt's: never to be mistaken for this one's
            self.fs.rm(summary)
        self.fs.makedirs(self.dir, exist_ok=True)
        self.fs.makedirs(self.segments_dir, exist_ok=True)
        parts = self.committed_parts()
        names = {p.rsplit("/", 1)[-1] for p in parts}
        for leftover in self.fs.glob(f"{self.dir}/{TEMP_PREFIX}*") + [  # interrupted writes, never committed
            p for p in self.fs.glob(f"{self.segments_dir}/*.parquet") if p.rsplit("/", 1)[-1] not in names
        ]:
            self.fs.rm(leftover)
        committed, originals, healed = RowSet(n_rows), [], 0
        for path in parts:
            healed += self._heal(path)
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["row_index", "id", "status"])
            committed.add(table["row_index"].to_numpy())
            original = pc.not_equal(table["status"], Status.DUPLICATE_ID.value)
            originals.append(id_hashes(table["id"].filter(original).to_pylist()))
        self._seen = SeenIds(np.concatenate(originals) if originals else None)
        self.attempt = (previous or {}).get("attempts", 0) + 1
        marker = json.dumps({"job": job_key, "attempts": self.attempt}, indent=2).encode()
        write_atomic(self.marker, marker, fs=self.fs)
        return ResumeState(self.attempt, len(self.committed_parts()), committed, healed)

    def _heal(self, path: str) -> int:
        """Take the rows with a transient status out of the committed part at ``path`` (and their
        segment rows out of its segments part), so that this attempt redoes them; returns how many."""
        with self.fs.open(path, "rb") as f:
            status = pq.read_table(f, columns=["status"])["status"]
        if not pc.any(pc.is_in(status, pa.array(sorted(TRANSIENT)))).as_py():
            return 0  # the common case: only the status column was read
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f)
        transient = pc.is_in(table["status"], pa.array(sorted(TRANSIENT)))
        n = pc.sum(transient).as_py() or 0
        keep = table.filter(pc.invert(transient))
        segments_path = f"{self.segments_dir}/{path.rsplit('/', 1)[-1]}"
        if self.fs.exists(segments_path):
            with self.fs.open(segments_path, "rb") as f:
                segments = pq.read_table(f)
            dropped = pc.is_in(segments["row_index"], table["row_index"].filter(transient))
            self._put(segments.filter(pc.invert(dropped)), segments_path)
        if keep.num_rows:
            self._put(keep, path)  # replaced whole: a reader sees the old part or the new one
        else:
            self.fs.rm(path)
            if self.fs.exists(segments_path):
                self.fs.rm(segments_path)
        log.info("%s: %d rows with a transient status given back to this attempt", path.rsplit("/", 1)[-1], n)
        return n

    def committed_parts(self) -> list[str]:
        return sorted(self.fs.glob(f"{self.dir}/part-*.parquet"))

    def _read_marker(self) -> dict[str, Any]:
        with self.fs.open(self.marker, "r") as f:
            return json.load(f)

    def write(self, batch: pa.Table, segments: pa.Table | None = None) -> pa.Table:
        """Queue recording rows (and their segment rows, committed in the same part) for writing;
        returns the rows as written (duplicate ids marked)."""
        batch = self._mark_duplicates(conform(batch, self.schema))
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        if segments is not None and segments.num_rows:
            self._pending_segments.append(conform(segments, SEGMENT_TABLE_SCHEMA))
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
        mask = self._seen.add_batch(id_hashes(batch.column("id").to_pylist()))
        if not mask.any():
            return batch
        mask = pa.array(mask)
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
        if self.claim is not None:
            self.claim.check()  # a driver that lost its claim commits nothing more
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


def _differences(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two job keys, as ``key: before -> now`` items."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out
