"""Speaker regions -> what the outputs hold: a segment's own regions and main speaker, each
word's speaker, speaker turns with their text, talk time per speaker. Pure functions over plain
rows (no model), used in the workers (whole recordings) and by the driver (stitched ones)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class SpeakerRegion(NamedTuple):
    """One speaker speaking from ``start_s`` to ``end_s`` (recording time)."""

    speaker: str
    start_s: float
    end_s: float


def as_regions(items: Iterable[Any] | None) -> list[SpeakerRegion]:
    """Regions from dicts (Arrow rows) or tuples."""
    out = []
    for r in items or ():
        out.append(SpeakerRegion(r["speaker"], float(r["start_s"]), float(r["end_s"])) if isinstance(r, dict)
                   else SpeakerRegion(*r))
    return out


def clip(regions: Sequence[SpeakerRegion], start_s: float, end_s: float) -> list[dict]:
    """The parts of ``regions`` inside [start_s, end_s), as rows for ``records.SPEAKER_REGION``."""
    out = []
    for r in regions:
        a, b = max(r.start_s, start_s), min(r.end_s, end_s)
        if b > a:
            out.append({"speaker": r.speaker, "start_s": round(a, 3), "end_s": round(b, 3)})
    return out


def main_speaker(regions: Sequence[SpeakerRegion]) -> str | None:
    """The speaker with the most time in ``regions`` (None when there are none)."""
    time: dict[str, float] = {}
    for r in regions:
        time[r.speaker] = time.get(r.speaker, 0.0) + r.end_s - r.start_s
    return max(time, key=lambda s: (time[s], s)) if time else None


def merged(regions: Iterable[SpeakerRegion], gap_s: float = 0.0) -> list[SpeakerRegion]:
    """Regions in time order, with touching (or duplicated, from overlapping segments) regions of
    one speaker joined."""
    out: list[SpeakerRegion] = []
    for r in sorted(regions, key=lambda r: (r.start_s, r.end_s)):
        if out and out[-1].speaker == r.speaker and r.start_s <= out[-1].end_s + gap_s:
            out[-1] = SpeakerRegion(r.speaker, out[-1].start_s, max(out[-1].end_s, r.end_s))
        else:
            out.append(r)
    return out


def talk_time(regions: Iterable[SpeakerRegion]) -> dict[str, float]:
    """Seconds each speaker speaks (the union of their regions), speakers in order of first speech."""
    by: dict[str, list[SpeakerRegion]] = {}
    for r in sorted(regions, key=lambda r: r.start_s):
        by.setdefault(r.speaker, []).append(r)
    out = {}
    for speaker, rs in by.items():
        total, end = 0.0, float("-inf")
        for r in rs:
            if r.end_s > end:
                total += r.end_s - max(r.start_s, end)
                end = r.end_s
        out[speaker] = total
    return out


def _turn_of(turns: Sequence[SpeakerRegion], t: float) -> int:
    """The turn holding time ``t``, else the nearest one."""
    best, best_d = 0, float("inf")
    for i, r in enumerate(turns):
        d = 0.0 if r.start_s <= t < r.end_s else min(abs(t - r.start_s), abs(t - r.end_s))
        if d < best_d:
            best, best_d = i, d
            if d == 0.0:
                break
    return best


def speaker_columns(regions: Iterable[SpeakerRegion], words: list[dict] | None,
                    ) -> tuple[list[dict], list[dict], list[dict] | None]:
    """``speakers``, ``speaker_turns`` and the words with their ``speaker`` set.

    Turns are the merged regions (audio), each with the text of the words whose middle falls in it
    (a word in a pause goes to the nearest turn); without words a turn has no text. Talk time is
    the regions' time per speaker, so it counts speech, not pauses between words.
    """
    turns = merged(regions)
    texts: list[list[str]] = [[] for _ in turns]
    labelled = None
    if words is not None:
        labelled = []
        for w in words:
            if turns:
                i = _turn_of(turns, (w["start_s"] + w["end_s"]) / 2)
                texts[i].append(w["word"])
                w = {**w, "speaker": turns[i].speaker}
            labelled.append(w)
    have_text = words is not None
    turn_rows = [{"speaker": r.speaker, "start_s": round(r.start_s, 3), "end_s": round(r.end_s, 3),
                  "text": " ".join(t) if have_text else None} for r, t in zip(turns, texts)]
    speakers = []
    for speaker, seconds in talk_time(turns).items():
        said = [t["text"] for t in turn_rows if t["speaker"] == speaker and t["text"]]
        speakers.append({"speaker": speaker, "text": " ".join(said) if have_text else None,
                         "speaking_s": round(seconds, 3)})
    return speakers, turn_rows, labelled
