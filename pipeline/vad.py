"""Silero VAD: the voice-activity model that decides where long recordings are cut.

The ONNX model is the one faster-whisper ships in its assets (so it installs offline with the
``whisper`` extra), loaded once per process. It runs block by block with the LSTM state carried
over, so beyond the caller's array it needs one block of ONNX work and 4 bytes per 32 ms frame
(measured: +2 to +13 MiB peak RSS for a 1-hour recording, against ~670 MiB for faster-whisper's
``get_speech_timestamps``, which pads and re-batches the whole array).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

VAD_FRAME = 512  # Silero's frame at 16 kHz (32 ms): one speech probability per frame
_VAD_CONTEXT = 64  # samples of the previous frame that the v5/v6 model sees before each frame
# Frames per ONNX call (~16 s). Any size gives the same probabilities; ONNX activations grow with
# it (1024 frames: +25 MiB peak) and smaller ones run slower.
_VAD_BLOCK_FRAMES = 512
_SILERO_ASSET = "silero_vad_v6.onnx"


class VadUnavailable(RuntimeError):
    """Silero VAD cannot run here (no onnxruntime or no faster-whisper model file)."""


@functools.lru_cache(maxsize=1)
def _silero_session():
    """The Silero ONNX session, loaded once per process (a Ray worker loads it on first use)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise VadUnavailable("VAD segmentation needs onnxruntime: install the whisper extra (faster-whisper, onnxruntime), or set segment.vad: false") from e
    # find_spec locates the package without importing it (importing faster_whisper loads CTranslate2).
    spec = importlib.util.find_spec("faster_whisper")
    path = os.path.join(spec.submodule_search_locations[0], "assets", _SILERO_ASSET) if spec else ""
    if not os.path.isfile(path):
        raise VadUnavailable(f"Silero VAD model {_SILERO_ASSET} not found: install the whisper extra (faster-whisper ships it)")
    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1  # one CPU per Ray task; the model is too small to gain from more
    opts.intra_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


def speech_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32 ms frame (``ceil(len / 512)`` float32 values).

    The audio goes through the model ``_VAD_BLOCK_FRAMES`` frames at a time, carrying the LSTM
    state and the 64-sample context across blocks, which gives the same probabilities as one call
    over the whole array. Extra memory: one block plus 4 bytes per frame. Integer samples are
    not scaled: pass float audio in [-1, 1].
    """
    session = _silero_session()
    n_frames = -(-len(samples) // VAD_FRAME)
    probs = np.empty(n_frames, np.float32)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    context = np.zeros(_VAD_CONTEXT, np.float32)
    block = np.empty((_VAD_BLOCK_FRAMES, _VAD_CONTEXT + VAD_FRAME), np.float32)
    for first in range(0, n_frames, _VAD_BLOCK_FRAMES):
        chunk = samples[first * VAD_FRAME : (first + _VAD_BLOCK_FRAMES) * VAD_FRAME]
        full, rest = divmod(len(chunk), VAD_FRAME)
        k = full + (rest > 0)
        frames = block[:k, _VAD_CONTEXT:]
        frames[:full] = chunk[: full * VAD_FRAME].reshape(full, VAD_FRAME)  # casts in place, no temporary
        if rest:
            frames[full, :rest] = chunk[full * VAD_FRAME :]
            frames[full, rest:] = 0.0  # the last frame is zero-padded
        block[0, :_VAD_CONTEXT] = context
        block[1:k, :_VAD_CONTEXT] = frames[: k - 1, -_VAD_CONTEXT:]
        context = frames[k - 1, -_VAD_CONTEXT:].copy()
        out, h, c = session.run(None, {"input": block[:k], "h": h, "c": c})
        probs[first : first + k] = out.reshape(-1)
    return probs
