"""Recordings put back together from their segments, on the driver, as results stream in.

Segments of one recording reach the driver in any order, mixed with other recordings' rows
(they were spread over every engine actor). :class:`Assembler` holds the *text* of segments
whose recording is not complete yet (never audio) and, when the last one arrives, emits:

* one recording row for ``transcripts/``: the stitched text (:func:`pipeline.stitch.stitch`),
  or, with ``audio.channels: split``, one text per channel, a conversation ordered by start time,
  speaking and cross-talk time; scored against the recording's reference;
* its rows for ``segments/``: one per segment, with timestamps;
* optionally SRT / WebVTT files under ``subtitles/``.

A recording of one segment (most clips) passes straight through.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .config import RedactConfig, ScoringConfig
from .diarize.turns import as_regions, speaker_columns
from .records import OK, SAMPLE_RATE_HZ, SCORE, SEGMENT, SEGMENT_TABLE_SCHEMA, Status, conform, keep
from .scoring import score_row
from .segment import Segment
from .stitch import conversation, speaking_stats, stitch
from .storage import url_to_fs, write_atomic
from .subtitles import MAX_LINE_CHARS, MAX_LINES, to_srt, to_webvtt


def subtitle_name(row_id: str) -> str:
    """A file name for a recording id that cannot leave its folder: unsafe characters replaced,
    length bounded, and a hash of the exact id appended so distinct ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id)[:80].lstrip(".") or "recording"
    return f"{safe}-{hashlib.sha1(row_id.encode()).hexdigest()[:8]}"


class SubtitleWriter:
    """Writes ``<output>/subtitles/<name>.srt`` / ``.vtt`` for each finished recording."""

    def __init__(self, output_uri: str, formats: Iterable[str], storage_options: dict[str, Any]):
        self.formats = tuple(formats)
        self.fs, root = url_to_fs(output_uri, storage_options)
        self.dir = root.rstrip("/") + "/subtitles"

    def write(self, row_id: str, cues: list[tuple[float, float, str]]) -> None:
        if not self.formats or not cues:
            return
        name = subtitle_name(row_id)
        for fmt in self.formats:
            text = to_srt(cues) if fmt == "srt" else to_webvtt(cues)
            write_atomic(f"{self.dir}/{name}.{fmt}", text.encode("utf-8"), fs=self.fs)


