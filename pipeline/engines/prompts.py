"""The one place prompts are built, one builder per model family, each tested.

Granite Speech: the user turn is an instruction with the ``<|audio|>`` placeholder, rendered
through the model's own chat template (``add_generation_prompt=True``), as the model card does.
The transcription wording is the card's; translation follows vLLM's transcription endpoint
(``translate the speech to {language name}``); keyword biasing appends ``Keywords: a, b``.
Keywords arrive already cleaned and bounded (``pipeline/keywords.py``, applied where a row's
keywords are built): builders only render them. The
card does not confirm the 4.0 wording for translation and keywords, so it lives only here.

Whisper: a decoder prompt of special tokens (``<|startoftranscript|><|en|><|transcribe|>...``);
Whisper translates into English only.

Every builder also says, before any model call, whether it can serve a request at all
(:meth:`unsupported` returns a reason or ``None``), so an engine reports ``unsupported_task``
for that row instead of failing the batch.
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

from .base import EngineRequest

LANGUAGE_NAMES: dict[str, str] = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "ja": "Japanese",
    "it": "Italian",
    "zh": "Chinese",  # the card says "Mandarin"; the exact prompt word is unconfirmed
}

# granite-4.0-1b-speech (model card): ASR in six languages; X->en for those; en->X for those
# plus Italian and Mandarin.
GRANITE_ASR_LANGUAGES = frozenset({"en", "fr", "de", "es", "pt", "ja"})
GRANITE_FROM_ENGLISH = frozenset({"fr", "de", "es", "pt", "ja", "it", "zh"})

GRANITE_TRANSCRIBE = "<|audio|>can you transcribe the speech into a written format?"
GRANITE_TRANSLATE = "<|audio|>translate the speech to {language}"

TASKS = ("transcribe", "translate")


def normalize_language(code: str | None) -> str | None:
    """``"en-US"`` / ``"EN"`` -> ``"en"``; empty or ``None`` -> ``None``."""
    if not code:
        return None
    base = re.split(r"[-_]", code.strip().lower(), maxsplit=1)[0]
    return base or None


class PromptBuilder(Protocol):
    """What an engine needs from a family's builder."""

    family: str

    def unsupported(self, req: EngineRequest) -> str | None:
        """Why this model cannot serve ``req``, or ``None`` when it can."""

    def build(self, req: EngineRequest) -> str:
        """The prompt text for ``req`` (call only when :meth:`unsupported` returned ``None``)."""


def _unknown_task(req: EngineRequest) -> str | None:
    return None if req.task in TASKS else f"unknown task {req.task!r} (expected one of {', '.join(TASKS)})"


def granite_unsupported(language: str | None, task: str, target_language: str | None) -> str | None:
    """Why Granite Speech cannot do this language/task pair, or ``None`` when it can.

    An unknown source language (``None``) is allowed: the model transcribes what it hears, and
    translation into a non-English target is attempted as if the source were English.
    """
    src, tgt = normalize_language(language), normalize_language(target_language)
    if task not in TASKS:
        return f"unknown task {task!r} (expected one of {', '.join(TASKS)})"
    if src is not None and src not in GRANITE_ASR_LANGUAGES:
        return f"granite speech does not understand spoken {src!r} (supported: {', '.join(sorted(GRANITE_ASR_LANGUAGES))})"
    if task == "transcribe":
        return None
    tgt = tgt or "en"
    if tgt == src:
        return f"translation from {src!r} into the same language; use task 'transcribe'"
    if tgt == "en":
        return None
    if tgt not in GRANITE_FROM_ENGLISH:
        return f"granite speech does not translate into {tgt!r}"
    if src not in (None, "en"):
        return f"granite speech translates {src!r} into English only, not into {tgt!r}"
    return None


class GranitePrompts:
    """Granite Speech prompts, rendered through the checkpoint's own chat template."""

    family = "granite"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def unsupported(self, req: EngineRequest) -> str | None:
        return granite_unsupported(req.language, req.task, req.target_language)

    def instruction(self, req: EngineRequest) -> str:
        """The user turn: task instruction, then the (already sanitised) keyword list if any."""
        if req.task == "translate":
            target = normalize_language(req.target_language) or "en"
            text = GRANITE_TRANSLATE.format(language=LANGUAGE_NAMES[target])
        else:
            text = GRANITE_TRANSCRIBE
        if req.keywords:
            text += " Keywords: " + ", ".join(req.keywords)
        return text

    def build(self, req: EngineRequest) -> str:
        messages = [{"role": "user", "content": self.instruction(req)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class WhisperPrompts:
    """Whisper decoder prompts. Keywords go in the previous-text slot (``<|startofprev|>``),
    Whisper's own way of conditioning on vocabulary."""

    family = "whisper"

    def __init__(self, languages: Sequence[str], multilingual: bool = True):
        self.languages = frozenset(languages)
        self.multilingual = multilingual

    def unsupported(self, req: EngineRequest) -> str | None:
        reason = _unknown_task(req)
        if reason:
            return reason
        src = normalize_language(req.language)
        if not self.multilingual and src not in (None, "en"):
            return f"this whisper model is English-only; row language is {src!r}"
        if src is not None and src not in self.languages:
            return f"whisper does not know language {src!r}"
        if req.task == "translate":
            if not self.multilingual:
                return "this whisper model is English-only and cannot translate"
            if (normalize_language(req.target_language) or "en") != "en":
                return f"whisper translates into English only, not {req.target_language!r}"
        return None

    def build(self, req: EngineRequest) -> str:
        # Whisper needs a language token; with none given, English (vLLM's endpoint does the same).
        lang = normalize_language(req.language) or "en"
        if self.multilingual:
            prompt = f"<|startoftranscript|><|{lang}|><|{req.task}|><|notimestamps|>"
        else:  # English-only checkpoints (*.en) have no language or task tokens
            prompt = "<|startoftranscript|><|notimestamps|>"
        if req.keywords:
            prompt = "<|startofprev|> " + ", ".join(req.keywords) + prompt
        return prompt
