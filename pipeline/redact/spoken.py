"""Spoken numbers and addresses in a transcript, rewritten the way the recognizers expect them,
with every character of the rewrite mapped back to the original text.

ASR writes what was said: "four one one one one one one one ...", "forty one eleven", "double
five", "212 555 0182", "john dot smith at example dot com". Presidio's recognizers look for
"4111 1111 1111 1111", "212-555-0182" and "john.smith@example.com". :func:`normalise` rewrites
runs of number words and digit groups into one digit string (laid out by its length as a card,
phone or SSN number would be written, so that the recognizers' own checks, Luhn and the rest,
decide) and spoken e-mail addresses into addresses; :class:`Normalised` maps a span of the
rewrite back to the span of the original it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9}
TEENS = {"ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
         "seventeen": 17, "eighteen": 18, "nineteen": 19}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
ZEROS = {"oh", "o"}  # "oh" is a digit only next to other number words
REPEATS = {"double": 2, "triple": 3}
TLDS = ("com", "org", "net", "edu", "gov", "io", "co", "uk", "de", "fr", "es", "it", "info", "biz", "us", "ca")

_TOKEN = re.compile(r"[A-Za-z]+|\d+")
# What may stand between two parts of one spoken number: spaces, punctuation, a spoken dash.
_JOINER = re.compile(r"(?:[\s,.\-/]+|\b(?:dash|hyphen)\b)*", re.IGNORECASE)
_SPOKEN_EMAIL = re.compile(
    r"\b([a-z0-9]+(?:(?:\s+(?:dot|underscore|dash)\s+|[._-])[a-z0-9]+)*)\s+(?:at|@)\s+"
    r"([a-z0-9-]+(?:(?:\s+dot\s+|\.)[a-z0-9-]+)*(?:\s+dot\s+|\.)(?:" + "|".join(TLDS) + r"))\b",
    re.IGNORECASE)
_EMAIL_SEPARATORS = {"dot": ".", "underscore": "_", "dash": "-"}


@dataclass
class Normalised:
    """The rewritten text, and for each of its characters the original span it stands for."""

    text: str
    starts: list[int]
    ends: list[int]

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original text's span that ``text[start:end]`` came from."""
        return self.starts[start], self.ends[end - 1]


class _Builder:
    def __init__(self):
        self.parts: list[str] = []
        self.starts: list[int] = []
        self.ends: list[int] = []

    def copy(self, text: str, a: int, b: int) -> None:
        self.parts.append(text[a:b])
        self.starts.extend(range(a, b))
        self.ends.extend(range(a + 1, b + 1))

    def put(self, new: str, a: int, b: int) -> None:
        """``new`` stands for original text[a:b] as a whole."""
        self.parts.append(new)
        self.starts.extend([a] * len(new))
        self.ends.extend([b] * len(new))

    def done(self) -> Normalised:
        return Normalised("".join(self.parts), self.starts, self.ends)


def _number_tokens(text: str) -> list[tuple[int, int, str]]:
    """(start, end, digits) of each token that is a number word or digits; "oh" decided later."""
    out = []
    words = [(m.start(), m.end(), m.group().lower()) for m in _TOKEN.finditer(text)]
    for i, (a, b, w) in enumerate(words):
        if w.isdigit():
            out.append((a, b, w))
        elif w in UNITS:
            out.append((a, b, str(UNITS[w])))
        elif w in TEENS:
            out.append((a, b, str(TEENS[w])))
        elif w in TENS:
            nxt = words[i + 1] if i + 1 < len(words) else None
            unit = nxt and nxt[2] in UNITS and nxt[2] != "zero" and _JOINER.fullmatch(text[b:nxt[0]])
            out.append((a, b, str(TENS[w])[0] if unit else str(TENS[w])))  # "forty one" -> 4 + 1
        elif w in ZEROS or w in REPEATS:
            out.append((a, b, w))
    return out


def _runs(text: str) -> list[list[tuple[int, int, str]]]:
    """Maximal runs of number tokens with only joiners between them."""
    runs: list[list[tuple[int, int, str]]] = []
    for tok in _number_tokens(text):
        if runs and _JOINER.fullmatch(text[runs[-1][-1][1]:tok[0]]):
            runs[-1].append(tok)
        else:
            runs.append([tok])
    return runs


def _digits(run: list[tuple[int, int, str]]) -> tuple[str, int, int] | None:
    """The digit string a run says, and its original extent (``oh`` / ``double`` / ``triple`` at
    the edges are not part of it when nothing numeric stands beside them)."""
    out, first, last, repeat = [], None, None, 1
    for i, (a, b, v) in enumerate(run):
        if v in REPEATS:
            if i + 1 < len(run) and run[i + 1][2] not in REPEATS:
                repeat = REPEATS[v]
                first = a if first is None else first
            continue
        if v in ZEROS:
            near = [run[j][2] for j in (i - 1, i + 1) if 0 <= j < len(run)]
            if not any(x.isdigit() for x in near):
                continue
            v = "0"
        out.append(v * repeat)
        repeat = 1
        first = a if first is None else first
        last = b
    return ("".join(out), first, last) if out and last is not None else None


def _layout(digits: str) -> str:
    """A digit string written as such a number usually is, so the recognizers see their formats."""
    n = len(digits)
    if n == 9:
        return f"{digits[:3]}-{digits[3:5]}-{digits[5:]}"  # SSN
    if n == 10:
        return f"{digits[:3]}-{digits[3:6]}-{digits[6:]}"  # NANP phone
    if n == 11 and digits[0] == "1":
        return f"1-{digits[1:4]}-{digits[4:7]}-{digits[7:]}"
    if 13 <= n <= 19:
        return " ".join(digits[k:k + 4] for k in range(0, n, 4))  # card
    return digits


def normalise(text: str) -> Normalised:
    """``text`` with spoken numbers and e-mail addresses rewritten; see the module doc."""
    edits: list[tuple[int, int, str]] = []
    for run in _runs(text):
        said = _digits(run)
        if said is None:
            continue
        digits, a, b = said
        spoken = any(not tok[2].isdigit() for tok in run) or len(run) > 1
        if spoken and len(digits) >= 3:
            edits.append((a, b, _layout(digits)))
    for m in _SPOKEN_EMAIL.finditer(text):
        if "@" in m.group() and " " not in m.group().strip():
            continue
        if any(a < m.end() and m.start() < b for a, b, _ in edits):
            continue
        local, domain = (re.sub(r"\s+(dot|underscore|dash)\s+", lambda k: _EMAIL_SEPARATORS[k.group(1).lower()], part,
                                flags=re.IGNORECASE) for part in m.groups())
        edits.append((m.start(), m.end(), f"{local}@{domain}".lower()))
    edits.sort()
    out = _Builder()
    at = 0
    for a, b, new in edits:
        out.copy(text, at, a)
        out.put(new, a, b)
        at = b
    out.copy(text, at, len(text))
    return out.done()
