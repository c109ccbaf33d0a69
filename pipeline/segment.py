"""Cut long recordings into engine-sized segments, at pauses where there are pauses.

Engines take at most ~30 s at a time (Whisper's window); a recording of an hour has to be cut,
and where it is cut decides what the transcript loses. :func:`plan_segments` only plans: it
returns sample ranges (:class:`Segment`), never copies of the audio, so the caller slices the one
decoded array it already holds.

The plan, in order of preference:

1. Silero VAD (the ONNX model bundled with faster-whisper) finds speech regions separated by
   pauses of at least ``VadOptions.min_silence_s``.
2. A region longer than ``max_s`` is split at its short pauses (``min_pause_s``, ~0.1 s),
   greedily at the last one that keeps the piece within ``max_s``.
3. Regions and pieces are packed greedily, in order, into segments of at most ``max_s``; the cut
   between two segments is the middle of the pause between them (or, for a long silence, each
   side keeps at most ``max_edge_silence_s`` of it and the rest is not transcribed).
4. Speech with no usable pause for more than ``max_s`` falls back to fixed windows that overlap
   by ``overlap_s``; :func:`pipeline.stitch.stitch` removes the words heard twice.

Without VAD (``vad=False``) the whole recording is cut into fixed overlapping windows; that mode
needs neither onnxruntime nor faster-whisper. The VAD runs block by block with the LSTM state
carried over, so beyond the caller's array it needs one block of ONNX work and 4 bytes per 32 ms
frame (measured: +2 to +13 MiB peak RSS for a 1-hour recording, against ~670 MiB for
faster-whisper's ``get_speech_timestamps``, which pads and re-batches the whole array).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from .engines.base import SAMPLE_RATE_HZ

VAD_FRAME = 512  # Silero's frame at 16 kHz (32 ms): one speech probability per frame
_VAD_CONTEXT = 64  # samples of the previous frame that the v5/v6 model sees before each frame
# Frames per ONNX call (~16 s). Any size gives the same probabilities; ONNX activations grow with
# it (1024 frames: +25 MiB peak) and smaller ones run slower.
_VAD_BLOCK_FRAMES = 512
_SILERO_ASSET = "silero_vad_v6.onnx"


@dataclass(frozen=True)
class Segment:
    """A range of samples ``[start, end)`` at 16 kHz that one engine call transcribes.

    ``overlap_before`` is how many samples this segment shares with the previous one: 0 for cuts
    at pauses, ``> 0`` for fixed windows, whose seam :func:`pipeline.stitch.stitch` deduplicates.
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
    min_speech_s: float = 0.25  # shorter speech regions are noise (clicks, breaths) and are dropped
    min_silence_s: float = 0.5  # a pause this long ends a speech region: the preferred places to cut
    min_pause_s: float = 0.1  # inside an over-long region, the shortest pause still good enough to cut at
    speech_pad_s: float = 0.2  # speech regions are widened by this much: VAD onsets and offsets are late / early
    # Most silence a segment keeps beyond its speech: Whisper hallucinates text on long silence.
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


class VadUnavailable(RuntimeError):
    """Silero VAD cannot run here (no onnxruntime or no faster-whisper model file)."""


