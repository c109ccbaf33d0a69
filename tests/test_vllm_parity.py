"""vLLM's Granite Speech computes what transformers' reference implementation computes.

Same checkpoint (tiny, random, float32), same audio, same rendered prompt: the prompt token ids
(audio placeholder expanded) are identical, and the first generated token's top-k
log-probabilities agree within LOGPROB_TOLERANCE.
"""

from __future__ import annotations

import pytest
import soundfile as sf

from pipeline.engines.base import EngineRequest

from .conftest import EVAL_DIR, eval_rows
from .tiny_models import shared_granite_engine

pytestmark = pytest.mark.vllm

# Absolute difference in natural-log probability. Both sides run float32 on CPU; what differs is
# kernel order (vLLM's fused CPU attention and its own mel/projector batching vs. PyTorch eager),
# which moves values by ~1e-6 here. 1e-4 is what FACTS.md saw at the real model's scale.
LOGPROB_TOLERANCE = 1e-4
TOP_K = 5


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_granite_engine(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(shared):
    import torch
    from transformers import AutoProcessor, GraniteSpeechForConditionalGeneration

    path, _ = shared
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(path))


def _clips(n: int) -> list[EngineRequest]:
    rows = [r for r in eval_rows() if r["language"] in ("en", "de") and r["duration_s"] < 15][:n]
    # Scaled so vLLM's encoder cache (keyed by the audio's hash) cannot hand back an encoder
    # output computed for this clip inside another test's batch: a batch pads its audio to the
    # longest clip and the conformer has no padding mask, which moves log-probs by ~1e-2.
    return [EngineRequest(id=r["id"], samples=0.99 * sf.read(EVAL_DIR / r["audio"], dtype="float32")[0],
                          language=r["language"]) for r in rows]


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_first_token_top_k_logprobs_match_transformers(shared, reference, task):
    import torch
    from vllm import SamplingParams

    _, engine = shared
    model, processor = reference
    scaling = model.config.text_config.logits_scaling
    for clip in _clips(2):
        req = EngineRequest(id=clip.id, samples=clip.samples, language="en", task=task,
                            target_language="fr" if task == "translate" else None)
        prompt = engine.prompts.build(req)
        out = engine.llm.generate(
            [{"prompt": prompt, "multi_modal_data": {"audio": (req.samples, 16000)}}],
            SamplingParams(temperature=0.0, max_tokens=1, logprobs=TOP_K),
            use_tqdm=False,
        )[0]
        inputs = processor(prompt, req.samples, return_tensors="pt")
        assert list(out.prompt_token_ids) == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()
        # transformers' GraniteSpeech skips the text model's logits_scaling; vLLM applies it.
        expected = torch.log_softmax(logits / scaling, dim=-1)
        top = torch.topk(expected, TOP_K)
        got = out.outputs[0].logprobs[0]
        assert set(top.indices.tolist()) <= set(got), (top.indices.tolist(), sorted(got))
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(got[token].logprob - value) <= LOGPROB_TOLERANCE, (clip.id, token, got[token].logprob, value)
        assert out.outputs[0].token_ids[0] == top.indices[0].item()
