"""Word timestamps by CTC forced alignment: a transcript aligned to the audio it came from, for
engines that give text without times (Granite on vLLM).

A :class:`CtcAligner` gives per-frame log-probabilities over a character vocabulary and turns
text into those characters' ids; :func:`align_words` finds the best monotonic path of the
transcript's characters through the frames (Viterbi over CTC's blank-interleaved states:
torchaudio's ``forced_align`` where its compiled extension loads, the same algorithm in numpy
otherwise: the PyPI torchaudio that vLLM's CPU build brings has no extension here) and times each
word by its characters' frames. Backends live in their own modules (:mod:`.granite_ctc`).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..engines.base import Word


@runtime_checkable
class CtcAligner(Protocol):
    blank: int

    def emissions(self, samples: np.ndarray) -> np.ndarray:
        """(frames, vocabulary) log-probabilities for 16 kHz mono ``samples``."""
        ...

    def word_tokens(self, words: Sequence[str]) -> list[list[int]]:
        """Each word's character ids (empty for a word the vocabulary cannot spell)."""
        ...


def viterbi(log_probs: np.ndarray, targets: Sequence[int], blank: int) -> np.ndarray:
    """For each target token, its frames: the best CTC path's state per frame, as an array of
    token indices (-1 for blank frames). ``log_probs``: (T, V)."""
    n_frames = len(log_probs)
    n_states = 2 * len(targets) + 1
    if not len(targets):
        return np.full(n_frames, -1)
    labels = np.full(n_states, blank)
    labels[1::2] = targets
    # a state may come from itself, the one before, or (a token different from the one two back) two before
    skip = np.zeros(n_states, bool)
    skip[3::2] = np.asarray(targets[1:]) != np.asarray(targets[:-1])
    neg = -np.inf
    score = np.full(n_states, neg)
    score[0] = log_probs[0, labels[0]]
    if n_states > 1:
        score[1] = log_probs[0, labels[1]]
    back = np.zeros((n_frames, n_states), np.int8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, n_frames):
        one = np.concatenate([[neg], score[:-1]])
        two = np.where(skip, np.concatenate([[neg, neg], score[:-2]]), neg)
        stacked = np.stack([score, one, two])
        choice = np.argmax(stacked, axis=0)
        score = stacked[choice, np.arange(n_states)] + log_probs[t, labels]
        back[t] = choice
    state = n_states - 1 if n_states == 1 or score[-1] >= score[-2] else n_states - 2
    path = np.empty(n_frames, int)
    for t in range(n_frames - 1, -1, -1):
        path[t] = state
        state -= back[t, state]
    return np.where(path % 2 == 1, path // 2, -1)


def _torchaudio_path(log_probs: np.ndarray, targets: Sequence[int], blank: int) -> np.ndarray | None:
    try:
        import torch
        import torchaudio.functional as F

        aligned, _ = F.forced_align(torch.from_numpy(log_probs)[None].float(), torch.tensor([list(targets)]),
                                    blank=blank)
    except Exception:  # noqa: BLE001 - no compiled extension (the PyPI build here): numpy Viterbi
        return None
    # torchaudio gives the token id per frame; recover token indices by walking the targets
    ids = aligned[0].numpy()
    out, k, prev = np.full(len(ids), -1), -1, blank
    for t, tok in enumerate(ids):
        if tok != blank and (tok != prev or k < 0):
            k += 1
        if tok != blank:
            out[t] = k
        prev = tok
    return out


def align_words(aligner: CtcAligner, samples: np.ndarray, text: str) -> tuple[Word, ...]:
    """``text``'s words (split at whitespace) timed against ``samples``; a word the vocabulary
    cannot spell takes the time between its neighbours."""
    from ..records import SAMPLE_RATE_HZ

    words = text.split()
    if not words or not len(samples):
        return ()
    log_probs = aligner.emissions(samples)
    frame_s = len(samples) / SAMPLE_RATE_HZ / max(1, len(log_probs))
    tokens = aligner.word_tokens(words)
    flat = [t for ts in tokens for t in ts]
    if len(flat) > len(log_probs):  # more characters than frames: CTC cannot place them
        flat, tokens = [], [[] for _ in words]
    owner = _torchaudio_path(log_probs, flat, aligner.blank) if flat else None
    if owner is None:
        owner = viterbi(log_probs, flat, aligner.blank) if flat else np.full(len(log_probs), -1)
    first_token, spans = 0, []
    for ts in tokens:
        ks = range(first_token, first_token + len(ts))
        frames = np.flatnonzero(np.isin(owner, list(ks))) if ts else np.zeros(0, int)
        spans.append((frames[0], frames[-1] + 1, float(np.exp(log_probs[frames, [flat[k] for k in owner[frames]]]).mean()))
                     if len(frames) else None)
        first_token += len(ts)
    out, total = [], len(log_probs)
    for i, (word, span) in enumerate(zip(words, spans)):
        if span is None:  # between the neighbours that have times
            before = next((s[1] for s in reversed(spans[:i]) if s), 0)
            after = next((s[0] for s in spans[i + 1:] if s), total)
            span = (before, max(before, after), None)
        a, b, p = span
        out.append(Word(word, round(a * frame_s, 3), round(b * frame_s, 3), p))
    return tuple(out)


__all__ = ["CtcAligner", "align_words", "viterbi"]
