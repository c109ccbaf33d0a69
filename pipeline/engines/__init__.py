"""Engines behind one interface; :func:`load_engine` picks one by ``engine.name``.

Each engine lives in its own module and is imported only when chosen, so the heavy libraries
(ctranslate2, vllm, torch) load only in the workers that use them. This package imports no config
(pydantic) at import time either: ``pipeline.engines.transformers`` and what it imports must load
where only torch, torchaudio, transformers and numpy are installed (the GPU benchmark).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .base import Engine, EngineDead, EngineRequest, EngineResult, EngineUnavailable, Word, is_engine_dead

if TYPE_CHECKING:
    from ..config import EngineConfig, TaskConfig


def _whisper(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .whisper import WhisperEngine

    return WhisperEngine(cfg.model, cfg.whisper)


def _vllm(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .vllm import VllmEngine

    return VllmEngine(cfg.model, cfg.vllm, device="cuda" if cfg.gpus_per_replica > 0 else "cpu")


def _transformers(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .transformers import TransformersEngine

    return TransformersEngine(cfg.model, cfg.transformers)


def _fake(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .fake import FakeEngine

    return FakeEngine(cfg.model)


ENGINES: dict[str, Callable[[EngineConfig, TaskConfig], Engine]] = {
    "whisper": _whisper, "vllm": _vllm, "transformers": _transformers, "fake": _fake,
}


def preflight(cfg: EngineConfig) -> None:
    """Fail fast, before any worker starts, when the model cannot be found here (a path that does
    not exist, a hub name with the hub forbidden). Loads nothing. Only meaningful where the
    workers share this machine's files (a local Ray)."""
    if cfg.name in ("vllm", "transformers"):
        from .common import resolve_model

        resolve_model(cfg.model, engine=cfg.name)
    elif cfg.name == "whisper":
        from .whisper import resolve_model as resolve_ct2

        resolve_ct2(cfg.model)


def load_engine(cfg: EngineConfig, task: TaskConfig | None = None) -> Engine:
    """Load the configured engine once (call in a worker's setup, never per batch)."""
    if task is None:
        from ..config import TaskConfig

        task = TaskConfig()
    return ENGINES[cfg.name](cfg, task)


__all__ = ["Engine", "EngineDead", "EngineRequest", "EngineResult", "EngineUnavailable", "is_engine_dead",
           "Word", "load_engine", "preflight"]
