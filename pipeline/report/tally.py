"""The report's data side: one streamed pass over the transcripts (:class:`ReportTally`).

Only the columns the page needs are read, one record batch at a time, never audio; the tally
holds running totals and the ``worst`` highest-error rows, never the job. Error rates are corpus
rates from summed counts, (S + D + I) / N, never a mean of row rates.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CannotRun
from ..records import OK
from ..scoring import COUNT_COLUMNS, CorpusTally, add_scores

TIME_COLUMN = "finished_at"  # per-row completion time; throughput over time needs it
COLUMNS = ("id", "status", "error", "text", "reference", "language", "duration_s", "inference_s",
           "metric", "normalizer", "wer", *COUNT_COLUMNS)  # what the page reads of each row
DURATION_RES = 2  # duration histogram kept at 1/2 s resolution while streaming
_DURATION_CAP_S = 86_400  # longer rows land in the last bin
MAX_GROUPS = 10_000  # distinct values tallied per grouping column; the rest count as "(other)"
_MAX_MESSAGES = 200  # distinct error messages kept per reason; the rest count as "(other messages)"


class ReportError(CannotRun, RuntimeError):
    """The output cannot be reported on (no transcripts, unknown or unusable grouping column)."""


# ----------------------------------------------------------------------------------------------
# The streamed pass


@dataclass(order=True)
class _Ranked:
    rate: float
    errors: int
    seq: int  # minus the order seen: on ties the row seen first ranks higher
    row: dict = field(compare=False)


@dataclass
class ReportTally:
    """Running totals over transcript batches; holds no row but the ``worst`` highest-error ones."""

    group_by: tuple[str, ...] = ()
    worst: int = 20
    has_time: bool = False
    n_rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    messages: dict[str, Counter] = field(default_factory=dict)  # reason -> message -> rows
    audio_s_ok: float = 0.0
    inference_s: float = 0.0
    scores: dict[tuple[str, str], CorpusTally] = field(default_factory=dict)  # (language, metric)
    group_scores: dict[str, dict[tuple[str, str], CorpusTally]] = field(default_factory=dict)
    group_overflow: Counter = field(default_factory=Counter)  # column -> rows tallied as "(other)"
    durations_ok: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    durations_failed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    finished: dict[int, list] = field(default_factory=dict)  # epoch second -> [rows, audio_s]
    _heap: list[_Ranked] = field(default_factory=list)
    _seq: int = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch])
        self.n_rows += table.num_rows
        status = table["status"]
        ok = pc.equal(status, OK)
        self.by_status.update(dict(zip(*_value_counts(status), strict=True)))
        self._add_messages(table.filter(pc.invert(ok)))
        durations = table["duration_s"]
        self.audio_s_ok += _sum(durations.filter(ok))
        self.inference_s += _sum(table["inference_s"])
        self.durations_ok = _add_bins(self.durations_ok, durations.filter(ok))
        self.durations_failed = _add_bins(self.durations_failed, durations.filter(pc.invert(ok)))
        scored = table.filter(pc.is_valid(table["metric"]))
        add_scores(self.scores, pc.fill_null(scored["language"], "unknown"), scored)  # as summary.json
        for column in self.group_by:
            self._add_group(column, scored)
        if self.has_time:
            self._add_times(table.filter(ok))
        self._add_worst(scored)

    def _add_messages(self, failed: pa.Table) -> None:
        for reason, message in zip(failed["status"].to_pylist(), failed["error"].to_pylist(), strict=True):
            counter = self.messages.setdefault(reason, Counter())
            key = (message or "").strip() or "(no message)"
            counter[key if key in counter or len(counter) < _MAX_MESSAGES else "(other messages)"] += 1

    def _add_group(self, column: str, scored: pa.Table) -> None:
        values = scored[column]
        if not pa.types.is_string(values.type):
            try:
                values = pc.cast(values, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ReportError(f"cannot group by {column!r}: its type {values.type} has no text form") from e
        tallies = self.group_scores.setdefault(column, {})
        self.group_overflow[column] += add_scores(tallies, pc.fill_null(values, "(none)"), scored, limit=MAX_GROUPS)

    def _add_times(self, ok: pa.Table) -> None:
        times = ok[TIME_COLUMN]
        valid = pc.is_valid(times)
        seconds = pc.cast(pc.cast(times.filter(valid), pa.timestamp("s", tz="UTC"), safe=False), pa.int64())
        durations = pc.fill_null(ok["duration_s"].filter(valid), 0.0)
        for second, duration in zip(seconds.to_pylist(), durations.to_pylist(), strict=True):
            slot = self.finished.setdefault(second, [0, 0.0])
            slot[0] += 1
            slot[1] += duration

    def _add_worst(self, scored: pa.Table) -> None:
        if self.worst == 0:
            return
        rated = scored.filter(pc.and_(pc.is_valid(scored["wer"]), pc.greater(scored["ref_words"], 0)))
        if rated.num_rows == 0:
            return
        errors = pc.add(pc.add(rated["substitutions"], rated["deletions"]), rated["insertions"])
        rated = rated.append_column("errors", errors)
        # Only this batch's top `worst` can enter the running top list.
        top = rated.take(pc.select_k_unstable(rated, self.worst, [("wer", "descending"), ("errors", "descending")]))
        columns = ["id", "language", "metric", "normalizer", "wer", "errors", "text", "reference", *COUNT_COLUMNS]
        for row in top.select(columns).to_pylist():
            self._seq += 1
            item = _Ranked(row["wer"], row["errors"], -self._seq, row)
            if len(self._heap) < self.worst:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                heapq.heapreplace(self._heap, item)

    @property
    def worst_rows(self) -> list[dict]:
        return [r.row for r in sorted(self._heap, reverse=True)]


def _value_counts(array: pa.ChunkedArray) -> tuple[list, list]:
    counts = pc.value_counts(array).flatten()
    return counts[0].to_pylist(), counts[1].to_pylist()


def _sum(array) -> float:
    return pc.sum(array).as_py() or 0.0


def _add_bins(bins: np.ndarray, durations) -> np.ndarray:
    values = np.asarray(pc.drop_null(durations).to_numpy(zero_copy_only=False), dtype=np.float64)
    if values.size == 0:
        return bins
    index = np.floor(np.clip(values, 0, _DURATION_CAP_S) * DURATION_RES).astype(np.int64)
    counts = np.bincount(index)
    if counts.size > bins.size:
        bins = np.pad(bins, (0, counts.size - bins.size))
    bins[: counts.size] += counts
    return bins
