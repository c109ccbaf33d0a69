"""Biasing keywords: parsed from a manifest cell, cleaned and bounded once, where a row's keywords
are built (``manifest.PrepareStage``), so every engine (Whisper's hotwords, Granite's prompt)
receives the same plain, bounded list and only renders it.

A keyword is plain text: no special tokens (``<|...|>``), angle brackets, control or format
characters, newlines or commas (the list separator); whitespace collapsed; at most
``task.max_keyword_chars`` characters; at most ``task.max_keywords`` of them, duplicates (ignoring
case) dropped, in the order given (the job's, then the row's).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config import TaskConfig

_SPECIAL_TOKEN = re.compile(r"<\|.*?\|>")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class KeywordLimits:
    """Bounds on biasing keywords: how many are kept and how long each may be (characters).
    Defaults are the job config's (``task.max_keywords``, ``task.max_keyword_chars``)."""

    max_keywords: int = TaskConfig.model_fields["max_keywords"].default
    max_chars: int = TaskConfig.model_fields["max_keyword_chars"].default

    @classmethod
    def of(cls, task: TaskConfig) -> "KeywordLimits":
        return cls(max_keywords=task.max_keywords, max_chars=task.max_keyword_chars)


def parse_keywords(value: Any) -> list[str]:
    """A keywords cell: a list, or a comma-separated string (not yet cleaned: see :func:`row_keywords`)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(k).strip() for k in items if k is not None and str(k).strip()]


def sanitize_keyword(text: str, max_chars: int) -> str:
    """One keyword as plain text: no special tokens, angle brackets, control characters,
    newlines or commas (the list separator); whitespace collapsed; at most ``max_chars``."""
    text = str(text)[: max_chars * 16]  # a 10 MB "keyword" is cut before any work is done on it
    text = unicodedata.normalize("NFC", text)
    text = _SPECIAL_TOKEN.sub(" ", text)
    # Category C* is control/format/private-use; none of it belongs in a keyword.
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = text.replace("<", " ").replace(">", " ").replace(",", " ")
    text = _SPACES.sub(" ", text).strip()
    return text[:max_chars].rstrip()


def sanitize_keywords(keywords: Iterable[str], limits: KeywordLimits = KeywordLimits()) -> tuple[str, ...]:
    """Clean keywords, drop empty ones and case-insensitive duplicates, keep the first
    ``limits.max_keywords`` in their given order."""
    kept: list[str] = []
    seen: set[str] = set()
    for raw in keywords:
        if len(kept) >= limits.max_keywords:
            break
        word = sanitize_keyword(raw, limits.max_chars)
        if word and word.casefold() not in seen:
            seen.add(word.casefold())
            kept.append(word)
    return tuple(kept)


def row_keywords(job_keywords: Iterable[str], cell: Any, limits: KeywordLimits) -> list[str]:
    """A row's keywords as engines receive them: the job's, then the row's cell, cleaned and bounded."""
    return list(sanitize_keywords([*job_keywords, *parse_keywords(cell)], limits))
