"""Speaker diarization of mono recordings: who speaks when.

A backend turns a whole recording (16 kHz mono float32) and its speech regions (VAD) into
:class:`SpeakerRegion` s; :func:`load_diarizer` picks one by ``diarize.model`` and keeps it for
the life of the process (a Ray worker loads it on first use, never per batch). Backends live in
their own modules and import their libraries only when chosen:

* ``resemblyzer`` (:mod:`.resemblyzer_backend`): Resemblyzer's speaker encoder (weights inside
  its wheel: works offline) on sliding windows of speech, clustered with scikit-learn;
* anything else is a pyannote.audio pipeline (:mod:`.pyannote_backend`): a hub name or a local
  folder, where the hub or a copy is reachable.

What the rest of the pipeline does with the regions (per segment, words, turns, talk time) is in
:mod:`.turns`, which needs no model.
"""

from __future__ import annotations

import functools
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..config import DiarizeConfig
from ..errors import CannotRun
from .turns import SpeakerRegion

RESEMBLYZER = "resemblyzer"


class DiarizerUnavailable(CannotRun, RuntimeError):
    """The diarization backend or its model cannot be loaded here; the message says what is missing."""


@runtime_checkable
class Diarizer(Protocol):
    """A loaded diarization model."""

    name: str

    def diarize(self, samples: np.ndarray, speech: Sequence[tuple[int, int]]) -> list[SpeakerRegion]:
        """Speaker regions of ``samples`` (16 kHz mono), in seconds, labelled ``spk0``, ``spk1``, ...
        in order of first speech. ``speech``: the VAD's speech regions, as sample ranges."""
        ...


def _key(cfg: DiarizeConfig) -> str:
    return cfg.model_dump_json()


@functools.lru_cache(maxsize=2)
def _load(key: str) -> Diarizer:
    cfg = DiarizeConfig.model_validate_json(key)
    if cfg.model == RESEMBLYZER:
        from .resemblyzer_backend import ResemblyzerDiarizer

        return ResemblyzerDiarizer(cfg)
    from .pyannote_backend import PyannoteDiarizer

    return PyannoteDiarizer(cfg)


def load_diarizer(cfg: DiarizeConfig) -> Diarizer:
    """The configured diarizer, loaded once per process."""
    return _load(_key(cfg))


def preflight(cfg: DiarizeConfig) -> None:
    """Fail before any worker starts when the backend cannot be loaded here (loads it: small)."""
    if cfg.enabled:
        load_diarizer(cfg)


__all__ = ["Diarizer", "DiarizerUnavailable", "SpeakerRegion", "load_diarizer", "preflight"]
