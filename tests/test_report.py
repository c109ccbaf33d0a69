"""report.html: built from an output's Parquet and summary.json, rendered for real in headless Chromium.

The output is Parquet parts in the one output schema plus the pipeline's own summary.json, from
realistic rows (two languages and a CER language, failed rows, a carried-through `speaker` column)
whose error counts come from the real scorer, with hostile text wherever data reaches the page.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ScoringConfig, load_config
from pipeline.records import TRANSCRIPT_COLUMNS, transcript_schema
from pipeline.report import ReportError, write_report
from pipeline.scoring import align, score
from pipeline.summary import JobSummary, JobTally

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
STARTED = datetime(2026, 11, 22, 9, 0, 0, tzinfo=timezone.utc)

# (id, language, speaker, reference, hypothesis, duration_s); hypothesis None = the row failed.
ROWS = [
    ("en-000", "en", "alice", "the quick brown fox jumps over the lazy dog", "the quick brown fox jumps over the lazy dog", 4.1),
    ("en-001", "en", "alice", "she sells sea shells by the sea shore", "she sells shells by the sea sure", 3.2),
    ("en-002", "en", "bob", "a long reference with many words that the model mostly gets right in the end",
     "a long reference with many words the model mostly gets right in the end", 7.9),
    ("en-003", "en", "bob", "hi", "hi there you", 0.9),  # short row, high WER: mean of row WERs != corpus WER
    ("en-004", "en", HOSTILE, "numbers like twenty five", f"numbers like {HOSTILE} twenty", 2.4),
    ("de-000", "de", "carl", "für die besten aussichten auf hongkong", "für die besten aussichten auf hongkong", 5.5),
    ("de-001", "de", "carl", "er griff auch alles an was ins wasser kam", "er griff auch alles an was im wasser kam", 6.0),
    ("de-002", "de", "alice", "der raum wurde als leichenhalle genutzt", "der raum wurde als leichenhaler genutzt ja", 4.4),
    ("ja-000", "ja", "bob", "今日は良い天気です", "今日はいい天気です", 2.0),
    (f"bad-{HOSTILE}", "en", "bob", "never transcribed", None, None),
]
FAILED = {"bad-" + HOSTILE: ("missing_object", f"no such object: s3://bucket/{HOSTILE}.flac")}


def _rows(with_time: bool) -> list[dict]:
    scoring = ScoringConfig()
    out = []
    for i, (row_id, language, speaker, reference, hypothesis, duration_s) in enumerate(ROWS):
        row = dict.fromkeys(TRANSCRIPT_COLUMNS)
        row.update(id=row_id, row_index=i, audio=f"s3://bucket/audio/{row_id}.flac", reference=reference, language=language,
                   task="transcribe", speaker=speaker)
        if hypothesis is None:
            row["status"], row["error"] = FAILED[row_id]
        else:
            counts = score(reference, hypothesis, language, scoring)
            row.update(status="ok", text=hypothesis, duration_s=duration_s, source_sample_rate=16000,
                       source_channels=1, engine="whisper", model="base", avg_logprob=-0.1 - 0.05 * i,
                       inference_s=duration_s / 8, metric=counts.metric, normalizer=counts.normalizer,
                       ref_words=counts.ref_units, substitutions=counts.substitutions, deletions=counts.deletions,
                       insertions=counts.insertions, wer=counts.rate)
            if with_time:
                row["finished_at"] = STARTED + timedelta(seconds=20 + 15 * (i // 3))  # engine batches of 3
        out.append(row)
    return out


def make_output(root: Path, *, with_time: bool = True) -> dict:
    """Write a Quarry output (2 Parquet parts + summary.json) at ``root``; returns the summary."""
    extra = [pa.field("speaker", pa.string())]
    if "finished_at" not in TRANSCRIPT_COLUMNS:  # older schema: the time travels as a carried column
        extra.append(pa.field("finished_at", pa.timestamp("ms", tz="UTC")))
    schema = transcript_schema(extra)
    table = pa.Table.from_pylist(_rows(with_time), schema=schema)
    if not with_time:
        schema = schema.remove(schema.get_field_index("finished_at"))
        table = table.drop_columns(["finished_at"])
    files = write_parts(root, table, rows_per_file=6)
    tally = JobTally()
    tally.add(table)
    summary = JobSummary.build(tally, job_wall_s=80.0, started_at=STARTED.timestamp(), engine="whisper", model="base",
                               config=load_config(None, ["engine.model=base"]).redacted(), files=files,
                               max_failed_fraction=1.0)
    summary.write(str(root), {})
    return summary.model_dump()


def write_parts(root: Path, table: pa.Table, rows_per_file: int) -> list[str]:
    """``<root>/transcripts/part-*.parquet`` as a job writes them, a few rows per part."""
    (root / "transcripts").mkdir(parents=True)
    files = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_file)):
        files.append(str(root / "transcripts" / f"part-{i:05d}.parquet"))
        pq.write_table(table.slice(start, rows_per_file), files[-1])
    return files


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is not installed: `make setup` installs it (Debian package chromium)",
                    pytrace=False)
    return exe


def render(page: Path, tmp_path: Path) -> tuple[str, Path]:
    """(the DOM after Chromium has parsed and laid out the page, a full-page PNG screenshot)."""
    exe, url = chromium(), page.resolve().as_uri()
    png = tmp_path / "report.png"
    profile = [f"--user-data-dir={tmp_path / 'chromium-dom'}"]
    dom = subprocess.Popen([exe, *CHROMIUM_FLAGS, *profile, "--dump-dom", url],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    shot = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-shot'}",
                           "--window-size=1200,4000", f"--screenshot={png}", url],
                          capture_output=True, text=True, timeout=120)
    out, _ = dom.communicate(timeout=120)
    assert dom.returncode == 0 and out.strip(), "chromium --dump-dom produced nothing"
    assert shot.returncode == 0, shot.stderr[-2000:]
    return out, png


class Dom(HTMLParser):
    """Just enough of the rendered DOM to assert on: elements with attributes, and text by element id."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.title = ""
        self._stack: list[tuple[str, dict]] = []
        self.text_in: dict[str, list[str]] = {}
        self.feed(text)

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in self.VOID:
            self._stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._stack and self._stack[-1][0] == "title":
            parent = self._stack[-2] if len(self._stack) > 1 else ("", {})
            if parent[0] == "head":
                self.title += data
            elif parent[0] == "svg":
                self.text_in.setdefault("svg-title:" + parent[1].get("id", ""), []).append(data)
        for _, attrs in self._stack:
            if "id" in attrs:
                self.text_in.setdefault(attrs["id"], []).append(data)

    def by_tag(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.elements if t == tag]

    def by_class(self, cls: str) -> list[dict]:
        return [attrs for _, attrs in self.elements if cls in (attrs.get("class") or "").split()]


