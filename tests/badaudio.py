"""A corpus of bad and odd audio inputs, written with numpy + soundfile only.

``write_corpus(folder)`` writes every file and returns one :class:`Case` per input, with the
status decoding it must end in; ``build_corpus()`` gives the same cases with their bytes in
memory (cached, so parametrising tests over it costs one build). The speech comes from a real
recording in ``tests/data/eval`` (``EVAL_DIR``); the odd rates are made with
linear interpolation, which is crude but enough to test decoding, not listening.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipeline.records import Status

from .paths import EVAL_DIR

EVAL_AUDIO = EVAL_DIR / "audio"
SPEECH_CLIP = "fleurs_en_000.flac"  # 16 kHz mono speech
SPEECH_S = 4.0  # seconds of it used, to keep the corpus small and quick
RATE = 16_000


@dataclass(frozen=True)
class Case:
    """One input file and what decoding it must give."""

    file_name: str
    status: Status
    description: str
    source_sample_rate: int | None = None  # checked when the status is OK
    source_channels: int | None = None
    duration_s: float | None = None


def speech(seconds: float = SPEECH_S) -> np.ndarray:
    """The first ``seconds`` of a real 16 kHz speech recording, float32 mono."""
    path = EVAL_AUDIO / SPEECH_CLIP
    if not path.exists():
        raise FileNotFoundError(f"the eval recordings are missing: {EVAL_AUDIO} (tests/data/eval in the repository)")
    samples, rate = sf.read(path, dtype="float32", frames=int(seconds * RATE))
    if rate != RATE or samples.ndim != 1:
        raise ValueError(f"{path}: expected 16 kHz mono, got {rate} Hz, shape {samples.shape}")
    return samples


def resample_linear(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Crude resampling by linear interpolation (test data only)."""
    n_out = round(len(samples) * new_rate / rate)
    return np.interp(np.arange(n_out) * rate / new_rate, np.arange(len(samples)), samples).astype(np.float32)


def encoded(samples: np.ndarray, rate: int, format: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=format, subtype=subtype)
    return buffer.getvalue()


def with_chunk_before_data(wav: bytes, chunk_id: bytes, payload: bytes) -> bytes:
    """A RIFF WAVE file with an extra chunk (padded to an even size) inserted before ``data``."""
    at = wav.index(b"data")
    chunk = chunk_id + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)
    out = bytearray(wav[:at] + chunk + wav[at:])
    out[4:8] = struct.pack("<I", len(out) - 8)
    return bytes(out)


