"""Put segment transcripts back together: one text per recording, conversations, speaking time.

Segments cut at pauses share no audio, so their texts are simply joined. Fixed windows (speech
with no pause for longer than an engine window) share ``overlap_before`` samples with the previous
window, so the words spoken there come out twice; :func:`stitch` finds them by matching the end
of one text against the start of the next, on normalised words, and keeps them once.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .records import SAMPLE_RATE_HZ
from .segment import Cue, Segment

MAX_WORDS_PER_S = 6.0
"""Upper bound on speech rate (fast read speech is ~3-4 words/s); bounds the seam search, so a
phrase that is repeated further apart than the overlap is never taken for a duplicate."""
_SEAM_SLACK_WORDS = 2  # a word cut in half at each edge of the overlap
_MIN_INNER_RUN = 2  # a shared run not at the very edges must be this long to count as the overlap


def _norm(word: str) -> str:
    """Case- and punctuation-blind form of a word, for matching only (the output keeps the raw word)."""
    folded = unicodedata.normalize("NFKC", word).casefold()
    return "".join(ch for ch in folded if not unicodedata.category(ch).startswith("P"))


def _seam(prev: Sequence[str], cur: Sequence[str], bound: int) -> tuple[int, int, int]:
    """Where the overlap is: ``(i, j, k)`` means ``prev[i:i+k] == cur[j:j+k]`` (normalised).

    First choice: the longest suffix of ``prev`` equal to a prefix of ``cur``, at most ``bound``
    words (``i + k == len(prev)``, ``j == 0``). Failing that, the longest run of at least
    ``_MIN_INNER_RUN`` words shared by the last ``bound`` words of ``prev`` and the first
    ``bound`` of ``cur``: the edges of a window often hold a half word that the other window
    heard whole, which breaks the exact suffix match. ``k == 0``: no overlap found.
    """
    p = [_norm(w) for w in prev[-bound:]] if bound else []
    c = [_norm(w) for w in cur[:bound]]
    offset = len(prev) - len(p)
    for k in range(min(len(p), len(c)), 0, -1):
        if p[len(p) - k :] == c[:k]:
            return offset + len(p) - k, 0, k
    best = (0, 0, 0)
    for i in range(len(p)):  # bound is a few dozen words: quadratic here is cheap
        for j in range(len(c)):
            k = 0
            while i + k < len(p) and j + k < len(c) and p[i + k] == c[j + k] and p[i + k]:
                k += 1
            if k >= _MIN_INNER_RUN and k > best[2]:
                best = (offset + i, j, k)
    return best


def stitch(texts: Sequence[str | None], segments: Sequence[Segment]) -> str:
    """One text from the segments' texts, in order; words heard twice at an overlap kept once.

    Across a seam the first half of the shared words comes from the earlier window and the rest
    from the later one: each window is least sure of the words at its own edge (cut-off context,
    a sentence-final full stop where the window, not the sentence, ended). Words the earlier window
    has after the shared run, and the later one has before it, are edge fragments and dropped.
    ``None`` (a failed segment) counts as no text. Raises ValueError if the lengths differ.
    """
    if len(texts) != len(segments):
        raise ValueError(f"{len(texts)} texts for {len(segments)} segments")
    out: list[str] = []
    prev_words = 0  # how many of out's last words the previous segment heard
    for text, seg in zip(texts, segments, strict=True):
        words = (text or "").split()
        heard_from = len(out)  # where this segment's words start in out
        if seg.overlap_before > 0 and prev_words and words:
            bound = int(seg.overlap_before / SAMPLE_RATE_HZ * MAX_WORDS_PER_S) + _SEAM_SLACK_WORDS
            i, j, k = _seam(out[len(out) - prev_words :], words, bound)
            if k:
                heard_from = i + len(out) - prev_words  # the shared words kept from before are this one's too
                keep = (k + 1) // 2
                del out[heard_from + keep :]
                words = words[j + keep :]
        out.extend(words)
        prev_words = len(out) - heard_from if (text or "").strip() else 0
    return " ".join(out)


def _cue(item) -> Cue:
    if isinstance(item, Cue):
        return item
    if hasattr(item, "start_s") and hasattr(item, "text"):
        return Cue(float(item.start_s), float(item.end_s), item.text)
    start_s, end_s, text = item
    return Cue(float(start_s), float(end_s), text)


def conversation(channel_segments: Mapping[str, Iterable]) -> list[dict]:
    """Both (all) channels' timed texts as one conversation ordered by start time.

    Items are ``(start_s, end_s, text)`` tuples, :class:`Cue` s, or anything with ``start_s``,
    ``end_s`` and ``text``. Rows with empty text (silence) are left out. Ties in start time keep
    the channels' order in the mapping, so the result is deterministic.
    """
    rows = []
    for rank, (channel, items) in enumerate(channel_segments.items()):
        for item in items:
            cue = _cue(item)
            if cue.text and cue.text.strip():
                rows.append((cue.start_s, rank, cue.end_s, channel, cue.text.strip()))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return [{"channel": ch, "start_s": s, "end_s": e, "text": t} for s, _, e, ch, t in rows]


@dataclass(frozen=True)
class SpeakingStats:
    """Speaking time per channel and time when two or more channels speak at once, in seconds."""

    speaking_s: dict[str, float]
    overlap_s: float


def _span(item) -> tuple[float, float]:
    if hasattr(item, "start_s"):
        return float(item.start_s), float(item.end_s)
    start_s, end_s = tuple(item)[:2]
    return float(start_s), float(end_s)


def _union(items: Iterable) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(span for span in map(_span, items) if span[1] > span[0]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def speaking_stats(channel_intervals: Mapping[str, Iterable]) -> SpeakingStats:
    """Per-channel speaking time and cross-talk time from each channel's speech intervals.

    Pass VAD speech regions (``pipeline.segment.speech_regions`` of each channel, divided by
    the sample rate to make seconds):
    segment spans include the silence margins around the speech and pauses packed inside a
    segment, so they overstate speaking time. Items are ``(start_s, end_s, ...)`` (extra fields,
    e.g. a cue's text, are ignored). A channel's own overlapping intervals count once; the overlap
    is the time where at least two channels speak (a sweep over all interval edges).
    """
    unions = {ch: _union(items) for ch, items in channel_intervals.items()}
    speaking = {ch: sum(b - a for a, b in spans) for ch, spans in unions.items()}
    edges = sorted([(a, 1) for spans in unions.values() for a, _ in spans]
                   + [(b, -1) for spans in unions.values() for _, b in spans])
    overlap, active, last = 0.0, 0, 0.0
    for t, step in edges:  # ends sort before starts at the same time: touching is not talking over
        if active >= 2:
            overlap += t - last
        active += step
        last = t
    return SpeakingStats(speaking_s=speaking, overlap_s=overlap)
