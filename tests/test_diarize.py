"""Speaker diarization of mono recordings (pipeline/diarize/, diarize.* in the config).

* The pieces without a model: regions per segment, turns, words' speakers, talk time.
* Resemblyzer + clustering, for real, on (a) a mono mix of two eval speakers built here with known
  turns (one change with no pause between the speakers, inside one VAD region) and (b) the eval
  set's two-speaker recording (one man, then the same man with a cold in another room; turns from
  the Montreal Forced Aligner's TextGrid of that recording): the diarization error rate from
  pyannote.metrics is printed and bounded; talk time per speaker within 10 % of the truth.
* The whole pipeline and the call-center job on mono calls: speakers on segments and words, turns
  and talk time on the recording, the same analytics columns as stereo calls get.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from pipeline.config import DiarizeConfig, load_config
from pipeline.diarize.turns import SpeakerRegion, clip, main_speaker, merged, speaker_columns, talk_time

from .conftest import EVAL_DIR, REPO, eval_rows
from .helpers import read_transcripts, write_jsonl

pytestmark = pytest.mark.callcenter  # needs the callcenter extra (make test installs it)

RATE = 16_000
A_CLIP, B_CLIP = "librispeech_2412-153948-0000", "fleurs_en_002"
# michaelandsickmichael.TextGrid (Montreal Forced Aligner's test data, MIT): speech intervals per tier.
TWO_SPEAKER_TURNS = [("michael", 1.059, 7.541), ("michael", 8.016, 17.207), ("michael", 18.360, 25.252),
                     ("sick", 26.723, 39.529), ("sick", 40.204, 43.814), ("sick", 44.480, 45.085),
                     ("sick", 46.379, 51.457)]


# --- Without a model ---------------------------------------------------------------------------

def test_regions_are_clipped_to_a_segment_and_its_main_speaker_is_the_longest():
    regions = [SpeakerRegion("spk0", 0.0, 4.0), SpeakerRegion("spk1", 4.0, 11.0), SpeakerRegion("spk0", 12.0, 20.0)]
    own = clip(regions, 3.0, 12.5)
    assert own == [{"speaker": "spk0", "start_s": 3.0, "end_s": 4.0}, {"speaker": "spk1", "start_s": 4.0, "end_s": 11.0},
                   {"speaker": "spk0", "start_s": 12.0, "end_s": 12.5}]
    assert main_speaker([SpeakerRegion(**r) for r in own]) == "spk1" and main_speaker([]) is None


def test_turns_take_the_words_inside_them_and_talk_time_counts_each_moment_once():
    # overlapping fixed windows repeat a region: merged, and counted once
    regions = [SpeakerRegion("spk0", 0.0, 3.0), SpeakerRegion("spk0", 2.0, 4.0), SpeakerRegion("spk1", 4.0, 6.0)]
    assert merged(regions) == [SpeakerRegion("spk0", 0.0, 4.0), SpeakerRegion("spk1", 4.0, 6.0)]
    assert talk_time(regions) == {"spk0": 4.0, "spk1": 2.0}
    words = [{"word": w, "start_s": a, "end_s": b, "probability": 1.0, "speaker": None}
             for w, a, b in [("hello", 0.5, 0.9), ("there", 3.7, 4.2), ("hi", 4.5, 4.8), ("late", 6.5, 6.9)]]
    speakers, turns, labelled = speaker_columns(regions, words)
    assert [w["speaker"] for w in labelled] == ["spk0", "spk0", "spk1", "spk1"]  # "late" (in a pause): nearest turn
    assert turns == [{"speaker": "spk0", "start_s": 0.0, "end_s": 4.0, "text": "hello there"},
                     {"speaker": "spk1", "start_s": 4.0, "end_s": 6.0, "text": "hi late"}]
    assert speakers == [{"speaker": "spk0", "text": "hello there", "speaking_s": 4.0},
                        {"speaker": "spk1", "text": "hi late", "speaking_s": 2.0}]


def test_pyannote_backend_without_the_hub_names_the_model_and_the_offline_choice(monkeypatch):
    from pipeline.diarize import DiarizerUnavailable, load_diarizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiarizerUnavailable, match=r"pyannote/speaker-diarization-3.1.*resemblyzer"):
        load_diarizer(DiarizeConfig(enabled=True, model="pyannote/speaker-diarization-3.1"))


def test_diarize_on_split_channels_is_refused():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="mono"):
        load_config(None, ["diarize.enabled=true", "audio.channels=split"])


# --- Resemblyzer, for real ----------------------------------------------------------------------

@pytest.mark.slow
def test_mel_frames_and_encoder_match_resemblyzers_own_without_loading_numba(tmp_path):
    """The backend computes Resemblyzer's mel frames in numpy and loads its encoder weights itself:
    Resemblyzer's package imports librosa -> numba -> llvmlite, which breaks vLLM's start-up in the
    same process. Compared with Resemblyzer's own functions in a child process."""
    import subprocess
    import sys

    import torch

    from pipeline.diarize.resemblyzer_backend import mel_frames, speaker_encoder, weights_path

    wav = EVAL_DIR / next(r for r in eval_rows("en"))["audio"]
    samples, _ = sf.read(wav, dtype="float32")
    ours = mel_frames(samples)
    with torch.inference_mode():
        embedding = speaker_encoder(torch, weights_path())(torch.from_numpy(ours[None, :160])).numpy()
    script = (f"import numpy as np, soundfile as sf, torch; from resemblyzer import VoiceEncoder; "
              f"from resemblyzer.audio import wav_to_mel_spectrogram; x, _ = sf.read({str(wav)!r}, dtype='float32'); "
              f"m = wav_to_mel_spectrogram(x); e = VoiceEncoder('cpu', verbose=False)(torch.from_numpy(m[None, :160]));"
              f"np.save({str(tmp_path / 'mel.npy')!r}, m); np.save({str(tmp_path / 'emb.npy')!r}, e.detach().numpy())")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert np.abs(ours - np.load(tmp_path / "mel.npy")).max() < 1e-4
    assert np.abs(embedding - np.load(tmp_path / "emb.npy")).max() < 1e-5
    assert "llvmlite" not in sys.modules

