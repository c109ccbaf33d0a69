"""The ``call-center`` job: campaign keywords joined to the calls, split-channel transcription, and
per-call analytics (talk time, words per minute, cross-talk, silence, keyword hits)."""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from ..claim import claim_output
from ..config import JobConfig
from ..output import INPUTS_NAME
from ..records import carried_name, column
from ..storage import atomic_open, join_uri, store_root, url_to_fs, write_atomic
from ..summary import JobSummary
from .results import JobResult
from .spec import CallCenterJob, JobError, _remove, job_config

log = logging.getLogger("quarry")

ANALYTICS_DIR = "analytics"
_KEYWORD_SEP = re.compile(r"[;,]")


@dataclass(frozen=True)
class CallCenterResult(JobResult):
    kind: ClassVar[str] = "call-center"
    output: str
    summary: JobSummary
    analytics: str
    n_calls: int
    channels: dict[str, dict[str, float]]  # channel -> {"talk_s": total, "wpm": mean}
    keyword_hits: dict[str, int]  # keyword -> hits over all calls
    unknown_campaigns: dict[str, int]  # campaign values with no keyword list -> calls

    def _lines(self) -> list[str]:
        lines = [f"call-center -> {self.output}", *self.summary_lines(),
                 f"  analytics: {self.n_calls} calls -> {self.analytics}"]
        for channel, figures in self.channels.items():
            wpm = f"{figures['wpm']:.0f}" if figures["wpm"] is not None else "-"
            lines.append(f"    {channel}: talk time {figures['talk_s']:.1f} s in all, mean {wpm} words/min")
        hits = sorted(self.keyword_hits.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        lines.append("    keyword hits: " + (", ".join(f"{k} {n}" for k, n in hits) if hits else "none"))
        if self.unknown_campaigns:
            lines.append("    campaigns without keywords: "
                         + ", ".join(f"{k!r} ({n} calls)" for k, n in sorted(self.unknown_campaigns.items())))
        return lines


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


def join_campaign_keywords(manifest_uri: str, output_uri: str, campaigns: dict[str, list[str]], campaign_column: str,
                           cfg: JobConfig) -> tuple[str, int, Counter]:
    """Stream the manifest into ``<output>/inputs.jsonl`` with each row's campaign keywords added to
    its ``keywords`` column (after any keywords of its own) and its audio path made absolute.
    Returns (the written manifest's URI, rows, calls per campaign that has no keyword list)."""
    from ..keywords import parse_keywords
    from ..manifest import Manifest, resolve_audio_uri

    manifest = Manifest.open(manifest_uri, cfg)
    columns = cfg.input.columns
    by_folded = {name.casefold(): words for name, words in campaigns.items()}
    fs, out = url_to_fs(output_uri, cfg.storage.options)
    n_rows, unknown, saw_column = 0, Counter(), False
    with atomic_open(fs, f"{out.rstrip('/')}/{INPUTS_NAME}", "w", encoding="utf-8") as f:
        for batch in manifest.batches():
            lines = []
            for raw in manifest.raw_rows(batch):
                n_rows += 1
                if raw.problem:  # not a JSON object: passed on as written, the job marks it invalid_row
                    lines.append(raw.origin)
                    continue
                row = dict(raw.values)
                saw_column = saw_column or campaign_column in row
                campaign = row.get(campaign_column)
                campaign = str(campaign).strip() if campaign is not None else ""
                keywords = by_folded.get(campaign.casefold())
                if keywords is None:
                    unknown[campaign or "(none)"] += 1
                audio = row.get(columns.audio)
                if isinstance(audio, str) and audio.strip():
                    row[columns.audio] = resolve_audio_uri(audio.strip(), manifest.directory)
                own = parse_keywords(row.get(columns.keywords))
                row[columns.keywords] = own + [k for k in keywords or [] if k.casefold() not in
                                               {o.casefold() for o in own}]
                lines.append(json.dumps(row, ensure_ascii=False, default=str))
            if lines:
                f.write("\n".join(lines) + "\n")
        if n_rows and not saw_column:
            raise JobError(f"manifest {manifest_uri} has no {campaign_column!r} column (campaign_column)")
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
        *(column(n) for n in ("id", "audio", "status")),
        pa.field("campaign", pa.string()),
        column("duration_s"),
        pa.field("channels", pa.list_(pa.struct([
            ("channel", pa.string()), ("talk_s", pa.float64()), ("words", pa.int64()), ("wpm", pa.float64()),
        ]))),
    ]
    for name in channel_names:
        fields += [pa.field(f"talk_s_{name}", pa.float64()), pa.field(f"words_{name}", pa.int64()),
                   pa.field(f"wpm_{name}", pa.float64())]
    fields += [
        column("overlap_s"),  # both (all) channels speaking at once
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

    A mono call diarized (``diarize.enabled``) has ``speakers`` instead of ``channel_texts``: its
    speakers stand for the channels, in order of first speech (spk0, the first to speak, is
    ``channel_names[0]``: the agent, who answers), and nobody speaks over anybody (one label per
    moment), so its overlap is 0.

    Silence is approximated from the per-channel speaking times: speech = sum of talk time - overlap
    (the overlap is counted in every channel's talk time), silence = duration - speech.
    """
    out: dict[str, Any] = {"id": row["id"], "audio": row["audio"], "status": row["status"], "campaign": campaign,
                           "duration_s": row["duration_s"]}
    per_channel = row.get("channel_texts") or _speakers_as_channels(row.get("speakers"), channel_names)
    if row["status"] != "ok" or not per_channel:
        return out  # a failed call keeps its row, without figures
    channels = []
    for ct in per_channel:
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
    text = "\n".join(ct["text"] or "" for ct in per_channel)
    out["keyword_hits"] = keyword_hits(text, keywords)
    out["keyword_hits_total"] = sum(h["count"] for h in out["keyword_hits"])
    return out


def _speakers_as_channels(speakers: list[dict] | None, channel_names: list[str]) -> list[dict] | None:
    """A diarized call's ``speakers`` as ``channel_texts``: spk<N> named ``channel_names[N]``."""
    if not speakers:
        return None
    out = []
    for s in speakers:
        n = int(s["speaker"][3:]) if s["speaker"].startswith("spk") and s["speaker"][3:].isdigit() else None
        name = channel_names[n] if n is not None and n < len(channel_names) else s["speaker"]
        out.append({"channel": name, "text": s["text"], "speaking_s": s["speaking_s"]})
    return out


def write_analytics(output_uri: str, campaigns: dict[str, list[str]], campaign_column: str,
                    cfg: JobConfig) -> tuple[str, list[dict[str, Any]]]:
    """``<output>/analytics/part-*.parquet``: one analytics part per transcripts part (same name),
    read and written one part at a time. Returns the folder's URI and small per-call figures for
    the summary (no texts)."""
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
    wanted += ["speakers"] if cfg.diarize.enabled else []
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
        write_atomic(f"{folder}/{name}", buffer.getvalue().to_pybytes(), fs=fs)
        figures += [{"channels": r.get("channels") or [], "hits": r.get("keyword_hits") or []} for r in rows]
    return join_uri(output_uri, ANALYTICS_DIR), figures


def run_call_center(job: CallCenterJob, overrides: list[str] | tuple[str, ...] = (), *,
                    overwrite: bool = False) -> CallCenterResult:
    from ..plan import run_job

    # The job writes its own JSONL manifest (inputs.jsonl), whatever format the calls came in.
    cfg = job_config(job.config, overrides, after=("input.format=jsonl",))
    if cfg.audio.channels != "split" and not cfg.diarize.enabled:
        raise JobError(f"call-center needs audio.channels: split (stereo calls) or diarize.enabled (mono calls) "
                       f"in its config ({job.config}), got audio.channels {cfg.audio.channels!r}")
    source_cfg = job_config(job.config, overrides)  # how to read the calls' own manifest
    campaigns = read_campaigns(job.campaigns, cfg.storage.options)
    # inputs.jsonl lives with the output; its audio may be read where the calls' own manifest allows
    allowed = source_cfg.input.allowed_prefixes or [store_root(job.manifest)]
    with claim_output(job.output, cfg.storage.options) as claim:  # before inputs.jsonl is written
        if overwrite:
            _remove(join_uri(job.output, ANALYTICS_DIR), cfg.storage.options)
        inputs, n_rows, unknown = join_campaign_keywords(job.manifest, job.output, campaigns, job.campaign_column,
                                                         source_cfg)
        log.info("call-center: %d calls, %d campaigns with keywords; %d calls in campaigns without keywords",
                 n_rows, len(campaigns), sum(unknown.values()))
        result = run_job(cfg.reading_from(*allowed), inputs, job.output, overwrite=overwrite, claim=claim)
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
