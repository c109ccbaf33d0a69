"""Offline diarization: Resemblyzer's speaker encoder on sliding windows, clustered.

Resemblyzer (Apache-2.0) ships its speaker encoder's weights inside its wheel (17 MB), so this
backend installs and runs with no model hub. Steps, on the whole recording:

1. each VAD speech region is brought to Resemblyzer's training loudness (-30 dBFS) on its own, so
   a quiet speaker and a loud one are compared by voice, not level;
2. 40-band mel frames (10 ms) of the recording; windows of ``window_s`` (1.6 s: the encoder's own
   partial length) every ``hop_s`` that are at least half speech get a 256-d embedding;
3. agglomerative clustering (cosine distance, average linkage) cut at ``threshold``, then held
   within ``[min_speakers, max_speakers]``; two passes of re-assignment to the nearest centroid;
4. every speech frame takes the label of the nearest window centre, so a speaker change inside a
   VAD region is found at the window resolution (``hop_s``), not assumed away; runs shorter than
   ``min_turn_s`` go to their neighbours; labels are renamed in order of first speech.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import DiarizeConfig
from ..records import SAMPLE_RATE_HZ
from .turns import SpeakerRegion

FRAME_S = 0.01  # Resemblyzer's mel hop (hparams.mel_window_step)
_BATCH = 64  # windows per encoder call
N_FFT, HOP, N_MELS, HIDDEN, LAYERS = 400, 160, 40, 256, 3  # Resemblyzer's hparams (25 ms window, 10 ms hop)


def weights_path() -> Path:
    """Resemblyzer's speaker encoder weights (``pretrained.pt`` inside its wheel), found without
    importing the package: its ``__init__`` imports librosa and so numba / llvmlite, and with
    llvmlite loaded vLLM 0.32's CPU engine fails to start in the same process (its kernel scan
    trips over llvmlite's objects), which a Ray worker reused for an engine actor, or a test
    session, would be."""
    spec = importlib.util.find_spec("resemblyzer")
    path = Path(spec.submodule_search_locations[0]) / "pretrained.pt" if spec else None
    if path is None or not path.is_file():
        from . import DiarizerUnavailable

        raise DiarizerUnavailable("diarize.model 'resemblyzer' needs the resemblyzer package (its weights): install "
                                  "the callcenter extra (pip install '.[callcenter]')")
    return path


def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), f)


def mel_filters(sr: int = SAMPLE_RATE_HZ, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) Slaney-style mel filterbank, as librosa.filters.mel builds it by default."""
    fft_hz = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return weights * (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]


_FILTERS = mel_filters()
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann, as librosa's


