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


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_downmix_gives_exactly_numpys_mean(channels):
    block = np.random.default_rng(channels).standard_normal((4_097, channels)).astype(np.float32)
    assert np.array_equal(audio.downmix(block), block.mean(axis=1, dtype=np.float32))


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


# --- Bounded reads and decodes (hostile inputs; the job-level corpus is tests/test_hostile.py) ----


def _within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread; fail (instead of hanging the suite) if it takes longer."""
    import threading

    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_object_size_is_checked_before_any_byte_is_read(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.config import AudioConfig

    big = tmp_path / "big.wav"
    with open(big, "wb") as f:  # sparse: larger than the default limit, on no disk
        f.truncate(AudioConfig().max_bytes + 1)

    def no_reading(*args, **kwargs):
        raise AssertionError("read although the size already says it is too large")

    monkeypatch.setattr(LocalFileSystem, "cat_file", no_reading)
    monkeypatch.setattr(LocalFileSystem, "open", no_reading)
    with pytest.raises(AudioError) as caught:
        load_audio(str(big), max_bytes=AudioConfig().max_bytes)
    assert caught.value.status is Status.TOO_LARGE and "audio.max_bytes" in str(caught.value)
    assert AudioConfig().max_bytes == 2 * 2**30


def test_fifos_devices_and_sockets_are_refused_without_being_opened(tmp_path):
    import os
    import socket

    os.mkfifo(tmp_path / "pipe.wav")  # opening it would block until a writer comes: never
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.wav"))
    sock.close()
    for uri in (str(tmp_path / "pipe.wav"), "/dev/zero", "/dev/urandom", str(tmp_path / "sock.wav")):
        with pytest.raises(AudioError) as caught:
            _within(10, fetch_bytes, uri)
        assert caught.value.status is Status.FORBIDDEN_URI and "regular" in str(caught.value), uri


def test_a_read_that_stalls_times_out_as_a_fetch_error():
    import http.server
    import threading
    import time

    from pipeline.storage import NO_RETRY

    stop = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()

        def do_GET(self):  # noqa: N802
            self.do_HEAD()
            self.wfile.flush()
            stop.wait(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.perf_counter()
        with pytest.raises(AudioError) as caught:
            _within(20, fetch_bytes, f"http://127.0.0.1:{server.server_address[1]}/a.wav", retry=NO_RETRY,
                    timeout_s=1.0)
        assert caught.value.status is Status.FETCH_ERROR and "Timeout" in str(caught.value)
        assert time.perf_counter() - started < 5
    finally:
        stop.set()
        server.shutdown()


def test_decompression_bomb_is_refused_from_its_header_before_any_sample_is_decoded(monkeypatch):
    from .hostile import flac_bomb

    data = flac_bomb()  # 2 h of 8-channel 192 kHz FLAC in 0.75 MB: 44 GB of float32
    assert len(data) < 1_000_000
    with sf.SoundFile(io.BytesIO(data)) as f:  # a real, decodable stream
        assert (f.samplerate, f.channels, f.frames) == (192_000, 8, 7200 * 192_000)
        assert not f.read(1000, dtype="float32").any()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the header already says it is over budget")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.raises(AudioError) as caught:
        decode_audio(data, name="bomb.flac", budget_bytes=8192 * 2**20)
    assert caught.value.status is Status.TOO_LARGE
    assert "8-channel 192000 Hz" in str(caught.value) and "audio.decode_budget_mb" in str(caught.value)


def test_decode_budget_counts_the_output_too_and_is_checked_while_decoding(monkeypatch):
    from .hostile import raw_wav

    # 40 kB at 1 Hz becomes 5.6 h at 16 kHz: the output side of the budget refuses it
    with pytest.raises(AudioError) as caught:
        decode_audio(raw_wav(1, 1, 20_000), budget_bytes=1024 * 2**20)
    assert caught.value.status is Status.TOO_LARGE
    # a header that under-declares is caught as blocks arrive
    monkeypatch.setattr(audio, "_SF_COUNT_MAX", 16_000)  # pretend the header gave no length
    monkeypatch.setattr(audio, "BLOCK_FRAMES", 1_000)
    with pytest.raises(AudioError) as caught:
        decode_audio(wav_bytes(sine(440, 16_000, 1.0), 16_000), budget_bytes=4 * 8_000)
    assert caught.value.status is Status.TOO_LARGE


def test_many_channels_are_decoded_in_blocks_of_bounded_size(monkeypatch):
    from .hostile import raw_wav

    assert audio.block_frames(1000) * 1000 * 4 <= audio.BLOCK_BYTES
    assert audio.block_frames(1) == audio.BLOCK_FRAMES
    sizes = []
    real_read = sf.SoundFile.read

    def recording_read(self, frames=-1, *args, **kwargs):
        sizes.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", recording_read)
    monkeypatch.setattr(audio, "BLOCK_BYTES", 1000 * 4 * 100)  # 100 frames of 1000 channels
    decoded = decode_audio(raw_wav(8_000, 1000, 450))
    assert decoded.source_channels == 1000 and decoded.duration_s == pytest.approx(450 / 8_000)
    assert set(sizes) == {100}


@pytest.mark.parametrize("raised", [MemoryError(), RuntimeError("soxr internal error"), ValueError("odd")],
                         ids=["memory_error", "runtime_error", "value_error"])
def test_any_failure_inside_decode_or_resample_is_the_rows_decode_error(monkeypatch, raised):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise raised

    monkeypatch.setattr(audio.soxr, "ResampleStream", Broken)
    with pytest.raises(AudioError) as caught:
        decode_audio(wav_bytes(sine(440, 48_000, 0.5), 48_000), name="x.wav")
    assert caught.value.status is Status.DECODE_ERROR and type(raised).__name__ in str(caught.value)


def test_decode_stage_keeps_going_when_decoding_or_segmenting_one_row_raises(tmp_path, monkeypatch):
    import pyarrow as pa

    from pipeline import stages
    from pipeline.config import AudioConfig, SegmentConfig
    from pipeline.records import PREPARED, null_row

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.wav").write_bytes(wav_bytes(sine(440, 16_000, 0.5), 16_000))
    real_load, real_plan = stages.load_audio, stages.plan_segments

    def load(uri, *args, **kwargs):
        if uri.endswith("b.wav"):
            raise MemoryError()
        return real_load(uri, *args, **kwargs)

    def plan(samples, **kwargs):
        if len(plan.calls) == 1:
            plan.calls.append(1)
            raise MemoryError()
        plan.calls.append(1)
        return real_plan(samples, **kwargs)

    plan.calls = []
    monkeypatch.setattr(stages, "load_audio", load)
    monkeypatch.setattr(stages, "plan_segments", plan)
    rows = [{**null_row(*PREPARED), "id": n, "audio": str(tmp_path / f"{n}.wav"), "status": "ok", "keywords": []}
            for n in ("a", "b", "c")]
    stage = stages.DecodeStage(AudioConfig(), SegmentConfig(vad=False), {}, ())
    out = pa.concat_tables(list(stage(pa.Table.from_pylist(rows)))).to_pylist()
    assert [(r["id"], r["status"]) for r in out] == [("a", "ok"), ("b", "decode_error"), ("c", "decode_error")]
    assert "MemoryError" in out[1]["error"] and "cannot segment" in out[2]["error"]


def test_audio_column_and_errors_carry_no_credentials(tmp_path):
    import pyarrow as pa

    from pipeline.config import AudioConfig, SegmentConfig
    from pipeline.records import PREPARED, null_row
    from pipeline.stages import DecodeStage

    uri = "http://user:pw-secret@127.0.0.1:9/a.wav?X-Amz-Signature=sig-secret"
    row = {**null_row(*PREPARED), "id": "x", "audio": uri, "status": "ok", "keywords": []}
    cfg = AudioConfig(read_timeout_s=2)
    (out,) = pa.concat_tables(list(DecodeStage(cfg, SegmentConfig(), {}, ())(pa.Table.from_pylist([row])))).to_pylist()
    assert out["status"] in ("fetch_error", "missing_object")
    assert "secret" not in out["audio"] and "secret" not in out["error"]
    assert out["audio"] == "http://***@127.0.0.1:9/a.wav?X-Amz-Signature=***"
