"""PII redaction of transcripts: Presidio's recognizers over text where spoken numbers and e-mail
addresses were first rewritten (:mod:`.spoken`), results mapped back to the original text.

:class:`Redactor` is built once per process (:func:`load_redactor`): Presidio's analyzer with a
blank spaCy pipeline (tokens only: the pattern recognizers need nothing more, and nothing is
downloaded) or, for ``PERSON``, a spaCy NER pipeline installed as a package. Its anonymizer
replaces each entity by ``[TYPE]``. :func:`redact_row` fills a row's ``records.REDACTED`` columns
and, with ``drop_text``, replaces every raw text of the row by its redacted form. It runs in the
workers for recordings whole in one row (``stages.RedactStage``) and on the driver for stitched
ones (assemble.py): 0.6-7 ms per transcript on this machine (benchmarks/bench_features.py,
tests/test_redact.py), most of it in the phone-number matcher.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..config import RedactConfig
from ..errors import CannotRun
from .spoken import normalise

log = logging.getLogger("quarry")


class RedactorUnavailable(CannotRun, RuntimeError):
    """Presidio (or the spaCy pipeline asked for) is not installed."""


@dataclass(frozen=True)
class Found:
    """One entity in the original text: ``text[start:end]``."""

    entity: str
    start: int
    end: int
    score: float


def _email_recognizer():
    """Presidio's e-mail recognizer, validating domains against the public-suffix list shipped
    inside tldextract instead of fetching the newest one from the network (its default)."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


# Numbers read out on a call that ASR got slightly wrong (a digit dropped or doubled) fail the
# recognizers' own checks (Luhn, SSN layout, phone plans) but are still the caller's card, SSN or
# phone number: a run of digits right after the words that announce one is redacted as that.
SPOKEN_CONTEXT = {  # entity: (announcing words, fewest and most digits, score: the more specific, the higher)
    "CREDIT_CARD": (r"\b(card|credit|debit|visa|mastercard|amex)\b", 12, 19, 0.6),
    "US_SSN": (r"\b(social security|ssn)\b", 7, 10, 0.6),
    "PHONE_NUMBER": (r"\b(call|phone|reach|cell|mobile|dial)\b", 7, 11, 0.45),
}
_CONTEXT_CHARS = 48  # how far before the digits the announcing words may be
_DIGIT_RUN = re.compile(r"\d(?:[\d -]*\d)?")


