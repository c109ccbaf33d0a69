"""``<output>/report.html``: one job's results on one page, for people.

One streamed pass over ``<output>/transcripts/*.parquet`` (:mod:`.tally`) builds running totals;
``summary.json`` adds the job's wall time and configuration; :mod:`.html` renders the page. The
page is self-contained: inline CSS and inline SVG plots (matplotlib), no scripts and no external
resources, so it opens offline and can be attached to a ticket. Transcripts are untrusted text:
everything from the data is escaped, and the page's Content-Security-Policy forbids scripts besides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from ..storage import join_uri, url_to_fs, write_atomic
from ..summary import JobSummary
from .html import render
from .tally import COLUMNS, TIME_COLUMN, ReportError, ReportTally

__all__ = ["ReportError", "open_transcripts", "write_report"]


def open_transcripts(output_uri: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """The Parquet parts of a Quarry output as a lazy pyarrow dataset (nothing read yet).

    Parts still being written (``_tmp-*``) are ignored: pyarrow skips names starting with ``_``.
    """
    fs, root = url_to_fs(output_uri, storage_options)
    path = root.rstrip("/") + "/transcripts"
    if not fs.isdir(path):
        raise ReportError(f"no transcripts at {join_uri(output_uri, 'transcripts')}: is {output_uri} a Quarry output?")
    return ds.dataset(path, filesystem=fs, format="parquet")


def write_report(output_uri: str, storage_options: dict[str, Any] | None = None, *,
                 group_by: Sequence[str] = (), worst: int = 20) -> str:
    """Write ``<output>/report.html`` and return its URI.

    ``group_by`` names columns of the transcripts (a carried-through manifest column such as
    ``dataset``, or ``model``, ``task``...) to break WER down by; ``worst`` is how many of the
    highest-error rows to show aligned word by word.
    """
    if worst < 0:
        raise ReportError(f"worst must be >= 0, not {worst}")
    dataset = open_transcripts(output_uri, storage_options)
    names = set(dataset.schema.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ReportError(f"transcripts at {output_uri} lack columns {missing}: not a Quarry output")
    unknown = [c for c in group_by if c not in names]
    if unknown:
        raise ReportError(f"no column {unknown} to group by; columns are: {', '.join(dataset.schema.names)}")
    has_time = TIME_COLUMN in names and pa.types.is_timestamp(dataset.schema.field(TIME_COLUMN).type)
    columns = list(dict.fromkeys([*COLUMNS, *group_by, *([TIME_COLUMN] if has_time else [])]))

    tally = ReportTally(group_by=tuple(group_by), worst=worst, has_time=has_time)
    for batch in dataset.to_batches(columns=columns, batch_size=8192):
        tally.add(batch)

    page = render(tally, JobSummary.read(output_uri, storage_options), output_uri)
    uri = join_uri(output_uri, "report.html")
    write_atomic(uri, page.encode("utf-8"), storage_options)
    return uri