def write_corpus(folder: Path) -> list[Case]:
    """Write every input into ``folder`` (created if needed); the missing-object case is not written."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, data in build_corpus():
        if data is not None:
            (folder / case.file_name).write_bytes(data)
    return [case for case, _ in build_corpus()]


@functools.cache
def build_corpus() -> tuple[tuple[Case, bytes | None], ...]:
    """Every case with its bytes (None: the object must not exist)."""
    clip = speech()
    n = len(clip)
    t = np.arange(n) / RATE
    at_48k = resample_linear(clip, RATE, 48_000)
    cases: list[tuple[Case, bytes | None]] = []

    def add(name: str, data: bytes | None, status: Status, description: str, rate: int | None = None,
            channels: int | None = None, duration_s: float | None = None) -> None:
        cases.append((Case(name, status, description, rate, channels, duration_s), data))

    wav16 = encoded(clip, RATE, "WAV", "PCM_16")
    flac = encoded(clip, RATE, "FLAC", "PCM_16")
    mp3 = encoded(clip, RATE, "MP3", "MPEG_LAYER_III")
    opus = encoded(at_48k, 48_000, "OGG", "OPUS")
    rf64 = encoded(clip, RATE, "RF64", "PCM_16")

    # Good inputs, in every shape a batch job meets.
    add("speech_16k.wav", wav16, Status.OK, "16 kHz 16-bit PCM speech", RATE, 1, SPEECH_S)
    add("speech.flac", flac, Status.OK, "FLAC speech", RATE, 1, SPEECH_S)
    add("flac_named.mp3", flac, Status.OK, "a FLAC file with an .mp3 extension decodes by content", RATE, 1, SPEECH_S)
    add("speech.mp3", mp3, Status.OK, "MP3 (libsndfile's LAME encoder)", RATE, 1, SPEECH_S)
    add("speech_opus.ogg", opus, Status.OK, "OGG/Opus at 48 kHz", 48_000, 1, SPEECH_S)
    add("speech_vorbis.ogg", encoded(clip, RATE, "OGG", "VORBIS"), Status.OK, "OGG/Vorbis", RATE, 1, SPEECH_S)
    add("telephony_8k_mulaw.wav", encoded(resample_linear(clip, RATE, 8_000), 8_000, "WAV", "ULAW"), Status.OK,
        "8 kHz mu-law telephony WAV", 8_000, 1, SPEECH_S)
    add("studio_48k_24bit.wav", encoded(at_48k, 48_000, "WAV", "PCM_24"), Status.OK, "48 kHz 24-bit WAV",
        48_000, 1, SPEECH_S)
    add("float32.wav", encoded(clip, RATE, "WAV", "FLOAT"), Status.OK, "32-bit float WAV", RATE, 1, SPEECH_S)
    six = np.stack([clip, 0.5 * clip, np.zeros(n), 0.1 * np.sin(2 * np.pi * 220 * t), -clip, 0.25 * clip], axis=1)
    add("surround_6ch.wav", encoded(six.astype(np.float32), RATE, "WAV", "PCM_16"), Status.OK,
        "6-channel WAV, downmixed to mono", RATE, 6, SPEECH_S)
    add("silence.wav", encoded(np.zeros(n, np.float32), RATE, "WAV", "PCM_16"), Status.OK,
        "digital silence decodes; judging it is the engine's job", RATE, 1, SPEECH_S)
    add("Grüße aus Köln – 会議 01.wav", wav16, Status.OK, "a key with spaces and non-ASCII characters",
        RATE, 1, SPEECH_S)
    add("list_chunk_before_data.wav", with_chunk_before_data(wav16, b"LIST", b"INFOISFT\x05\0\0\0odd!\0"), Status.OK,
        "an odd-sized chunk (padded) before the data chunk", RATE, 1, SPEECH_S)
    add("speech_rf64.wav", rf64, Status.OK, "RF64 (64-bit WAV) with sizes in its ds64 chunk", RATE, 1, SPEECH_S)

    # Cut short: libsndfile decodes most of these silently.
    add("truncated.wav", wav16[: len(wav16) * 6 // 10], Status.DECODE_ERROR, "WAV cut to 60 % of its bytes")
    add("truncated_rf64.wav", rf64[: len(rf64) * 6 // 10], Status.DECODE_ERROR, "RF64 cut to 60 % of its bytes")
    add("truncated.flac", flac[: len(flac) // 2], Status.DECODE_ERROR, "FLAC cut in half")
    add("truncated.mp3", mp3[: len(mp3) // 2], Status.DECODE_ERROR, "MP3 cut in half")
    add("truncated_opus.ogg", opus[: len(opus) // 2], Status.DECODE_ERROR, "OGG/Opus cut in half")

    # Empty, not audio, not numbers, not there.
    add("zero_length.wav", b"", Status.EMPTY_AUDIO, "a zero-byte object")
    add("header_only.wav", encoded(np.zeros(0, np.float32), RATE, "WAV", "PCM_16"), Status.EMPTY_AUDIO,
        "a WAV header with no samples")
    add("not_audio.wav", b"id,text\n1,this is a CSV file, not audio\n" * 20, Status.DECODE_ERROR,
        "a text file named .wav")
    add("random_bytes.flac", np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
        Status.DECODE_ERROR, "random bytes named .flac")
    bad = clip.copy()
    bad[100], bad[200], bad[300] = np.nan, np.inf, -np.inf
    add("nan_inf_float32.wav", encoded(bad, RATE, "WAV", "FLOAT"), Status.INVALID_AUDIO,
        "a float WAV with NaN and Inf samples")
    add("missing.wav", None, Status.MISSING_OBJECT, "an object that does not exist")
    return tuple(cases)
