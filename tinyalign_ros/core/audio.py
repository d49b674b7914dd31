"""Audio in: files and chunks turned into 16 kHz mono float32, or a clear error.

Every node boundary goes through `normalize`, so bad audio (NaN, Inf, wrong rate, stereo,
integers, clipping) is handled in one place with one set of rules:
- non-finite or empty audio is refused (AudioError): there is no honest way to repair it;
- integer PCM is scaled to [-1, 1], multi-channel audio is averaged to mono;
- another sample rate is resampled with soxr (a well-kept, high-quality resampler);
- samples beyond [-1, 1] are clipped, and reported so the caller can warn once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """Audio that cannot be used; the message says why and what was expected."""


def find_device(device: str, kind: str) -> int | None:
    """A sounddevice index of an `kind` ("input" or "output") device, from a name fragment or an
    index; "" = the system default (None) when there is such a device at all. An AudioError lists
    the devices of that kind that exist (mic_node's microphone, tts_node's speaker)."""
    import sounddevice as sd  # imported lazily: a file-source or publish-only robot needs no PortAudio

    if kind not in ("input", "output"):
        raise ValueError(f"kind is 'input' or 'output', not {kind!r}")
    devices = [(i, d) for i, d in enumerate(sd.query_devices()) if d[f"max_{kind}_channels"] > 0]
    listing = "; ".join(f"{i}: {d['name']}" for i, d in devices) or "none"
    if not device.strip():
        if devices:
            return None
    elif device.strip().lstrip("-").isdigit():
        index = int(device)
        if any(i == index for i, _ in devices):
            return index
    else:
        matches = [i for i, d in devices if device.lower() in d["name"].lower()]
        if matches:
            return matches[0]
    raise AudioError(f"no {kind} audio device '{device}'; available {kind} devices: {listing}")


@dataclass(frozen=True)
class Normalized:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    clipped: int         # number of samples that were clipped to [-1, 1]
    resampled_from: int | None


def _to_float_mono(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        scale = float(max(abs(info.min), info.max))
        offset = (info.max + 1) / 2 if data.dtype.kind == "u" else 0.0
        data = (data.astype(np.float64) - offset) / scale
    elif data.dtype.kind != "f":
        raise AudioError(f"audio must be numeric PCM, got dtype {data.dtype}")
    if data.ndim == 2:  # (frames, channels), the layout of soundfile and sounddevice
        data = data.mean(axis=1)
    elif data.ndim != 1:
        raise AudioError(f"audio must be 1-D (mono) or 2-D (frames, channels), got shape {data.shape}")
    return data.astype(np.float32, copy=False)


def normalize(data: np.ndarray, sample_rate: int) -> Normalized:
    """Make `data` graph audio (16 kHz mono float32 in [-1, 1]) or raise AudioError."""
    if sample_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {sample_rate}")
    samples = _to_float_mono(data)
    if samples.size == 0:
        raise AudioError("empty audio")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"audio contains {bad} NaN/Inf samples of {samples.size}")
    resampled_from = None
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE).astype(np.float32, copy=False)
        resampled_from = sample_rate
    clipped = int((np.abs(samples) > 1.0).sum())
    if clipped:
        samples = np.clip(samples, -1.0, 1.0)
    return Normalized(samples, clipped, resampled_from)


def load_audio(path: str | Path, max_duration_s: float = 3600.0) -> np.ndarray:
    """Read a WAV/FLAC/OGG file of any rate and channel count as graph audio.

    The length check happens before decoding so an hours-long file is refused cheaply.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as exc:
        raise AudioError(f"cannot read audio file {path}: {exc}") from exc
    if info.frames / info.samplerate > max_duration_s:
        raise AudioError(
            f"{path} lasts {info.frames / info.samplerate:.0f} s, more than the {max_duration_s:.0f} s allowed"
        )
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return normalize(data, rate).samples


def chunks(samples: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Fixed-size chunks; the last one is zero-padded so every chunk has the same length."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n = -(-samples.size // chunk_size)
    padded = np.zeros(n * chunk_size, dtype=np.float32)
    padded[: samples.size] = samples
    return list(padded.reshape(n, chunk_size))


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    sf.write(str(path), samples, sample_rate, subtype="PCM_16")
