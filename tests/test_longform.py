"""Long recordings and stereo calls through the whole line with the real offline engine
(faster-whisper tiny.en) and real recordings.

* The English long-form eval clips (52-85 s) and a constructed recording of 10+ minutes (short eval
  clips joined with pauses) are cut at pauses, transcribed segment by segment across two actors,
  and stitched: the stitched WER stays within 0.02 of the same clips transcribed one by one.
* A stereo call with a different speaker on each channel: each channel's transcript matches its
  own speaker's reference, not the other's.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.config import load_config
from pipeline.plan import run_job
from pipeline.scoring import CorpusTally, score

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_transcripts, write_jsonl

pytestmark = pytest.mark.slow

RATE = 16_000
GAP_S = 1.5


def whisper_cfg(*extra: str):
    # Two replicas of 0.75 CPU each leave room for a decode actor on a 2-core machine.
    return load_config(None, ["engine.replicas=2", "engine.cpus_per_replica=0.75", "engine.batch_size=4", *extra])


def _audio(row) -> np.ndarray:
    samples, rate = sf.read(EVAL_DIR / row["audio"], dtype="float32")
    assert rate == RATE and samples.ndim == 1, row["id"]
    return samples


def _pause(seconds: float, rng) -> np.ndarray:
    return (rng.standard_normal(int(seconds * RATE)) * 1e-4).astype(np.float32)  # near-silent room tone


@pytest.fixture(scope="module")
def longform(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("longform")
    rng = np.random.default_rng(0)
    short = [r for r in eval_rows("en") if r["duration_s"] < 30]
    long_ = [r for r in eval_rows("en") if r["duration_s"] > 30]
    assert len(long_) == 3 and len(short) >= 20
    pieces, references, joined_s = [], [], 0.0
    while joined_s < 600:  # cycle the short clips until the recording passes 10 minutes
        for r in short:
            pieces += [_audio(r), _pause(GAP_S, rng)]
            references.append(r["reference"])
            joined_s += r["duration_s"] + GAP_S
    sf.write(folder / "ten_minutes.flac", np.concatenate(pieces), RATE)
    rows = [{"id": "ten-minutes", "audio": "ten_minutes.flac", "reference": " ".join(references), "language": "en"}]
    rows += [{"id": r["id"], "audio": str(EVAL_DIR / r["audio"]), "reference": r["reference"], "language": "en"}
             for r in long_ + short]  # the long-form clips, and every short clip on its own
    out = folder / "out"
    result = run_job(whisper_cfg("output.subtitles=[srt, vtt]"), str(write_jsonl(folder / "m.jsonl", rows)), str(out))
    return rows, short, long_, out, result, joined_s


def _wer(rows) -> float:
    tally = CorpusTally(metric="wer", normalizer="whisper_english")
    for r in rows:
        tally.add(r["ref_words"], r["substitutions"], r["deletions"], r["insertions"])
    return tally.rate


def test_every_recording_is_transcribed_and_stitched_wer_matches_clip_by_clip(longform):
    rows, short, long_, out, result, joined_s = longform
    got = read_transcripts(out).set_index("id")
    assert sorted(got.index) == sorted(r["id"] for r in rows)
    assert (got["status"] == "ok").all(), got.loc[got["status"] != "ok", "error"].to_dict()
    assert result.summary.n_input == len(rows)
    ten = got.loc["ten-minutes"]
    assert ten["duration_s"] > 600 and ten["segments"] >= 20
    one_by_one = _wer([got.loc[r["id"]] for r in short])
    print(f"\n10-minute recording ({ten['duration_s']:.0f} s, {ten['segments']} segments): stitched WER "
          f"{ten['wer']:.4f}; its clips one by one: {one_by_one:.4f}")
    assert abs(ten["wer"] - one_by_one) <= 0.02
    for r in long_:
        row = got.loc[r["id"]]
        print(f"{r['id']} ({r['duration_s']:.0f} s, {row['segments']} segments): WER {row['wer']:.4f}")
        assert row["segments"] >= 2 and row["wer"] < 0.15


def test_segments_have_ordered_timestamps_within_their_recording(longform):
    rows, _, long_, out, _, _ = longform
    segments = pq.read_table(out / "segments").to_pandas()
    recordings = read_transcripts(out).set_index("id")
    assert set(segments["id"]) == set(recordings.index)
    for rid, seg in segments.groupby("id"):
        seg = seg.sort_values("segment_index")
        assert list(seg["segment_index"]) == list(range(len(seg))) == list(range(recordings.loc[rid, "segments"]))
        assert (seg["start_s"] < seg["end_s"]).all() and seg["start_s"].iloc[0] >= 0
        assert seg["end_s"].iloc[-1] <= recordings.loc[rid, "duration_s"] + 1e-6
        assert (seg["start_s"].to_numpy()[1:] >= seg["end_s"].to_numpy()[:-1] - 1e-6).all()  # in order, VAD cuts
        assert (seg["end_s"] - seg["start_s"]).max() <= 30.0 + 1e-6
        # the recording's text is its segments' texts, in order (cuts at pauses: nothing to dedupe)
        assert recordings.loc[rid, "text"].split() == " ".join(seg["text"]).split()


def test_subtitles_are_written_per_recording_with_cues_inside_it(longform):
    _, _, _, out, _, _ = longform
    srt = (out / "subtitles").glob("ten-minutes-*.srt")
    text = next(srt).read_text()
    stamps = re.findall(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", text)
    ends = [int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000 for *_, h, m, s, ms in stamps]
    assert len(stamps) >= 20 and ends == sorted(ends) and ends[-1] > 590
    assert next((out / "subtitles").glob("ten-minutes-*.vtt")).read_text().startswith("WEBVTT")


def test_stereo_call_each_channel_matches_its_own_speaker(tmp_path, ray_session):
    by_id = {r["id"]: r for r in eval_rows("en")}
    agent, customer = by_id["fleurs_en_002"], by_id["librispeech_2412-153948-0000"]
    a, c = _audio(agent), _audio(customer)
    start_c = len(a) - 2 * RATE  # the customer starts 2 s before the agent stops: cross-talk
    n = start_c + len(c) + RATE
    stereo = np.zeros((n, 2), np.float32)
    stereo[: len(a), 0] = a
    stereo[start_c : start_c + len(c), 1] = c
    sf.write(tmp_path / "call.wav", stereo, RATE, subtype="PCM_16")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "call-1", "audio": "call.wav", "language": "en"}])
    run_job(whisper_cfg("audio.channels=split", "audio.channel_names=[agent, customer]"), str(manifest),
            str(tmp_path / "out"))
    row = read_transcripts(tmp_path / "out").iloc[0]
    assert row["status"] == "ok" and row["segments"] >= 2
    texts = {ct["channel"]: ct for ct in row["channel_texts"]}
    assert set(texts) == {"agent", "customer"}
    wer = lambda ref, hyp: score(ref, hyp, "en", load_config(None).scoring).rate  # noqa: E731
    for name, own, other in (("agent", agent, customer), ("customer", customer, agent)):
        mine, theirs = wer(own["reference"], texts[name]["text"]), wer(other["reference"], texts[name]["text"])
        print(f"\n{name}: WER vs own speaker {mine:.3f}, vs the other speaker {theirs:.3f}")
        assert mine < 0.3 and theirs > 0.8
    assert texts["agent"]["speaking_s"] == pytest.approx(agent["duration_s"], abs=1.5)
    assert texts["customer"]["speaking_s"] == pytest.approx(customer["duration_s"], abs=1.5)
    assert row["overlap_s"] == pytest.approx(2.0, abs=1.0)
    turns = list(row["conversation"])
    assert turns[0]["channel"] == "agent" and [t["start_s"] for t in turns] == sorted(t["start_s"] for t in turns)
