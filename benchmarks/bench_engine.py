"""The transformers engine alone, with and without CTC-draft speculation, at batch sizes up to 256:
RTFx, output tokens per second and peak GPU memory as a table (``make bench-gpu``, or
``python -m benchmarks.bench_engine --help``). A developer's benchmark, not part of the product.

The model is granite-4.0-1b-speech: from ``--model`` (a local checkpoint folder, real weights), or
else built here at the real size from ``benchmarks/granite-4.0-1b-speech.json`` with random
weights (no hub needed: speed and memory, never accuracy). ``--tiny`` builds the same structure
at toy sizes, so ``--tiny --device cpu`` runs anywhere in seconds.

Clips are synthetic (seeded noise shaped like speech, 3-17 s, longest first as the pipeline sends
them), or ``--wav DIR`` (16 kHz PCM WAV files, read with the standard library) for real weights.
For each batch size it times, on the same clips:

* ``off``: plain greedy decoding (one encoder pass, then ``generate``);
* ``lossless, forced``: speculation with each clip's draft taken from the ``off`` run's own greedy
  output, so verification accepts wherever the teacher-forced pass agrees with incremental
  decoding (every row in float32; bfloat16 may disagree on near ties, which the random model's
  head, scaled to std 0.2, makes rare): speculation's best case;
* ``lossless, CTC``: speculation with the encoder's own CTC drafts (random weights: all rejected,
  so this is the worst case, a verification pass plus full decoding; real weights: the real rate);
* ``thresholded, CTC``: IBM's leaderboard rule with its thresholds (not lossless).

It imports only ``pipeline.engines.transformers`` and what that imports, plus torch, torchaudio,
transformers and numpy: no pydantic, Ray, pyarrow, vLLM or soundfile, which a bare GPU machine
lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline.engines.base import EngineRequest
from pipeline.engines.transformers import DraftStats, StageTimes, TransformersEngine

HERE = Path(__file__).resolve().parent
SPEC = HERE / "granite-4.0-1b-speech.json"
RATE = 16_000
SPECIALS = ("<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)
MODES = ("off", "lossless, forced", "lossless, CTC", "thresholded, CTC")


# --- options without pydantic ----------------------------------------------------------------

def engine_options(**values: Any) -> Any:
    """The engine's options: ``TransformersOptions`` where pydantic is installed, else the same
    fields as a plain namespace (every field is given here, so nothing relies on its defaults)."""
    missing = set(OPTION_FIELDS) - set(values)
    if missing:
        raise ValueError(f"engine options not given: {sorted(missing)}")
    try:
        from pipeline.config import TransformersOptions
    except ImportError:  # a bare GPU machine: no pydantic
        return SimpleNamespace(**values)
    return TransformersOptions(**values)


OPTION_FIELDS = ("device", "dtype", "max_model_len", "max_output_tokens_per_s", "min_output_tokens", "speculative",
                 "ctc_entropy_threshold", "verify_probability_threshold")
"""Every field of ``pipeline.config.TransformersOptions`` (a test keeps the two in step)."""


# --- a random Granite Speech ---------------------------------------------------------------

def model_spec(tiny: bool) -> dict:
    """The config to build: the real one, or with the ``tiny`` section's sizes laid over it."""
    spec = json.loads(SPEC.read_text())
    config = spec["config"]
    if tiny:
        for key, value in spec["tiny"].items():
            if key == "about":
                continue
            if isinstance(value, dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
    return config


def synthetic_tokenizer(text_config: dict, audio_id: int):
    """A byte-level tokenizer with the model's vocabulary size and special-token ids: the 256 byte
    symbols, Granite's special tokens at their ids, filler tokens elsewhere (never produced by
    encoding, decodable). Prompts tokenise longer than with the real tokenizer (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    size = text_config["vocab_size"]
    fixed = {"<|pad|>": text_config["pad_token_id"], "<|end_of_text|>": text_config["eos_token_id"],
             "<|audio|>": audio_id}
    taken = set(fixed.values())
    free = (i for i in range(256, size) if i not in taken)
    for name in ("<|start_of_role|>", "<|end_of_role|>"):
        fixed[name] = next(free)
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(fixed)
    used = set(vocab.values())
    vocab.update({f"tok{i}": i for i in range(size) if i not in used})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>",
        extra_special_tokens={"audio_token": "<|audio|>"}, chat_template=CHAT_TEMPLATE, model_max_length=1 << 20,
    )


def random_granite(tiny: bool, device: str, dtype: Any, seed: int = 0):
    """(model, processor): a GraniteSpeechForConditionalGeneration with random weights."""
    import torch
    from transformers import (GraniteSpeechConfig, GraniteSpeechFeatureExtractor, GraniteSpeechForConditionalGeneration,
                              GraniteSpeechProcessor)

    config = model_spec(tiny)
    tokenizer = synthetic_tokenizer(config["text_config"], config["audio_token_index"])
    granite = GraniteSpeechConfig(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        net = GraniteSpeechForConditionalGeneration(granite)
        # Initialised at std 0.02 the head gives nearly flat logits, whose greedy choices bfloat16
        # rounding decides, so a forced draft could fail verification on ties alone. A head at std
        # 0.2 makes choices clear (as tests/tiny_models.py does); it changes no cost.
        with torch.no_grad():
            net.lm_head.weight.mul_(0.2 / float(net.lm_head.weight.float().std()))
    net = net.to(dtype).eval()
    processor = GraniteSpeechProcessor(audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tokenizer,
                                       chat_template=CHAT_TEMPLATE)
    return net, processor


# --- clips ---------------------------------------------------------------------------------

def synthetic_clips(n: int, min_s: float, max_s: float, seed: int = 0) -> list[np.ndarray]:
    """Seeded noise with a syllable-rate envelope, durations uniform in [min_s, max_s]."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        length = int(rng.uniform(min_s, max_s) * RATE)
        t = np.arange(length) / RATE
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 2 * np.pi)) ** 2
        clips.append((0.1 * envelope * rng.standard_normal(length)).astype(np.float32))
    return clips


