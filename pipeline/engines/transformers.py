"""Hugging Face transformers: Granite Speech, batched, on GPU (bfloat16) or CPU (float32), with IBM's
CTC-draft speculative decoding as an option (``engine.transformers.speculative``).

One ``transcribe`` call is one batch: the requests' prompts come from :mod:`.prompts` (the same
builder as the vLLM engine), unsupported and too-long requests are answered here, and the rest go
through the model together:

1. **One encoder pass.** The processor turns the batch into log-mel features and prompt ids (with
   ``<|audio|>`` expanded); the conformer encoder runs once, the projector turns its output into
   audio embeddings, and those are scattered into the prompt embeddings, as the model's own
   ``forward`` does. Everything below reuses these embeddings: no row is encoded twice.
2. **Drafts** (speculation on). The encoder's character CTC head (``encoder.out``, the head the
   encoder also uses for its self-conditioning at the middle layer) is applied to the last encoder
   layer; greedy CTC decoding (best class per frame, repeats collapsed, blanks dropped) maps the
   classes through the checkpoint's CTC vocabulary (:func:`ctc_vocabulary`) to text. Rows that ask
   for a translation, Japanese rows (the head has Katakana only, the model writes kanji and kana),
   and drafts with characters outside the vocabulary get no draft.
3. **Verification.** A draft is tokenised with the LLM's tokenizer and appended to its row's
   prompt; one teacher-forced pass of the language model over all drafted rows gives, at every
   draft position, the model's own next-token distribution.
   ``lossless``: the draft is kept only where it is the model's greedy choice token by token and
   the model then chooses end-of-text (or the draft fills the row's output budget, where greedy
   decoding would stop too): the kept text is exactly what greedy decoding produces.
   ``thresholded``: IBM's leaderboard rule: a draft whose largest per-frame CTC entropy is at most
   ``ctc_entropy_threshold`` is taken as is, unverified; otherwise it is kept when every draft
   token's probability is at least ``verify_probability_threshold``. Faster, and not lossless.
4. **Fallback.** Rows without a kept draft (all rows when speculation is off) are decoded greedily
   by ``generate`` from the audio embeddings of step 1.

Each result's ``extra["draft"]`` says what happened to its draft (``accepted``, ``rejected``,
``none``; ``off`` when speculation is off) and :attr:`TransformersEngine.drafts` counts them.

Log-probabilities divide the logits by the language model's ``logits_scaling`` (which vLLM and
IBM's scripts apply and transformers' GraniteSpeech head does not), so ``avg_logprob`` means what it
means for the vLLM engine. Greedy decoding ignores any sampling or penalty settings of the
checkpoint's ``generation_config.json``, as the vLLM engine does (temperature 0, no penalties).

Imports stay light: this module and what it imports need only torch, torchaudio, transformers and
numpy (no pydantic, pyarrow, Ray, vLLM or soundfile), so ``benchmarks/bench_engine.py`` runs it on a
bare GPU machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from .base import EngineRequest, EngineResult, EngineUnavailable
from .common import admit, machine_threads, model_type, output_budget, resolve_model
from .prompts import GranitePrompts, normalize_language

if TYPE_CHECKING:
    from ..config import TransformersOptions

SPECULATIVE_MODES = ("off", "lossless", "thresholded")
CTC_VOCAB_FILE = "ctc_vocab.json"
"""Optional file in a checkpoint folder: the CTC head's vocabulary as a JSON list of strings, one per
class, index 0 the blank. Without it, the Granite layout (:func:`ctc_vocabulary`)."""
NO_DRAFT_LANGUAGES = frozenset({"ja"})
"""Languages whose text the character CTC head cannot spell (it has Katakana only)."""
_INSTALL_HINT = "engine 'transformers' needs torch, torchaudio and transformers: pip install 'quarry[transformers]'"

Draft = Union[str, Sequence[int], None]
DraftFn = Callable[[EngineRequest, Union[str, None]], Draft]
"""A test and benchmark seam: called for each row that may be drafted, with the CTC head's text
(``None`` when it had characters outside the vocabulary); returns the draft to verify instead: text,
LLM token ids, or ``None`` for no draft."""


def ctc_vocabulary(checkpoint: Path | None, size: int) -> list[str | None]:
    """The CTC head's classes as text: index 0 is the blank (``""``), ``None`` a class whose
    character is not known.

    The checkpoint keeps no vocabulary file: granite-4.0-1b-speech's card says the head's 348
    classes are "the first 256 ASCII entries" plus 92 Katakana, and IBM's own speculative decoding
    (Open ASR leaderboard ``granite/run_eval_speculative.py``, granite-speech-models
    ``speculative_decoding_notebook.ipynb``) decodes a class ``c`` as ``chr(c)``: classes 1-255 are
    Latin-1 code points. The order of the Katakana classes (256 and up) is not published, so they
    are unknown here, and a draft that uses one is no draft. A checkpoint folder may carry
    ``ctc_vocab.json`` (a list of ``size`` strings) to say otherwise; the tiny test model does.
    """
    path = checkpoint / CTC_VOCAB_FILE if checkpoint is not None else None
    if path is not None and path.exists():
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EngineUnavailable(f"cannot read {path}: {e}") from e
        if not (isinstance(vocab, list) and len(vocab) == size and all(isinstance(v, str) for v in vocab)):
            raise EngineUnavailable(f"{path} must be a JSON list of {size} strings (the CTC head's classes)")
        return [""] + list(vocab[1:])
    return [""] + [chr(c) for c in range(1, min(size, 256))] + [None] * max(0, size - 256)


@dataclass
class DraftStats:
    """Running counts of what speculation did, over every ``transcribe`` call of one engine.

    ``accepted``: a draft was kept (no ``generate`` for the row); ``rejected``: a draft was
    verified and refused; ``none``: the row had no draft (translation, Japanese, empty or
    unspellable CTC text). ``fallback`` = rows decoded by ``generate`` = rejected + none.
    """

    accepted: int = 0
    rejected: int = 0
    none: int = 0

    @property
    def fallback(self) -> int:
        return self.rejected + self.none

    @property
    def rows(self) -> int:
        return self.accepted + self.rejected + self.none

    @property
    def acceptance_rate(self) -> float | None:
        """Share of rows whose draft was kept (None before any row)."""
        return self.accepted / self.rows if self.rows else None

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "rejected": self.rejected, "none": self.none,
                "fallback": self.fallback, "acceptance_rate": self.acceptance_rate}


@dataclass
class StageTimes:
    """Seconds spent per step, summed over calls (synchronised on GPU): for the benchmark."""

    encode_s: float = 0.0  # features, encoder, projector, prompt embeddings
    draft_s: float = 0.0  # CTC decoding of the drafts
    verify_s: float = 0.0  # the teacher-forced pass over drafted rows
    generate_s: float = 0.0  # greedy decoding of the rest
    generated_tokens: int = 0  # tokens produced by generate
    output_tokens: int = 0  # tokens in all results (generated or accepted)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Row:
    """One request on its way through a batch."""

    index: int  # position in the batch
    req: EngineRequest
    prompt: str
    budget: int  # output tokens allowed
    draft_text: str | None = None  # what the draft says (for the entropy gate: taken as is)
    draft_ids: list[int] | None = None  # the draft, as LLM token ids
    max_entropy: float = float("inf")  # largest per-frame CTC entropy over the row's frames
    draft: str = "off"  # off | none | accepted | rejected
    gate: str | None = None  # how an accepted draft was accepted: "verified" | "ctc_entropy"
    out_ids: list[int] = field(default_factory=list)  # output tokens, end-of-text included if reached
    logprobs: list[float] | None = None  # their log-probabilities
    finish: str = "stop"


def _import_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise EngineUnavailable(f"{_INSTALL_HINT} ({e})") from e
    return torch


def _pick_device(device: str, torch: Any) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable("engine 'transformers' asked for cuda, but torch sees no CUDA GPU here")
    return device


def _pick_dtype(dtype: str, device: str, torch: Any) -> Any:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, not {dtype!r}")
    return getattr(torch, dtype)


def _logprob_recorder(torch: Any, scaling: float):
    """A logits processor, last in line, that records each row's chosen-token log-probability
    (greedy picks the highest score, so that is the row's maximum) and changes nothing."""
    from transformers import LogitsProcessor

    class ChosenLogprob(LogitsProcessor):
        def __init__(self):
            self.steps: list[Any] = []

        def __call__(self, input_ids, scores):
            self.steps.append(torch.log_softmax(scores.float() / scaling, dim=-1).amax(dim=-1))
            return scores

    return ChosenLogprob()


class TransformersEngine:
    """One Granite Speech checkpoint through transformers; a ``transcribe`` call is one batch."""

    name = "transformers"

    def __init__(self, model: str, options: TransformersOptions, *, cpus: float | None = None,
                 draft_fn: DraftFn | None = None):
        checkpoint = resolve_model(model, engine="transformers")
        found = model_type(checkpoint)
        if found != "granite_speech":
            raise EngineUnavailable(f"engine 'transformers' runs Granite Speech checkpoints (model type "
                                    f"'granite_speech'), not {found!r} ({checkpoint})")
        torch = _import_torch()
        from transformers import AutoProcessor, GraniteSpeechForConditionalGeneration

        device = _pick_device(options.device, torch)
        dtype = _pick_dtype(options.dtype, device, torch)
        if device == "cpu":  # every core of the machine, unless told otherwise
            torch.set_num_threads(max(1, int(round(cpus))) if cpus else machine_threads())
        try:
            processor = AutoProcessor.from_pretrained(str(checkpoint))
            net = GraniteSpeechForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype).to(device)
        except Exception as e:  # noqa: BLE001 - any load failure: say which model, keep the cause
            raise EngineUnavailable(f"transformers could not load {model!r} from {checkpoint}: {e}") from e
        self._setup(model, net, processor, options, checkpoint, draft_fn)

    @classmethod
    def from_model(cls, name: str, net: Any, processor: Any, options: TransformersOptions, *,
                   draft_fn: DraftFn | None = None, checkpoint: Path | None = None) -> TransformersEngine:
        """An engine around a model already in memory (on its device, in its dtype): the GPU
        benchmark builds one at the real size with random weights instead of writing gigabytes to
        disk and reading them back."""
        engine = cls.__new__(cls)
        engine._setup(name, net, processor, options, checkpoint, draft_fn)
        return engine

    def _setup(self, name: str, net: Any, processor: Any, options: TransformersOptions, checkpoint: Path | None,
               draft_fn: DraftFn | None) -> None:
        torch = _import_torch()
        from transformers import GenerationConfig

        if options.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, not {options.speculative!r}")
        self._torch = torch
        self.model = name
        self.options = options
        self.speculative: str = options.speculative
        """off | lossless | thresholded (from the options; tests and the benchmark switch it)."""
        self.draft_fn = draft_fn
        self.checkpoint = checkpoint
        self.net = net.eval()
        """The underlying ``GraniteSpeechForConditionalGeneration`` (tools and tests use it)."""
        self.device = net.device.type
        self.dtype = net.dtype
        if getattr(net, "_hf_peft_config_loaded", False):
            # Checkpoints with a speech LoRA (granite-speech 3.x): audio prompts always need it, and
            # generate() below is given embeddings, not audio, so it would switch the adapter off.
            net.enable_adapters()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches: prompts end together
        self.prompts = GranitePrompts(self.tokenizer)
        self._encoder, self._projector, self._text_model, self._lm_head = self._parts(net)
        text_config = net.config.text_config
        eos = text_config.eos_token_id if text_config.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: frozenset[int] = frozenset(eos if isinstance(eos, (list, tuple)) else [eos])
        self._eos = min(self.eos_ids)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else self._eos
        # Greedy is greedy: no penalties or sampling settings from the checkpoint's generation config.
        net.generation_config = GenerationConfig(
            bos_token_id=text_config.bos_token_id, eos_token_id=sorted(self.eos_ids), pad_token_id=self._pad)
        self.logits_scaling = float(getattr(text_config, "logits_scaling", None) or 1.0)
        self._audio_token_id = net.config.audio_token_id
        self._hop = int(processor.audio_processor.melspec_kwargs["hop_length"])
        size = int(self._encoder.out.out_features)
        self.ctc_vocab = ctc_vocabulary(checkpoint, size)
        self.drafts = DraftStats()
        """Counts of accepted / rejected / no drafts (``fallback`` = rejected + none)."""
        self.times = StageTimes()
        self.last_prompts: list[str | None] = []
        """Prompt of each request of the last ``transcribe`` call (None: not sent)."""
        self.last_token_ids: list[list[int] | None] = []
        """Output token ids of each request of the last call (end-of-text included when reached)."""

    @staticmethod
    def _parts(net: Any) -> tuple[Any, Any, Any, Any]:
        """(encoder, projector, text model without head, head), in transformers 5's layout
        (``net.model.*``) or 4's (``net.encoder``, ``net.language_model.model``)."""
        core = getattr(net, "model", None)
        if core is not None and hasattr(core, "encoder"):
            return core.encoder, core.projector, core.language_model, net.lm_head
        return net.encoder, net.projector, net.language_model.model, net.language_model.lm_head

    # --- length budget -------------------------------------------------------------------

    def audio_tokens(self, n_samples: int) -> int:
        """Prompt positions the audio takes (the processor's own count, ~10 per second)."""
        return int(self.processor.audio_processor._get_num_audio_features([n_samples])[0])

    def prompt_tokens(self, prompt: str, n_samples: int) -> int:
        """Length of the prompt the model sees: text tokens with <|audio|> expanded."""
        return len(self.tokenizer(prompt)["input_ids"]) - 1 + self.audio_tokens(n_samples)

    def _max_tokens(self, req: EngineRequest, prompt: str) -> int | str:
        o = self.options
        return output_budget(req.duration_s, self.prompt_tokens(prompt, len(req.samples)),
                             max_model_len=o.max_model_len, max_output_tokens_per_s=o.max_output_tokens_per_s,
                             min_output_tokens=o.min_output_tokens)

    # --- the batch -----------------------------------------------------------------------

    def transcribe(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        results, admitted = admit(requests, self.prompts, self._max_tokens)
        self.last_prompts = [None] * len(requests)
        self.last_token_ids = [None] * len(requests)
        rows: list[_Row] = []
        for i, req, prompt, budget in admitted:
            self.last_prompts[i] = prompt
            rows.append(_Row(i, req, prompt, budget))
        if rows:
            with self._torch.inference_mode():
                for row, result in zip(rows, self._run(rows), strict=True):
                    results[row.index] = result
                    self.last_token_ids[row.index] = row.out_ids
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"transformers engine produced no result for requests {missing}")
        return results  # type: ignore[return-value]

    def _sync(self) -> float:
        if self.device == "cuda":
            self._torch.cuda.synchronize()
        return time.perf_counter()

    def _run(self, rows: list[_Row]) -> list[EngineResult]:
        started = self._sync()
        inputs = self.processor(text=[r.prompt for r in rows],
                                audio=[np.ascontiguousarray(r.req.samples, dtype=np.float32) for r in rows],
                                device=self.device, padding=True, return_tensors="pt")
        input_ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        features = inputs["input_features"].to(self.device, self.dtype)
        hidden = self._encoder(features)
        hidden = getattr(hidden, "last_hidden_state", hidden)
        embeds = self._merge(input_ids, self._projector(hidden), inputs["input_features_mask"].to(self.device))
        encoded = self._sync()
        self.times.encode_s += encoded - started

        if self.speculative != "off":
            self._draft(rows, hidden)
            drafted = self._sync()
            self.times.draft_s += drafted - encoded
            verify = [j for j, r in enumerate(rows) if r.draft_ids is not None and r.gate is None]
            if verify:
                self._verify([rows[j] for j in verify], embeds[verify], mask[verify])
            self.times.verify_s += self._sync() - drafted

        todo = [j for j, r in enumerate(rows) if r.draft != "accepted"]
        if todo:
            before = self._sync()
            self._generate([rows[j] for j in todo], embeds[todo], mask[todo])
            self.times.generate_s += self._sync() - before

        results = []
        for j, row in enumerate(rows):
            if self.speculative != "off":
                setattr(self.drafts, row.draft, getattr(self.drafts, row.draft) + 1)
            results.append(self._result(row, int(mask[j].sum())))
        return results

    def _merge(self, input_ids: Any, audio: Any, audio_mask: Any) -> Any:
        """Prompt embeddings with the audio embeddings in the ``<|audio|>`` positions (what the
        model's own forward does before its language model)."""
        is_audio = input_ids == self._audio_token_id
        embeds = self._text_model.get_input_embeddings()(input_ids.masked_fill(is_audio, 0))
        audio = audio[audio_mask].to(embeds.dtype)
        return embeds.masked_scatter(is_audio.unsqueeze(-1).expand_as(embeds), audio)

    # --- drafts --------------------------------------------------------------------------

    def _draft(self, rows: list[_Row], hidden: Any) -> None:
        """Each row's draft from the CTC head (or ``draft_fn``), and the thresholded entropy gate."""
        torch = self._torch
        logits = self._encoder.out(hidden).float()  # [rows, frames, classes]
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        frames = logits.shape[1]
        # Encoder frames holding each clip (the rest is batch padding): the feature extractor's
        # own arithmetic (mel frames = samples // hop + 1, two per encoder frame).
        lengths = [min(frames, (len(r.req.samples) // self._hop + 1) // 2) for r in rows]
        valid = torch.arange(frames, device=logits.device)[None, :] < torch.tensor(lengths, device=logits.device)[:, None]
        max_entropy = entropy.masked_fill(~valid, float("-inf")).amax(dim=-1).tolist()
        best = logits.argmax(dim=-1).cpu()
        for row, classes, n, ent in zip(rows, best, lengths, max_entropy):
            row.draft = "none"
            if row.req.task != "transcribe" or normalize_language(row.req.language) in NO_DRAFT_LANGUAGES:
                continue
            text = self.ctc_text(classes[:n].tolist())
            draft: Draft = self.draft_fn(row.req, text) if self.draft_fn else text
            if draft is None:
                continue
            if isinstance(draft, str):
                draft = draft.strip()
                ids = self.tokenizer.encode(draft, add_special_tokens=False) if draft else []
            else:
                ids = [int(t) for t in draft]
                draft = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if not ids:
                continue
            row.draft_text, row.draft_ids = draft, ids
            if text is not None and draft == text.strip():  # the CTC head's own text: its entropy says how sure
                row.max_entropy = ent
            if (self.speculative == "thresholded" and row.max_entropy <= self.options.ctc_entropy_threshold
                    and len(ids) <= row.budget):
                row.draft, row.gate = "accepted", "ctc_entropy"
                row.out_ids, row.logprobs = ids, None

    def ctc_text(self, classes: Sequence[int]) -> str | None:
        """Greedy CTC decoding of one row's best classes: repeats collapsed, blanks (0) dropped,
        classes spelled through the vocabulary; ``None`` when a class has no known character."""
        chars, previous = [], None
        for c in classes:
            if c != previous and c != 0:
                char = self.ctc_vocab[c] if c < len(self.ctc_vocab) else None
                if char is None:
                    return None
                chars.append(char)
            previous = c
        return "".join(chars)

    def _verify(self, rows: list[_Row], embeds: Any, mask: Any) -> None:
        """One teacher-forced pass of the language model over each row's prompt + draft; keep or
        refuse each draft (see the module docstring for the two rules)."""
        torch = self._torch
        lossless = self.speculative == "lossless"
        # lossless: greedy decoding stops at the budget, so only the budget's worth of the draft counts
        kept = [r.draft_ids[: r.budget] if lossless else r.draft_ids for r in rows]
        width = max(len(k) for k in kept)
        draft = torch.full((len(rows), width), self._pad, dtype=torch.long)
        draft_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
        for j, ids in enumerate(kept):
            draft[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            draft_mask[j, : len(ids)] = 1
        draft, draft_mask = draft.to(self.device), draft_mask.to(self.device)
        x = torch.cat([embeds, self._text_model.get_input_embeddings()(draft)], dim=1)
        attention = torch.cat([mask, draft_mask], dim=1)
        # Positions as generate() makes them for a left-padded batch.
        positions = (attention.long().cumsum(-1) - 1).masked_fill(attention == 0, 0)
        hidden = self._text_model(inputs_embeds=x, attention_mask=attention, position_ids=positions,
                                  use_cache=False).last_hidden_state
        # The last prompt position predicts draft token 1, ...; the last draft token predicts what follows.
        start = embeds.shape[1] - 1
        rows_at = torch.cat([torch.full((len(ids) + 1,), j, dtype=torch.long) for j, ids in enumerate(kept)])
        cols_at = torch.cat([torch.arange(start, start + len(ids) + 1) for ids in kept])
        targets = torch.tensor([t for ids in kept for t in ids + [self._eos]], dtype=torch.long)
        best, target_logprob, best_logprob = self._score(hidden[rows_at.to(self.device), cols_at.to(self.device)],
                                                         targets.to(self.device))
        offset = 0
        for row, ids in zip(rows, kept):
            n = len(ids)
            choice, lp, lp_best = best[offset: offset + n + 1], target_logprob[offset: offset + n], best_logprob[offset + n]
            offset += n + 1
            if lossless:
                stops = len(row.draft_ids) < row.budget  # greedy would end here with end-of-text
                ok = choice[:n] == ids and (not stops or choice[n] in self.eos_ids)
                out, logprobs = (ids + [choice[n]], lp + [lp_best]) if stops else (ids, lp)
            else:
                ok = len(ids) <= row.budget and all(np.exp(v) >= self.options.verify_probability_threshold for v in lp)
                out, logprobs = ids, lp
            if ok:
                row.draft, row.gate, row.out_ids, row.logprobs = "accepted", "verified", out, logprobs
                row.finish = "stop" if (out and out[-1] in self.eos_ids) or not lossless else "length"
            else:
                row.draft = "rejected"

    def _score(self, hidden: Any, targets: Any, chunk: int = 2048) -> tuple[list[int], list[float], list[float]]:
        """For hidden states of positions: the head's greedy token, the log-probability of
        ``targets`` and of the greedy token; in chunks, so a batch of long drafts never holds
        positions x vocabulary logits at once."""
        torch = self._torch
        best, target_lp, best_lp = [], [], []
        for s in range(0, hidden.shape[0], chunk):
            logits = self._lm_head(hidden[s: s + chunk])
            choice = logits.argmax(dim=-1)  # in the model's dtype, as generate() picks
            logp = torch.log_softmax(logits.float() / self.logits_scaling, dim=-1)
            best += choice.tolist()
            target_lp += logp.gather(1, targets[s: s + chunk, None]).squeeze(1).tolist()
            best_lp += logp.gather(1, choice[:, None]).squeeze(1).tolist()
        return best, target_lp, best_lp

    # --- greedy decoding -----------------------------------------------------------------

    def _generate(self, rows: list[_Row], embeds: Any, mask: Any) -> None:
        """Greedy ``generate`` from the prompt embeddings (audio already in them)."""
        torch = self._torch
        from transformers import GenerationMixin, LogitsProcessorList

        used = torch.nonzero(mask.sum(dim=0)).min().item()  # drop padding no row of this subset needs
        embeds, mask = embeds[:, used:], mask[:, used:]
        recorder = _logprob_recorder(torch, self.logits_scaling)
        # GenerationMixin's own generate: GraniteSpeech's override would switch a speech LoRA off
        # for a call without input_features.
        out = GenerationMixin.generate(
            self.net, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max(r.budget for r in rows),
            do_sample=False, num_beams=1, logits_processor=LogitsProcessorList([recorder]),
        )
        sequences = getattr(out, "sequences", out).tolist()
        steps = torch.stack(recorder.steps, dim=1).tolist() if recorder.steps else [[] for _ in rows]
        for row, tokens, logprobs in zip(rows, sequences, steps, strict=True):
            tokens = tokens[: row.budget]
            end = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
            if end is not None:
                tokens = tokens[: end + 1]
            row.out_ids, row.logprobs = tokens, logprobs[: len(tokens)]
            row.finish = "stop" if end is not None else "length"
            self.times.generated_tokens += len(tokens)

    # --- results -------------------------------------------------------------------------

    def _result(self, row: _Row, prompt_tokens: int) -> EngineResult:
        text_ids = [t for t in row.out_ids if t not in self.eos_ids]
        if row.gate == "ctc_entropy":
            text = row.draft_text or ""
        else:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        avg = sum(row.logprobs) / len(row.logprobs) if row.logprobs else None
        self.times.output_tokens += len(row.out_ids)
        extra: dict[str, Any] = {"prompt_tokens": prompt_tokens, "output_tokens": len(row.out_ids),
                                 "finish_reason": row.finish, "draft": row.draft}
        if row.gate:
            extra["draft_gate"] = row.gate
        return EngineResult(text, language=normalize_language(row.req.language), avg_logprob=avg,
                            prompt=row.prompt, extra=extra)
