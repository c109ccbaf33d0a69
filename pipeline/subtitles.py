"""Timed text as subtitles: SubRip (``.srt``) and WebVTT (``.vtt``).

A segment's transcript can be 30 s of speech, far more than a reader takes in at once, so a long
cue is wrapped into lines of at most ``max_line_chars`` (42: the common broadcast guideline) and
split into consecutive cues of at most ``max_lines`` lines, its time shared out in proportion to
each part's characters (the words carry no timing of their own here).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable

from .segment import Cue

MAX_LINE_CHARS = 42
MAX_LINES = 2


def _timestamp(ms: int, sep: str) -> str:
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    seconds, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{sep}{ms:03d}"


def _balanced(words: list[str], n_lines: int, max_line_chars: int) -> list[str]:
    """The narrowest wrap of ``words`` into ``n_lines`` lines: two even lines read better than 42 + 5."""
    text = " ".join(words)
    for width in range(max(1, math.ceil(len(text) / n_lines)), max_line_chars + 1):
        lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)
        if len(lines) <= n_lines:
            return lines
    return textwrap.wrap(text, max_line_chars, break_long_words=False, break_on_hyphens=False)


def _layout(cues: Iterable, max_line_chars: int, max_lines: int) -> list[tuple[int, int, list[str]]]:
    """(start_ms, end_ms, lines) per displayed cue; empty cues are skipped, long ones split."""
    if max_line_chars < 1 or max_lines < 1:
        raise ValueError(f"need max_line_chars >= 1 and max_lines >= 1, got {max_line_chars}, {max_lines}")
    out = []
    for item in cues:
        start_s, end_s, text = item if not hasattr(item, "start_s") else (item.start_s, item.end_s, item.text)
        if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s < start_s:
            raise ValueError(f"bad cue times: start {start_s} s, end {end_s} s")
        words = (text or "").split()
        if not words:
            continue
        greedy = textwrap.wrap(" ".join(words), max_line_chars, break_long_words=False, break_on_hyphens=False)
        blocks = [greedy[k : k + max_lines] for k in range(0, len(greedy), max_lines)]
        total = sum(len(" ".join(b)) for b in blocks)
        start_ms, end_ms = round(start_s * 1000), round(end_s * 1000)
        done = 0
        for block in blocks:
            a = start_ms + round((end_ms - start_ms) * done / total)
            done += len(" ".join(block))
            b = start_ms + round((end_ms - start_ms) * done / total)
            out.append((a, b, _balanced(" ".join(block).split(), len(block), max_line_chars)))
    return out


def to_srt(cues: Iterable[Cue | tuple[float, float, str]], *, max_line_chars: int = MAX_LINE_CHARS,
           max_lines: int = MAX_LINES) -> str:
    """SubRip text: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, a blank line after each.

    Cues are ``(start_s, end_s, text)`` (or :class:`~pipeline.segment.Cue`), written in the order
    given. Raises ValueError for negative, non-finite or reversed times.
    """
    parts = []
    for n, (a, b, lines) in enumerate(_layout(cues, max_line_chars, max_lines), start=1):
        parts.append(f"{n}\n{_timestamp(a, ',')} --> {_timestamp(b, ',')}\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def _vtt_escape(line: str) -> str:
    # "<" starts a tag and "&" an entity in WebVTT; escaping ">" also rules out a stray "-->".
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_webvtt(cues: Iterable[Cue | tuple[float, float, str]], *, max_line_chars: int = MAX_LINE_CHARS,
              max_lines: int = MAX_LINES) -> str:
    """WebVTT text: the ``WEBVTT`` header, then cues timed ``HH:MM:SS.mmm --> HH:MM:SS.mmm``.

    Same cues and errors as :func:`to_srt`; text is escaped (``&``, ``<``, ``>``).
    """
    parts = ["WEBVTT\n"]
    for a, b, lines in _layout(cues, max_line_chars, max_lines):
        parts.append(f"{_timestamp(a, '.')} --> {_timestamp(b, '.')}\n" + "\n".join(map(_vtt_escape, lines)) + "\n")
    return "\n".join(parts)
