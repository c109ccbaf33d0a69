"""A deterministic engine for fast tests of the pipeline's own logic (never proof of a feature).

Its text is a fingerprint of the audio, so different audio gives different text and tests can
check that results land on the right rows. Test hooks: a request whose id starts with
``fail-engine`` raises (as a broken model call would); one whose id starts with ``slow-engine``
takes ``SLOW_S`` seconds (so a test can act while the engine is busy, e.g. kill its actor); one
with language ``xx`` is unsupported. With ``engine.model: "die-once:<path>"`` the engine dies (as
vLLM's engine-dead error) on its first ``die-engine*`` request if ``<path>`` does not exist yet,
creating it, and fails every later request: the first replica dies once, its replacement works. With ``engine.model:
"fail-while:<path>"``, ``fail-engine*`` requests fail only while ``<path>`` exists (a fault that
goes away).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..records import Status
from .base import EngineDead, EngineRequest, EngineResult, Word

SLOW_S = 0.25  # seconds a ``slow-engine*`` request takes


class FakeEngine:
    name = "fake"

    def __init__(self, model: str = "fingerprint"):
        self.model = model
        self._dead = False

    @staticmethod
    def fingerprint(samples: np.ndarray) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(samples, dtype=np.float32)).hexdigest()[:8]  # no copy
        return f"audio {digest} of {len(samples)} samples"

    @staticmethod
    def spread(text: str, duration_s: float) -> tuple[Word, ...]:
        """The text's words spread evenly over the clip (mechanics only: no real timing)."""
        words = text.split()
        step = duration_s / max(1, len(words))
        return tuple(Word(w, round(i * step, 3), round((i + 1) * step, 3), 1.0) for i, w in enumerate(words))

    def _failing(self) -> bool:
        if self.model.startswith("fail-while:"):
            return Path(self.model.removeprefix("fail-while:")).exists()
        return True

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        results = []
        for req in requests:
            if req.id.startswith("fail-engine") and self._failing():
                raise RuntimeError(f"fake engine failure for {req.id}")
            if self._dead:
                raise EngineDead("fake engine is dead")  # as a dead vLLM engine: every later call fails
            if req.id.startswith("die-engine") and self.model.startswith("die-once:"):
                marker = Path(self.model.removeprefix("die-once:"))
                if not marker.exists():
                    marker.touch()
                    self._dead = True
                    raise EngineDead(f"fake engine died on {req.id}")
            if req.id.startswith("slow-engine"):
                time.sleep(SLOW_S)
            if req.language == "xx":
                results.append(EngineResult(None, Status.UNSUPPORTED_TASK.value, "language 'xx' is not supported"))
                continue
            text = self.fingerprint(req.samples)
            if req.keywords:
                text += " keywords " + " ".join(req.keywords)
            results.append(EngineResult(text, language=req.language, avg_logprob=-0.1,
                                        words=self.spread(text, req.duration_s) if req.words else None))
        return results
