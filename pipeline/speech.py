"""Speech regions of a whole recording for the analyses that look at who speaks and in what
language (diarization, language ID), found on a copy of the audio without infrasonic drift.

Silero VAD gives near-zero speech probability to speech riding on strong sub-20 Hz drift (seen
in the eval set's two-speaker clip, where 99 % of one half's energy is below 20 Hz): a 4th-order
80 Hz high-pass first brings it back, and removes the rumble from the speaker embeddings too.
Segment planning (segment.py) keeps its own VAD pass: a region it misses costs nothing there,
since segments tile the recording anyway.
"""

from __future__ import annotations

import numpy as np

from .errors import CannotRun
from .records import SAMPLE_RATE_HZ
from .segment import speech_regions

HIGHPASS_HZ = 80.0
_BLOCK = 10 * SAMPLE_RATE_HZ  # filtered block by block, the filter state carried: bounded memory


class SpeechAnalysisUnavailable(CannotRun, RuntimeError):
    """scipy (the high-pass filter) is not installed."""


def highpassed(samples: np.ndarray) -> np.ndarray:
    """``samples`` (16 kHz mono) through an 80 Hz high-pass, as float32."""
    try:
        from scipy.signal import butter, sosfilt, sosfilt_zi
    except ImportError as e:
        raise SpeechAnalysisUnavailable("diarize and task.detect_language need scipy: install the callcenter "
                                        "extra (pip install '.[callcenter]')") from e

    sos = butter(4, HIGHPASS_HZ, "highpass", fs=SAMPLE_RATE_HZ, output="sos")
    out = np.empty(len(samples), np.float32)
    zi = sosfilt_zi(sos) * 0.0
    for a in range(0, len(samples), _BLOCK):
        out[a:a + _BLOCK], zi = sosfilt(sos, samples[a:a + _BLOCK], zi=zi)
    return out


def whole_recording_speech(samples: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The high-passed audio and its speech regions (sample ranges)."""
    clean = highpassed(samples)
    return clean, speech_regions(clean)
