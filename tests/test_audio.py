"""Audio fetch and decode: every odd input ends in its status; resampling and downmix are right."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline import audio
from pipeline.audio import AudioError, decode_audio, fetch_bytes, load_audio
from pipeline.records import Status

from .badaudio import Case, build_corpus, write_corpus
from .paths import EVAL_DIR

CASES = [case for case, _ in build_corpus()]


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def sine(freq_hz: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("badaudio")
    write_corpus(folder)
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.file_name for c in CASES])
def test_each_corpus_input_decodes_or_fails_with_its_expected_status(case: Case, corpus: Path):
    uri = str(corpus / case.file_name)
    if case.status is not Status.OK:
        with pytest.raises(AudioError) as caught:
            load_audio(uri)
        assert caught.value.status is case.status, f"{case.description}: {caught.value}"
        assert case.file_name in str(caught.value)
        if case.file_name.startswith("truncated"):
            assert "truncated" in str(caught.value)
        return
    decoded = load_audio(uri)
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    assert decoded.sample_rate == 16_000
    assert np.isfinite(decoded.samples).all()
    assert np.abs(decoded.samples).max() <= 1.5  # integer PCM scaled, resampling ringing allowed
    assert decoded.source_sample_rate == case.source_sample_rate
    assert decoded.source_channels == case.source_channels
    assert decoded.duration_s == pytest.approx(case.duration_s, abs=0.03)


def test_resampling_48k_sine_to_16k_keeps_length_and_frequency():
    decoded = decode_audio(wav_bytes(sine(1000, 48_000, 2.0), 48_000, "FLOAT"))
    assert decoded.source_sample_rate == 48_000
    assert len(decoded.samples) == 32_000
    spectrum = np.abs(np.fft.rfft(decoded.samples)) ** 2
    freqs = np.fft.rfftfreq(len(decoded.samples), 1 / 16_000)
    assert freqs[spectrum.argmax()] == pytest.approx(1000, abs=1)
    assert spectrum[np.abs(freqs - 1000) <= 10].sum() / spectrum.sum() > 0.99


def test_block_by_block_decode_matches_one_shot_resampling(monkeypatch):
    source = sine(440, 44_100, 1.5) + sine(3000, 44_100, 1.5, 0.2)
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1_000)  # many seams
    decoded = decode_audio(wav_bytes(source, 44_100, "FLOAT"))
    np.testing.assert_allclose(decoded.samples, soxr.resample(source, 44_100, 16_000, quality="HQ"), atol=1e-6)


def test_stereo_downmixes_to_the_mean_of_its_channels():
    left, right = sine(440, 16_000, 1.0, 0.6), sine(1250, 16_000, 1.0, 0.3)
    decoded = decode_audio(wav_bytes(np.stack([left, right], axis=1), 16_000, "FLOAT"))
    assert decoded.source_channels == 2
    np.testing.assert_allclose(decoded.samples, (left + right) / 2, atol=1e-6)


def test_integer_pcm_is_scaled_to_unit_range():
    full_scale = np.tile(np.array([32767, -32768], dtype=np.int16), 800)
    decoded = decode_audio(wav_bytes(full_scale, 16_000))
    assert decoded.samples.max() == pytest.approx(1.0, abs=1e-4)
    assert decoded.samples.min() == pytest.approx(-1.0)


def test_too_long_is_rejected_from_the_header_before_decoding(monkeypatch):
    data = wav_bytes(sine(440, 16_000, 3.0), 16_000)

    def no_decoding(*args, **kwargs):
        raise RuntimeError("decoded although the header already says it is too long")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(AudioError) as caught:
        decode_audio(data, name="long.wav", max_duration_s=2.0)
    assert caught.value.status is Status.TOO_LONG
    assert "long.wav" in str(caught.value) and "3.0 s" in str(caught.value)


def test_audio_within_max_duration_decodes():
    assert decode_audio(wav_bytes(sine(440, 16_000, 3.0), 16_000), max_duration_s=3.0).duration_s == 3.0


def _eval_rows() -> list[dict]:
    manifest = EVAL_DIR / "manifest.jsonl"
    if not manifest.exists():
        raise FileNotFoundError(f"the eval recordings are missing: {EVAL_DIR} (tests/data/eval in the repository)")
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _eval_rows(), ids=lambda row: row["id"])
def test_eval_recording_decodes_to_its_manifest_duration(row: dict):
    decoded = load_audio(str(EVAL_DIR / row["audio"]))
    assert decoded.duration_s == pytest.approx(row["duration_s"], abs=0.02)
    assert decoded.source_channels == 1


def test_fetch_through_memory_uri():
    fs = fsspec.filesystem("memory")
    data = wav_bytes(sine(440, 16_000, 0.5), 16_000)
    fs.pipe("/quarry-audio-test/clip one.wav", data)
    try:
        assert fetch_bytes("memory://quarry-audio-test/clip one.wav") == data
        assert load_audio("memory://quarry-audio-test/clip one.wav").duration_s == 0.5
    finally:
        fs.rm("/quarry-audio-test", recursive=True)


def test_fetch_through_file_uri(tmp_path: Path):
    path = tmp_path / "clip.flac"
    sf.write(path, sine(440, 8_000, 0.5), 8_000)
    decoded = load_audio(f"file://{path}")
    assert (decoded.source_sample_rate, decoded.duration_s) == (8_000, 0.5)


def test_missing_memory_object_is_missing_object():
    with pytest.raises(AudioError) as caught:
        fetch_bytes("memory://quarry-audio-test/nothing-here.wav")
    assert caught.value.status is Status.MISSING_OBJECT


@pytest.mark.parametrize(
    ("raised", "status"),
    [(PermissionError("AccessDenied"), Status.ACCESS_DENIED), (ConnectionError("reset"), Status.FETCH_ERROR),
     (OSError("device error"), Status.FETCH_ERROR)],
    ids=["permission_error_is_access_denied", "connection_error_is_fetch_error", "os_error_is_fetch_error"],
)
def test_storage_errors_map_to_statuses_without_leaking_options(monkeypatch, raised: Exception, status: Status):
    def failing_open(*args, **kwargs):
        raise raised

    monkeypatch.setattr(audio.fsspec, "open", failing_open)
    with pytest.raises(AudioError) as caught:
        fetch_bytes("s3://bucket/key.wav", {"secret": "hunter2-do-not-log", "key": "AKIA-do-not-log"})
    assert caught.value.status is status
    assert "s3://bucket/key.wav" in str(caught.value)
    assert "do-not-log" not in str(caught.value)
    assert caught.value.__cause__ is raised


def test_unknown_resample_quality_is_a_caller_error_not_a_row_failure():
    with pytest.raises(ValueError, match="Quality"):
        decode_audio(wav_bytes(sine(440, 48_000, 0.5), 48_000), quality="BEST")