def mel_frames(wav: np.ndarray) -> np.ndarray:
    """(frames, 40) power mel spectrogram, as ``resemblyzer.audio.wav_to_mel_spectrogram`` computes
    it with librosa (centred frames, zero padding, power 2), in numpy."""
    padded = np.pad(wav.astype(np.float32), N_FFT // 2)
    n = 1 + (len(padded) - N_FFT) // HOP
    out = np.empty((n, N_MELS), np.float32)
    for a in range(0, n, 4096):  # bounded memory for long recordings
        idx = np.arange(a, min(n, a + 4096))[:, None] * HOP + np.arange(N_FFT)[None, :]
        power = np.abs(np.fft.rfft(padded[idx] * _WINDOW, axis=1)) ** 2
        out[a:a + len(idx)] = power @ _FILTERS.T
    return out


def _unavailable(what: str, e: Exception):
    from . import DiarizerUnavailable

    return DiarizerUnavailable(f"diarize.model 'resemblyzer' needs {what}: install the callcenter extra "
                               f"(pip install '.[callcenter]'): {e}")


class ResemblyzerDiarizer:
    name = "resemblyzer"

    def __init__(self, cfg: DiarizeConfig):
        try:
            import torch
            from sklearn.cluster import AgglomerativeClustering  # noqa: F401 - checked here, used per call
        except ImportError as e:
            raise _unavailable("torch and scikit-learn", e) from e
        self.cfg = cfg
        self._torch = torch
        # One thread: this runs in decode actors that may reserve a fraction of a CPU; more threads only
        # fight each other there (measured: 12x slower with 2 threads on a busy 2-core machine).
        torch.set_num_threads(1)
        self._mel = mel_frames
        self._encoder = speaker_encoder(torch, weights_path())

    # --- steps -----------------------------------------------------------------------------

    @staticmethod
    def _levelled(samples: np.ndarray, speech: Sequence[tuple[int, int]]) -> np.ndarray:
        out = np.zeros_like(samples, dtype=np.float32)
        for a, b in speech:
            piece = samples[a:b].astype(np.float32)
            rms = float(np.sqrt(np.mean(piece ** 2))) if b > a else 0.0
            if rms > 1e-5:
                out[a:b] = np.clip(piece * (10 ** (-30 / 20) / rms), -1.0, 1.0)
        return out

    def _embed(self, mel: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for k in range(0, len(starts), _BATCH):
                batch = np.stack([mel[s:s + width] for s in starts[k:k + _BATCH]])
                out.append(self._encoder(torch.from_numpy(batch)).numpy())
        return np.concatenate(out) if out else np.zeros((0, 256), np.float32)

    def _cluster(self, emb: np.ndarray) -> np.ndarray:
        from sklearn.cluster import AgglomerativeClustering

        cfg = self.cfg
        n = len(emb)
        if n < 2 or cfg.max_speakers == 1:
            return np.zeros(n, int)
        labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=cfg.threshold).fit_predict(emb)
        k = len(set(labels))
        want = min(max(k, cfg.min_speakers), cfg.max_speakers, n)
        if want != k:
            labels = AgglomerativeClustering(n_clusters=want, metric="cosine", linkage="average").fit_predict(emb)
        for _ in range(2):  # refine: each window to its nearest centroid
            ids = sorted(set(labels))
            centroids = np.stack([emb[labels == i].mean(0) for i in ids])
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-9
            labels = np.asarray(ids)[np.argmax(emb @ centroids.T, axis=1)]
        return labels

    def _smoothed(self, labels: np.ndarray, speech: np.ndarray) -> np.ndarray:
        """Runs of one label shorter than min_turn_s (inside speech) take their neighbour's label."""
        shortest = int(round(self.cfg.min_turn_s / FRAME_S))
        if shortest <= 1:
            return labels
        labels = labels.copy()
        for _ in range(3):
            idx = np.flatnonzero(speech)
            if not len(idx):
                break
            seq = labels[idx]
            cuts = np.flatnonzero(np.diff(seq)) + 1
            bounds = np.concatenate([[0], cuts, [len(seq)]])
            changed = False
            for i in range(len(bounds) - 1):
                a, b = bounds[i], bounds[i + 1]
                if b - a < shortest and len(bounds) > 2:
                    left = seq[a - 1] if a > 0 else None
                    right = seq[b] if b < len(seq) else None
                    left_len = a - bounds[i - 1] if i > 0 else -1
                    right_len = bounds[i + 2] - b if i + 2 < len(bounds) else -1
                    seq[a:b] = left if (left is not None and left_len >= right_len) else right
                    changed = True
            labels[idx] = seq
            if not changed:
                break
        return labels

    # --- the interface ----------------------------------------------------------------------

    def diarize(self, samples: np.ndarray, speech: Sequence[tuple[int, int]]) -> list[SpeakerRegion]:
        cfg = self.cfg
        speech = [(a, b) for a, b in speech if b > a]
        if not speech:
            return []
        mel = self._mel(self._levelled(samples, speech))  # (frames, 40)
        n_frames = len(mel)
        is_speech = np.zeros(n_frames, bool)
        per_frame = SAMPLE_RATE_HZ * FRAME_S
        for a, b in speech:
            is_speech[int(a // per_frame):int(np.ceil(b / per_frame))] = True
        width = int(round(cfg.window_s / FRAME_S))
        hop = max(1, int(round(cfg.hop_s / FRAME_S)))
        if n_frames < width:  # shorter than one window: pad with silence to one
            mel = np.concatenate([mel, np.zeros((width - n_frames, mel.shape[1]), mel.dtype)])
        starts = np.arange(0, max(1, len(mel) - width + 1), hop)
        cover = np.array([is_speech[s:s + width].mean() for s in starts]) if len(starts) else np.zeros(0)
        keep = starts[cover >= 0.5]
        if not len(keep):  # scattered speech: take the windows with the most of it
            keep = starts[np.argsort(-cover)[: max(1, len(starts) // 4)]]
            keep.sort()
        emb = self._embed(mel, keep, width)
        labels = self._cluster(emb)
        centres = keep + width / 2
        frames = np.arange(n_frames)
        nearest = np.clip(np.searchsorted(centres, frames), 1, max(1, len(centres) - 1))
        if len(centres) > 1:
            left_closer = (frames - centres[nearest - 1]) < (centres[nearest] - frames)
            nearest = np.where(left_closer, nearest - 1, nearest)
        else:
            nearest = np.zeros(n_frames, int)
        frame_labels = np.where(is_speech, labels[nearest], -1)
        frame_labels = self._smoothed(frame_labels, is_speech)
        return _regions(frame_labels)


def speaker_encoder(torch, weights: Path):
    """Resemblyzer's ``VoiceEncoder`` network (3-layer LSTM over 40 mel bands, linear + ReLU,
    L2-normalised 256-d output) with its weights."""
    nn = torch.nn

    class SpeakerEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            raw = torch.relu(self.linear(hidden[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    model = SpeakerEncoder()
    state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
    model.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("lstm", "linear")})
    return model.eval()


def _regions(frame_labels: np.ndarray) -> list[SpeakerRegion]:
    """Runs of one label (>= 0) as regions, labels renamed spk0, spk1, ... in order of first speech."""
    names: dict[int, str] = {}
    out = []
    n = len(frame_labels)
    cuts = np.flatnonzero(np.diff(frame_labels)) + 1
    bounds = np.concatenate([[0], cuts, [n]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        label = int(frame_labels[a])
        if label < 0:
            continue
        name = names.setdefault(label, f"spk{len(names)}")
        out.append(SpeakerRegion(name, round(float(a) * FRAME_S, 3), round(float(b) * FRAME_S, 3)))
    return out
