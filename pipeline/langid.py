"""Language identification of a whole recording, on its first speech, in the decode stage.

Why the decode stage: only there is a recording whole, before it is cut into segments that travel
to the engine separately; every segment (and so the prompt of each, and the scoring normaliser)
must carry the same language. A separate actor stage would see segments, not recordings. The
model (faster-whisper, multilingual ``base`` by default: installed offline from PyPI) is loaded
once per decode actor and kept, with one CTranslate2 thread, as a decode actor may reserve a
fraction of a CPU.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from .errors import CannotRun
from .records import SAMPLE_RATE_HZ


class LanguageIdUnavailable(CannotRun, RuntimeError):
    """The language-ID model cannot be loaded here, or is English-only."""


@functools.lru_cache(maxsize=2)
def _model(name: str):
    from .engines.base import EngineUnavailable
    from .engines.whisper import resolve_model

    try:
        from faster_whisper import WhisperModel
    except ImportError as e:
        raise LanguageIdUnavailable("task.detect_language needs faster-whisper: install the whisper extra") from e
    try:
        model = WhisperModel(resolve_model(name), device="cpu", compute_type="int8", cpu_threads=1)
    except EngineUnavailable as e:
        raise LanguageIdUnavailable(f"task.language_id_model: {e}") from e
    except Exception as e:  # noqa: BLE001 - a hub or file failure: say which model
        raise LanguageIdUnavailable(f"cannot load the language-ID model {name!r}: {e}") from e
    if not model.model.is_multilingual:
        raise LanguageIdUnavailable(f"task.language_id_model {name!r} is English-only; use a multilingual "
                                    "model (base installs offline)")
    return model


def preflight(name: str) -> None:
    """Fail before any worker starts when the model cannot be loaded (loads it once here)."""
    _model(name)


def first_speech(samples: np.ndarray, speech: Sequence[tuple[int, int]], seconds: float) -> np.ndarray:
    """Up to ``seconds`` of audio from the first speech on (leading silence skipped; pauses
    between speech regions kept, as Whisper saw them in training); the start when there is none."""
    n = int(seconds * SAMPLE_RATE_HZ)
    start = speech[0][0] if speech else 0
    return samples[start:start + n]


def detect_language(samples: np.ndarray, speech: Sequence[tuple[int, int]], model: str = "base",
                    seconds: float = 30.0) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the language spoken first in ``samples`` (16 kHz mono)."""
    clip = np.ascontiguousarray(first_speech(samples, speech, seconds), dtype=np.float32)
    language, probability, _ = _model(model).detect_language(audio=clip)
    return language, float(probability)