def test_report_renders_every_plot_and_aligned_worst_rows_without_running_data_scripts(tmp_path):
    output = tmp_path / "run-2026-11-22"
    summary = make_output(output)

    uri = write_report(str(output), group_by=["speaker"], worst=5)

    page = output / "report.html"
    assert uri == str(page) and page.exists()
    dom_text, png = render(page, tmp_path)
    dom = Dom(dom_text)

    # Data scripts never became elements, never ran (the title is still ours), and show as text.
    assert dom.title == "Quarry report: run-2026-11-22"
    assert dom.by_tag("script") == []
    assert not [a for a in dom.by_tag("img")], "a data <img onerror> became an element"
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom_text

    # Every plot is an inline SVG with its id and an accessible title.
    plots = {a["id"] for a in dom.by_tag("svg") if "plot" in (a.get("class") or "")}
    assert plots == {"plot-scores-language", "plot-scores-group-0", "plot-status", "plot-duration", "plot-throughput"}
    for plot in plots:
        assert "".join(dom.text_in["svg-title:" + plot]).strip(), f"{plot} has no <title>"
    assert not [a for _, a in dom.elements if any(k.startswith("on") for k in a)], "an event handler attribute"

    # Corpus rates from summed counts, equal to summary.json's (and not the mean of row rates).
    for language, metrics in summary["scores"]["by_language"].items():
        for metric, t in metrics.items():
            assert f"{100 * t['rate']:.2f}%" in "".join(dom.text_in["scores-language"]), (language, metric)
    en_rows = [r for r in _rows(True) if r["language"] == "en" and r["wer"] is not None]
    mean_wer = sum(r["wer"] for r in en_rows) / len(en_rows)
    assert f"{100 * mean_wer:.2f}%" not in "".join(dom.text_in["scores-language"])

    # Status breakdown names the failure reason; the time-less note is absent.
    assert "missing_object" in "".join(dom.text_in["status-table"])
    assert "throughput-missing" not in dom_text

    # Worst rows: as many as asked, highest rate first, each aligned token by token, and the
    # coloured tokens add up to the row's stored S, D and I.
    worst = dom.by_class("worst-row")
    assert len(worst) == 5
    row_blocks = dom_text.split('class="worst-row"')[1:]
    rates = []
    for attrs, block in zip(worst, row_blocks, strict=True):
        assert block.count('class="tok op-substitute"') == int(attrs["data-s"])
        assert block.count('class="tok op-delete"') == int(attrs["data-d"])
        assert block.count('class="tok op-insert"') == int(attrs["data-i"])
        assert block.count('class="tok op-') == block.count('class="r"') == block.count('class="h"')
        rates.append(float(block.split('class="num">', 2)[2].split("%")[0]))
    assert rates == sorted(rates, reverse=True)

    # The job's configuration from summary.json.
    assert "engine.model" in "".join(dom.text_in["config-table"])

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_report_without_a_time_column_says_which_column_throughput_needs(tmp_path):
    output = tmp_path / "out"
    make_output(output, with_time=False)

    write_report(str(output))

    html_text = (output / "report.html").read_text()
    assert 'id="throughput-missing"' in html_text and "<code>finished_at</code>" in html_text
    assert 'id="plot-throughput"' not in html_text
    assert 'id="plot-duration"' in html_text


def test_report_refuses_an_unknown_group_column_and_a_folder_without_transcripts(tmp_path):
    output = tmp_path / "out"
    make_output(output)
    with pytest.raises(ReportError, match="no column"):
        write_report(str(output), group_by=["nope"])
    with pytest.raises(ReportError, match="no transcripts"):
        write_report(str(tmp_path / "empty"))


def test_report_without_summary_still_reports_from_the_transcripts(tmp_path):
    output = tmp_path / "out"
    make_output(output)
    (output / "summary.json").unlink()

    write_report(str(output))

    html_text = (output / "report.html").read_text()
    assert "No summary.json" in html_text and 'id="plot-status"' in html_text


@pytest.mark.parametrize("row_id", ["en-001", "en-003", "de-002", "ja-000"])
def test_alignment_tokens_add_up_to_the_stored_error_counts(row_id):
    row = next(r for r in _rows(True) if r["id"] == row_id)
    triples = align(row["reference"], row["text"], row["metric"], row["normalizer"])
    ops = [op for op, _, _ in triples]
    assert ops.count("substitute") == row["substitutions"]
    assert ops.count("delete") == row["deletions"]
    assert ops.count("insert") == row["insertions"]
    assert len(triples) - ops.count("insert") == row["ref_words"]
