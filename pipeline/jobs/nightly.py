"""The ``nightly-archive`` job: new archive objects into ``run_date=YYYY-MM-DD/``, then the canary gate."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ..claim import claim_output
from ..config import JobConfig
from ..storage import join_uri, url_to_fs, write_atomic
from ..summary import JobSummary
from .results import JobResult
from .spec import JobError, NightlyArchiveJob, job_config

log = logging.getLogger("quarry")

CANARY_DIR = "canary"
LAST_GOOD = "last_good.json"


@dataclass(frozen=True)
class CanaryCheck:
    """The canary's figures against the last good run's."""

    output: str
    metric: str
    rate: float
    ref_units: int
    errors: int
    n_rows: int
    n_failed: int
    engine: str
    model: str
    last_good: dict[str, Any] | None  # last_good.json as it was before this run
    margin: float
    passed: bool
    recorded: bool  # last_good.json was updated with this run

    @property
    def limit(self) -> float | None:
        return None if self.last_good is None else self.last_good["rate"] + self.margin

    def line(self) -> str:
        head = (f"canary: {self.metric.upper()} {self.rate:.4f} ({self.errors} errors / {self.ref_units} reference "
                f"{'words' if self.metric == 'wer' else 'characters'}, {self.n_rows} rows)")
        if self.n_failed:
            head += f", {self.n_failed} rows FAILED"
        unrecorded = "; not recorded as the last good run: the archive run did not complete"
        if self.n_failed:
            verdict = f"FAILED: {self.n_failed} canary rows failed (see {self.output}); last_good.json not updated"
        elif self.last_good is None:
            verdict = "first run: passed, " + (
                "recorded as the last good run" if self.recorded else unrecorded.removeprefix("; "))
        else:
            lg = self.last_good
            versus = (f"last good {lg['rate']:.4f} (run_date {lg.get('run_date')}, {lg.get('engine')} / "
                      f"{lg.get('model')}) + margin {self.margin:.4f} = limit {self.limit:.4f}")
            if not self.passed:
                verdict = f"> {versus}: FAILED, last_good.json not updated"
            else:
                verdict = f"<= {versus}: passed" + ("; last_good.json updated" if self.recorded else unrecorded)
        return f"{head}\n  {verdict}"


@dataclass(frozen=True)
class NightlyResult(JobResult):
    kind: ClassVar[str] = "nightly-archive"
    run_date: str
    output: str
    n_found: int
    n_done_before: int
    n_todo: int
    summary: JobSummary
    canary: CanaryCheck | None

    @property
    def ok(self) -> bool:
        return self.summary.ok and (self.canary is None or self.canary.passed)

    def _lines(self) -> list[str]:
        lines = [f"nightly-archive {self.run_date} -> {self.output}",
                 f"  found {self.n_found} audio objects: {self.n_done_before} done by earlier runs, {self.n_todo} new",
                 *self.summary_lines()]
        lines.append(self.canary.line() if self.canary else "canary: none configured")
        return lines


def _read_json(uri: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def run_nightly(job: NightlyArchiveJob, run_date: str, overrides: list[str] | tuple[str, ...] = (), *,
                overwrite: bool = False) -> NightlyResult:
    """New archive objects into ``run_date=<run_date>/``, then the canary gate."""
    from ..discover import discover
    from ..plan import run_job

    cfg = job_config(job.config, overrides)
    opts = cfg.storage.options
    output = join_uri(job.output_root, f"run_date={run_date}")
    with claim_output(output, opts) as claim:  # before inputs.jsonl is written into the partition
        # The date's own rows never count as done by an earlier run (discover leaves its output out).
        found = discover(job.audio, output, skip_done_in=job.output_root, storage_options=opts)
        log.info("nightly %s: %d audio objects, %d done by earlier runs, %d to do", run_date, found.n_found,
                 found.n_done_before, found.n_todo)
        result = run_job(cfg.reading_from(found.root), found.manifest_uri, output, overwrite=overwrite, claim=claim)
    canary = _canary_gate(job, cfg, run_date, record=result.ok) if job.canary else None
    return NightlyResult(run_date, output, found.n_found, found.n_done_before, found.n_todo, result.summary, canary)


def canary_passes(rate: float, n_failed: int, last_good: dict[str, Any] | None, margin: float) -> bool:
    """The gate: no canary row failed, and the error rate is at most the last good run's plus the
    margin (a first run, with nothing to compare with, passes)."""
    return n_failed == 0 and (last_good is None or rate <= last_good["rate"] + margin + 1e-12)


def _canary_gate(job: NightlyArchiveJob, cfg: JobConfig, run_date: str, *, record: bool) -> CanaryCheck:
    """Transcribe the canary afresh (every run measures the engine as it is now), compare with
    ``last_good.json``, and record this run there when it passes (and ``record``: the archive run
    itself completed)."""
    from ..plan import run_job

    assert job.canary is not None
    opts = cfg.storage.options
    root = join_uri(job.output_root, CANARY_DIR)
    output = join_uri(root, f"run_date={run_date}")
    summary = run_job(cfg, job.canary.manifest, output, overwrite=True).summary
    overall = summary.scores.overall
    metric = "wer" if "wer" in overall else next(iter(overall), None)
    if metric is None or overall[metric].rate is None:
        raise JobError(f"canary {job.canary.manifest}: no row was scored ({summary.n_ok} of "
                       f"{summary.n_input} rows ok); the canary needs rows with references")
    t = overall[metric]
    rate = t.rate
    last_good = _read_json(join_uri(root, LAST_GOOD), opts)
    if last_good is not None and last_good.get("metric", "wer") != metric:
        last_good = None  # a canary scored in another unit: nothing to compare with
    margin = job.canary.max_wer_regression
    passed = canary_passes(rate, summary.n_failed, last_good, margin)
    recorded = passed and record
    if recorded:
        write_atomic(join_uri(root, LAST_GOOD), json.dumps({
            "run_date": run_date, "metric": metric, "rate": rate, "ref_units": t.ref_units,
            "errors": t.errors, "n_scored": t.n_scored,
            "engine": summary.engine, "model": summary.model, "canary_manifest": job.canary.manifest,
            "canary_output": output, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2).encode(), opts)
    return CanaryCheck(output=output, metric=metric, rate=rate, ref_units=t.ref_units, errors=t.errors,
                       n_rows=summary.n_input, n_failed=summary.n_failed, engine=summary.engine,
                       model=summary.model, last_good=last_good, margin=margin, passed=passed, recorded=recorded)