def _audio(clip_id: str) -> np.ndarray:
    row = next(r for r in eval_rows() if r["id"] == clip_id)
    samples, rate = sf.read(EVAL_DIR / row["audio"], dtype="float32")
    assert rate == RATE and samples.ndim == 1
    return samples


def _halves(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut at the quietest 100 ms around the middle."""
    mid, win = len(samples) // 2, RATE // 10
    energy = [float(np.mean(samples[k:k + win] ** 2)) for k in range(mid - 2 * RATE, mid + 2 * RATE, win // 2)]
    cut = mid - 2 * RATE + int(np.argmin(energy)) * (win // 2) + win // 2
    return samples[:cut], samples[cut:]


def _speech_s(samples: np.ndarray) -> float:
    """A piece's speech time on its own (the VAD the diarizer uses): the truth for talk time."""
    from pipeline.speech import whole_recording_speech

    return sum(b - a for a, b in whole_recording_speech(samples)[1]) / RATE


def build_mix() -> tuple[np.ndarray, list[tuple[str, float, float]], dict[str, float]]:
    """A1 | 0.7 s | B1 | 0.7 s | A2 | B2 (B2 right after A2: a change with no pause), with each
    piece's extent (leading / trailing silence trimmed by energy) as the reference turns."""
    a1, a2 = _halves(_audio(A_CLIP))
    b1, b2 = _halves(_audio(B_CLIP))
    pause = np.zeros(int(0.7 * RATE), np.float32)
    pieces = [("A", a1), (None, pause), ("B", b1), (None, pause), ("A", a2), ("B", b2)]
    turns, talk, at = [], {"A": 0.0, "B": 0.0}, 0
    for who, piece in pieces:
        if who:
            loud = np.flatnonzero(np.abs(piece) > 0.02 * np.abs(piece).max())
            turns.append((who, (at + loud[0]) / RATE, (at + loud[-1]) / RATE))
            talk[who] += _speech_s(piece)
        at += len(piece)
    return np.concatenate([p for _, p in pieces]), turns, talk


def _der(reference, hypothesis) -> float:
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns):
        out = Annotation()
        for speaker, a, b in turns:
            out[Segment(a, b)] = speaker
        return out

    return DiarizationErrorRate(collar=0.25)(annotation(reference), annotation(hypothesis),
                                             uem=None)


def _diarize(samples: np.ndarray, **cfg):
    from pipeline.diarize import load_diarizer
    from pipeline.speech import whole_recording_speech

    diarizer = load_diarizer(DiarizeConfig(enabled=True, **cfg))
    started = time.perf_counter()
    clean, speech = whole_recording_speech(samples)
    regions = diarizer.diarize(clean, speech)
    return regions, len(samples) / RATE / (time.perf_counter() - started)


