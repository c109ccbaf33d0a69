"""Granite Speech's own CTC head as the aligner for its transcripts.

Granite's conformer encoder carries a character CTC head (``encoder.out``: used at the middle
block for self-conditioning, and by IBM's CTC-draft decoding on the final block's output). This
backend loads only ``encoder.*`` from the checkpoint (no language model: a fraction of the
memory) with transformers' ``GraniteSpeechCTCEncoder`` and the checkpoint's feature extractor,
on CPU, beside the vLLM engine in the same actor.

The head's character table is not published with the checkpoint. Assumed here, and NOT verified
against the real granite-4.0-1b-speech (no hub on the machines this was built on): id 0 is the
blank and id ``i`` is the character with code point ``i`` (ASCII, lower-cased), as IBM's draft
decoder is described as ASCII-only. A checkpoint may override it with ``ctc_vocab.json`` beside
``config.json`` (a list: the character of each id, ``""`` for the blank). Tested for mechanics
on a tiny random Granite only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engines.base import EngineUnavailable

VOCAB_FILE = "ctc_vocab.json"


class GraniteCtcAligner:
    blank = 0

    def __init__(self, checkpoint: str | Path):
        try:
            import torch
            from safetensors import safe_open
            from transformers import AutoFeatureExtractor, GraniteSpeechConfig
            from transformers.models.granite_speech.modeling_granite_speech import GraniteSpeechCTCEncoder
        except ImportError as e:
            raise EngineUnavailable(f"word timestamps for Granite need torch, transformers and safetensors: {e}") from e
        self._torch = torch
        checkpoint = Path(checkpoint)
        config = GraniteSpeechConfig.from_pretrained(str(checkpoint))
        self.encoder = GraniteSpeechCTCEncoder(config.encoder_config).eval()
        state = {}
        for path in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("encoder."):
                        state[key.removeprefix("encoder.")] = f.get_tensor(key)
        missing, _ = self.encoder.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("attention_dists")]:
            raise EngineUnavailable(f"checkpoint {checkpoint} lacks encoder weights: {missing[:5]}")
        self.encoder.float()
        self.features = AutoFeatureExtractor.from_pretrained(str(checkpoint))
        n = config.encoder_config.output_dim
        vocab_file = checkpoint / VOCAB_FILE
        table = json.loads(vocab_file.read_text()) if vocab_file.exists() else [""] + [chr(i) for i in range(1, n)]
        self.ids = {c: i for i, c in enumerate(table) if c and i != self.blank}

    def emissions(self, samples: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            feats = self.features([np.asarray(samples, np.float32)], device="cpu")["input_features"].float()
            hidden = self.encoder(feats).last_hidden_state
            return torch.log_softmax(self.encoder.out(hidden), dim=-1)[0].numpy()

    def word_tokens(self, words: Sequence[str]) -> list[list[int]]:
        return [[self.ids[c] for c in w.lower() if c in self.ids] for w in words]
