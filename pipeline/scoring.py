"""Scoring: named normalisers, per-row error counts, corpus totals from summed counts.

Text is stored raw; normalisation happens only here. The normalisers are the ones the Open ASR
leaderboard uses (Whisper's English normaliser for English, its basic multilingual one otherwise);
languages without word boundaries are scored by character error rate. A corpus rate is always
(S + D + I) / N over summed counts, never an average of row rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import jiwer
import pyarrow as pa
from pydantic import BaseModel, computed_field

from .config import ScoringConfig
from .records import OK

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


def metric_for(language: str | None, cfg: ScoringConfig) -> str:
    """``cer`` for languages written without word boundaries (``scoring.cer_languages``), else ``wer``."""
    return "cer" if _base_language(language) in cfg.cer_languages else "wer"


def _measure(reference: str, hypothesis: str | None, metric: str, normalizer: str):
    """The one text-preparation path: normalise both texts, then let jiwer align them (words, or
    characters without spaces for CER). Returns (jiwer's output or None for an empty reference,
    reference units, hypothesis units). Row scores, corpus totals and the report's alignment all
    come from here, so the coloured tokens of a report add up to the stored counts."""
    normalize = get_normalizer(normalizer)
    ref = " ".join(normalize(reference).split())
    hyp = " ".join(normalize(hypothesis or "").split())
    if metric == "cer":
        ref, hyp = ref.replace(" ", ""), hyp.replace(" ", "")
        return (jiwer.process_characters(ref, hyp) if ref else None), len(ref), len(hyp)
    return (jiwer.process_words(ref, hyp) if ref else None), len(ref.split()), len(hyp.split())


def score(reference: str, hypothesis: str | None, language: str | None, cfg: ScoringConfig) -> ErrorCounts:
    """Count errors of ``hypothesis`` against ``reference`` after normalising both."""
    metric, norm_name = metric_for(language, cfg), normalizer_name(language, cfg)
    out, ref_units, hyp_units = _measure(reference, hypothesis, metric, norm_name)
    if out is None:  # empty reference: every hypothesis unit is an insertion
        return ErrorCounts(metric, norm_name, 0, 0, 0, hyp_units)
    return ErrorCounts(metric, norm_name, ref_units, out.substitutions, out.deletions, out.insertions)


def score_row(row: dict[str, Any], cfg: ScoringConfig) -> None:
    """Fill the SCORE columns of a finished recording row in place. Rows that failed, have no
    reference, or are translations keep them null. Each row is scored once: a single-segment
    recording in the workers (stages.ScoreStage), a stitched one when the driver assembles it."""
    if row["status"] != OK or not row["reference"] or row["task"] != "transcribe":
        return
    counts = score(row["reference"], row["text"], row["language"], cfg)
    row.update(metric=counts.metric, normalizer=counts.normalizer, ref_words=counts.ref_units,
               substitutions=counts.substitutions, deletions=counts.deletions, insertions=counts.insertions,
               wer=counts.rate)


def align(reference: str, hypothesis: str | None, metric: str, normalizer: str) -> list[tuple[str, str | None, str | None]]:
    """``(op, ref_token, hyp_token)`` triples, op in ``equal|substitute|delete|insert``, as jiwer
    aligned the row when it was scored (same normaliser, same units)."""
    out, _, _ = _measure(reference, hypothesis, metric, normalizer)
    if out is None:
        return [("insert", None, h) for h in " ".join(get_normalizer(normalizer)(hypothesis or "").split()).split()]
    ref_tokens, hyp_tokens = out.references[0], out.hypotheses[0]
    triples: list[tuple[str, str | None, str | None]] = []
    for chunk in out.alignments[0]:
        refs = ref_tokens[chunk.ref_start_idx:chunk.ref_end_idx]
        hyps = hyp_tokens[chunk.hyp_start_idx:chunk.hyp_end_idx]
        if chunk.type == "delete":
            triples += [("delete", r, None) for r in refs]
        elif chunk.type == "insert":
            triples += [("insert", None, h) for h in hyps]
        else:  # equal / substitute: same length on both sides
            triples += [(chunk.type, r, h) for r, h in zip(refs, hyps, strict=True)]
    return triples


class CorpusTally(BaseModel):
    """Summed counts for one (language, metric) group; its rate is (S + D + I) / N over the sums.
    The same model is a summary.json score entry (``rate`` included when dumped)."""

    metric: str
    normalizer: str
    n_scored: int = 0
    ref_units: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    def add(self, ref_units: int, substitutions: int, deletions: int, insertions: int, n_scored: int = 1) -> None:
        """Add the counts of ``n_scored`` scored rows."""
        self.n_scored += n_scored
        self.ref_units += ref_units
        self.substitutions += substitutions
        self.deletions += deletions
        self.insertions += insertions

    def merge(self, other: "CorpusTally") -> None:
        self.add(other.ref_units, other.substitutions, other.deletions, other.insertions, other.n_scored)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rate(self) -> float | None:
        return self.errors / self.ref_units if self.ref_units else None


COUNT_COLUMNS = ("ref_words", "substitutions", "deletions", "insertions")  # what a corpus tally sums


def add_scores(tallies: dict[tuple[str, str], CorpusTally], keys, scored: pa.Table,
                limit: int | None = None) -> int:
    """Sum the error counts of ``scored`` rows (SCORE columns) into ``tallies`` per (key, metric),
    ``keys`` giving each row's key (its language, or a grouping column's value), with one vectorised
    group-by per batch.

    Past ``limit`` distinct keys, new keys are tallied under ``(other)``; returns how many scored
    rows went there in this batch.
    """
    if scored.num_rows == 0:
        return 0
    keyed = pa.table({"key": keys, "metric": scored["metric"], "normalizer": scored["normalizer"],
                      **{c: scored[c] for c in COUNT_COLUMNS}})
    grouped = keyed.group_by(["key", "metric", "normalizer"], use_threads=False).aggregate(
        [(c, "sum") for c in COUNT_COLUMNS] + [("metric", "count")])
    overflow = 0
    for row in grouped.to_pylist():
        key = (row["key"], row["metric"])
        if limit is not None and key not in tallies and len(tallies) >= limit:  # (value, metric) pairs
            key = ("(other)", row["metric"])
            overflow += row["metric_count"]
        tally = tallies.setdefault(key, CorpusTally(metric=row["metric"], normalizer=row["normalizer"]))
        if row["normalizer"] not in tally.normalizer.split("+"):
            tally.normalizer += "+" + row["normalizer"]
        tally.add(row["ref_words_sum"] or 0, row["substitutions_sum"] or 0, row["deletions_sum"] or 0,
                  row["insertions_sum"] or 0, n_scored=row["metric_count"])
    return overflow