@dataclass
class _Pending:
    first: dict[str, Any]
    n_channels: int
    expected: dict[str | None, int] = field(default_factory=dict)
    parts: dict[str | None, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.expected[row["channel"]] = row["n_segments"]
        self.parts.setdefault(row["channel"], {})[row["segment_index"]] = row

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.n_channels and all(
            len(self.parts[c]) == n for c, n in self.expected.items())


class Assembler:
    """Segment rows in (``stages.scored_schema``), recording and segment rows out."""

    def __init__(self, transcript_schema: pa.Schema, scoring: ScoringConfig,
                 subtitles: SubtitleWriter | None = None, redact: RedactConfig | None = None):
        self.schema = transcript_schema
        self.scoring = scoring
        self.subtitles = subtitles
        self.redact = redact if redact is not None and redact.enabled else None
        self._redactor = None
        self._pending: dict[int, _Pending] = {}

    def _redact(self, recording: dict, rows: list[dict]) -> None:
        """Redaction of a stitched recording (on the driver: it needs the whole text). With
        drop_text, its segment rows lose their raw text too."""
        from .redact import load_redactor, redact_row

        if self._redactor is None:
            self._redactor = load_redactor(self.redact)
        redact_row(recording, self._redactor, self.redact)
        if self.redact.drop_text:
            words = recording["words"] or []
            for r in rows:
                r["text"] = None
                if r["words"] is not None:  # its own stretch (and channel) of the recording's redacted words
                    r["words"] = [w for w in words if r["start_s"] <= w["start_s"] < (r["end_s"] or 0)
                                  and (r["channel"] is None or w["speaker"] == r["channel"])]

    @property
    def pending(self) -> int:
        """Recordings waiting for more segments."""
        return len(self._pending)

    def add(self, batch: pa.Table) -> tuple[pa.Table, pa.Table]:
        whole = pc.and_(pc.and_(pc.equal(batch["n_channels"], 1), pc.equal(batch["n_segments"], 1)),
                        pc.is_null(batch["channel"]))
        recordings, segments = self._pass_through(keep(batch, whole))
        finished: list[dict] = []
        finished_segments: list[dict] = []
        for row in keep(batch, pc.invert(whole)).to_pylist():
            key = row["row_index"]  # a redone decode call repeats the same rows: they land on the same entry
            entry = self._pending.setdefault(key, _Pending(row, row["n_channels"]))
            entry.add(row)
            if entry.complete:
                del self._pending[key]
                rows = [r for c in entry.parts for _, r in sorted(entry.parts[c].items())]
                self._finish(rows, finished, finished_segments, split=rows[0]["channel"] is not None)
        return (pa.concat_tables([recordings, pa.Table.from_pylist(finished, schema=self.schema)]),
                pa.concat_tables([segments, pa.Table.from_pylist(finished_segments, schema=SEGMENT_TABLE_SCHEMA)]))

    def _pass_through(self, whole: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Recordings whole in one row (most clips): already complete and scored, so they pass
        column by column, without a Python object per row."""
        decoded = pc.is_valid(whole["duration_s"])
        segments = conform(keep(whole, decoded), SEGMENT_TABLE_SCHEMA)
        if self.subtitles and self.subtitles.formats:
            for row in segments.to_pylist():
                self.subtitles.write(row["id"], _cues([row], split=False))
        counted = whole.set_column(whole.schema.get_field_index("segments"), "segments",
                                   pc.if_else(decoded, pa.scalar(1, pa.int32()), pa.scalar(0, pa.int32())))
        return conform(counted, self.schema), segments

    def close(self) -> tuple[pa.Table, pa.Table]:
        """Recordings still incomplete when the stream ended (segments lost on the way, which the
        pipeline does not do): emitted with what arrived and status inference_error, never dropped."""
        recordings, segments = [], []
        for entry in self._pending.values():
            rows = [r for c in entry.parts for _, r in sorted(entry.parts[c].items())]
            got = len(rows)
            want = sum(entry.expected.values())
            self._finish(rows, recordings, segments, split=rows[0]["channel"] is not None,
                         missing=f"only {got} of {want}+ segments arrived")
        self._pending.clear()
        return (pa.Table.from_pylist(recordings, schema=self.schema),
                pa.Table.from_pylist(segments, schema=SEGMENT_TABLE_SCHEMA))

    def _finish(self, rows: list[dict], recordings: list, segments: list, *, split: bool,
                missing: str | None = None) -> None:
        decoded = rows[0]["duration_s"] is not None
        recording = self._recording(rows, split) if len(rows) > 1 or split else dict(rows[0])
        if missing:
            recording["status"], recording["error"] = Status.INFERENCE_ERROR.value, missing
        recording["segments"] = len(rows) if decoded else 0
        if split:  # a single reference covers the call: score the turns' words, not the channel labels
            words = " ".join(turn["text"] for turn in recording["conversation"] or [])
            scored = {**recording, "text": words}
            score_row(scored, self.scoring)
            recording.update({k: scored[k] for k in SCORE.names})
        elif len(rows) > 1:
            score_row(recording, self.scoring)
        if self.redact and not missing:
            self._redact(recording, rows)
        if decoded:
            segments.extend(_segment_row(r) for r in rows)
        if self.subtitles and decoded:
            self.subtitles.write(recording["id"], _cues(rows, split, recording["words"]))
        for name in SEGMENT.names:
            recording.pop(name, None)
        recordings.append(recording)

    def _recording(self, rows: list[dict], split: bool) -> dict[str, Any]:
        row = dict(rows[0])
        failed = [r for r in rows if r["status"] != OK]
        if failed:
            bad = failed[0]
            where = f"{bad['channel']} " if bad["channel"] else ""
            row["status"] = bad["status"]
            row["error"] = (f"{len(failed)} of {len(rows)} segments failed; first: {where}segment {bad['segment_index']} "
                            f"({bad['start_s']:.1f}-{bad['end_s'] or 0:.1f} s): {bad['error']}")
        else:
            row["status"], row["error"] = OK, None
        ok = [r for r in rows if r["status"] == OK]
        weights = [(r["end_s"] - r["start_s"], r["avg_logprob"]) for r in ok if r["avg_logprob"] is not None]
        total = sum(w for w, _ in weights)
        row["avg_logprob"] = sum(w * v for w, v in weights) / total if total else None
        row["inference_s"] = sum(r["inference_s"] or 0.0 for r in rows)
        stamps = [r["finished_at"] for r in rows if r["finished_at"] is not None]
        row["finished_at"] = max(stamps) if stamps else None
        row["language"] = next((r["language"] for r in rows if r["language"]), None)
        by_channel: dict[str | None, list[dict]] = {}
        for r in rows:
            by_channel.setdefault(r["channel"], []).append(r)
        texts = {c: stitch([r["text"] if r["status"] == OK else None for r in rs], [_segment(r) for r in rs])
                 for c, rs in by_channel.items()}
        if not split:
            row["text"] = texts[None] if ok else None
            row["words"] = _words(rows) if any(r["words"] is not None for r in ok) else None
            if any(r["speaker_regions"] is not None for r in rows):
                regions = as_regions(reg for r in rows for reg in r["speaker_regions"] or ())
                speakers, turns, row["words"] = speaker_columns(regions, row["words"])
                if ok and not failed:
                    row["speakers"], row["speaker_turns"] = speakers, turns
            return row
        speech = {c: (rs[0]["speech"] if rs[0]["speech"] is not None else [(r["start_s"], r["end_s"]) for r in rs])
                  for c, rs in by_channel.items()}
        stats = speaking_stats(speech)
        row["channel_texts"] = [{"channel": c, "text": t, "speaking_s": round(stats.speaking_s[c], 3)}
                                for c, t in texts.items()]
        row["overlap_s"] = round(stats.overlap_s, 3)
        row["conversation"] = conversation({c: [(r["start_s"], r["end_s"], r["text"]) for r in rs if r["status"] == OK]
                                            for c, rs in by_channel.items()})
        row["text"] = "\n".join(f"{turn['channel']}: {turn['text']}" for turn in row["conversation"]) if ok else None
        if any(r["words"] is not None for r in ok):  # every channel's words in time order, the channel as speaker
            row["words"] = sorted(({**w, "speaker": c} for c, rs in by_channel.items() for w in _words(rs)),
                                  key=lambda w: (w["start_s"], w["speaker"]))
        return row


def _segment(row: dict) -> Segment:
    return Segment(row["segment_index"], round(row["start_s"] * SAMPLE_RATE_HZ),
                   round((row["end_s"] or 0) * SAMPLE_RATE_HZ), round((row["seam_overlap_s"] or 0) * SAMPLE_RATE_HZ))


def _segment_row(row: dict) -> dict:
    return {name: row[name] for name in SEGMENT_TABLE_SCHEMA.names}


def _words(rows: list[dict]) -> list[dict]:
    """The recording's words from its segments' (already in recording time). Where fixed windows
    overlap, each side keeps the words whose middle is on its side of the overlap's middle."""
    out: list[dict] = []
    for i, r in enumerate(rows):
        if r["status"] != OK or not r["words"]:
            continue
        lo = r["start_s"] + (r["seam_overlap_s"] or 0.0) / 2 if i else float("-inf")
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        hi = nxt["start_s"] + (nxt["seam_overlap_s"] or 0.0) / 2 if nxt and nxt["seam_overlap_s"] else float("inf")
        out.extend(w for w in r["words"] if lo <= (w["start_s"] + w["end_s"]) / 2 < hi)
    return out


MAX_CUE_GAP_S = 1.0  # a longer pause between words starts a new cue


def _fits(text: str) -> bool:
    """Whether ``text`` is one displayed cue (subtitles.py wraps it into at most MAX_LINES lines)."""
    return len(textwrap.wrap(text, MAX_LINE_CHARS, break_long_words=False, break_on_hyphens=False)) <= MAX_LINES


def word_cues(words: list[dict]) -> list[tuple[float, float, str]]:
    """Cues from timed words: a new cue at a speaker change, a pause over MAX_CUE_GAP_S, or when
    the text would not fit one displayed cue; a cue's time is its words' (prefixed ``spkN:`` when
    diarized), so subtitles.py never has to share a cue's time out by characters."""
    cues: list[tuple[float, float, str]] = []
    group: list[dict] = []

    def flush():
        if group:
            text = " ".join(w["word"] for w in group)
            if group[0].get("speaker"):
                text = f"{group[0]['speaker']}: {text}"
            cues.append((group[0]["start_s"], max(group[-1]["end_s"], group[0]["start_s"]), text))

    def text_with(w):
        speaker = f"{group[0]['speaker']}: " if group[0].get("speaker") else ""
        return speaker + " ".join(x["word"] for x in group + [w])

    for w in words:
        if group and (w.get("speaker") != group[-1].get("speaker") or w["start_s"] - group[-1]["end_s"] > MAX_CUE_GAP_S
                      or not _fits(text_with(w))):
            flush()
            group = []
        group.append(w)
    flush()
    return cues


def _cues(rows: list[dict], split: bool, words: list[dict] | None = None) -> list[tuple[float, float, str]]:
    if words is not None:  # split channels: each word's speaker is its channel
        return word_cues(words)
    if not split and len(rows) == 1 and rows[0]["words"] is not None:
        return word_cues(rows[0]["words"])
    ok = [r for r in rows if r["status"] == OK and (r["text"] or "").strip()]
    if split:
        return [(r["start_s"], r["end_s"], f"{r['channel']}: {r['text'].strip()}")
                for r in sorted(ok, key=lambda r: (r["start_s"], r["channel"]))]
    return [(r["start_s"], r["end_s"], r["text"].strip()) for r in ok]
