"""``<output>/summary.json``: one typed model, written, read back and rendered here alone.

Counts and scores cover the whole output (every attempt, from the committed parts); throughput
covers this attempt (``this_run``). The counts reconcile: ``n_input == n_ok + sum(n_failed_by_reason)``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from .records import OK
from .scoring import CorpusTally, add_scores
from .storage import join_uri, url_to_fs, write_atomic

SUMMARY_NAME = "summary.json"
COMPLETED = "completed"
BUDGET_EXCEEDED = "failed_budget_exceeded"


@dataclass
class JobTally:
    """Running totals over output batches; reconciles n_input == n_ok + sum(n_failed)."""

    n_input: int = 0
    by_status: Counter = field(default_factory=Counter)
    audio_s: float = 0.0  # audio that was transcribed (status ok)
    audio_s_decoded: float = 0.0  # audio that decoded, whatever happened next
    inference_s: float = 0.0  # engine busy seconds, summed over replicas
    scores: dict[tuple[str, str], CorpusTally] = field(default_factory=dict)  # (language, metric)

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "status", "duration_s", "inference_s", "language", "metric", "normalizer",
        "ref_words", "substitutions", "deletions", "insertions",
    )

    def add(self, batch: pa.Table) -> None:
        """Add a batch of output rows, column by column (no per-row Python)."""
        if not batch.num_rows:
            return
        t = batch.select(list(self.COLUMNS))
        self.n_input += t.num_rows
        counts = pc.value_counts(t["status"]).flatten()
        self.by_status.update(dict(zip(counts[0].to_pylist(), counts[1].to_pylist(), strict=True)))
        ok = pc.equal(t["status"], OK)
        self.audio_s_decoded += pc.sum(t["duration_s"]).as_py() or 0.0
        self.audio_s += pc.sum(t["duration_s"].filter(ok)).as_py() or 0.0
        self.inference_s += pc.sum(t["inference_s"]).as_py() or 0.0
        scored = t.filter(pc.is_valid(t["metric"]))
        add_scores(self.scores, pc.fill_null(scored["language"], "unknown"), scored)

    @property
    def n_ok(self) -> int:
        return self.by_status.get(OK, 0)

    @property
    def n_failed(self) -> int:
        return self.n_input - self.n_ok

    def failed_fraction(self) -> float:
        return self.n_failed / self.n_input if self.n_input else 0.0


class _Model(BaseModel):
    # Unknown keys are ignored on read: a summary written by a newer Quarry still reads.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class RunFigures(_Model):
    """What this attempt did (a rerun resumes: earlier attempts' rows are counted as committed)."""

    attempt: int
    n_committed_before: int
    n_processed: int
    audio_s: float
    inference_s: float
    job_wall_s: float
    driver_cpu_s: float | None = None  # CPU the driver process spent on this attempt (every thread of it)
    # From the replicas' engine meters (pipeline/meter.py): seconds from the job's start to the first
    # request reaching an engine (the fixed start-up), and the engines' busy fraction from then on.
    engine_start_s: float | None = None
    engine_busy_fraction: float | None = None


class Scores(_Model):
    overall: dict[str, CorpusTally]  # metric -> over every language
    by_language: dict[str, dict[str, CorpusTally]]  # language -> metric -> tally


class JobSummary(_Model):
    status: Literal["completed", "failed_budget_exceeded"]
    stopped_early: bool
    started_at: str
    n_input: int
    n_ok: int
    n_failed: int
    n_failed_by_reason: dict[str, int]
    failed_fraction: float
    max_failed_fraction: float
    audio_s: float
    audio_s_decoded: float
    job_wall_s: float
    inference_s: float
    rtfx_job: float | None
    rtfx_inference: float | None
    this_run: RunFigures | None
    scores: Scores
    engine: str
    model: str
    files: list[str]
    config: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    @classmethod
    def build(cls, tally: JobTally, *, job_wall_s: float, started_at: float, engine: str, model: str,
              config: dict[str, Any], files: list[str], max_failed_fraction: float,
              this_run: RunFigures | None = None, stopped_early: bool = False) -> "JobSummary":
        """Counts and scores over the whole output (``tally``, every attempt); throughput from
        this run alone (``this_run``), or from the tally when there is none."""
        run_audio_s = this_run.audio_s if this_run else tally.audio_s
        run_inference_s = this_run.inference_s if this_run else tally.inference_s
        by_language: dict[str, dict[str, CorpusTally]] = {}
        overall: dict[str, CorpusTally] = {}
        for (language, metric), t in sorted(tally.scores.items()):
            by_language.setdefault(language, {})[metric] = t
            overall.setdefault(metric, CorpusTally(metric=metric, normalizer="per-language")).merge(t)
        budget_exceeded = stopped_early or tally.failed_fraction() > max_failed_fraction
        return cls(
            status=BUDGET_EXCEEDED if budget_exceeded else COMPLETED,
            stopped_early=stopped_early,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
            n_input=tally.n_input,
            n_ok=tally.n_ok,
            n_failed=tally.n_failed,
            n_failed_by_reason={k: v for k, v in sorted(tally.by_status.items()) if k != OK},
            failed_fraction=round(tally.failed_fraction(), 6),
            max_failed_fraction=max_failed_fraction,
            audio_s=round(tally.audio_s, 3),
            audio_s_decoded=round(tally.audio_s_decoded, 3),
            job_wall_s=round(job_wall_s, 3),
            inference_s=round(tally.inference_s, 3),
            rtfx_job=round(run_audio_s / job_wall_s, 3) if job_wall_s else None,
            rtfx_inference=round(run_audio_s / run_inference_s, 3) if run_inference_s else None,
            this_run=this_run,
            scores=Scores(overall=dict(sorted(overall.items())), by_language=by_language),
            engine=engine,
            model=model,
            files=files,
            config=config,
        )

    def write(self, output_uri: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write ``<output>/summary.json`` (whole or not at all) and return its URI."""
        uri = join_uri(output_uri, SUMMARY_NAME)
        write_atomic(uri, self.model_dump_json(indent=2).encode(), storage_options)
        return uri

    @classmethod
    def read(cls, output_uri: str, storage_options: dict[str, Any] | None = None) -> "JobSummary | None":
        """``<output>/summary.json``, or None when the output has none (yet)."""
        fs, root = url_to_fs(output_uri, storage_options)
        path = root.rstrip("/") + "/" + SUMMARY_NAME
        if not fs.exists(path):
            return None
        with fs.open(path, "r", encoding="utf-8") as f:
            return cls.model_validate(json.load(f))

    def lines(self) -> list[str]:
        """The summary for people: rows, throughput, error rates, and the verdict on the budget."""
        failed = f" ({', '.join(f'{k} {v}' for k, v in self.n_failed_by_reason.items())})" if self.n_failed else ""
        processed = f"; this run {self.this_run.n_processed} rows" if self.this_run else ""
        lines = [
            f"rows: {self.n_input} in, {self.n_ok} ok, {self.n_failed} failed{failed}",
            (f"audio: {self.audio_s:.1f} s{processed} in {self.job_wall_s:.1f} s wall (RTFx {self.rtfx_job}, "
             f"engine RTFx {self.rtfx_inference}); {self.engine} / {self.model}"),
        ]
        run = self.this_run
        if run and run.engine_busy_fraction is not None:
            lines.append(f"engine: first request {run.engine_start_s:.1f} s after the start, busy "
                         f"{run.engine_busy_fraction:.1%} of the time from then on")
        for language, metrics in self.scores.by_language.items():
            for metric, t in metrics.items():
                lines.append(f"{metric.upper()} {language}: {t.rate:.4f} over {t.n_scored} rows ({t.normalizer})"
                             if t.rate is not None else f"{metric.upper()} {language}: no reference words")
        if not self.ok:
            lines.append(f"FAILED ROW BUDGET: {self.n_failed}/{self.n_input} failed > max_failed_fraction "
                         f"{self.max_failed_fraction}")
        return lines
