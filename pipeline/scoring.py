"""Scoring: named normalisers, per-row error counts, corpus totals from summed counts.

Text is stored raw; normalisation happens only here. The normalisers are the ones the Open ASR
leaderboard uses (Whisper's English normaliser for English, its basic multilingual one otherwise);
languages without word boundaries are scored by character error rate. A corpus rate is always
(S + D + I) / N over summed counts, never an average of row rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import jiwer

from .config import ScoringConfig

Normalizer = Callable[[str], str]


@lru_cache(maxsize=None)
def get_normalizer(name: str) -> Normalizer:
    """A normaliser by name: ``whisper_english``, ``whisper_basic`` or ``none``."""
    if name == "whisper_english":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "whisper_basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    if name == "none":
        return lambda text: text
    raise ValueError(f"unknown normalizer {name!r}")


def _base_language(language: str | None) -> str:
    return (language or "").split("-")[0].split("_")[0].lower()


def normalizer_name(language: str | None, cfg: ScoringConfig) -> str:
    if cfg.normalizer != "auto":
        return cfg.normalizer
    return "whisper_english" if _base_language(language) == "en" else "whisper_basic"


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts of one hypothesis against one reference, in ``metric`` units."""

    metric: str  # "wer" or "cer"
    normalizer: str
    ref_units: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def rate(self) -> float | None:
        if self.ref_units == 0:
            return None
        return (self.substitutions + self.deletions + self.insertions) / self.ref_units


def score(reference: str, hypothesis: str | None, language: str | None, cfg: ScoringConfig) -> ErrorCounts:
    """Count errors of ``hypothesis`` against ``reference`` after normalising both."""
    norm_name = normalizer_name(language, cfg)
    normalize = get_normalizer(norm_name)
    ref = " ".join(normalize(reference).split())
    hyp = " ".join(normalize(hypothesis or "").split())
    if _base_language(language) in cfg.cer_languages:
        ref, hyp = ref.replace(" ", ""), hyp.replace(" ", "")
        metric, ref_units = "cer", len(ref)
        out = jiwer.process_characters(ref, hyp) if ref else None
        hyp_units = len(hyp)
    else:
        metric, ref_units = "wer", len(ref.split())
        out = jiwer.process_words(ref, hyp) if ref else None
        hyp_units = len(hyp.split())
    if out is None:  # empty reference: every hypothesis unit is an insertion
        return ErrorCounts(metric, norm_name, 0, 0, 0, hyp_units)
    return ErrorCounts(metric, norm_name, ref_units, out.substitutions, out.deletions, out.insertions)


@dataclass
class CorpusTally:
    """Summed counts for one (language, metric) group."""

    metric: str
    normalizer: str
    n_scored: int = 0
    ref_units: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    def add(self, ref_units: int, substitutions: int, deletions: int, insertions: int) -> None:
        self.n_scored += 1
        self.ref_units += ref_units
        self.substitutions += substitutions
        self.deletions += deletions
        self.insertions += insertions

    @property
    def rate(self) -> float | None:
        if self.ref_units == 0:
            return None
        return (self.substitutions + self.deletions + self.insertions) / self.ref_units

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "rate": self.rate,
            "normalizer": self.normalizer,
            "n_scored": self.n_scored,
            "ref_units": self.ref_units,
            "substitutions": self.substitutions,
            "deletions": self.deletions,
            "insertions": self.insertions,
        }
