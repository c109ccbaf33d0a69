"""The HTML of ``<output>/report.html``: a :class:`.tally.ReportTally` and ``summary.json``
rendered as one self-contained page, with inline CSS and inline SVG plots (matplotlib).

Transcripts are untrusted text: everything from the data goes through :func:`_e` (HTML-escaped), and
the page's Content-Security-Policy forbids scripts besides.
"""

from __future__ import annotations

import calendar
import html
import io
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..records import OK
from ..scoring import CorpusTally, align
from ..summary import JobSummary
from .tally import DURATION_RES, MAX_GROUPS, TIME_COLUMN, ReportTally

_SHOWN_GROUPS = 30


# ----------------------------------------------------------------------------------------------
# Plots: matplotlib figures to inline SVG (text kept as text, no dates, stable ids)

_OK_COLOUR, _FAIL_COLOUR, _BAR_COLOUR = "#3a7d44", "#c0392b", "#2e6da4"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig, plot_id: str, title: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": plot_id, "font.size": 9}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline SVG needs neither
    head_end = svg.index(">") + 1
    opening = svg[:head_end].replace(
        "<svg ", f'<svg id="{_e(plot_id)}" class="plot" role="img" aria-label="{_e(title)}" ', 1)
    return f"{opening}<title>{_e(title)}</title>{svg[head_end:]}"


def _label(text: str, limit: int = 48) -> str:
    text = str(text) if len(str(text)) <= limit else str(text)[: limit - 1] + "…"
    return text.replace("$", r"\$")  # a data '$' must not start matplotlib mathtext


def _bar_plot(plot_id: str, title: str, labels: list[str], values: list[float], xlabel: str,
              colours: list[str] | None = None, annotate: Iterable[str] | None = None) -> str:
    fig = _figure(7.5, 0.6 + 0.28 * max(len(labels), 1))
    ax = fig.add_subplot()
    positions = list(range(len(labels)))[::-1]
    bars = ax.barh(positions, values, color=colours or _BAR_COLOUR, height=0.7)
    ax.set_yticks(positions, [_label(x) for x in labels])
    ax.set_xlabel(xlabel)
    ax.set_title(_label(title), loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    if annotate is not None:
        ax.bar_label(bars, labels=[_label(a) for a in annotate], padding=3, fontsize=8)
        ax.set_xlim(0, max(values or [0]) * 1.18 or 1)
    return _svg(fig, plot_id, title)


def _duration_plot(ok: np.ndarray, failed: np.ndarray) -> str | None:
    size = max(ok.size, failed.size)
    if size == 0:
        return None
    ok, failed = np.pad(ok, (0, size - ok.size)), np.pad(failed, (0, size - failed.size))
    max_s = size / DURATION_RES
    width = next((w for w in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
                  if max_s / w <= 30), 7200)
    factor = int(width * DURATION_RES)
    n_bins = math.ceil(size / factor)
    pad = n_bins * factor - size
    ok_bins = np.pad(ok, (0, pad)).reshape(n_bins, factor).sum(axis=1)
    failed_bins = np.pad(failed, (0, pad)).reshape(n_bins, factor).sum(axis=1)
    edges = np.arange(n_bins) * width
    title = "Duration of decoded rows"
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    ax.bar(edges, ok_bins, width=width, align="edge", color=_OK_COLOUR, label="ok", edgecolor="white", linewidth=0.5)
    if failed_bins.any():
        ax.bar(edges, failed_bins, width=width, bottom=ok_bins, align="edge", color=_FAIL_COLOUR,
               label="failed", edgecolor="white", linewidth=0.5)
    ax.set_xlabel(f"duration (s), bins of {width:g} s")
    ax.set_ylabel("rows")
    ax.set_title(title, loc="left")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "plot-duration", title)


