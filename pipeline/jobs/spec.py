"""Job files: the typed models of ``jobs/<name>/job.yaml``, :func:`load_job` (``${VAR}`` expansion,
paths resolved against the job file's folder) and the helpers every runner shares.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..config import JobConfig, load_config, read_yaml_mapping
from ..errors import CannotRun
from ..scrub import register_secrets_in
from ..storage import has_scheme, url_to_fs


class JobError(CannotRun, ValueError):
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
    data = read_yaml_mapping(source, JobError, "job file")
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
    register_secrets_in(cfg.storage.options)  # scrubbed from whatever this process prints
    if not cfg.ray.address and os.environ.get("RAY_ADDRESS"):
        cfg.ray.address = os.environ["RAY_ADDRESS"]
    return cfg


def _remove(uri: str, storage_options: dict[str, Any]) -> None:
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
