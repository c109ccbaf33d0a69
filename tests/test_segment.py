"""Long recordings: VAD cut planning on real speech, seam stitching, conversations, subtitles.

The long recordings are built from the eval clips with silences of known place and length put
between them, so where the cuts must fall is known exactly.
"""

from __future__ import annotations

import re
import sys
from itertools import pairwise

import numpy as np
import pytest

from pipeline import segment as seg_mod
from pipeline.audio import load_audio
from pipeline.segment import Cue, Segment, VadOptions, VadUnavailable, plan_segments, speech_probabilities
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


def test_ten_minutes_are_cut_only_inside_inserted_silences(ten_minutes, ten_minute_plan):
    samples, _, silences = ten_minutes
    segments = ten_minute_plan
    _check_basic(segments, len(samples))
    assert len(segments) >= 600 / MAX_S
    assert all(s.overlap_before == 0 for s in segments)
    for prev, nxt in pairwise(segments):
        assert prev.end <= nxt.start, "VAD cuts never overlap"
        inside = [(a, b) for a, b in silences if a <= prev.end and nxt.start <= b]
        assert inside, f"cut {prev.end_s:.2f}-{nxt.start_s:.2f} s is not inside an inserted silence"
        if prev.end == nxt.start:  # a cut that had room to go where it wanted: the middle of the pause
            a, b = inside[0]
            assert abs(prev.end - (a + b) / 2) < 0.25 * SR


def test_ten_minutes_every_clip_is_covered(ten_minutes, ten_minute_plan):
    samples, spans, _ = ten_minutes
    covered = np.zeros(len(samples), bool)
    for s in ten_minute_plan:
        covered[s.start : s.end] = True
    for a, b in spans:
        assert covered[a:b].all(), f"clip at {a / SR:.1f}-{b / SR:.1f} s is not fully covered"
    # silence beyond max_edge_silence_s at each side of the speech is left out: never one segment over all
    assert ten_minute_plan[-1].end <= len(samples)


def test_speech_without_pauses_falls_back_to_overlapping_fixed_windows(clips):
    speech = np.concatenate([c for _, c in clips[:8]])  # ~70 s, clips back to back
    no_pause = VadOptions(min_silence_s=1e4, min_pause_s=1e4)
    segments = plan_segments(speech, max_s=MAX_S, overlap_s=1.0, vad_options=no_pause)
    _check_basic(segments, len(speech))
    assert len(segments) >= 3
    assert segments[0].overlap_before == 0
    for prev, nxt in pairwise(segments):
        assert nxt.overlap_before == prev.end - nxt.start
        assert SR - 1 <= nxt.overlap_before <= SR + 1
    assert segments[-1].end == len(speech)
    assert len({s.end - s.start for s in segments}) == 1, "windows share the length evenly"


def test_long_speech_with_short_pauses_is_cut_at_pauses_not_windows(clips):
    speech = np.concatenate([c for _, c in clips[:8]])
    segments = plan_segments(speech, max_s=MAX_S)  # default options: pauses under 0.5 s are inside regions
    _check_basic(segments, len(speech))
    assert len(segments) >= 3
    assert all(s.overlap_before == 0 for s in segments)
    probs = speech_probabilities(speech)
    for prev, nxt in pairwise(segments):
        assert prev.end <= nxt.start
        frame = min((prev.end + nxt.start) // 2 // seg_mod.VAD_FRAME, len(probs) - 1)
        assert probs[frame] < VadOptions().threshold, f"cut at {prev.end_s:.2f} s is in speech"


def test_streamed_vad_probabilities_equal_one_call_over_the_whole_clip():
    from faster_whisper.vad import get_vad_model

    row = next(r for r in eval_rows() if r["id"] == "librivox_de_aeneas_long")  # 68 s: several blocks
    samples = load_audio(str(EVAL_DIR / row["audio"])).samples
    ours = speech_probabilities(samples)
    padded = np.pad(samples, (0, seg_mod.VAD_FRAME - len(samples) % seg_mod.VAD_FRAME))
    theirs = get_vad_model()(padded).reshape(-1)[: len(ours)]
    assert len(ours) == -(-len(samples) // seg_mod.VAD_FRAME)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_fixed_windows_without_vad_need_no_onnxruntime(monkeypatch, clips):
    seg_mod._silero_session.cache_clear()
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
        seg_mod._silero_session.cache_clear()


def test_short_audio_is_one_segment_and_silence_is_one_bounded_segment(clips):
    clip = clips[0][1]
    assert plan_segments(clip, max_s=MAX_S) == [Segment(0, 0, len(clip))]
    quiet = (np.random.default_rng(1).standard_normal(120 * SR) * 1e-3).astype(np.float32)
    assert plan_segments(quiet, max_s=MAX_S) == [Segment(0, 0, int(MAX_S * SR))]


def test_long_silence_is_left_out_and_short_segments_widen_to_min_s(clips):
    short = [c for _, c in clips if 3 * SR < len(c) < 6 * SR][:3]
    gap = np.zeros(10 * SR, np.float32)
    samples = np.concatenate([short[0], gap, short[1], gap, short[2]])
    starts = [0, len(short[0]) + len(gap), len(short[0]) + len(short[1]) + 2 * len(gap)]
    opts = VadOptions(max_edge_silence_s=1.0)
    for min_s, expect_min in ((1.0, None), (10.0, 10.0)):
        segments = plan_segments(samples, max_s=12.0, min_s=min_s, vad_options=opts)
        _check_basic(segments, len(samples), max_s=12.0)
        assert len(segments) == 3 and all(a.end <= b.start for a, b in pairwise(segments))
        for s, start, clip in zip(segments, starts, short):
            assert s.start <= start and start + len(clip) <= s.end
            if expect_min is None:  # at most the edge silence (+ VAD padding) beyond the speech
                assert s.duration_s <= len(clip) / SR + 2 * (1.0 + 0.2) + 0.1
            else:
                assert s.duration_s >= expect_min


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
