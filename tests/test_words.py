"""Word-level timestamps (output.words): faster-whisper's own, and CTC forced alignment for
Granite (pipeline/align/), and subtitles built from words.

* The Viterbi alignment finds the known path through made-up emissions.
* Granite's CTC-head aligner loads the encoder of a tiny random Granite and times every word of a
  transcript in order inside the clip: mechanics only (random weights; the real model's character
  table is not verified here, see pipeline/align/granite_ctc.py).
* The whole pipeline with whisper tiny.en on a recording built from eval clips joined with known
  silences (long enough to be cut into segments): every word starts inside its clip's span and the
  words of each clip are that clip's text; the SRT written from the words parses back to the same
  words and times.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.align import align_words, viterbi
from pipeline.assemble import word_cues
from pipeline.config import load_config
from pipeline.plan import run_job
from pipeline.scoring import score
from pipeline.subtitles import to_srt

from .conftest import EVAL_DIR, eval_rows
from .helpers import read_transcripts, write_jsonl

RATE = 16_000
GAP_S = 2.0
CLIPS = ("fleurs_en_000", "librispeech_2412-153948-0000", "jfk_inaugural_11s", "fleurs_en_005")


def test_viterbi_finds_the_known_path_through_the_emissions():
    # 12 frames, vocabulary {blank, a, b}: blank a a blank b b blank blank a blank blank blank
    truth = [0, 1, 1, 0, 2, 2, 0, 0, 1, 0, 0, 0]
    log_probs = np.full((12, 3), np.log(0.05))
    log_probs[np.arange(12), truth] = np.log(0.9)
    owner = viterbi(log_probs, [1, 2, 1], blank=0)
    assert owner.tolist() == [-1, 0, 0, -1, 1, 1, -1, -1, 2, -1, -1, -1]
    # a repeated token needs a blank between its two occurrences
    owner = viterbi(log_probs, [1, 1], blank=0)
    assert sorted(set(owner.tolist()) - {-1}) == [0, 1]


def test_granite_ctc_head_times_every_word_in_order_on_a_tiny_random_granite(tmp_path):
    import json

    from pipeline.align.granite_ctc import VOCAB_FILE, GraniteCtcAligner

    from .tiny_models import build_tiny_granite

    checkpoint = build_tiny_granite(tmp_path / "granite")
    (checkpoint / VOCAB_FILE).write_text(json.dumps([""] + [chr(ord("a") + i) for i in range(23)]))  # output_dim 24
    aligner = GraniteCtcAligner(checkpoint)
    samples = np.random.default_rng(0).standard_normal(3 * RATE).astype(np.float32) * 0.1
    words = align_words(aligner, samples, "a bad cab, 42 fed")
    assert [w.word for w in words] == ["a", "bad", "cab,", "42", "fed"]
    starts = [w.start_s for w in words]
    assert starts == sorted(starts) and all(0 <= w.start_s <= w.end_s <= 3.0 for w in words)
    assert words[3].probability is None  # "42" has no characters in the table: placed between its neighbours


def test_cues_from_words_split_at_pauses_speakers_and_length_and_srt_parses_back():
    words = [{"word": w, "start_s": a, "end_s": b, "speaker": s} for w, a, b, s in [
        ("hello", 0.0, 0.4, None), ("there", 0.5, 0.9, None), ("after", 2.5, 2.9, None), ("pause", 3.0, 3.3, None)]]
    cues = word_cues(words)
    assert cues == [(0.0, 0.9, "hello there"), (2.5, 3.3, "after pause")]
    labelled = [{**w, "speaker": "spk0" if i < 1 else "spk1"} for i, w in enumerate(words[:2])]
    assert word_cues(labelled) == [(0.0, 0.4, "spk0: hello"), (0.5, 0.9, "spk1: there")]
    assert parse_srt(to_srt(cues)) == [(0.0, 0.9, "hello there"), (2.5, 3.3, "after pause")]


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        a, b = re.fullmatch(r"(\S+) --> (\S+)", lines[1]).groups()
        seconds = [sum(float(x) * m for x, m in zip(t.replace(",", ".").split(":"), (3600, 60, 1))) for t in (a, b)]
        out.append((round(seconds[0], 3), round(seconds[1], 3), " ".join(lines[2:])))
    return out


@pytest.mark.slow
def test_whisper_words_fall_inside_their_clips_and_srt_from_words_round_trips(ray_session, tmp_path):
    by_id = {r["id"]: r for r in eval_rows("en")}
    pieces, spans, at = [], [], GAP_S
    pieces.append(np.zeros(int(GAP_S * RATE), np.float32))
    for clip_id in CLIPS:
        samples, _ = sf.read(EVAL_DIR / by_id[clip_id]["audio"], dtype="float32")
        pieces += [samples, np.zeros(int(GAP_S * RATE), np.float32)]
        spans.append((at, at + len(samples) / RATE))
        at += len(samples) / RATE + GAP_S
    sf.write(tmp_path / "joined.wav", np.concatenate(pieces), RATE, subtype="PCM_16")
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "joined", "audio": "joined.wav", "language": "en"}])
    run_job(load_config(None, ["output.words=true", "output.subtitles=[srt]", "engine.cpus_per_replica=0.75"]),
            str(manifest), str(tmp_path / "out"))
    row = read_transcripts(tmp_path / "out").iloc[0]
    assert row["status"] == "ok" and row["segments"] >= 2  # cut into segments: times shifted to the recording
    words = list(row["words"])
    outside = [w for w in words if not any(a - 0.3 <= w["start_s"] <= b for a, b in spans)]
    per_clip = [[w["word"] for w in words if a - 0.3 <= w["start_s"] <= b] for a, b in spans]
    wers = [score(by_id[c]["reference"], " ".join(ws), "en", load_config(None).scoring).rate
            for c, ws in zip(CLIPS, per_clip)]
    print(f"\n{len(words)} words over {len(CLIPS)} clips joined with {GAP_S} s silences: {len(outside)} start "
          f"outside their clip; WER of each clip's words vs its reference: {[round(w, 3) for w in wers]}")
    assert not outside and max(wers) < 0.25
    assert all(0 <= w["probability"] <= 1 and w["start_s"] <= w["end_s"] for w in words)
    assert [w["start_s"] for w in words] == sorted(w["start_s"] for w in words)
    segments = pq.read_table(tmp_path / "out" / "segments").to_pandas()
    assert sum(len(s) for s in segments["words"]) == len(words)
    srt = next((tmp_path / "out" / "subtitles").glob("joined-*.srt")).read_text()
    cues = parse_srt(srt)
    assert " ".join(c[2] for c in cues).split() == [w["word"] for w in words]
    assert cues == [(round(a, 3), round(b, 3), t) for a, b, t in word_cues(words)]
