"""Ready-made jobs: typed definitions in ``jobs/<name>/job.yaml`` and the runners behind ``quarry job``.

A job file names what kind of job it is (``kind``), the quarry config it runs with, and its inputs
and outputs. Paths in it are resolved relative to the job file's folder (URIs with a scheme, such
as ``s3://``, are taken as they are), after ``${VAR}`` / ``${VAR:-default}`` are expanded from the
environment, so one job folder runs from any working directory, including the one Ray unpacks for
``ray job submit --working-dir``. Validation is strict (``extra="forbid"``): a misspelt key fails
with the key named.

Kinds:

- ``nightly-archive``: every new audio object under ``audio`` (a prefix or a glob) into
  ``<output_root>/run_date=YYYY-MM-DD/``, leaving out what completed earlier runs under
  ``output_root`` already did; then a canary manifest with references is transcribed into
  ``<output_root>/canary/run_date=YYYY-MM-DD/`` and its corpus WER is compared with the last good
  run's, kept in ``<output_root>/canary/last_good.json``. A WER above the last good one plus
  ``canary.max_wer_regression`` fails the run (exit 1) and leaves ``last_good.json`` alone; a run
  that passes records its figures there (the first run passes and records).
- ``call-center``: stereo calls split into channels (``audio.channels: split`` in the config).
  Per-campaign keyword lists from a CSV (columns ``campaign``, ``keywords``; keywords separated by
  ``;`` or ``,``) are joined to the manifest's rows by ``campaign_column`` while the manifest is
  streamed into ``<output>/inputs.jsonl`` (so the engine is biased towards them), and after the job
  ``<output>/analytics/part-*.parquet`` holds one row per call: talk time, words and words per
  minute per channel, cross-talk, silence share and keyword hits.
- ``dataset-labeling``: pseudo-labels with the engine's confidence (``avg_logprob``), subtitles
  per recording, and exports (lhotse cuts, NeMo manifest, Hugging Face Parquet) narrowed by
  confidence, duration and language into ``<output>/exports/``.

Every runner uses :func:`pipeline.plan.run_job`, so a rerun of the same job resumes (rows already
written are not done again) and ``overwrite`` starts over.

Modules: :mod:`.spec` (the job file models, :func:`load_job`, ``${VAR}`` expansion, the config a
job runs with), :mod:`.results` (what every result shares), one module per kind
(:mod:`.nightly`, :mod:`.call_center`, :mod:`.labeling`), and here :func:`run_job_file`, which
loads a job file and hands it to its kind's runner.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from .call_center import CallCenterResult, run_call_center
from .labeling import LabelingResult, run_dataset_labeling
from .nightly import NightlyResult, run_nightly
from .spec import CallCenterJob, JobError, NightlyArchiveJob, load_job

__all__ = ["JobOutcome", "run_job_file"]

Echo = Callable[[str], None]

JobOutcome = NightlyResult | CallCenterResult | LabelingResult


def run_job_file(path: str | Path, *, run_date: str | dt.date | None = None, overrides: list[str] | tuple[str, ...] = (),
                 overwrite: bool = False, echo: Echo | None = print) -> JobOutcome:
    """Load the job file at ``path`` and run it; print its summary with ``echo`` (None: quiet).

    ``run_date`` (nightly-archive only; default today, UTC) names the run's partition.
    ``overrides`` (``key=value``) apply to the job's quarry config. Raises :class:`JobError` (and
    the pipeline's own errors) when the job cannot run; a failed gate or budget is a result whose
    ``exit_code`` is 1.
    """
    job = load_job(path)
    if isinstance(job, NightlyArchiveJob):
        result: JobOutcome = run_nightly(job, _run_date(run_date), overrides, overwrite=overwrite)
    elif run_date is not None:
        raise JobError(f"--date applies to nightly-archive jobs only; {path} is a {job.kind} job")
    elif isinstance(job, CallCenterJob):
        result = run_call_center(job, overrides, overwrite=overwrite)
    else:
        result = run_dataset_labeling(job, overrides, overwrite=overwrite)
    if echo is not None:
        echo(result.render())
    return result


def _run_date(value: str | dt.date | None) -> str:
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError as e:
        raise JobError(f"--date must be YYYY-MM-DD, got {value!r}") from e
