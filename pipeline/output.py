"""Output: Parquet transcripts with the one explicit schema, and summary.json.

The driver is the sink: it receives already-transcribed batches (text only, no audio), writes them
in parts of at most ``rows_per_file`` rows, and keeps running totals. It holds one part's rows
at a time, never the job. Each part is written under a temporary name and then moved into place,
so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .records import Status
from .scoring import CorpusTally
from .storage import join_uri, url_to_fs


class OutputExistsError(RuntimeError):
    """The output already holds a job's results and overwrite was not asked for."""


class TranscriptWriter:
    """Writes ``<output>/transcripts/part-NNNNN.parquet`` files from a stream of batches."""

    def __init__(self, output_uri: str, schema: pa.Schema, storage_options: dict[str, Any], rows_per_file: int):
        self.output_uri = output_uri
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.fs, self.root = url_to_fs(output_uri, storage_options)
        self.dir = self.root.rstrip("/") + "/transcripts"
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.files: list[str] = []

    def prepare(self, overwrite: bool) -> None:
        """Refuse to mix with an earlier job's output unless ``overwrite``; then clear it."""
        existing = [p for p in (self.dir, self.root.rstrip("/") + "/summary.json") if self.fs.exists(p)]
        if existing and not overwrite:
            raise OutputExistsError(
                f"output {self.output_uri} already holds results ({', '.join(existing)}); pass --overwrite to replace them"
            )
        for path in existing:
            self.fs.rm(path, recursive=True)
        self.fs.makedirs(self.dir, exist_ok=True)

    def write(self, batch: pa.Table) -> None:
        self._pending.append(batch.cast(self.schema))
        self._pending_rows += batch.num_rows
        while self._pending_rows >= self.rows_per_file:
            table = pa.concat_tables(self._pending)
            self._flush(table.slice(0, self.rows_per_file))
            rest = table.slice(self.rows_per_file)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self._pending_rows or not self.files:  # an empty job still gets one (empty) file
            self._flush(pa.concat_tables(self._pending) if self._pending else self.schema.empty_table())
        self._pending, self._pending_rows = [], 0

    def _flush(self, table: pa.Table) -> None:
        name = f"part-{len(self.files):05d}.parquet"
        final = f"{self.dir}/{name}"
        temp = f"{self.dir}/_tmp-{name}"
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        with self.fs.open(temp, "wb") as f:
            f.write(buffer.getvalue())
        self.fs.mv(temp, final)
        self.files.append(join_uri(self.output_uri, "transcripts", name))


@dataclass
class JobTally:
    """Running totals over output batches; reconciles n_input == n_ok + sum(n_failed)."""

    n_input: int = 0
    by_status: Counter = field(default_factory=Counter)
    audio_s: float = 0.0  # audio that was transcribed (status ok)
    audio_s_decoded: float = 0.0  # audio that decoded, whatever happened next
    inference_s: float = 0.0  # engine busy seconds, summed over replicas
    scores: dict[tuple[str, str], CorpusTally] = field(default_factory=dict)

    def add(self, batch: pa.Table) -> None:
        for row in batch.select(
            ["status", "duration_s", "inference_s", "language", "metric", "normalizer", "ref_words", "substitutions", "deletions", "insertions"]
        ).to_pylist():
            self.n_input += 1
            self.by_status[row["status"]] += 1
            self.audio_s_decoded += row["duration_s"] or 0.0
            self.inference_s += row["inference_s"] or 0.0
            if row["status"] == Status.OK.value:
                self.audio_s += row["duration_s"] or 0.0
            if row["metric"]:
                key = (row["language"] or "unknown", row["metric"])
                tally = self.scores.setdefault(key, CorpusTally(row["metric"], row["normalizer"]))
                tally.add(row["ref_words"], row["substitutions"], row["deletions"], row["insertions"])

    @property
    def n_ok(self) -> int:
        return self.by_status.get(Status.OK.value, 0)

    @property
    def n_failed(self) -> int:
        return self.n_input - self.n_ok

    def failed_fraction(self) -> float:
        return self.n_failed / self.n_input if self.n_input else 0.0


def build_summary(tally: JobTally, *, job_wall_s: float, started_at: float, engine: str, model: str,
                  config: dict[str, Any], files: list[str], max_failed_fraction: float) -> dict[str, Any]:
    failed = {k: v for k, v in sorted(tally.by_status.items()) if k != Status.OK.value}
    by_language: dict[str, Any] = {}
    for (language, metric), t in sorted(tally.scores.items()):
        by_language.setdefault(language, {})[metric] = t.to_dict()
    overall = {}
    for metric in sorted({m for _, m in tally.scores}):
        total = CorpusTally(metric, "per-language")
        for (_, m), t in tally.scores.items():
            if m == metric:
                total.n_scored += t.n_scored
                total.ref_units += t.ref_units
                total.substitutions += t.substitutions
                total.deletions += t.deletions
                total.insertions += t.insertions
        overall[metric] = total.to_dict()
    budget_exceeded = tally.failed_fraction() > max_failed_fraction
    return {
        "status": "failed_budget_exceeded" if budget_exceeded else "completed",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "n_input": tally.n_input,
        "n_ok": tally.n_ok,
        "n_failed": tally.n_failed,
        "n_failed_by_reason": failed,
        "failed_fraction": round(tally.failed_fraction(), 6),
        "max_failed_fraction": max_failed_fraction,
        "audio_s": round(tally.audio_s, 3),
        "audio_s_decoded": round(tally.audio_s_decoded, 3),
        "job_wall_s": round(job_wall_s, 3),
        "inference_s": round(tally.inference_s, 3),
        "rtfx_job": round(tally.audio_s / job_wall_s, 3) if job_wall_s else None,
        "rtfx_inference": round(tally.audio_s / tally.inference_s, 3) if tally.inference_s else None,
        "scores": {"overall": overall, "by_language": by_language},
        "engine": engine,
        "model": model,
        "files": files,
        "config": config,
    }


def write_summary(output_uri: str, summary: dict[str, Any], storage_options: dict[str, Any]) -> str:
    fs, root = url_to_fs(output_uri, storage_options)
    path = root.rstrip("/") + "/summary.json"
    with fs.open(path, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return join_uri(output_uri, "summary.json")
