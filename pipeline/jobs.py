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
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .config import JobConfig, load_config
from .storage import has_scheme, join_uri, parent_uri, url_to_fs

log = logging.getLogger("quarry")

EXIT_OK = 0
EXIT_GATE = 1  # the job ran, but the canary gate or the failed-row budget failed
EXIT_CANNOT_RUN = 2

Echo = Callable[[str], None]


class JobError(ValueError):
    """The job cannot run: a bad job file, a missing input column, an unusable canary, ..."""


# --- Job definitions ---------------------------------------------------------------------------


class _JobModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    PATHS: ClassVar[tuple[str, ...]] = ()  # fields resolved relative to the job file's folder


class CanarySpec(_JobModel):
    """A small manifest with references, transcribed on every nightly run as a quality gate."""

    PATHS: ClassVar[tuple[str, ...]] = ("manifest",)
    manifest: str = Field(description="Manifest (JSONL / CSV / Parquet) whose rows have references.")
    max_wer_regression: float = Field(
        0.01, description="Fail the run when the canary's corpus WER exceeds the last good run's by more than this "
        "(absolute, 0.01 = one point).")


class NightlyArchiveJob(_JobModel):
    PATHS: ClassVar[tuple[str, ...]] = ("config", "audio", "output_root")
    kind: Literal["nightly-archive"]
    config: str = Field(description="The quarry config YAML the job runs with.")
    audio: str = Field(description="Prefix (every audio object below it) or glob of the archive.")
    output_root: str = Field(description="Each run writes <output_root>/run_date=YYYY-MM-DD/; the canary "
                             "<output_root>/canary/.")
    canary: CanarySpec | None = Field(None, description="Quality gate; null runs without one.")


class CallCenterJob(_JobModel):
    PATHS: ClassVar[tuple[str, ...]] = ("config", "manifest", "output", "campaigns")
    kind: Literal["call-center"]
    config: str
    manifest: str = Field(description="Calls: JSONL / CSV / Parquet with an audio column and the campaign column.")
    output: str
    campaigns: str = Field(description="CSV with columns campaign, keywords (separated by ';' or ',').")
    campaign_column: str = Field("campaign", description="The manifest column naming each call's campaign.")


class LabelFilters(_JobModel):
    min_avg_logprob: float | None = Field(None, description="Keep rows whose engine confidence is at least this.")
    min_duration_s: float | None = None
    max_duration_s: float | None = None
    languages: list[str] | None = Field(None, description="Keep rows whose text is in one of these languages.")


ExportFormat = Literal["lhotse", "nemo", "hf"]
EXPORT_FILES: dict[str, str] = {"lhotse": "cuts.jsonl.gz", "nemo": "nemo_manifest.jsonl", "hf": "hf.parquet"}


class DatasetLabelingJob(_JobModel):
    PATHS: ClassVar[tuple[str, ...]] = ("config", "manifest", "output")
    kind: Literal["dataset-labeling"]
    config: str
    manifest: str
    output: str
    filters: LabelFilters = LabelFilters()
    exports: list[ExportFormat] = Field(default_factory=lambda: ["lhotse", "nemo", "hf"])
    subtitles: list[Literal["srt", "vtt"]] | None = Field(
        None, description="Subtitle files per recording (sets output.subtitles); null: as the config says.")