@pytest.mark.slow
def test_resemblyzer_finds_both_speakers_of_a_built_mix_and_their_talk_time():
    samples, reference, truth = build_mix()
    regions, rtfx = _diarize(samples)
    der = _der(reference, [tuple(r) for r in regions])
    talk = talk_time(regions)
    # spk0 speaks first: A; spk1 is B
    errors = {who: abs(talk.get(spk, 0.0) - truth[who]) / truth[who] for who, spk in (("A", "spk0"), ("B", "spk1"))}
    print(f"\nbuilt mix ({len(samples) / RATE:.1f} s): DER {der:.3f}, talk time A {talk.get('spk0', 0):.2f} s "
          f"(truth {truth['A']:.2f}), B {talk.get('spk1', 0):.2f} s (truth {truth['B']:.2f}), errors "
          f"{errors['A']:.1%} / {errors['B']:.1%}; diarization alone RTFx {rtfx:.1f}")
    assert set(talk) == {"spk0", "spk1"}
    assert der < 0.10
    assert max(errors.values()) < 0.10
    # the change with no pause (A2 -> B2) is found within half a second
    change = reference[3][1]
    found = [r.start_s for r in regions if r.speaker == "spk1" and abs(r.start_s - change) < 0.5]
    assert found, (change, regions)


@pytest.mark.slow
def test_resemblyzer_on_the_eval_two_speaker_recording():
    samples = _audio("mfa_two_speaker_52s")
    regions, rtfx = _diarize(samples)
    der = _der(TWO_SPEAKER_TURNS, [tuple(r) for r in regions])
    talk = talk_time(regions)
    truth = {who: sum(b - a for w, a, b in TWO_SPEAKER_TURNS if w == who) for who in ("michael", "sick")}
    print(f"\nmfa_two_speaker_52s (the same man, then with a cold in another room): DER {der:.3f}; talk time "
          f"{ {k: round(v, 2) for k, v in talk.items()} } vs truth {truth}; RTFx {rtfx:.1f}")
    assert len(talk) == 2
    assert der < 0.25


# --- The pipeline and the call-center job ------------------------------------------------------

@pytest.mark.slow
def test_call_center_job_on_mono_calls_diarized_gives_the_stereo_analytics(ray_session, tmp_path):
    from pipeline.jobs import run_job_file
    from pipeline.jobs.call_center import analytics_schema

    samples, reference, truth = build_mix()
    calls = tmp_path / "calls"
    calls.mkdir()
    sf.write(calls / "mono-1.wav", samples, RATE, subtype="PCM_16")
    write_jsonl(calls / "calls.jsonl", [{"id": "mono-1", "audio": "mono-1.wav", "campaign": "support", "language": "en"}])
    (tmp_path / "campaigns.csv").write_text("campaign,keywords\nsupport,narrative;town\n")
    config = yaml.safe_load((REPO / "jobs" / "call-center" / "config.local.yaml").read_text())
    config["audio"]["channels"] = "mix"
    config["diarize"] = {"enabled": True}
    config["engine"].update(replicas=1, cpus_per_replica=0.75)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"kind": "call-center", "config": "config.yaml", "manifest": "calls/calls.jsonl",
                                   "output": "out", "campaigns": "campaigns.csv"}))
    result = run_job_file(job)
    assert result.summary.n_ok == 1
    out = tmp_path / "out"
    row = read_transcripts(out).iloc[0]
    talk = {s["speaker"]: s["speaking_s"] for s in row["speakers"]}
    print(f"\nmono call through the pipeline: talk time {talk} (truth A {truth['A']:.2f}, B {truth['B']:.2f}); "
          f"{len(row['speaker_turns'])} turns")
    assert set(talk) == {"spk0", "spk1"}
    assert talk["spk0"] == pytest.approx(truth["A"], rel=0.10) and talk["spk1"] == pytest.approx(truth["B"], rel=0.10)
    turns = list(row["speaker_turns"])
    assert [t["start_s"] for t in turns] == sorted(t["start_s"] for t in turns) and len(turns) >= 4
    assert all(w["speaker"] in ("spk0", "spk1") for w in row["words"])
    segments = pq.read_table(out / "segments").to_pandas()
    assert segments["segment_speaker"].notna().all()
    analytics = pq.read_table(out / "analytics")
    assert analytics.schema.names == analytics_schema(["agent", "customer"]).names  # as stereo calls get
    a = analytics.to_pylist()[0]
    assert a["talk_s_agent"] == talk["spk0"] and a["talk_s_customer"] == talk["spk1"]
    assert a["words_agent"] > 10 and a["words_customer"] > 10 and a["overlap_s"] == 0.0
    assert a["silence_s"] == pytest.approx(a["duration_s"] - talk["spk0"] - talk["spk1"], abs=0.01)
