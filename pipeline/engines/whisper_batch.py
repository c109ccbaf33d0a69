"""Many clips of at most one Whisper window (30 s) through one CTranslate2 encode and generate.

The arithmetic is faster-whisper's own for a clip's first window (``WhisperModel.transcribe`` ->
``generate_segments`` -> ``generate_with_fallback`` at temperature 0), built from its own pieces:
the same log-mel features padded to 3000 frames (``pad_or_trim``), the same prompt (``get_prompt``),
the same generate options (its defaults, read from its signature), the same silence rule and the
same split into segments (``_split_segments_by_timestamps``). Only the batch is new: where
``BatchedInferencePipeline`` batches the windows of one recording, this batches windows of many.

Where faster-whisper would go on from that first window (a temperature fallback for a repetitive
or improbable decode, a second window because the first ended mid-segment), the clip's answer is
``None`` and the caller decodes it alone with ``WhisperModel.transcribe``: the text is then
faster-whisper's by construction.

Imported only where faster-whisper is installed (``WhisperEngine.__init__``).
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_compression_ratio, get_ctranslate2_storage, get_suppressed_tokens

# faster-whisper's decoding defaults, from the one place it states them.
_DEFAULTS = {name: p.default for name, p in inspect.signature(WhisperModel.transcribe).parameters.items()}


@dataclass(frozen=True)
class Decoded:
    """One clip's text as ``WhisperModel.transcribe`` joins it, and its window's mean log-probability
    (None where the window was judged silent and gave no segment)."""

    text: str
    avg_logprob: float | None


class WindowBatcher:
    """Batched first-window decoding on one loaded ``WhisperModel``.

    ``generate_calls`` counts the CTranslate2 generate calls made here by batch size (detection
    and decoding alike), ``passed_on`` the clips answered None by reason (``temperature``,
    ``next_window``): what a test or a benchmark reads to see what batching did.
    """

    def __init__(self, model: WhisperModel, beam_size: int):
        self._model = model
        self._beam_size = beam_size
        self.generate_calls: Counter[int] = Counter()
        self.passed_on: Counter[str] = Counter()

    def fits(self, samples: np.ndarray) -> bool:
        """True when the clip is one window: faster-whisper decodes it in a single pass."""
        return len(samples) <= self._model.feature_extractor.n_samples

    def detect_languages(self, clips: Sequence[np.ndarray]) -> list[str]:
        """Each clip's language as ``WhisperModel.transcribe(language=None)`` finds it: the most
        probable language token on the first 3000 feature frames (one detection segment, where the
        top language is the answer whatever its probability)."""
        nb = self._model.feature_extractor.nb_max_frames
        encoded = self._encode([self._model.feature_extractor(c)[..., :nb] for c in clips])
        found = self._model.model.detect_language(encoded)
        self.generate_calls[len(clips)] += 1
        return [ranked[0][0][2:-2] for ranked in found]

    def decode(self, clips: Sequence[np.ndarray], *, language: str, task: str, hotwords: str | None,
               without_timestamps: bool) -> list[Decoded | None]:
        """One answer per clip, in order, all decoded with one prompt; None where faster-whisper
        would decode further."""
        m, d = self._model, _DEFAULTS
        tokenizer = Tokenizer(m.hf_tokenizer, m.model.is_multilingual, task=task, language=language)
        # A clip's features minus the frame of faster-whisper's 160-sample padding, as generate_segments cuts them.
        features = [m.feature_extractor(c)[..., :-1] for c in clips]
        encoded = self._encode(features)
        prompt = m.get_prompt(tokenizer, [], without_timestamps=without_timestamps, hotwords=hotwords)
        results = m.model.generate(
            encoded, [prompt] * len(clips),
            beam_size=self._beam_size, patience=d["patience"], length_penalty=d["length_penalty"],
            repetition_penalty=d["repetition_penalty"], no_repeat_ngram_size=d["no_repeat_ngram_size"],
            max_length=m.max_length, return_scores=True, return_no_speech_prob=True,
            suppress_blank=d["suppress_blank"],
            suppress_tokens=get_suppressed_tokens(tokenizer, list(d["suppress_tokens"])),
            max_initial_timestamp_index=int(round(d["max_initial_timestamp"] / m.time_precision)),
        )
        self.generate_calls[len(clips)] += 1
        return [self._answer(tokenizer, r, f.shape[-1]) for r, f in zip(results, features, strict=True)]

    def _encode(self, features: Sequence[np.ndarray]):
        """The encoder output of a batch of clips, each padded to one 3000-frame window."""
        windows = [pad_or_trim(f) for f in features]
        if self._model.model.device != "cpu":
            return self._model.encode(np.stack(windows))
        # On CPU, clip by clip: a batch's attention matrices (heads x 1500 x 1500 floats per clip)
        # outgrow the caches and cost more CPU time than the same clips one by one, with the same
        # numbers (bit for bit on tiny.en); generate still takes the whole batch, where batching pays.
        return get_ctranslate2_storage(np.concatenate([np.asarray(self._model.encode(w)) for w in windows]))

    def _answer(self, tokenizer: Tokenizer, result, content_frames: int) -> Decoded | None:
        d = _DEFAULTS
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * (len(tokens) ** d["length_penalty"]) / (len(tokens) + 1)
        # generate_with_fallback's rules at temperature 0: too repetitive or too improbable -> the
        # next temperature, unless the window is silence.
        silent_low = result.no_speech_prob > d["no_speech_threshold"] and avg_logprob < d["log_prob_threshold"]
        retry = (get_compression_ratio(tokenizer.decode(tokens).strip()) > d["compression_ratio_threshold"]
                 or avg_logprob < d["log_prob_threshold"])
        if retry and not silent_low:
            self.passed_on["temperature"] += 1
            return None
        # generate_segments' no-speech skip: the window gives no segment.
        if result.no_speech_prob > d["no_speech_threshold"] and not avg_logprob > d["log_prob_threshold"]:
            return Decoded("", None)
        size = min(self._model.feature_extractor.nb_max_frames, content_frames)
        segments, seek, _ = self._model._split_segments_by_timestamps(
            tokenizer=tokenizer, tokens=tokens, time_offset=0.0, segment_size=size,
            segment_duration=size * self._model.feature_extractor.time_per_frame, seek=0,
        )
        if seek < content_frames:  # the window ended mid-segment: faster-whisper decodes on from there
            self.passed_on["next_window"] += 1
            return None
        texts = [t for s in segments if s["start"] != s["end"] and (t := tokenizer.decode(s["tokens"])).strip()]
        return Decoded("".join(texts).strip(), avg_logprob if texts else None)