JobSpec = Annotated[NightlyArchiveJob | CallCenterJob | DatasetLabelingJob, Field(discriminator="kind")]
KINDS = ("nightly-archive", "call-center", "dataset-labeling")
_ADAPTER: TypeAdapter = TypeAdapter(JobSpec)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, source: Path) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in every string of the job file (an empty variable counts
    as unset, as in the shell's ``:-``)."""
    if isinstance(value, dict):
        return {k: _expand_env(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        raise JobError(f"job file {source}: environment variable {name} is not set "
                       f"(write ${{{name}:-default}} to give a default)")

    return _ENV_REF.sub(substitute, value)


def resolve_path(value: str, base_dir: Path) -> str:
    """A URI with a scheme as it is; a local path made absolute against ``base_dir``."""
    if has_scheme(value):
        return value
    path = os.path.expanduser(value)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base_dir, path))


def _resolve(model: _JobModel, base_dir: Path) -> _JobModel:
    update: dict[str, Any] = {name: resolve_path(getattr(model, name), base_dir) for name in model.PATHS}
    for name, value in model:
        if isinstance(value, _JobModel) and value.PATHS:
            update[name] = _resolve(value, base_dir)
    return model.model_copy(update=update)


def load_job(path: str | Path) -> NightlyArchiveJob | CallCenterJob | DatasetLabelingJob:
    """Read and validate a job file; paths come back resolved against its folder."""
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text())
    except FileNotFoundError as e:
        raise JobError(f"job file not found: {source}") from e
    except yaml.YAMLError as e:
        raise JobError(f"job file {source} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise JobError(f"job file {source} must hold a mapping at the top level")
    if data.get("kind") not in KINDS:
        raise JobError(f"job file {source}: 'kind' must be one of {', '.join(KINDS)} (got {data.get('kind')!r})")
    data = _expand_env(data, source)
    try:
        job = _ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"][1:]) or "<root>"  # loc[0] is the kind tag
            problems.append(f"unknown key '{where}'" if item["type"] == "extra_forbidden" else f"'{where}': {item['msg']}")
        raise JobError(f"invalid job file ({source}): " + "; ".join(problems)) from e
    return _resolve(job, source.resolve().parent)


def job_config(config_path: str, overrides: list[str] | tuple[str, ...] = (), *, before: tuple[str, ...] = (),
               after: tuple[str, ...] = ()) -> JobConfig:
    """The job's quarry config: settings the job implies (``before``), the user's ``--set``
    overrides, then settings the job cannot run without (``after``).

    Inside a Ray job (``ray job submit`` sets ``RAY_ADDRESS``) a config without ``ray.address``
    joins that cluster rather than starting a Ray of its own.
    """
    cfg = load_config(config_path, [*before, *overrides, *after])
    if not cfg.ray.address and os.environ.get("RAY_ADDRESS"):
        cfg.ray.address = os.environ["RAY_ADDRESS"]
    return cfg


# --- Results -------------------------------------------------------------------------------------


def _job_lines(summary: dict[str, Any]) -> list[str]:
    s = summary
    failed = f" ({', '.join(f'{k} {v}' for k, v in s['n_failed_by_reason'].items())})" if s["n_failed"] else ""
    lines = [
        f"  rows: {s['n_input']} in, {s['n_ok']} ok, {s['n_failed']} failed{failed}",
        (f"  audio: {s['audio_s']:.1f} s; this run {s['this_run']['n_processed']} rows in {s['job_wall_s']:.1f} s "
         f"(RTFx {s['rtfx_job']}, engine RTFx {s['rtfx_inference']}); {s['engine']} / {s['model']}"),
    ]
    for language, metrics in s["scores"]["by_language"].items():
        for metric, t in metrics.items():
            if t["rate"] is not None:
                lines.append(f"  {metric.upper()} {language}: {t['rate']:.4f} over {t['n_scored']} rows")
    if s["status"] != "completed":
        lines.append(f"  FAILED ROW BUDGET: {s['n_failed']}/{s['n_input']} failed > max_failed_fraction "
                     f"{s['max_failed_fraction']}")
    return lines


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
class NightlyResult:
    kind: ClassVar[str] = "nightly-archive"
    run_date: str
    output: str
    n_found: int
    n_done_before: int
    n_todo: int
    summary: dict[str, Any]
    canary: CanaryCheck | None

    @property
    def ok(self) -> bool:
        return self.summary["status"] == "completed" and (self.canary is None or self.canary.passed)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_GATE

    def render(self) -> str:
        lines = [f"nightly-archive {self.run_date} -> {self.output}",
                 f"  found {self.n_found} audio objects: {self.n_done_before} done by earlier runs, {self.n_todo} new",
                 *_job_lines(self.summary)]
        lines.append(self.canary.line() if self.canary else "canary: none configured")
        lines.append("result: ok" if self.ok else "result: FAILED (exit 1)")
        return "\n".join(lines)


@dataclass(frozen=True)
class CallCenterResult:
    kind: ClassVar[str] = "call-center"
    output: str
    summary: dict[str, Any]
    analytics: str
    n_calls: int
    channels: dict[str, dict[str, float]]  # channel -> {"talk_s": total, "wpm": mean}
    keyword_hits: dict[str, int]  # keyword -> hits over all calls
    unknown_campaigns: dict[str, int]  # campaign values with no keyword list -> calls

    @property
    def ok(self) -> bool:
        return self.summary["status"] == "completed"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_GATE

    def render(self) -> str:
        lines = [f"call-center -> {self.output}", *_job_lines(self.summary),
                 f"  analytics: {self.n_calls} calls -> {self.analytics}"]
        for channel, figures in self.channels.items():
            wpm = f"{figures['wpm']:.0f}" if figures["wpm"] is not None else "-"
            lines.append(f"    {channel}: talk time {figures['talk_s']:.1f} s in all, mean {wpm} words/min")
        hits = sorted(self.keyword_hits.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        lines.append("    keyword hits: " + (", ".join(f"{k} {n}" for k, n in hits) if hits else "none"))
        if self.unknown_campaigns:
            lines.append("    campaigns without keywords: "
                         + ", ".join(f"{k!r} ({n} calls)" for k, n in sorted(self.unknown_campaigns.items())))
        lines.append("result: ok" if self.ok else "result: FAILED (exit 1)")
        return "\n".join(lines)


@dataclass(frozen=True)
class LabelingResult:
    kind: ClassVar[str] = "dataset-labeling"
    output: str
    summary: dict[str, Any]
    exports: dict[str, Any]  # format -> pipeline.exports.ExportResult
    filters: dict[str, Any]
    subtitles: list[str]

    @property
    def ok(self) -> bool:
        return self.summary["status"] == "completed"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_GATE

    def render(self) -> str:
        active = {k: v for k, v in self.filters.items() if v is not None}
        lines = [f"dataset-labeling -> {self.output}", *_job_lines(self.summary),
                 f"  exports of {self.summary['n_ok']} ok rows, filters {json.dumps(active) if active else 'none'}:"]
        for fmt, result in self.exports.items():
            lines.append(f"    {fmt}: {result.count} rows -> {result.path}")
        if self.subtitles:
            lines.append(f"  subtitles ({', '.join(self.subtitles)}): {join_uri(self.output, 'subtitles')}/")
        lines.append("result: ok" if self.ok else "result: FAILED (exit 1)")
        return "\n".join(lines)


JobOutcome = NightlyResult | CallCenterResult | LabelingResult


# --- Running -----------------------------------------------------------------------------------


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


def _remove(uri: str, storage_options: dict[str, Any]) -> None:
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _write_json(uri: str, value: dict[str, Any], storage_options: dict[str, Any]) -> None:
    """Written under a temporary name and moved into place: a reader sees the old or the new file."""
    fs, path = url_to_fs(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    temp = f"{parent}/_tmp-{path.rsplit('/', 1)[-1]}"
    with fs.open(temp, "w") as f:
        json.dump(value, f, indent=2)
    fs.mv(temp, path)


def _read_json(uri: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


# --- nightly-archive ---------------------------------------------------------------------------


CANARY_DIR = "canary"
LAST_GOOD = "last_good.json"


def run_nightly(job: NightlyArchiveJob, run_date: str, overrides: list[str] | tuple[str, ...] = (), *,
                overwrite: bool = False) -> NightlyResult:
    """New archive objects into ``run_date=<run_date>/``, then the canary gate."""
    from .discover import discover
    from .plan import run_job

    cfg = job_config(job.config, overrides)
    opts = cfg.storage.options
    output = join_uri(job.output_root, f"run_date={run_date}")
    if overwrite:  # redo the date: its earlier rows must not count as done by an earlier run
        _remove(output, opts)
    found = discover(job.audio, output, skip_done_in=job.output_root, storage_options=opts)
    log.info("nightly %s: %d audio objects, %d done by earlier runs, %d to do", run_date, found.n_found,
             found.n_done_before, found.n_todo)
    result = run_job(cfg, found.manifest_uri, output)
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
    from .plan import run_job

    assert job.canary is not None
    opts = cfg.storage.options
    root = join_uri(job.output_root, CANARY_DIR)
    output = join_uri(root, f"run_date={run_date}")
    summary = run_job(cfg, job.canary.manifest, output, overwrite=True).summary
    overall = summary["scores"]["overall"]
    metric = "wer" if "wer" in overall else next(iter(overall), None)
    if metric is None or overall[metric]["rate"] is None:
        raise JobError(f"canary {job.canary.manifest}: no row was scored ({summary['n_ok']} of "
                       f"{summary['n_input']} rows ok); the canary needs rows with references")
    t = overall[metric]
    rate = t["rate"]
    last_good = _read_json(join_uri(root, LAST_GOOD), opts)
    if last_good is not None and last_good.get("metric", "wer") != metric:
        last_good = None  # a canary scored in another unit: nothing to compare with
    margin = job.canary.max_wer_regression
    passed = canary_passes(rate, summary["n_failed"], last_good, margin)
    recorded = passed and record
    if recorded:
        _write_json(join_uri(root, LAST_GOOD), {
            "run_date": run_date, "metric": metric, "rate": rate, "ref_units": t["ref_units"],
            "errors": t["substitutions"] + t["deletions"] + t["insertions"], "n_scored": t["n_scored"],
            "engine": summary["engine"], "model": summary["model"], "canary_manifest": job.canary.manifest,
            "canary_output": output, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, opts)
    return CanaryCheck(output=output, metric=metric, rate=rate, ref_units=t["ref_units"],
                       errors=t["substitutions"] + t["deletions"] + t["insertions"], n_rows=summary["n_input"],
                       n_failed=summary["n_failed"], engine=summary["engine"], model=summary["model"],
                       last_good=last_good, margin=margin, passed=passed, recorded=recorded)


# --- call-center -------------------------------------------------------------------------------


INPUTS_NAME = "inputs.jsonl"
ANALYTICS_DIR = "analytics"
MANIFEST_CHUNK_ROWS = 4096
_KEYWORD_SEP = re.compile(r"[;,]")


def read_campaigns(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Campaign -> keywords (in order, duplicates of any case dropped) from a CSV with columns
    ``campaign`` and ``keywords``. Keywords are separated by ``;`` or ``,``; with ``keywords`` as
    the last column, an unquoted ``a,b,c`` after the campaign counts as one keywords cell. A
    campaign on several lines gets the keywords of all of them."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rt", compression="infer", encoding="utf-8-sig", newline="") as f:
            lines = list(csv.reader(f))
    except FileNotFoundError as e:
        raise JobError(f"campaigns file not found: {uri}") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise JobError(f"campaigns file {uri} is not a readable CSV: {e}") from e
    header = [name.strip() for name in lines[0]] if lines else []
    missing = [c for c in ("campaign", "keywords") if c not in header]
    if missing:
        raise JobError(f"campaigns file {uri} lacks column(s) {missing} (has {header})")
    at_campaign, at_keywords = header.index("campaign"), header.index("keywords")
    last = at_keywords == len(header) - 1
    campaigns: dict[str, list[str]] = {}
    for number, row in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header) and not last:
            raise JobError(f"campaigns file {uri}, line {number}: more fields than columns; quote a keywords "
                           "cell that holds commas")
        campaign = row[at_campaign].strip() if at_campaign < len(row) else ""
        if not campaign:
            continue
        cells = row[at_keywords:] if last else row[at_keywords:at_keywords + 1]
        words = campaigns.setdefault(campaign, [])
        for keyword in _KEYWORD_SEP.split(",".join(cells)):
            keyword = " ".join(keyword.split())
            if keyword and keyword.casefold() not in {w.casefold() for w in words}:
                words.append(keyword)
    return campaigns


def _iter_manifest(uri: str, fmt: str, storage_options: dict[str, Any]) -> Iterator[list[dict[str, Any] | str]]:
    """The manifest in chunks of rows, never whole: Parquet row batches and CSV blocks through
    pyarrow's streaming readers (CSV as text, as the pipeline reads it), JSONL line by line (a line
    that is not a JSON object comes back as its raw text, for the pipeline to mark invalid_row)."""
    from .manifest import ManifestError

    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=MANIFEST_CHUNK_ROWS):
                yield batch.to_pylist()
    elif fmt == "csv":
        with fs.open(path, "rb", compression="infer") as f:
            names = pacsv.open_csv(f).schema.names
        with fs.open(path, "rb", compression="infer") as f:
            reader = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True, null_values=[""]))
            for batch in reader:
                yield batch.to_pylist()
    else:
        chunk: list[dict[str, Any] | str] = []
        with fs.open(path, "rt", compression="infer", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    value = None
                chunk.append(value if isinstance(value, dict) else line.rstrip("\n"))
                if len(chunk) >= MANIFEST_CHUNK_ROWS:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def join_campaign_keywords(manifest_uri: str, output_uri: str, campaigns: dict[str, list[str]], campaign_column: str,
                           cfg: JobConfig) -> tuple[str, int, Counter]:
    """Stream the manifest into ``<output>/inputs.jsonl`` with each row's campaign keywords added to
    its ``keywords`` column (after any keywords of its own) and its audio path made absolute.
    Returns (the written manifest's URI, rows, calls per campaign that has no keyword list)."""
    from .manifest import detect_format, parse_keywords, resolve_audio_uri

    fmt = detect_format(manifest_uri, cfg.input.format)
    columns = cfg.input.columns
    opts = cfg.storage.options
    manifest_dir = parent_uri(manifest_uri if has_scheme(manifest_uri) else os.path.abspath(manifest_uri))
    by_folded = {name.casefold(): words for name, words in campaigns.items()}
    fs, out = url_to_fs(output_uri, opts)
    fs.makedirs(out, exist_ok=True)
    final, temp = f"{out.rstrip('/')}/{INPUTS_NAME}", f"{out.rstrip('/')}/_tmp-{INPUTS_NAME}"
    n_rows, unknown, saw_column = 0, Counter(), False
    try:
        with fs.open(temp, "w", encoding="utf-8") as f:
            for chunk in _iter_manifest(manifest_uri, fmt, opts):
                lines = []
                for row in chunk:
                    n_rows += 1
                    if isinstance(row, str):  # not a JSON object: passed on, the job marks it invalid_row
                        lines.append(row)
                        continue
                    saw_column = saw_column or campaign_column in row
                    campaign = row.get(campaign_column)
                    campaign = str(campaign).strip() if campaign is not None else ""
                    keywords = by_folded.get(campaign.casefold())
                    if keywords is None:
                        unknown[campaign or "(none)"] += 1
                    row = dict(row)
                    audio = row.get(columns.audio)
                    if isinstance(audio, str) and audio.strip():
                        row[columns.audio] = resolve_audio_uri(audio.strip(), manifest_dir)
                    own = parse_keywords(row.get(columns.keywords))
                    row[columns.keywords] = own + [k for k in keywords or [] if k.casefold() not in
                                                   {o.casefold() for o in own}]
                    lines.append(json.dumps(row, ensure_ascii=False, default=str))
                if lines:
                    f.write("\n".join(lines) + "\n")
        if n_rows and not saw_column:
            raise JobError(f"manifest {manifest_uri} has no {campaign_column!r} column (campaign_column)")
        fs.mv(temp, final)
    except BaseException:
        if fs.exists(temp):
            fs.rm(temp)
        raise
    return join_uri(output_uri, INPUTS_NAME), n_rows, unknown


def keyword_hits(text: str, keywords: list[str]) -> list[dict[str, Any]]:
    """How often each keyword occurs in ``text``: case-insensitive, whole words (a phrase matches
    across any whitespace; "plan" does not match "plans" or "airplane")."""
    hits = []
    for keyword in keywords:
        words = keyword.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
        hits.append({"keyword": keyword, "count": len(re.findall(pattern, text, flags=re.IGNORECASE))})
    return hits


def analytics_schema(channel_names: list[str]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("audio", pa.string()),
        pa.field("status", pa.string()),
        pa.field("campaign", pa.string()),
        pa.field("duration_s", pa.float64()),
        pa.field("channels", pa.list_(pa.struct([
            ("channel", pa.string()), ("talk_s", pa.float64()), ("words", pa.int64()), ("wpm", pa.float64()),
        ]))),
    ]
    for name in channel_names:
        fields += [pa.field(f"talk_s_{name}", pa.float64()), pa.field(f"words_{name}", pa.int64()),
                   pa.field(f"wpm_{name}", pa.float64())]
    fields += [
        pa.field("overlap_s", pa.float64()),  # both (all) channels speaking at once
        pa.field("speech_s", pa.float64()),  # anyone speaking: sum of talk time minus overlap
        pa.field("silence_s", pa.float64()),
        pa.field("silence_share", pa.float64()),  # silence_s / duration_s
        pa.field("keyword_hits", pa.list_(pa.struct([("keyword", pa.string()), ("count", pa.int64())]))),
        pa.field("keyword_hits_total", pa.int64()),
    ]
    return pa.schema(fields)


def call_analytics(row: dict[str, Any], campaign: str | None, keywords: list[str],
                   channel_names: list[str]) -> dict[str, Any]:
    """One call's analytics from its transcript row (``channel_texts``, ``overlap_s``, ``duration_s``).

    Silence is approximated from the per-channel speaking times: speech = sum of talk time - overlap
    (the overlap is counted in every channel's talk time), silence = duration - speech.
    """
    out: dict[str, Any] = {"id": row["id"], "audio": row["audio"], "status": row["status"], "campaign": campaign,
                           "duration_s": row["duration_s"]}
    if row["status"] != "ok" or not row.get("channel_texts"):
        return out  # a failed call keeps its row, without figures
    channels = []
    for ct in row["channel_texts"]:
        talk = float(ct["speaking_s"] or 0.0)
        words = len((ct["text"] or "").split())
        channels.append({"channel": ct["channel"], "talk_s": talk, "words": words,
                         "wpm": words / (talk / 60.0) if talk > 0 else None})
    out["channels"] = channels
    for c in channels:
        if c["channel"] in channel_names:
            out[f"talk_s_{c['channel']}"], out[f"words_{c['channel']}"], out[f"wpm_{c['channel']}"] = (
                c["talk_s"], c["words"], c["wpm"])
    overlap = float(row["overlap_s"] or 0.0)
    duration = float(row["duration_s"] or 0.0)
    speech = min(max(sum(c["talk_s"] for c in channels) - overlap, 0.0), duration) if duration else 0.0
    out["overlap_s"] = overlap
    out["speech_s"] = speech
    out["silence_s"] = max(duration - speech, 0.0)
    out["silence_share"] = out["silence_s"] / duration if duration > 0 else None
    text = "\n".join(ct["text"] or "" for ct in row["channel_texts"])
    out["keyword_hits"] = keyword_hits(text, keywords)
    out["keyword_hits_total"] = sum(h["count"] for h in out["keyword_hits"])
    return out


def write_analytics(output_uri: str, campaigns: dict[str, list[str]], campaign_column: str,
                    cfg: JobConfig) -> tuple[str, list[dict[str, Any]]]:
    """``<output>/analytics/part-*.parquet``: one analytics part per transcripts part (same name),
    read and written one part at a time. Returns the folder's URI and small per-call figures for
    the summary (no texts)."""
    from .manifest import carried_name

    opts = cfg.storage.options
    fs, root = url_to_fs(output_uri, opts)
    root = root.rstrip("/")
    folder = f"{root}/{ANALYTICS_DIR}"
    if fs.exists(folder):
        fs.rm(folder, recursive=True)  # derived data: always rebuilt from every committed part
    fs.makedirs(folder, exist_ok=True)
    names = list(cfg.audio.channel_names) or ["ch0", "ch1"]
    schema = analytics_schema(names)
    by_folded = {name.casefold(): words for name, words in campaigns.items()}
    column = carried_name(campaign_column)
    wanted = ["id", "audio", "status", "duration_s", "channel_texts", "overlap_s"]
    figures = []
    for part in sorted(fs.glob(f"{root}/transcripts/part-*.parquet")):
        with fs.open(part, "rb") as f:
            parquet = pq.ParquetFile(f)
            have = parquet.schema_arrow.names
            table = parquet.read(columns=wanted + ([column] if column in have else []))
        rows = []
        for row in table.to_pylist():
            campaign = row.get(column)
            keywords = by_folded.get(campaign.strip().casefold(), []) if campaign else []
            rows.append(call_analytics(row, campaign, keywords, names))
        name = part.rsplit("/", 1)[-1]
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
        with fs.open(f"{folder}/_tmp-{name}", "wb") as f:
            f.write(buffer.getvalue().to_pybytes())
        fs.mv(f"{folder}/_tmp-{name}", f"{folder}/{name}")
        figures += [{"channels": r.get("channels") or [], "hits": r.get("keyword_hits") or []} for r in rows]
    return join_uri(output_uri, ANALYTICS_DIR), figures


def run_call_center(job: CallCenterJob, overrides: list[str] | tuple[str, ...] = (), *,
                    overwrite: bool = False) -> CallCenterResult:
    from .plan import run_job

    # The job writes its own JSONL manifest (inputs.jsonl), whatever format the calls came in.
    cfg = job_config(job.config, overrides, after=("input.format=jsonl",))
    if cfg.audio.channels != "split":
        raise JobError(f"call-center needs audio.channels: split in its config ({job.config}), "
                       f"got {cfg.audio.channels!r}")
    source_cfg = job_config(job.config, overrides)  # how to read the calls' own manifest
    campaigns = read_campaigns(job.campaigns, cfg.storage.options)
    if overwrite:
        _remove(join_uri(job.output, ANALYTICS_DIR), cfg.storage.options)
    inputs, n_rows, unknown = join_campaign_keywords(job.manifest, job.output, campaigns, job.campaign_column,
                                                     source_cfg)
    log.info("call-center: %d calls, %d campaigns with keywords; %d calls in campaigns without keywords",
             n_rows, len(campaigns), sum(unknown.values()))
    result = run_job(cfg, inputs, job.output, overwrite=overwrite)
    analytics, figures = write_analytics(job.output, campaigns, job.campaign_column, cfg)
    channels: dict[str, dict[str, Any]] = {}
    for call in figures:
        for c in call["channels"]:
            entry = channels.setdefault(c["channel"], {"talk_s": 0.0, "wpms": []})
            entry["talk_s"] += c["talk_s"]
            if c["wpm"] is not None:
                entry["wpms"].append(c["wpm"])
    summary_channels = {ch: {"talk_s": e["talk_s"], "wpm": sum(e["wpms"]) / len(e["wpms"]) if e["wpms"] else None}
                        for ch, e in channels.items()}
    hits: Counter = Counter()
    for call in figures:
        for h in call["hits"]:
            hits[h["keyword"]] += h["count"]
    return CallCenterResult(job.output, result.summary, analytics, len(figures), summary_channels,
                            {k: v for k, v in hits.items()}, dict(unknown))


# --- dataset-labeling --------------------------------------------------------------------------


EXPORTS_DIR = "exports"


def run_dataset_labeling(job: DatasetLabelingJob, overrides: list[str] | tuple[str, ...] = (), *,
                         overwrite: bool = False) -> LabelingResult:
    from .exports import export
    from .plan import run_job

    before = () if job.subtitles is None else (f"output.subtitles=[{', '.join(job.subtitles)}]",)
    cfg = job_config(job.config, overrides, before=before)
    if overwrite:
        _remove(join_uri(job.output, EXPORTS_DIR), cfg.storage.options)
    result = run_job(cfg, job.manifest, job.output, overwrite=overwrite)
    filters = job.filters.model_dump()
    exports = {}
    for fmt in dict.fromkeys(job.exports):
        dest = join_uri(job.output, EXPORTS_DIR, EXPORT_FILES[fmt])
        exports[fmt] = export(job.output, fmt, dest, storage_options=cfg.storage.options, **filters)
    return LabelingResult(job.output, result.summary, exports, filters, list(cfg.output.subtitles))

