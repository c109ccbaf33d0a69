"""Cut long recordings into engine-sized segments, at pauses where there are pauses.

Engines take at most ~30 s at a time (Whisper's window); a recording of an hour has to be cut,
and where it is cut decides what the transcript loses. :func:`plan_segments` only plans: it
returns sample ranges (:class:`Segment`), never copies of the audio, so the caller slices the one
decoded array it already holds.

The segments tile the whole recording: whatever the VAD says, every sample is in a segment, and
only fixed windows overlap. The VAD misses speech, so it decides where to cut, never what to leave
out: losing audio is worse than transcribing some silence. The plan, in order of preference:

1. Silero VAD (:mod:`pipeline.vad`) finds speech regions separated by
   pauses of at least ``VadOptions.min_silence_s``.
2. A pause shorter than ``min_s`` (never worth a segment of its own) or than twice
   ``max_edge_silence_s`` is cut at its middle: the regions beside it take in its halves. A region
   longer than ``max_s`` is split at the middles of its short pauses (``min_pause_s``, ~0.1 s),
   greedily at the last one that keeps the piece within ``max_s``.
3. Regions and pieces are packed greedily, in order, into speech groups of at most ``max_s``.
   Each pause between two groups (and the audio before the first and after the last) is shared
   by the segments beside it: the cut is the middle of the pause when both sides stay within
   ``max_s``, else the point nearest the middle that keeps them within it. A pause too long for
   that becomes segments of its own, as few as fit in ``max_s``; the speech on each side keeps
   ``max_edge_silence_s`` of it, or more where that saves a segment. The cuts inside such a pause
   move, by up to ``_SNAP_S``, to its quietest point: speech the VAD missed there (a quiet second
   speaker, speech under music) is then less likely to be cut mid-word.
4. Speech with no usable pause for more than ``max_s`` falls back to fixed windows that overlap
   by ``overlap_s``; :func:`pipeline.stitch.stitch` removes the words heard twice.
5. A segment shorter than ``min_s`` is merged into a neighbour when the two fit in ``max_s``.

Without VAD (``vad=False``) the whole recording is cut into fixed overlapping windows; that mode
needs neither onnxruntime nor faster-whisper.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from .records import SAMPLE_RATE_HZ
from .vad import VAD_FRAME, speech_probabilities

# A cut inside a long silence moves up to this far to the quietest point near it (by the energy of
# _QUIET_WINDOW samples, looked at every _QUIET_STEP samples): the VAD may have missed speech there.
_SNAP_S = 1.0
_QUIET_WINDOW = 1600  # 0.1 s: longer than a plosive's closure, shorter than a pause between words
_QUIET_STEP = 160

_Span = tuple[tuple[int, int], bool]  # ((start, end), is_fixed_window): a segment before numbering


@dataclass(frozen=True)
class Segment:
    """A range of samples ``[start, end)`` at 16 kHz that one engine call transcribes.

    ``overlap_before`` is how many samples this segment shares with the previous one: 0 for cuts
    at pauses (the segment starts where the previous one ends), ``> 0`` for fixed windows, whose
    seam :func:`pipeline.stitch.stitch` deduplicates.
    """

    index: int
    start: int
    end: int
    overlap_before: int = 0

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE_HZ

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE_HZ

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE_HZ


class Cue(NamedTuple):
    """Timed text: what was said between ``start_s`` and ``end_s`` (seconds from the recording's start)."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class VadOptions:
    """How speech and pauses are found. Not faster-whisper's ``VadOptions``: that one pads speech by
    0.4 s and needs 2 s of silence to end a region (tuned to drop silence, not to place cuts), and
    importing it loads CTranslate2."""

    threshold: float = 0.5  # a frame with speech probability >= threshold starts / continues speech
    neg_threshold: float | None = None  # below it a frame is silence; None: threshold - 0.15 (Silero's rule)
    min_speech_s: float = 0.25  # shorter speech regions are noise (clicks, breaths): treated as pause
    min_silence_s: float = 0.5  # a pause this long ends a speech region: the preferred places to cut
    min_pause_s: float = 0.1  # inside an over-long region, the shortest pause still good enough to cut at
    speech_pad_s: float = 0.2  # speech regions are widened by this much: VAD onsets and offsets are late / early
    # Of a pause too long to be shared by the segments beside it, the speech on each side keeps this
    # much (more only where that saves a segment) and the rest becomes segments of its own, rather
    # than long silence around speech (Whisper hallucinates text on long silence). A run of fixed
    # windows takes in at most this much of a pause beside it, and none that would need one more
    # window. Pauses up to twice this long are cut at their middle wherever both sides fit.
    max_edge_silence_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be in [0, threshold], got {self.neg_threshold}")
        for name in ("min_speech_s", "min_silence_s", "min_pause_s", "speech_pad_s", "max_edge_silence_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def silence_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


def _frames(probs: np.ndarray, chunk: int = 1 << 16):
    """(index, probability) pairs; Python floats iterate ~10x faster than array items, and converting
    a chunk at a time keeps that list small for recordings of many hours."""
    for base in range(0, len(probs), chunk):
        yield from enumerate(probs[base : base + chunk].tolist(), start=base)


def _speech_frames(probs: np.ndarray, opts: VadOptions, fps: float) -> list[tuple[int, int]]:
    """Speech regions ``[first, end)`` in frames, by Silero's hysteresis rule."""
    on, off = opts.threshold, opts.silence_threshold
    min_silence = max(1, round(opts.min_silence_s * fps))
    regions: list[tuple[int, int]] = []
    start = silence_from = -1
    for i, p in _frames(probs):
        if start < 0:
            if p >= on:
                start, silence_from = i, -1
        elif p >= on:
            silence_from = -1
        elif p < off:
            if silence_from < 0:
                silence_from = i
            if i + 1 - silence_from >= min_silence:
                regions.append((start, silence_from))
                start = silence_from = -1
    if start >= 0:
        regions.append((start, silence_from if silence_from >= 0 else len(probs)))
    min_speech = opts.min_speech_s * fps
    return [(a, b) for a, b in regions if b - a >= min_speech]


def speech_regions(samples: np.ndarray, vad_options: VadOptions | None = None) -> list[tuple[int, int]]:
    """Speech regions ``[start, end)`` in samples, padded by ``speech_pad_s``, in order, disjoint."""
    opts = vad_options or VadOptions()
    frames = _speech_frames(speech_probabilities(samples), opts, SAMPLE_RATE_HZ / VAD_FRAME)
    return _padded(frames, opts, len(samples))


def _padded(frames: list[tuple[int, int]], opts: VadOptions, n: int) -> list[tuple[int, int]]:
    pad = round(opts.speech_pad_s * SAMPLE_RATE_HZ)
    spans = [[a * VAD_FRAME, min(b * VAD_FRAME, n)] for a, b in frames]
    for left, right in pairwise(spans):
        grow = min(pad, (right[0] - left[1]) // 2)  # a short pause is shared, never padded over
        left[1] += grow
        right[0] -= grow
    if spans:
        spans[0][0] = max(0, spans[0][0] - pad)
        spans[-1][1] = min(n, spans[-1][1] + pad)
    return [(a, b) for a, b in spans]


def _close_short_gaps(regions: list[tuple[int, int]], shortest: int, max_len: int, n: int) -> list[tuple[int, int]]:
    """Regions widened over the pauses shorter than ``shortest`` beside them, to the pause's middle
    (the audio before the first and after the last: all of it), such a pause being no segment of
    its own. A region that fits in ``max_len`` is widened only as far as it still fits: the cut
    moves off the middle, or, where no cut can keep both sides within it, the pause stays open."""
    spans = [[a, b] for a, b in regions]
    for k in range(len(spans) + 1):
        g0 = spans[k - 1][1] if k else 0
        g1 = spans[k][0] if k < len(spans) else n
        if g1 - g0 >= shortest:
            continue
        lo, hi = (g0, g1) if 0 < k < len(spans) else (0, 0) if k == 0 else (n, n)
        if k and spans[k - 1][1] - spans[k - 1][0] <= max_len:
            hi = min(hi, spans[k - 1][0] + max_len)
        if k < len(spans) and spans[k][1] - spans[k][0] <= max_len:
            lo = max(lo, spans[k][1] - max_len)
        if lo <= hi:
            cut = min(max((g0 + g1) // 2, lo), hi)
            if k:
                spans[k - 1][1] = cut
            if k < len(spans):
                spans[k][0] = cut
    return [(a, b) for a, b in spans]


def _split_long(region: tuple[int, int], probs: np.ndarray, opts: VadOptions, max_len: int) -> list[tuple[int, int]]:
    """Split a region longer than ``max_len`` in its short pauses: pieces, touching where they can.

    Greedy: each piece ends in the last pause that it reaches within ``max_len``, at the pause's
    middle or as near it as ``max_len`` allows; a stretch with no such pause is returned whole
    (longer than ``max_len``) and becomes fixed windows.
    """
    a, b = region
    lo, hi = -(-a // VAD_FRAME), b // VAD_FRAME
    quiet = np.concatenate(([False], probs[lo:hi] < opts.silence_threshold, [False]))
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    min_pause = max(1, round(opts.min_pause_s * SAMPLE_RATE_HZ / VAD_FRAME))
    pauses = [  # quiet runs touching the region's ends are its padding, not pauses
        ((lo + s) * VAD_FRAME, (lo + e) * VAD_FRAME)
        for s, e in zip(edges[::2].tolist(), edges[1::2].tolist())
        if e - s >= min_pause and s > 0 and e < hi - lo
    ]
    pieces: list[tuple[int, int]] = []
    start, i = a, 0
    while b - start > max_len:
        usable = None
        while i < len(pauses) and pauses[i][0] - start < max_len:
            usable = i
            i += 1
        if usable is None:  # no pause within reach: this stretch runs on to the next pause, or the end
            if i == len(pauses):
                break
            usable = i
        p0, p1 = pauses[usable]
        cut = (p0 + p1) // 2 if p0 - start >= max_len else min((p0 + p1) // 2, start + max_len)
        pieces.append((start, cut))
        i = usable + 1
        # The next piece takes in the rest of the pause, unless that is what keeps it from reaching
        # the end or the next pause within max_len: then the rest is left between the pieces, for
        # the segments beside it or a segment of its own.
        earliest = min(b - max_len, pauses[i][0] - max_len + 1) if i < len(pauses) else b - max_len
        start = cut if cut >= earliest or p1 < earliest else p1
    pieces.append((start, b))
    return pieces


def _windows(a: int, b: int, max_len: int, overlap: int) -> list[tuple[int, int]]:
    """Equal windows over ``[a, b)``, each at most ``max_len``, consecutive ones sharing ``overlap``."""
    n = max(1, -(-(b - a - overlap) // (max_len - overlap)))
    if n == 1:
        return [(a, b)]
    length = -(-(b - a + (n - 1) * overlap) // n)
    starts = [a + round(k * (b - a - length) / (n - 1)) for k in range(n)]
    return [(s, s + length) for s in starts]


def plan_segments(
    samples: np.ndarray,
    *,
    max_s: float = 30.0,
    min_s: float = 1.0,
    overlap_s: float = 1.0,
    vad: bool = True,
    vad_options: VadOptions | None = None,
) -> list[Segment]:
    """Plan how to cut 16 kHz mono ``samples`` into segments of at most ``max_s`` (see the module doc).

    Guarantees: the segments are in order and tile the recording, whatever the VAD finds: the
    first starts at 0, the last ends at ``len(samples)``, and each starts where the previous one
    ends, except fixed windows (``overlap_before > 0``), which start ``overlap_before`` samples
    earlier. None is longer than ``max_s``. Cuts between segments that do not overlap fall in
    pauses (or, in audio the VAD finds no speech in, at its quietest points). A segment shorter
    than ``min_s`` is merged into a neighbour when the two fit in ``max_s`` (engines do badly on
    fragments); one that cannot merge stays short. Audio no longer than ``max_s`` is one segment
    covering it all; audio with no speech is cut into equal segments of at most ``max_s``.
    """
    if max_s <= 0 or not 0 <= overlap_s < max_s or not 0 <= min_s <= max_s:
        raise ValueError(f"need 0 <= overlap_s < max_s and 0 <= min_s <= max_s, got {overlap_s=}, {max_s=}, {min_s=}")
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono (1-D), got shape {samples.shape}")
    n = len(samples)
    max_len, overlap = round(max_s * SAMPLE_RATE_HZ), round(overlap_s * SAMPLE_RATE_HZ)
    if n <= max_len:
        return [Segment(0, 0, n)]
    if not vad:
        return _numbered([(w, True) for w in _windows(0, n, max_len, overlap)])
    opts = vad_options or VadOptions()
    min_len, edge = round(min_s * SAMPLE_RATE_HZ), round(opts.max_edge_silence_s * SAMPLE_RATE_HZ)
    probs = speech_probabilities(samples)
    regions = _padded(_speech_frames(probs, opts, SAMPLE_RATE_HZ / VAD_FRAME), opts, n)
    # Short pauses are taken in before packing, so that packing never leaves one between two full
    # segments, where it would become a fragment of a segment on its own.
    regions = _close_short_gaps(regions, max(min_len, 2 * edge), max_len, n)
    units = [p for r in regions for p in ([r] if r[1] - r[0] <= max_len else _split_long(r, probs, opts, max_len))]
    groups: list[tuple[int, int]] = []  # speech extents: packed units, or one over-long unit
    for a, b in units:
        if groups and b - groups[-1][0] <= max_len and groups[-1][1] - groups[-1][0] <= max_len:
            groups[-1] = (groups[-1][0], b)
        else:
            groups.append((a, b))
    spans = _Tiler(samples, max_len, min_len, overlap, edge).tile(groups)
    return _numbered(_merge_short(spans, min_len, max_len))


class _Tiler:
    """Turns speech groups into segments that tile the recording, sharing out the pauses between."""

    def __init__(self, samples: np.ndarray, max_len: int, min_len: int, overlap: int, edge: int):
        self.samples, self.max_len, self.min_len, self.overlap, self.edge = samples, max_len, min_len, overlap, edge

    def tile(self, groups: list[tuple[int, int]]) -> list[_Span]:
        """Each gap (before the first group, between two, after the last) is shared out left to right:
        a group's room for the gap after it is what the gap before it left."""
        n = len(self.samples)
        extents = [[a, b] for a, b in groups]
        fixed = [b - a > self.max_len for a, b in groups]
        spans: list[_Span] = []
        for k in range(len(groups) + 1):
            g0 = extents[k - 1][1] if k else 0
            g1 = extents[k][0] if k < len(groups) else n
            left_room = self._room(*extents[k - 1], fixed[k - 1]) if k else 0
            right_room = self._room(*extents[k], fixed[k]) if k < len(groups) else 0
            left, right, pieces = self.share_gap(g0, g1, left_room, right_room)
            if k:
                extents[k - 1][1] += left
                a, b = extents[k - 1]
                if fixed[k - 1]:
                    spans.extend((w, True) for w in _windows(a, b, self.max_len, self.overlap))
                else:
                    spans.append(((a, b), False))
            if k < len(groups):
                extents[k][0] -= right
            spans.extend((p, False) for p in pieces)
        return spans

    def _room(self, a: int, b: int, is_fixed: bool) -> int:
        """How much more of a pause the segment(s) over ``[a, b)`` can take in: up to ``max_len``, or
        for fixed windows, up to ``edge`` and only as far as that needs no extra window."""
        if not is_fixed:
            return self.max_len - (b - a)
        step = self.max_len - self.overlap
        return min(self.edge, -(-(b - a - self.overlap) // step) * step + self.overlap - (b - a))

    def share_gap(self, g0: int, g1: int, left_room: int, right_room: int) -> tuple[int, int, list[tuple[int, int]]]:
        """``(left, right, pieces)``: the segment before the gap takes ``[g0, g0 + left)``, the one
        after it ``[g1 - right, g1)``, and ``pieces`` (silence-only segments) tile the rest. A side
        takes at most its room (0 where there is no segment: the recording's ends)."""
        size = g1 - g0
        half = size // 2
        if half <= left_room and size - half <= right_room:  # the middle of the pause
            return half, size - half, []
        if size <= left_room + right_room:  # the point nearest the middle that both sides fit
            left = min(max(half, size - right_room), left_room)
            return left, size - left, []
        # Too long to share: silence-only segments, as few as fit, the speech beside keeping an edge.
        k = -(-(size - left_room - right_room) // self.max_len)
        left, right = min(left_room, self.edge), min(right_room, self.edge)
        if left + right < size - k * self.max_len:
            left, right = _share(size - k * self.max_len, left_room, right_room)
        rest = min(self.min_len, size)
        if size - left - right < rest:
            left, right = _share(size - rest, left, right)
        a, b = g0 + left, g1 - right
        cuts = [a + round(j * (b - a) / k) for j in range(k + 1)]
        lengths = [y - x for x, y in pairwise(cuts)]
        shortest = min(lengths)
        slack = min(
            round(_SNAP_S * SAMPLE_RATE_HZ),
            (self.max_len - max(lengths)) // 2,  # pieces stay within max_s ...
            max(0, shortest - self.min_len) // 2,  # ... and at least min_s long
            shortest // 4,
        )
        for j, cut in enumerate(cuts):
            lo, hi = cut - slack, cut + slack
            if j == 0:  # the segment before keeps no more than its room, and no less than the gap's start
                lo, hi = max(lo, g0), min(hi, g0 + left_room)
            if j == k:
                lo, hi = max(lo, g1 - right_room), min(hi, g1)
            if lo < hi:
                cuts[j] = _quietest(self.samples, lo, hi, cut)
        return cuts[0] - g0, g1 - cuts[-1], list(pairwise(cuts))


def _quietest(samples: np.ndarray, lo: int, hi: int, target: int) -> int:
    """The point in ``[lo, hi]`` with the least energy around it, the one nearest ``target`` on ties."""
    steps = np.arange(-((target - lo) // _QUIET_STEP), (hi - target) // _QUIET_STEP + 1)
    points = target + steps * _QUIET_STEP
    first, last = max(0, lo - _QUIET_WINDOW // 2), min(len(samples), hi + _QUIET_WINDOW // 2)
    x = np.asarray(samples[first:last], dtype=np.float64)
    energy = np.concatenate(([0.0], np.cumsum(x * x)))
    a = np.clip(points - _QUIET_WINDOW // 2, first, last) - first
    b = np.clip(points + _QUIET_WINDOW // 2, first, last) - first
    mean = (energy[b] - energy[a]) / np.maximum(b - a, 1)
    quiet = np.flatnonzero(mean <= mean.min() * (1 + 1e-9))
    return int(points[quiet[np.argmin(np.abs(steps[quiet]))]])


def _share(room: int, left_room: int, right_room: int) -> tuple[int, int]:
    """Split ``room`` samples between two sides that can take at most ``left_room`` / ``right_room``."""
    left = min(left_room, max(room // 2, room - right_room))
    return left, min(right_room, room - left)


def _merge_short(spans: list[_Span], min_len: int, max_len: int) -> list[_Span]:
    """Merge each span shorter than ``min_len`` into the neighbour that gives the shorter result
    within ``max_len``; fixed windows neither merge nor take others in.

    Greedy packing and the sharing of pauses leave hardly any such pair (a short span is short
    because its neighbours are full); this makes the guarantee hold whatever changes upstream.
    """
    out = list(spans)
    k = 0
    while k < len(out):
        (a, b), is_fixed = out[k]
        options = []
        if not is_fixed and b - a < min_len:
            if k and not out[k - 1][1] and b - out[k - 1][0][0] <= max_len:
                options.append((b - out[k - 1][0][0], k - 1))
            if k + 1 < len(out) and not out[k + 1][1] and out[k + 1][0][1] - a <= max_len:
                options.append((out[k + 1][0][1] - a, k + 1))
        if not options:
            k += 1
            continue
        first, last = sorted((k, min(options)[1]))
        out[first : last + 1] = [((out[first][0][0], out[last][0][1]), False)]
        k = first  # the merged span may still be short
    return out


def _numbered(spans: list[_Span]) -> list[Segment]:
    segments: list[Segment] = []
    for (a, b), fixed in spans:
        shared = max(0, segments[-1].end - a) if segments and fixed else 0
        segments.append(Segment(len(segments), a, b, shared))
    return segments
