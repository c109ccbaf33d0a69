"""Engines behind one interface; :func:`load_engine` picks one by ``engine.name``.

Each engine lives in its own module and is imported only when chosen, so the heavy libraries
(ctranslate2, vllm, torch) load only in the workers that use them.
"""

from __future__ import annotations

from typing import Callable

from ..config import EngineConfig, TaskConfig
from .base import Engine, EngineDead, EngineRequest, EngineResult, EngineUnavailable, Word, is_engine_dead


def _whisper(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .whisper import WhisperEngine

    return WhisperEngine(cfg.model, cfg.whisper, cpus=cfg.cpus_per_replica)


def _vllm(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .prompts import KeywordLimits
    from .vllm import VllmEngine

    limits = KeywordLimits(max_keywords=task.max_keywords, max_chars=task.max_keyword_chars)
    return VllmEngine(cfg.model, cfg.vllm, device="cuda" if cfg.gpus_per_replica > 0 else "cpu",
                      keyword_limits=limits)


def _fake(cfg: EngineConfig, task: TaskConfig) -> Engine:
    from .fake import FakeEngine

    return FakeEngine(cfg.model)


ENGINES: dict[str, Callable[[EngineConfig, TaskConfig], Engine]] = {
    "whisper": _whisper, "vllm": _vllm, "fake": _fake,
}


def preflight(cfg: EngineConfig) -> None:
    """Fail fast, before any worker starts, when the model cannot be found here (a path that does
    not exist, a hub name with the hub forbidden). Loads nothing. Only meaningful where the
    workers share this machine's files (a local Ray)."""
    if cfg.name == "vllm":
        from .vllm import resolve_model

        resolve_model(cfg.model)
    elif cfg.name == "whisper":
        from .whisper import resolve_model as resolve_ct2

        resolve_ct2(cfg.model)


def load_engine(cfg: EngineConfig, task: TaskConfig | None = None) -> Engine:
    """Load the configured engine once (call in a worker's setup, never per batch)."""
    return ENGINES[cfg.name](cfg, task or TaskConfig())


__all__ = ["Engine", "EngineDead", "EngineRequest", "EngineResult", "EngineUnavailable", "is_engine_dead",
           "Word", "load_engine", "preflight"]