def _context_recognizer(entity: str):
    """A recognizer for ``entity``: a digit run of the entity's length (spaces and dashes allowed)
    within _CONTEXT_CHARS after one of its announcing words."""
    from presidio_analyzer import LocalRecognizer, RecognizerResult

    words, shortest, longest, score = SPOKEN_CONTEXT[entity]
    context = re.compile(words, re.IGNORECASE)

    class ContextNumberRecognizer(LocalRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            out = []
            for m in _DIGIT_RUN.finditer(text):
                n = sum(c.isdigit() for c in m.group())
                if shortest <= n <= longest and context.search(text[max(0, m.start() - _CONTEXT_CHARS):m.start()]):
                    out.append(RecognizerResult(entity, m.start(), m.end(), score))
            return out

    return ContextNumberRecognizer(supported_entities=[entity], name=f"Spoken{entity.title()}Recognizer")


class Redactor:
    """Finds and replaces the configured entity types in text."""

    def __init__(self, cfg: RedactConfig):
        try:
            import spacy
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, IbanRecognizer,
                                                                  PhoneRecognizer, SpacyRecognizer, UsSsnRecognizer)
            from presidio_anonymizer import AnonymizerEngine
            from presidio_anonymizer.entities import OperatorConfig
        except ImportError as e:
            raise RedactorUnavailable("redaction needs presidio-analyzer and presidio-anonymizer: install the "
                                      f"callcenter extra (pip install '.[callcenter]'): {e}") from e
        self.cfg = cfg
        entities = list(cfg.entities)
        model = cfg.spacy_model
        if model and not spacy.util.is_package(model):
            raise RedactorUnavailable(f"redact.spacy_model {model!r} is not installed as a package (it is never "
                                      "downloaded here): pip install it, or set redact.spacy_model: null")
        if "PERSON" in entities and not model:
            log.warning("redact: PERSON needs a spaCy NER model (redact.spacy_model); with the blank pipeline "
                        "names are not redacted")
            entities.remove("PERSON")

        class _Pipeline(SpacyNlpEngine):
            def load(self) -> None:  # never spacy.cli.download: the model or a blank pipeline
                self.nlp = {"en": spacy.load(model) if model else spacy.blank("en")}

        nlp = _Pipeline(models=[{"lang_code": "en", "model_name": model or "blank"}])
        nlp.load()
        recognizers = {"CREDIT_CARD": CreditCardRecognizer, "PHONE_NUMBER": PhoneRecognizer,
                       "EMAIL_ADDRESS": _email_recognizer, "US_SSN": UsSsnRecognizer, "IBAN_CODE": IbanRecognizer}
        registry = RecognizerRegistry([recognizers[e]() for e in entities if e in recognizers])
        for entity in SPOKEN_CONTEXT:
            if entity in entities:
                registry.add_recognizer(_context_recognizer(entity))
        if "PERSON" in entities:
            registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON"]))
        self.entities = entities
        self._analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"])
        self._anonymizer = AnonymizerEngine()
        self._operators = {e: OperatorConfig("replace", {"new_value": f"[{e}]"}) for e in cfg.entities}

    def find(self, text: str) -> list[Found]:
        """Entities in ``text`` (original positions), overlaps resolved by score then length."""
        if not text or not self.entities:
            return []
        norm = normalise(text)
        results = self._analyzer.analyze(norm.text, language="en", entities=self.entities,
                                         score_threshold=self.cfg.score_threshold)
        found = []
        for r in sorted(results, key=lambda r: (-r.score, -(r.end - r.start))):
            a, b = norm.original_span(r.start, r.end)
            if all(b <= f.start or a >= f.end for f in found):
                found.append(Found(r.entity_type, a, b, float(r.score)))
        return sorted(found, key=lambda f: f.start)

    def replace(self, text: str, found: list[Found]) -> str:
        """``text`` with each found entity replaced by ``[TYPE]`` (Presidio's anonymizer)."""
        if not found:
            return text
        from presidio_anonymizer.entities import RecognizerResult

        results = [RecognizerResult(f.entity, f.start, f.end, f.score) for f in found]
        return self._anonymizer.anonymize(text, results, operators=self._operators).text

    def redact(self, text: str | None) -> str | None:
        return None if text is None else self.replace(text, self.find(text))

    def redact_words(self, words: list[dict]) -> tuple[list[dict], list[dict]]:
        """Words with each entity's words merged into one ``[TYPE]`` word (its time: theirs), and
        the entities found with their times. The words are analysed as one text, so an entity read
        across segments is found."""
        starts, pieces, at = [], [], 0
        for w in words:
            starts.append(at)
            pieces.append(w["word"])
            at += len(w["word"]) + 1
        found = self.find(" ".join(pieces))
        out, spans, k = [], [], 0
        for f in found:
            hit = [i for i, s in enumerate(starts) if s < f.end and s + len(pieces[i]) > f.start]
            if not hit:
                continue
            out.extend(words[k:hit[0]])
            first, last = words[hit[0]], words[hit[-1]]
            out.append({**first, "word": f"[{f.entity}]", "end_s": last["end_s"], "probability": None})
            spans.append({"entity": f.entity, "score": f.score, "start_s": first["start_s"], "end_s": last["end_s"]})
            k = hit[-1] + 1
        out.extend(words[k:])
        return out, spans


def _key(cfg: RedactConfig) -> str:
    return cfg.model_dump_json()


@functools.lru_cache(maxsize=2)
def _load(key: str) -> Redactor:
    return Redactor(RedactConfig.model_validate_json(key))


def load_redactor(cfg: RedactConfig) -> Redactor:
    """The redactor for ``cfg``, built once per process."""
    return _load(_key(cfg))


def redact_row(row: dict[str, Any], redactor: Redactor, cfg: RedactConfig) -> None:
    """Fill ``text_redacted`` and ``redactions`` of a recording row (in place); with
    ``cfg.drop_text``, raw text leaves the row: ``text`` becomes null and the texts per channel,
    speaker and turn, and the words, become their redacted forms."""
    if row.get("status") != "ok" or row.get("text") is None:
        return
    found = redactor.find(row["text"])
    row["text_redacted"] = redactor.replace(row["text"], found)
    if row.get("words"):
        words, row["redactions"] = redactor.redact_words(row["words"])
    else:
        words, row["redactions"] = None, [{"entity": f.entity, "score": f.score, "start_s": None, "end_s": None}
                                          for f in found]
    if not cfg.drop_text:
        return
    row["text"] = None
    if words is not None:
        row["words"] = words
    for name in ("channel_texts", "conversation", "speakers", "speaker_turns"):
        if row.get(name):
            row[name] = [{**item, "text": redactor.redact(item["text"])} for item in row[name]]


__all__ = ["Found", "Redactor", "RedactorUnavailable", "load_redactor", "redact_row"]