def wav_clips(folder: Path, n: int) -> list[np.ndarray]:
    """Up to ``n`` 16 kHz PCM WAV files of ``folder`` (cycled when fewer), mono-mixed."""
    clips = []
    for path in sorted(folder.glob("*.wav")):
        with wave.open(str(path)) as w:
            if w.getframerate() != RATE or w.getsampwidth() != 2:
                raise SystemExit(f"{path}: need 16 kHz 16-bit PCM WAV")
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
            clips.append(data.reshape(-1, w.getnchannels()).mean(axis=1))
    if not clips:
        raise SystemExit(f"no .wav files in {folder}")
    return [clips[i % len(clips)] for i in range(n)]


# --- timing --------------------------------------------------------------------------------

def peak_gib(torch: Any, device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_mode(engine: TransformersEngine, mode: str, requests: list[EngineRequest], batch: int,
             forced: dict[str, list[int]], torch: Any) -> dict:
    """Time ``requests`` in batches of ``batch`` under ``mode``; return the table row."""
    engine.speculative = mode.split(",")[0]
    engine.draft_fn = (lambda req, ctc: forced.get(req.id)) if mode == "lossless, forced" else None
    engine.drafts, engine.times = DraftStats(), StageTimes()
    if engine.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    ok = 0
    for i in range(0, len(requests), batch):
        chunk = requests[i: i + batch]
        results = engine.transcribe(chunk)
        ok += sum(r.status == "ok" for r in results)
        if mode == "off":
            for req, ids in zip(chunk, engine.last_token_ids):
                forced[req.id] = [t for t in ids or [] if t not in engine.eos_ids]
    if engine.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    audio = sum(r.duration_s for r in requests)
    return {"mode": mode, "batch": batch, "clips": len(requests), "ok": ok, "audio_s": audio, "wall_s": wall,
            "rtfx": audio / wall, "tokens_per_s": engine.times.output_tokens / wall,
            "peak_gib": peak_gib(torch, engine.device), "drafts": engine.drafts.as_dict(),
            "times": engine.times.as_dict()}


def format_table(rows: list[dict]) -> str:
    head = (f"{'mode':<18}{'batch':>6}{'clips':>6}{'audio_s':>9}{'wall_s':>8}{'RTFx':>8}{'tok/s':>9}"
            f"{'GPU GiB':>9}{'acc/rej/none':>14}{'enc/draft/ver/gen s':>24}")
    lines = [head]
    for r in rows:
        d, t = r["drafts"], r["times"]
        drafts = "-" if r["mode"] == "off" else f"{d['accepted']}/{d['rejected']}/{d['none']}"
        gib = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        steps = f"{t['encode_s']:.2f}/{t['draft_s']:.2f}/{t['verify_s']:.2f}/{t['generate_s']:.2f}"
        lines.append(f"{r['mode']:<18}{r['batch']:>6}{r['clips']:>6}{r['audio_s']:>9.1f}{r['wall_s']:>8.2f}"
                     f"{r['rtfx']:>8.1f}{r['tokens_per_s']:>9.0f}{gib:>9}{drafts:>14}{steps:>24}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local granite-4.0-1b-speech checkpoint folder (real weights); "
                    "default: random weights at the real size")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (with random weights): a run in seconds")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="auto: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16,64,256; --tiny 1,4)")
    ap.add_argument("--batches", type=int, default=2, help="timed batches per batch size")
    ap.add_argument("--min-s", type=float, default=None, help="shortest synthetic clip (default 3; --tiny 1)")
    ap.add_argument("--max-s", type=float, default=None, help="longest synthetic clip (default 17; --tiny 4)")
    ap.add_argument("--wav", type=Path, help="a folder of 16 kHz PCM WAV clips instead of synthetic ones")
    ap.add_argument("--modes", default=",".join(m.replace(", ", "-") for m in MODES),
                    help="which rows to time, of: " + ", ".join(m.replace(", ", "-") for m in MODES))
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's own; --tiny: 1, as a toy model gains nothing from more)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)

    import torch

    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible; use --device cpu (with --tiny for a quick run)")
    sizes = [int(x) for x in (args.batch_sizes or ("1,4" if args.tiny else "1,16,64,256")).split(",") if x]
    min_s = args.min_s if args.min_s is not None else (1.0 if args.tiny else 3.0)
    max_s = args.max_s if args.max_s is not None else (4.0 if args.tiny else 17.0)
    modes = [m for m in MODES if m.replace(", ", "-") in args.modes.split(",")]
    if "lossless, forced" in modes and "off" not in modes:
        modes.insert(0, "off")  # the forced drafts are the off run's outputs
    options = engine_options(device=args.device, dtype=args.dtype, max_model_len=1024, max_output_tokens_per_s=8.0,
                             min_output_tokens=32, speculative="off", ctc_entropy_threshold=0.7,
                             verify_probability_threshold=0.2)

    started = time.perf_counter()
    if args.model:
        engine = TransformersEngine(args.model, options)
        what = f"{args.model} (real weights)"
    else:
        if args.dtype == "auto":
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        else:
            dtype = getattr(torch, args.dtype)
        net, processor = random_granite(args.tiny, args.device, dtype)
        engine = TransformersEngine.from_model("granite-4.0-1b-speech (random)", net, processor, options)
        what = f"granite-4.0-1b-speech {'tiny' if args.tiny else 'real size'}, random weights"
    params = sum(p.numel() for p in engine.net.parameters())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{what}: {params / 1e9:.3f} B parameters, {engine.dtype}, {device_name}; "
          f"ready in {time.perf_counter() - started:.1f} s", flush=True)

    rows = []
    for batch in sizes:
        n = batch * args.batches
        clips = wav_clips(args.wav, n) if args.wav else synthetic_clips(n, min_s, max_s, seed=batch)
        clips.sort(key=len, reverse=True)  # the pipeline sends its batches longest first
        requests = [EngineRequest(id=f"b{batch}-{i}", samples=c, language="en") for i, c in enumerate(clips)]
        engine.speculative, engine.draft_fn = "off", None
        engine.transcribe(requests[: min(batch, 8)])  # warm-up: kernels, allocator
        forced: dict[str, list[int]] = {}
        for mode in modes:
            row = run_mode(engine, mode, requests, batch, forced, torch)
            rows.append(row)
            print(format_table([row]).splitlines()[1] if len(rows) > 1 else format_table([row]), flush=True)
    print()
    print(format_table(rows))
    print(f"total {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": what, "device": device_name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