def _throughput_plot(finished: dict[int, list], started_at: int | None) -> str | None:
    if not finished:
        return None
    first, last = min(finished), max(finished)
    origin = min(started_at, first) if started_at is not None else first
    span = last - origin + 1
    # Times are per engine batch: a bin narrower than two batch gaps shows bursts, not throughput.
    gaps = np.diff(sorted(finished))
    floor = 2 * float(np.median(gaps)) if gaps.size else 1
    width = next((w for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
                  if span / w <= 60 and w >= floor), 86_400)
    n_bins = math.ceil(span / width)
    audio = np.zeros(n_bins)
    for second, (_, audio_s) in finished.items():
        audio[(second - origin) // width] += audio_s
    minutes = np.arange(n_bins) * width / 60
    title = "Throughput over time"
    fig = _figure(7.5, 4.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    widths = np.full(n_bins, float(width))
    widths[-1] = span - (n_bins - 1) * width  # the last bin ends with the last row, not a whole bin later
    if n_bins > 1 and widths[-1] < width / 2:  # a sliver of a bin would show one batch as a burst
        audio[-2] += audio[-1]
        widths[-2] += widths[-1]
        audio, widths, minutes = audio[:-1], widths[:-1], minutes[:-1]
    top.bar(minutes, audio / widths, width=widths / 60, align="edge", color=_BAR_COLOUR)
    top.set_ylabel("audio s per wall s\n(RTFx)")
    top.set_title(f"{title} (bins of {width:g} s)", loc="left")
    seconds = sorted(finished)  # exact, not binned: rows done by each completion time
    done = np.cumsum([finished[t][0] for t in seconds])
    bottom.step([0, *[(t - origin) / 60 for t in seconds], span / 60], [0, *done, done[-1]],
                where="post", color=_OK_COLOUR)
    bottom.set_ylabel("rows done (ok)")
    bottom.set_xlabel("minutes since job start" if started_at is not None else "minutes since first row finished")
    for ax in (top, bottom):
        ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig, "plot-throughput", title)


# ----------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232a}
body{margin:0 auto;max-width:1100px;padding:0 20px 60px}
h1{margin:24px 0 4px}h2{margin:36px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:4px}h3{margin:20px 0 6px}
.muted{color:#57606a}.note{background:#fff8c5;border:1px solid #e3c94c;padding:8px 12px;border-radius:6px}
.warn{background:#ffebe9;border:1px solid #e5a39e;padding:8px 12px;border-radius:6px}
.figures{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.figure{border:1px solid #d8dee4;border-radius:8px;padding:10px 14px;min-width:120px}
.figure b{display:block;font-size:22px}.figure span{color:#57606a;font-size:12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid #e5e9ee;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
svg.plot{max-width:100%;height:auto;display:block;margin:8px 0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.align{display:flex;flex-wrap:wrap;gap:3px 4px;max-width:760px}
.tok{display:inline-flex;flex-direction:column;border-radius:3px;padding:1px 4px}
.tok{font-family:ui-monospace,Menlo,monospace;font-size:12px}
.tok .r,.tok .h{white-space:pre;min-height:1.3em}.tok .h{border-top:1px dotted #c9d1d9}
.op-equal{background:#f6f8fa;color:#57606a}.op-substitute{background:#fff1c2}.op-delete{background:#ffd7d5}
.op-delete .r{text-decoration:line-through}.op-insert{background:#d3f0ff}
.legend .tok{margin-right:6px}details summary{cursor:pointer;color:#57606a}
td.config-key{white-space:nowrap}td.wrap{max-width:520px;word-break:break-word}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{_e(c)}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _score_rows(tallies: dict[tuple[str, str], CorpusTally], order: list[tuple[str, str]]) -> list[list[Any]]:
    return [[value, metric.upper(), _pct(t.rate), t.n_scored, t.ref_units, t.substitutions, t.deletions, t.insertions,
             t.normalizer]
            for value, metric in order for t in [tallies[(value, metric)]]]


def _score_section(section_id: str, column: str, tallies: dict[tuple[str, str], CorpusTally], title: str,
                   plot_id: str, overflow: int = 0) -> str:
    if not tallies:
        return '<p class="muted">No scored rows (no row had a reference).</p>'
    order = sorted(tallies, key=lambda k: (-tallies[k].ref_units, k))
    shown = order[:_SHOWN_GROUPS]
    headers = [column, "metric", "rate", "rows scored", "ref units", "S", "D", "I", "normaliser"]
    parts = [_table(section_id, headers, _score_rows(tallies, shown), numeric=(2, 3, 4, 5, 6, 7))]
    if len(order) > len(shown):
        parts.append(f'<p class="muted">Showing the {len(shown)} largest of {len(order)} groups by reference units.</p>')
    if overflow:
        parts.append(f'<p class="muted">{overflow} scored rows fell beyond {MAX_GROUPS} distinct values and are '
                     'tallied as (other).</p>')
    rated = [k for k in shown if tallies[k].rate is not None]
    if rated:
        labels = [f"{value} ({metric.upper()})" for value, metric in rated]
        rates = [100 * tallies[k].rate for k in rated]
        notes = [f"{r:.1f}% of {tallies[k].ref_units}" for r, k in zip(rates, rated, strict=True)]
        parts.append(_bar_plot(plot_id, title, labels, rates, "error rate (%), corpus: (S+D+I)/N", annotate=notes))
    return "".join(parts)


def _headline(tally: ReportTally, summary: JobSummary | None) -> str:
    n_ok = tally.by_status.get(OK, 0)
    n_failed = tally.n_rows - n_ok
    rtfx_job = summary.rtfx_job if summary else None
    rtfx_engine = tally.audio_s_ok / tally.inference_s if tally.inference_s else None
    overall = _overall(tally.scores)
    figures = [
        ("rows", f"{tally.n_rows:,}"),
        ("ok", f"{n_ok:,}"),
        ("failed", f"{n_failed:,}" + (f" ({100 * n_failed / tally.n_rows:.1f}%)" if tally.n_rows else "")),
        ("audio transcribed (h)", f"{tally.audio_s_ok / 3600:,.3f}"),
        ("RTFx job (audio / wall)", _num(rtfx_job, 1)),
        ("RTFx engine (audio / busy)", _num(rtfx_engine, 1)),
        *[(f"corpus {m.upper()}, all languages", _pct(t.rate)) for m, t in sorted(overall.items())],
    ]
    cards = "".join(f'<div class="figure"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in figures)
    parts = [f'<div class="figures" id="headline-figures">{cards}</div>']
    if summary is None:
        parts.append('<p class="note">No summary.json beside the transcripts (job still running, or it '
                     'stopped early): job RTFx and the configuration are unknown.</p>')
    elif summary.n_input != tally.n_rows:
        parts.append(f'<p class="warn">summary.json counts {_e(summary.n_input)} rows but the transcripts '
                     f'hold {tally.n_rows}: a partial copy, or files from another run?</p>')
    parts.append("<h3>Corpus error rate by language</h3>")
    parts.append('<p class="muted">From summed counts, (S + D + I) / N over every scored row of the language; '
                 'CER languages count characters.</p>')
    parts.append(_score_section("scores-language", "language", tally.scores, "Error rate by language",
                                "plot-scores-language"))
    return "".join(parts)


def _overall(scores: dict[tuple[str, str], CorpusTally]) -> dict[str, CorpusTally]:
    overall: dict[str, CorpusTally] = {}
    for (_, metric), t in scores.items():
        overall.setdefault(metric, CorpusTally(metric=metric, normalizer="per-language")).merge(t)
    return overall


def _status_section(tally: ReportTally) -> str:
    order = sorted(tally.by_status, key=lambda s: (s != OK, -tally.by_status[s], s))
    rows = []
    for status in order:
        messages = tally.messages.get(status, Counter()).most_common(3)
        example = "; ".join(f"{m} (×{n})" for m, n in messages)
        rows.append([status, tally.by_status[status], _pct(tally.by_status[status] / tally.n_rows), example])
    parts = [_table("status-table", ["status", "rows", "share", "most frequent messages"], rows, numeric=(1, 2))]
    if order:
        colours = [_OK_COLOUR if s == OK else _FAIL_COLOUR for s in order]
        parts.append(_bar_plot("plot-status", "Rows by status", order, [tally.by_status[s] for s in order], "rows",
                               colours=colours, annotate=[f"{tally.by_status[s]:,}" for s in order]))
    return "".join(parts)


def _throughput_section(tally: ReportTally, summary: JobSummary | None) -> str:
    if not tally.has_time:
        return (f'<p class="note" id="throughput-missing">Throughput over time needs a per-row completion time, a '
                f'<code>{TIME_COLUMN}</code> timestamp column (UTC) on the transcripts; these transcripts have none.</p>')
    started = None
    if summary and summary.started_at:
        try:
            started = int(calendar.timegm(time.strptime(summary.started_at, "%Y-%m-%dT%H:%M:%SZ")))
        except ValueError:
            started = None
    svg = _throughput_plot(tally.finished, started)
    if svg is None:
        return f'<p class="note" id="throughput-missing">No ok row carries a <code>{TIME_COLUMN}</code> time.</p>'
    return (f'<p class="muted"><code>{TIME_COLUMN}</code> is stamped per engine batch, so the curve is as fine as '
            f'the batches.</p>{svg}')


def _alignment_html(triples: list[tuple[str, str | None, str | None]]) -> str:
    tokens = "".join(
        f'<span class="tok op-{op}"><span class="r">{_e(r or "")}</span><span class="h">{_e(h or "")}</span></span>'
        for op, r, h in triples)
    return f'<div class="align">{tokens}</div>'


def _worst_section(tally: ReportTally) -> str:
    rows = tally.worst_rows
    if not rows:
        return '<p class="muted">No scored rows.</p>'
    legend = ('<p class="legend"><span class="tok op-equal"><span class="r">ref</span><span class="h">hyp</span></span>'
              '<span class="tok op-substitute"><span class="r">S</span><span class="h">substituted</span></span>'
              '<span class="tok op-delete"><span class="r">D</span><span class="h"></span></span>'
              '<span class="tok op-insert"><span class="r"></span><span class="h">I inserted</span></span>'
              ' top line reference, bottom line hypothesis, both normalised as scored.</p>')
    body = []
    for rank, row in enumerate(rows, 1):
        try:
            aligned = _alignment_html(align(row["reference"] or "", row["text"], row["metric"], row["normalizer"]))
        except ValueError as e:  # a normaliser this version does not know
            aligned = f'<p class="warn">alignment unavailable: {_e(e)}</p>'
        raw = (f'<details><summary>raw text</summary><div class="wrap"><b>reference</b> {_e(row["reference"])}<br>'
               f'<b>hypothesis</b> {_e(row["text"])}</div></details>')
        body.append(
            f'<tr class="worst-row" data-s="{row["substitutions"]}" data-d="{row["deletions"]}" data-i="{row["insertions"]}">'
            f'<td class="num">{rank}</td><td class="mono wrap">{_e(row["id"])}</td><td>{_e(row["language"])}</td>'
            f'<td class="num">{_e(_pct(row["wer"]))} {_e(row["metric"].upper())}</td>'
            f'<td class="num">{row["substitutions"]}/{row["deletions"]}/{row["insertions"]} of {row["ref_words"]}</td>'
            f'<td>{aligned}{raw}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("#", "id", "language", "rate", "S/D/I of N", "alignment"))
    return f'{legend}<table id="worst-rows"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _config_section(summary: JobSummary | None) -> str:
    if summary is None:
        return '<p class="muted">No summary.json.</p>'
    summary = summary.model_dump(mode="json")
    job_keys = ["status", "stopped_early", "started_at", "engine", "model", "n_input", "n_ok", "n_failed",
                "n_failed_by_reason", "failed_fraction", "max_failed_fraction", "audio_s", "audio_s_decoded",
                "job_wall_s", "inference_s", "rtfx_job", "rtfx_inference", "this_run"]
    job = [[k, json.dumps(summary[k], ensure_ascii=False) if isinstance(summary[k], (dict, list)) else summary[k]]
           for k in job_keys if k in summary]
    job.append(["files", f"{len(summary.get('files') or [])} Parquet part(s)"])
    config = [[k, json.dumps(v, ensure_ascii=False)] for k, v in _flatten(summary.get("config") or {})]
    return ("<h3>Job</h3>" + _table("job-table", ["field", "value"], job)
            + "<h3>Resolved configuration</h3>" + _table("config-table", ["key", "value"], config))


def render(tally: ReportTally, summary: JobSummary | None, output_uri: str) -> str:
    """The whole page as one string."""
    name = output_uri.rstrip("/").rsplit("/", 1)[-1] or output_uri
    sections = [
        ("headline", "Headline", _headline(tally, summary)),
        *[(f"group-{i}", f"Error rate by {column}",
           _score_section(f"scores-{column}", column, tally.group_scores.get(column, {}), f"Error rate by {column}",
                          f"plot-scores-group-{i}", tally.group_overflow.get(column, 0)))
          for i, column in enumerate(tally.group_by)],
        ("status", "Status and failure reasons", _status_section(tally)),
        ("durations", "Durations", _duration_plot(tally.durations_ok, tally.durations_failed)
         or '<p class="muted">No row decoded.</p>'),
        ("throughput", "Throughput over time", _throughput_section(tally, summary)),
        ("worst", f"Worst {tally.worst} rows by error rate", _worst_section(tally)),
        ("config", "Job and configuration (summary.json)", _config_section(summary)),
    ]
    body = "".join(f'<section id="{_e(sid)}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in sections)
    generated = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>Quarry report: {_e(name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Quarry report</h1><p class=\"muted\"><code>{_e(output_uri)}</code> · generated {generated}</p></header>"
        f"{body}</body></html>\n"
    )
