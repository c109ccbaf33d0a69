"""The engine interface: the only place in the pipeline that knows a model exists.

An engine is loaded once per worker (a Ray actor) and then turns batches of decoded audio into
text. Stages never import a model library; they call :func:`pipeline.engines.load_engine` and
talk to the returned object through :class:`Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import CannotRun
from ..constants import SAMPLE_RATE_HZ


class EngineUnavailable(CannotRun, RuntimeError):
    """The engine or its model cannot be loaded here; the message says what is missing."""


class EngineDead(RuntimeError):
    """The engine itself has failed (not one request): its replica must be replaced."""


# Failures after which a replica cannot be trusted with another request: vLLM's engine-dead error,
# CUDA faults and GPU memory exhaustion (torch raises them as RuntimeError subclasses).
_DEAD_TYPES = frozenset({"EngineDead", "EngineDeadError", "OutOfMemoryError", "AcceleratorError"})
_DEAD_MESSAGES = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "CUDA out of memory")


def is_engine_dead(error: BaseException) -> bool:
    """True when ``error`` (or one it was raised from) says the engine died rather than a request failed."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ in _DEAD_TYPES or any(m in str(seen) for m in _DEAD_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class EngineRequest:
    """One unit of work for an engine: a clip of audio and what to do with it."""

    id: str
    samples: np.ndarray  # float32, mono, SAMPLE_RATE_HZ
    language: str | None = None  # spoken language (ISO 639-1), None = engine decides / default
    task: str = "transcribe"  # "transcribe" | "translate"
    target_language: str | None = None  # for task == "translate"
    keywords: tuple[str, ...] = ()  # biasing hints, already cleaned and bounded (pipeline/keywords.py)
    segment: bool = False  # a piece of a longer recording (cut at pauses), not a whole clip
    words: bool = False  # also return word timestamps (EngineResult.words)

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE_HZ


@dataclass(frozen=True)
class Word:
    """One word of a transcript and where it was spoken, in seconds from the start of the request's
    audio (the inference stage shifts them to recording time)."""

    word: str
    start_s: float
    end_s: float
    probability: float | None = None


@dataclass(frozen=True)
class EngineResult:
    """The engine's answer for one request. ``status`` is ``ok`` or a failure reason."""

    text: str | None
    status: str = "ok"
    error: str | None = None
    language: str | None = None  # language the engine used or detected
    avg_logprob: float | None = None  # mean token log-probability, a confidence proxy
    prompt: str | None = None  # the rendered prompt, for engines that take one
    words: tuple[Word, ...] | None = None  # when the request asked for words: the text's words, timed
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """A loaded model. ``transcribe`` returns exactly one result per request, in order.

    Engines report per-request problems (unsupported language, clip too long) as results with a
    status; they raise only for failures of the engine itself (it died, ran out of memory), which
    the caller treats as fatal for the batch.

    An engine whose model can serve several calls at once (vLLM's continuous batching) also has
    ``async def transcribe_async(requests)``, with the same contract, awaited: the inference stage
    then gives it every batch as it arrives instead of one batch at a time.
    """

    name: str
    model: str

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]: ...
