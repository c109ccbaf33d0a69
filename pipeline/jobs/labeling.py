"""The ``dataset-labeling`` job: pseudo-labels with the engine's confidence, subtitles, and exports
narrowed by confidence, duration and language."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from ..claim import claim_output
from ..storage import join_uri
from ..summary import JobSummary
from .results import JobResult
from .spec import EXPORT_FILES, DatasetLabelingJob, _remove, job_config

EXPORTS_DIR = "exports"


@dataclass(frozen=True)
class LabelingResult(JobResult):
    kind: ClassVar[str] = "dataset-labeling"
    output: str
    summary: JobSummary
    exports: dict[str, Any]  # format -> pipeline.exports.ExportResult
    filters: dict[str, Any]
    subtitles: list[str]

    def _lines(self) -> list[str]:
        active = {k: v for k, v in self.filters.items() if v is not None}
        lines = [f"dataset-labeling -> {self.output}", *self.summary_lines(),
                 f"  exports of {self.summary.n_ok} ok rows, filters {json.dumps(active) if active else 'none'}:"]
        for fmt, result in self.exports.items():
            lines.append(f"    {fmt}: {result.count} rows -> {result.path}")
        if self.subtitles:
            lines.append(f"  subtitles ({', '.join(self.subtitles)}): {join_uri(self.output, 'subtitles')}/")
        return lines


def run_dataset_labeling(job: DatasetLabelingJob, overrides: list[str] | tuple[str, ...] = (), *,
                         overwrite: bool = False) -> LabelingResult:
    from ..exports import export
    from ..plan import run_job

    before = () if job.subtitles is None else (f"output.subtitles=[{', '.join(job.subtitles)}]",)
    cfg = job_config(job.config, overrides, before=before)
    filters = job.filters.model_dump()
    exports = {}
    with claim_output(job.output, cfg.storage.options) as claim:
        if overwrite:
            _remove(join_uri(job.output, EXPORTS_DIR), cfg.storage.options)
        result = run_job(cfg, job.manifest, job.output, overwrite=overwrite, claim=claim)
        for fmt in dict.fromkeys(job.exports):
            dest = join_uri(job.output, EXPORTS_DIR, EXPORT_FILES[fmt])
            exports[fmt] = export(job.output, fmt, dest, storage_options=cfg.storage.options, **filters)
    return LabelingResult(job.output, result.summary, exports, filters, list(cfg.output.subtitles))