@functools.lru_cache(maxsize=1)
def _silero_session():
    """The Silero ONNX session, loaded once per process (a Ray worker loads it on first use)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise VadUnavailable("VAD segmentation needs onnxruntime: install quarry[whisper], or use vad=False") from e
    # find_spec locates the package without importing it (importing faster_whisper loads CTranslate2).
    spec = importlib.util.find_spec("faster_whisper")
    path = os.path.join(spec.submodule_search_locations[0], "assets", _SILERO_ASSET) if spec else ""
    if not os.path.isfile(path):
        raise VadUnavailable(f"Silero VAD model {_SILERO_ASSET} not found: install quarry[whisper] (faster-whisper)")
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1  # one CPU per Ray task; the model is too small to gain from more
    opts.intra_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32 ms frame (``ceil(len / 512)`` float32 values).

    The audio goes through the model ``_VAD_BLOCK_FRAMES`` frames at a time, carrying the LSTM
    state and the 64-sample context across blocks, which gives the same probabilities as one call
    over the whole array. Extra memory: one block plus 4 bytes per frame. Integer samples are
    not scaled: pass float audio in [-1, 1].
    """
    session = _silero_session()
    n_frames = -(-len(samples) // VAD_FRAME)
    probs = np.empty(n_frames, np.float32)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    context = np.zeros(_VAD_CONTEXT, np.float32)
    block = np.empty((_VAD_BLOCK_FRAMES, _VAD_CONTEXT + VAD_FRAME), np.float32)
    for first in range(0, n_frames, _VAD_BLOCK_FRAMES):
        chunk = samples[first * VAD_FRAME : (first + _VAD_BLOCK_FRAMES) * VAD_FRAME]
        full, rest = divmod(len(chunk), VAD_FRAME)
        k = full + (rest > 0)
        frames = block[:k, _VAD_CONTEXT:]
        frames[:full] = chunk[: full * VAD_FRAME].reshape(full, VAD_FRAME)  # casts in place, no temporary
        if rest:
            frames[full, :rest] = chunk[full * VAD_FRAME :]
            frames[full, rest:] = 0.0  # the last frame is zero-padded
        block[0, :_VAD_CONTEXT] = context
        block[1:k, :_VAD_CONTEXT] = frames[: k - 1, -_VAD_CONTEXT:]
        context = frames[k - 1, -_VAD_CONTEXT:].copy()
        out, h, c = session.run(None, {"input": block[:k], "h": h, "c": c})
        probs[first : first + k] = out.reshape(-1)
    return probs


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


def _split_long(region: tuple[int, int], probs: np.ndarray, opts: VadOptions, max_len: int) -> list[tuple[int, int]]:
    """Split a region longer than ``max_len`` at short pauses: pieces, gaps between them are pauses.

    Greedy: each piece ends at the last pause that keeps it within ``max_len``; a stretch with no
    such pause is returned whole (longer than ``max_len``) and becomes fixed windows.
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
        while i < len(pauses) and pauses[i][0] - start <= max_len:
            if pauses[i][0] > start:
                usable = i
            i += 1
        if usable is None:  # no pause within reach: this stretch runs on to the next pause, or the end
            if i == len(pauses):
                break
            usable = i
            i += 1
        pieces.append((start, pauses[usable][0]))
        start = pauses[usable][1]
        i = usable + 1
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

    Guarantees: segments are in order, within ``[0, len(samples)]``, no longer than ``max_s`` and,
    apart from fixed windows (``overlap_before > 0``), disjoint; all speech the VAD finds is covered
    (only pauses fall between segments).
    A segment shorter than ``min_s`` is widened into free audio around it, as far as that goes
    (engines do badly on fragments). Audio no longer than ``max_s`` is one segment covering it all;
    audio with no speech is one segment over its first ``max_s`` (an empty transcript, one row).
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
    probs = speech_probabilities(samples)
    regions = _padded(_speech_frames(probs, opts, SAMPLE_RATE_HZ / VAD_FRAME), opts, n)
    if not regions:
        return [Segment(0, 0, max_len)]
    units = [p for r in regions for p in ([r] if r[1] - r[0] <= max_len else _split_long(r, probs, opts, max_len))]
    groups: list[tuple[int, int]] = []  # speech extents: packed units, or one over-long unit
    for a, b in units:
        if groups and b - groups[-1][0] <= max_len and groups[-1][1] - groups[-1][0] <= max_len:
            groups[-1] = (groups[-1][0], b)
        else:
            groups.append((a, b))
    edge = round(opts.max_edge_silence_s * SAMPLE_RATE_HZ)
    spans: list[tuple[tuple[int, int], bool]] = []  # ((start, end), is_fixed_window)
    for k, (a, b) in enumerate(groups):
        if b - a > max_len:
            spans.extend((w, True) for w in _windows(a, b, max_len, overlap))
            continue
        before = (a - groups[k - 1][1]) // 2 if k else a  # reach the middle of the pause, no further
        after = (groups[k + 1][0] - b) // 2 if k + 1 < len(groups) else n - b
        left, right = _share(max_len - (b - a), min(before, edge), min(after, edge))
        spans.append(((a - left, b + right), False))
    return _numbered(_widen(spans, round(min_s * SAMPLE_RATE_HZ), n))


def _share(room: int, left_room: int, right_room: int) -> tuple[int, int]:
    """Split ``room`` samples between two sides that can take at most ``left_room`` / ``right_room``."""
    left = min(left_room, max(room // 2, room - right_room))
    return left, min(right_room, room - left)


def _widen(spans: list[tuple[tuple[int, int], bool]], min_len: int, n: int) -> list[tuple[tuple[int, int], bool]]:
    """Widen spans shorter than ``min_len`` into the free audio beside them."""
    out = list(spans)
    for k, ((a, b), fixed) in enumerate(out):
        if fixed or b - a >= min_len:
            continue
        free_left = a - (out[k - 1][0][1] if k else 0)
        free_right = (out[k + 1][0][0] if k + 1 < len(out) else n) - b
        left, right = _share(min_len - (b - a), max(0, free_left), max(0, free_right))
        out[k] = ((a - left, b + right), fixed)
    return out


def _numbered(spans: list[tuple[tuple[int, int], bool]]) -> list[Segment]:
    segments: list[Segment] = []
    for (a, b), fixed in spans:
        shared = max(0, segments[-1].end - a) if segments and fixed else 0
        segments.append(Segment(len(segments), a, b, shared))
    return segments
