"""``redact.audio``: a copy of a recording with the redacted words' time silenced (or beeped),
written to ``<output>/redacted_audio/<name>.flac`` for QA teams. Runs in a Ray task per recording
(plan.RedactedAudio): it re-reads the audio, as no audio reaches the driver."""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from ..assemble import subtitle_name
from ..records import SAMPLE_RATE_HZ

REDACTED_AUDIO_DIR = "redacted_audio"
PAD_S = 0.1  # word times are approximate: each span is widened by this much on both sides
BEEP_HZ = 1000.0


def redacted_audio_name(row_id: str) -> str:
    """The copy's file name: the recording's subtitle name (safe, unique per id), ``.flac``."""
    return f"{subtitle_name(row_id)}.flac"


def silence(samples: np.ndarray, spans: Sequence[tuple[float, float]], beep: bool = False) -> np.ndarray:
    """``samples`` (frames x channels, or mono) with each ``(start_s, end_s)`` span, padded by
    PAD_S, set to silence or to a -20 dBFS tone."""
    out = samples.copy()
    n = len(out)
    for start_s, end_s in spans:
        a = max(0, int((start_s - PAD_S) * SAMPLE_RATE_HZ))
        b = min(n, int(np.ceil((end_s + PAD_S) * SAMPLE_RATE_HZ)))
        if b <= a:
            continue
        if beep:
            tone = 0.1 * np.sin(2 * np.pi * BEEP_HZ * np.arange(a, b) / SAMPLE_RATE_HZ).astype(out.dtype)
            out[a:b] = tone[:, None] if out.ndim == 2 else tone
        else:
            out[a:b] = 0.0
    return out


def write_redacted_audio(audio_uri: str, row_id: str, spans: Sequence[tuple[float, float]], output_uri: str,
                         storage_options: dict[str, Any], split: bool = False, beep: bool = False) -> str:
    """Decode ``audio_uri`` as the pipeline did (16 kHz; channels kept when ``split``), silence
    ``spans`` and write the copy as FLAC; returns its URI."""
    import soundfile as sf

    from ..audio import load_audio
    from ..storage import join_uri, url_to_fs, write_atomic

    decoded = load_audio(audio_uri, storage_options, target_rate=SAMPLE_RATE_HZ, split_channels=split)
    clean = silence(decoded.samples, spans, beep)
    buffer = io.BytesIO()
    sf.write(buffer, clean, SAMPLE_RATE_HZ, format="FLAC", subtype="PCM_16")
    fs, root = url_to_fs(output_uri, storage_options)
    write_atomic(f"{root.rstrip('/')}/{REDACTED_AUDIO_DIR}/{redacted_audio_name(row_id)}", buffer.getvalue(), fs=fs)
    return join_uri(output_uri, REDACTED_AUDIO_DIR, redacted_audio_name(row_id))
