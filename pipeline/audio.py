"""Audio in: fetch bytes through fsspec, decode with soundfile, downmix, resample with soxr.

Every failure becomes an :class:`AudioError` carrying the row status it maps to, so the decode
stage records a reason instead of failing the job. Checks that soundfile does not make itself:
a WAV whose data chunk is shorter than its header declares (libsndfile decodes it silently),
zero samples, and NaN / Inf samples.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import soundfile as sf
import soxr

from .records import Status


class AudioError(Exception):
    """A recording that cannot be used; ``status`` is the row's failure reason."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, at the target rate
    sample_rate: int
    source_sample_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def fetch_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The object's bytes; storage failures map to missing_object / access_denied / fetch_error."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise AudioError(Status.MISSING_OBJECT, f"no such object: {uri}") from e
    except PermissionError as e:
        raise AudioError(Status.ACCESS_DENIED, f"access denied reading {uri}") from e
    except IsADirectoryError as e:
        raise AudioError(Status.MISSING_OBJECT, f"{uri} is a folder, not an audio object") from e
    except Exception as e:  # noqa: BLE001 - anything else the store raised, after its own retries
        raise AudioError(Status.FETCH_ERROR, f"cannot read {uri}: {type(e).__name__}: {e}") from e


def _wav_shortfall(data: bytes) -> tuple[int, int] | None:
    """(declared, present) data-chunk bytes when a RIFF/WAVE file is cut short, else None."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            present = len(data) - (pos + 8)
            if size != 0xFFFFFFFF and present < size:  # 0xFFFFFFFF: streamed / RF64 size
                return size, present
            return None
        pos += 8 + size + (size & 1)
    return None


def decode_audio(
    data: bytes,
    *,
    name: str = "",
    target_rate: int = 16_000,
    quality: str = "HQ",
    max_duration_s: float | None = None,
) -> DecodedAudio:
    """Decode any format libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3, ...) to mono float32."""
    label = name or "audio"
    if not data:
        raise AudioError(Status.EMPTY_AUDIO, f"{label}: zero-length object")
    shortfall = _wav_shortfall(data)
    if shortfall:
        raise AudioError(
            Status.DECODE_ERROR,
            f"{label}: truncated WAV: header declares {shortfall[0]} bytes of audio, {shortfall[1]} present",
        )
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            if max_duration_s is not None and frames > 0 and frames / rate > max_duration_s:
                raise AudioError(Status.TOO_LONG, f"{label}: {frames / rate:.1f} s is longer than {max_duration_s:g} s")
            samples = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:  # noqa: BLE001 - libsndfile's errors are all "not decodable"
        raise AudioError(Status.DECODE_ERROR, f"{label}: cannot decode: {e}") from e
    if samples.shape[0] == 0:
        raise AudioError(Status.EMPTY_AUDIO, f"{label}: decodes to zero samples")
    if not np.isfinite(samples).all():
        raise AudioError(Status.INVALID_AUDIO, f"{label}: samples contain NaN or Inf")
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    if rate != target_rate:
        mono = soxr.resample(mono, rate, target_rate, quality=quality).astype(np.float32, copy=False)
    return DecodedAudio(np.ascontiguousarray(mono), target_rate, rate, channels)


def load_audio(uri: str, storage_options: dict[str, Any] | None = None, **decode_kwargs: Any) -> DecodedAudio:
    """Fetch and decode one recording."""
    return decode_audio(fetch_bytes(uri, storage_options), name=uri, **decode_kwargs)
