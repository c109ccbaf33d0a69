"""Diarization with a pyannote.audio pipeline (e.g. ``pyannote/speaker-diarization-3.1``), where
the Hugging Face hub (with a token accepted for the model: ``HF_TOKEN``) or a local copy of the
pipeline is reachable. Not installed by the project's extras: ``pip install pyannote.audio``.
On machines without the hub, use the offline ``resemblyzer`` backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import DiarizeConfig
from ..records import SAMPLE_RATE_HZ
from .turns import SpeakerRegion


class PyannoteDiarizer:
    name = "pyannote"

    def __init__(self, cfg: DiarizeConfig):
        from . import DiarizerUnavailable

        self.cfg = cfg
        local = Path(cfg.model).expanduser()
        if not local.exists() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise DiarizerUnavailable(
                f"diarize.model {cfg.model!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub; "
                "give a local pyannote pipeline folder, or diarize.model: resemblyzer (offline)")
        try:
            import torch
            from pyannote.audio import Pipeline
        except ImportError as e:
            raise DiarizerUnavailable(f"diarize.model {cfg.model!r} needs pyannote.audio: pip install pyannote.audio "
                                      f"(or use diarize.model: resemblyzer, offline): {e}") from e
        self._torch = torch
        try:
            source = str(local / "config.yaml") if local.is_dir() else str(local) if local.exists() else cfg.model
            self._pipeline = Pipeline.from_pretrained(source, token=os.environ.get("HF_TOKEN"))
        except Exception as e:  # noqa: BLE001 - hub, auth or file failure: say which model
            raise DiarizerUnavailable(f"cannot load the pyannote pipeline {cfg.model!r}: {e}") from e
        if self._pipeline is None:  # pyannote returns None for a gated model without a token
            raise DiarizerUnavailable(f"pyannote pipeline {cfg.model!r} did not load (gated: set HF_TOKEN)")

    def diarize(self, samples: np.ndarray, speech: Sequence[tuple[int, int]]) -> list[SpeakerRegion]:
        waveform = self._torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
        out = self._pipeline({"waveform": waveform, "sample_rate": SAMPLE_RATE_HZ},
                             min_speakers=self.cfg.min_speakers, max_speakers=self.cfg.max_speakers)
        annotation = getattr(out, "speaker_diarization", out)  # pyannote.audio 4 wraps the annotation
        names: dict[str, str] = {}
        regions = []
        for segment, _, label in sorted(annotation.itertracks(yield_label=True), key=lambda t: t[0].start):
            name = names.setdefault(label, f"spk{len(names)}")
            regions.append(SpeakerRegion(name, round(float(segment.start), 3), round(float(segment.end), 3)))
        return regions
