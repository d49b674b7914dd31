"""Who is speaking: a speaker embedding, enrollment, and "unsure -> unknown speaker".

Two backends (`speaker_id.backend` in config/assistant.yaml), chosen by `tinyalign bench speaker`
(bench/results/speaker.json, "backends"), which measures both on synthetic voices and on the
real recordings of the machine: the ge2e one wins on both (EER, closed-set accuracy).

- "ge2e" (default): Resemblyzer's GE2E voice encoder, trained on thousands of real speakers
  (core/ge2e.py). Its embeddings need no background; the cosine to the centroid is thresholded.
- "whisper": pooled states of an early layer of the Whisper encoder we already run (below):
  no extra weights, but it learned *what* is said, not who says it.

A wrong adapter hurts far more than none (a severe voice's ASR adapter raised another voice's WER
to 0.7-1.9; docs/design.md §5), so an utterance whose best score is under the threshold is the
unknown speaker and gets the base model. Each backend's threshold is chosen on synthetic voices,
never on the real recordings it is judged on; for ge2e it is conservative on real speech (see
DEFAULT_THRESHOLDS).

The "whisper" embedding: the hidden states of one early encoder layer (layer 1 of tiny.en, before the final
LayerNorm) are pooled over the utterance's frames (mean; the std is computed too and can be
used), z-scored per dimension against a fixed *background* (mean and std of the pooled statistics
of many utterances by many speakers) and L2-normalized. Identification is cosine similarity to
each enrolled speaker's centroid (the normalized average of its N enrollment embeddings) with a
threshold: below it the speaker is unknown and the assistant uses the base projector.

Why this and nothing bigger (`tinyalign bench speaker` measures the choices, see
bench/results/speaker.json): no extra network and no extra weights, because the encoder runs
anyway for ASR and an early layer is both among the best for identity (the top layers are tuned
to *what* is said) and nearly free: every early exit is at or beyond it. Without the background,
every utterance shares one large component (positions, the encoder's biases, a few
high-variance dimensions), so all cosines are ~0.99 and the threshold would have to sit at
0.994 with genuine and unknown speakers 0.005 apart; after z-scoring the same ranking spreads
over 0..1 and the threshold (0.68) has room. Accuracy itself is the same either way (measured). A fixed random projection would only preserve cosines
approximately (Johnson-Lindenstrauss), so it can only add noise. An LDA/PLDA would have to be
trained on many speakers and would learn our synthesizers rather than people; cohort score
normalization (T-norm) and removing the positional embeddings before pooling were tried and
did not help consistently.

Known limit: pooled ASR features still carry *what* was said, so scores vary by sentence, and
voices made by one synthesizer with different pitch or rate are near-twins. The benchmark reports
closed-set accuracy and the unknown-speaker false-accept rate; a wrong accept only means another
person's adapter is used (the personalizer's validation gate keeps adapters from being harmful).

For "whisper" the background is made once per registry from synthesized speech
(`SpeakerEmbedder.background`) and stored with it; embeddings, background and centroids live in
safetensors files written atomically. A registry records its backend: voiceprints of one backend
are never compared with another's.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from .adapters import InvalidSpeakerId, atomic_write_bytes, validate_speaker_id
from .encoder import WhisperEncoder, log_mel, speech_frames

log = logging.getLogger(__name__)

REGISTRY_FORMAT = "tinyalign-speakers/2"
BACKENDS = ("ge2e", "whisper")
DEFAULT_BACKEND = "ge2e"
POOLINGS = ("mean", "mean+std")
# Measured with `tinyalign bench speaker` (bench/results/speaker.json; 23 synthesized voices,
# 3 enrollment + 10 test utterances each): layers 1 and 2 of tiny.en identify best (closed-set
# 83-85% and 80-84% over the pooling/normalization variants; stem 56-67%, layer 4 34-56%); they
# tie within noise (230 test utterances), and layer 1 is cheaper: every early exit is at or
# beyond it. The variants are within noise of each other; mean pooling is the smaller
# embedding. The threshold is the equal-error point on calibration utterances (0.677).
DEFAULT_LAYER = 1
DEFAULT_POOLING = "mean"
DEFAULT_THRESHOLD = 0.68
# Per backend, each the equal-error point on the synthetic voices' calibration half, rounded
# (`tinyalign bench speaker`, bench/results/speaker.json "backends": ge2e 0.825, or 0.821 against
# impostors of other synthesizer models only). For ge2e it is conservative on real speech: the
# real recordings (never used to choose it) score 0.74-0.91 against their own voiceprint and at
# most 0.73 against another's, so at 0.82 a quarter of the real test utterances fell back to the
# base model and none got a wrong or a stranger's adapter; GE2E hears all espeak voices as
# near-twins, which is what pushes the synthetic equal-error point up.
DEFAULT_THRESHOLDS = {"whisper": DEFAULT_THRESHOLD, "ge2e": 0.82}
BACKGROUND_SENTENCES = (
    "Please bring me a glass of water from the kitchen.",
    "What is the weather going to be like tomorrow morning?",
)


class SpeakerRegistryError(ValueError):
    """The speaker registry cannot be used: corrupt file, wrong layer, pooling or dimension."""


def pool(hidden: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over time of (T, d) or (1, T, d) hidden states: (2d,) float32.

    Both are always computed (cheap); `embed` decides which half the embedding uses.
    """
    if hidden.dim() == 3:
        if hidden.shape[0] != 1:
            raise ValueError(f"pool takes one utterance, got a batch of {hidden.shape[0]}")
        hidden = hidden[0]
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        raise ValueError(f"expected hidden states (T, d) with T >= 1, got {tuple(hidden.shape)}")
    hidden = hidden.float()
    return torch.cat([hidden.mean(dim=0), hidden.std(dim=0, unbiased=False)])


@dataclass(frozen=True)
class Background:
    """Per-dimension mean and std of pooled statistics over many utterances of many speakers."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_stats(cls, stats: Sequence[torch.Tensor]) -> "Background":
        if len(stats) < 2:
            raise ValueError("a background needs the statistics of at least 2 utterances")
        x = torch.stack([s.float().flatten() for s in stats])
        return cls(x.mean(0), x.std(0))


def embed(stats: torch.Tensor, background: Background | None = None, pooling: str = DEFAULT_POOLING) -> torch.Tensor:
    """Pooled statistics (..., 2d) -> unit-length embedding.

    With a background: z-scored per dimension (so a few high-variance dimensions, which Whisper
    has, do not dominate the cosine, and the component all utterances share is removed).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    x = stats.float()
    if background is not None:
        x = (x - background.mean) / (background.std + 1e-3)
    if pooling == "mean":
        x = x[..., : x.shape[-1] // 2]
    return F.normalize(x, dim=-1)


class SpeakerEmbedder:
    """Pooled statistics of 16 kHz audio, or of hidden states the ASR path has already computed."""

    backend = "whisper"

    def __init__(self, encoder: WhisperEncoder, layer: int = DEFAULT_LAYER) -> None:
        if not 0 <= layer <= encoder.n_layers:
            raise ValueError(f"speaker layer must be in 0..{encoder.n_layers}, got {layer}")
        self.encoder, self.layer = encoder, layer

    def stats(self, samples_16k: np.ndarray) -> torch.Tensor:
        """Pooled statistics of one utterance; runs the encoder only up to `layer` (unpadded mel)."""
        samples = np.asarray(samples_16k, dtype=np.float32)
        mel = log_mel(samples, pad_to_30s=False)
        frames = speech_frames(samples.size)
        with torch.inference_mode():
            for i, hidden in enumerate(self.encoder.layers(mel)):
                if i == self.layer:
                    return pool(hidden[0, :frames])
        raise AssertionError("unreachable: layer checked in __init__")

    def stats_from_hidden_states(self, hidden_states: Sequence[torch.Tensor], frames: int | None = None) -> torch.Tensor:
        """Pooled statistics from an EncoderOutput's hidden_states (index 0 = stem, k = block k)."""
        if len(hidden_states) <= self.layer:
            raise ValueError(f"the encoder stopped at layer {len(hidden_states) - 1}, "
                             f"the speaker embedding needs layer {self.layer}")
        hidden = hidden_states[self.layer]
        hidden = hidden[0] if hidden.dim() == 3 else hidden
        return pool(hidden[:frames] if frames else hidden)

    def background(self, voices: Sequence | None = None,
                   sentences: Sequence[str] = BACKGROUND_SENTENCES) -> Background:
        """A background from synthesized speech (corpus voices; default_voices(seed=1) when None).

        Done once when a registry is created (about a second per clip on a small CPU); the
        voices are synthetic, but the background only has to say which dimensions vary between
        utterances, not who the operators are.
        """
        from .corpus import default_voices, synthesize

        voices = default_voices(seed=1) if voices is None else voices
        return Background.from_stats([self.stats(synthesize(t, v)) for v in voices for t in sentences])


class Ge2eEmbedder:
    """The "ge2e" backend: `stats` is the unit-length GE2E embedding (256,) of an utterance."""

    backend = "ge2e"
    layer = None

    def __init__(self, weights: str | Path | None = None) -> None:
        from .ge2e import VoiceEncoder, VoiceEncoderError

        try:
            self.encoder = VoiceEncoder(weights)
        except VoiceEncoderError as exc:
            raise SpeakerRegistryError(str(exc)) from exc

    def stats(self, samples_16k: np.ndarray) -> torch.Tensor:
        return self.encoder(samples_16k)


def make_embedder(backend: str, encoder: WhisperEncoder | None = None) -> "SpeakerEmbedder | Ge2eEmbedder":
    """The embedder of a backend ("whisper" needs the Whisper encoder the ASR runs)."""
    if backend == "ge2e":
        return Ge2eEmbedder()
    if backend == "whisper":
        if encoder is None:
            raise ValueError("the 'whisper' speaker backend needs the Whisper encoder (encoder.enabled)")
        return SpeakerEmbedder(encoder)
    raise ValueError(f"speaker backend must be one of {BACKENDS}, got {backend!r}")


@dataclass(frozen=True)
class Identification:
    speaker: str | None  # None: nobody enrolled is close enough (use the base projector)
    score: float  # cosine similarity to the closest enrolled speaker (-1 when none is enrolled)
    closest: str | None  # the closest enrolled speaker, even when refused


def registry_backend(root: str | Path) -> str | None:
    """The backend of the registry in `root` (None: no registry there yet). Registries from before
    backends existed are "whisper" ones; an unreadable header is SpeakerRegistryError."""
    header = Path(root) / SpeakerRegistry.HEADER
    if not header.is_file():
        return None
    return SpeakerRegistry.read(header)[1].get("backend", "whisper")


class SpeakerRegistry:
    """Enrolled speakers, one safetensors file each (`<speaker>.safetensors`), written atomically.

    A speaker file holds the centroid (the normalized mean of the enrollment embeddings) and the
    enrollment count; `_registry.safetensors` holds the backend all centroids were computed with
    and, for "whisper", the background, layer and pooling (a leading underscore is never a valid
    speaker id). Opening a registry with another backend, layer or pooling is refused rather than
    comparing unlike embeddings. `threshold` None: the backend's default.
    """

    HEADER = "_registry.safetensors"

    def __init__(self, root: str | Path, *, backend: str = "whisper", layer: int = DEFAULT_LAYER,
                 pooling: str = DEFAULT_POOLING, threshold: float | None = None,
                 background: Background | None = None) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if backend not in BACKENDS:
            raise ValueError(f"speaker backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "whisper" and background is not None:
            raise ValueError(f"the {backend!r} speaker backend takes no background")
        self.root, self.backend = Path(root), backend
        self.layer, self.pooling = int(layer), pooling
        self.threshold = float(DEFAULT_THRESHOLDS[backend] if threshold is None else threshold)
        self.background: Background | None = None
        self._centroids: dict[str, torch.Tensor] = {}
        header = self.root / self.HEADER
        if header.is_file():
            tensors, meta = self.read(header)
            if meta.get("backend", "whisper") != backend:  # registries before backends were whisper ones
                raise SpeakerRegistryError(
                    f"{self.root} holds voiceprints of the {meta.get('backend', 'whisper')!r} speaker backend, not "
                    f"{backend!r}: set speaker_id.backend to it, or use another folder (and enroll again)")
            if backend == "whisper":
                self.background = self._stored_background(header, tensors, meta, background)
        elif backend == "whisper" and background is None:
            raise SpeakerRegistryError(
                f"{self.root} is a new speaker registry and needs a background "
                "(SpeakerEmbedder.background(), or open_registry() which makes one)")
        else:
            self.background = background
            self.root.mkdir(parents=True, exist_ok=True)
            self._write(header, {"mean": background.mean, "std": background.std} if background else {})
        for path in sorted(self.root.glob("*.safetensors")):
            if path.name == self.HEADER:
                continue
            speaker = path.name[: -len(".safetensors")]
            try:
                validate_speaker_id(speaker)
            except InvalidSpeakerId:
                log.warning("ignoring %s: not a speaker file (invalid speaker id)", path)
                continue
            self._centroids[speaker] = self.read(path)[0]["embedding"]

    # ---------------------------------------------------------------- files

    def _stored_background(self, header: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                           background: Background | None) -> Background:
        if (int(meta.get("layer", -1)), meta.get("pooling")) != (self.layer, self.pooling):
            raise SpeakerRegistryError(
                f"{self.root} was made with layer {meta.get('layer')} / {meta.get('pooling')} pooling, "
                f"not layer {self.layer} / {self.pooling}: use those settings or a new folder")
        if "mean" not in tensors or "std" not in tensors:
            raise SpeakerRegistryError(f"{header} lacks the background")
        stored = Background(tensors["mean"], tensors["std"])
        if background is not None and not torch.equal(stored.mean, background.mean.float()):
            raise SpeakerRegistryError(f"{self.root} already has a different background")
        return stored

    def _path(self, speaker: str) -> Path:
        return self.root / f"{validate_speaker_id(speaker)}.safetensors"

    @classmethod
    def read(cls, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) of one registry file, checked (SpeakerRegistryError if it is not one)."""
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise SpeakerRegistryError(f"{path} is not a valid speaker-registry file: {exc}") from exc
        if meta.get("format") != REGISTRY_FORMAT:
            raise SpeakerRegistryError(f"{path}: format {meta.get('format')!r}, expected {REGISTRY_FORMAT!r}")
        if path.name != cls.HEADER and "embedding" not in tensors:
            raise SpeakerRegistryError(f"{path} has no embedding")
        return tensors, meta

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], **meta: object) -> None:
        shape = {"layer": str(self.layer), "pooling": self.pooling} if self.backend == "whisper" else {}
        metadata = {"format": REGISTRY_FORMAT, "backend": self.backend, **shape,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    **{k: json.dumps(v) for k, v in meta.items()}}
        data = save_safetensors({k: v.float().contiguous() for k, v in tensors.items()}, metadata=metadata)
        atomic_write_bytes(path, data)

    # ---------------------------------------------------------------- use

    def embed(self, stats: torch.Tensor) -> torch.Tensor:
        """The embedder's output -> the normalized embedding this registry compares."""
        if self.backend != "whisper":
            return F.normalize(stats.flatten().float(), dim=-1)
        return embed(stats.flatten(), self.background, self.pooling)

    def enroll(self, speaker: str, stats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Enroll (or re-enroll) `speaker` from the pooled statistics of N utterances."""
        path = self._path(speaker)
        if not stats:
            raise ValueError(f"enrolling {speaker!r} needs at least one utterance")
        centroid = F.normalize(torch.stack([self.embed(s) for s in stats]).mean(0), dim=-1)
        if self._centroids and centroid.numel() != next(iter(self._centroids.values())).numel():
            raise SpeakerRegistryError(f"embedding of {centroid.numel()} dimensions does not match the registry's")
        self._write(path, {"embedding": centroid}, count=len(stats))
        self._centroids[speaker] = centroid
        return centroid

    def remove(self, speaker: str) -> bool:
        path = self._path(speaker)
        self._centroids.pop(speaker, None)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def speakers(self) -> list[str]:
        return sorted(self._centroids)

    def scores(self, stats: torch.Tensor) -> dict[str, float]:
        """Cosine similarity of one utterance to every enrolled speaker."""
        if not self._centroids:
            return {}
        names = sorted(self._centroids)
        matrix = torch.stack([self._centroids[n] for n in names])
        e = self.embed(stats)
        if e.numel() != matrix.shape[1]:
            raise SpeakerRegistryError(f"embedding has {e.numel()} dimensions, the registry {matrix.shape[1]}")
        return dict(zip(names, (matrix @ e).tolist()))

    def identify(self, stats: torch.Tensor) -> Identification:
        """The enrolled speaker closest to the utterance, if at least `threshold` similar."""
        scores = self.scores(stats)
        if not scores:
            return Identification(None, -1.0, None)
        closest = max(scores, key=scores.__getitem__)
        score = scores[closest]
        return Identification(closest if score >= self.threshold else None, score, closest)


def open_registry(root: str | Path, embedder: SpeakerEmbedder, threshold: float = DEFAULT_THRESHOLD,
                  pooling: str = DEFAULT_POOLING) -> SpeakerRegistry:
    """The registry in `root`, creating it (with the default synthesized background) if new."""
    root = Path(root)
    background = None if (root / SpeakerRegistry.HEADER).is_file() else embedder.background()
    return SpeakerRegistry(root, layer=embedder.layer, pooling=pooling, threshold=threshold, background=background)


@dataclass(frozen=True)
class SpeakerDecision:
    speaker: str | None  # enrolled speaker the utterance is attributed to; None = unknown
    score: float  # cosine to the closest enrolled speaker (-1: nobody enrolled; 1: an enrollment utterance)
    how: str  # "enrollment" (the speaker was asked to speak), "identified", "unknown"


class SpeakerIdentifier:
    """asr_node's speaker recognition: attribute each utterance to an enrolled speaker, or enroll.

    Enrollment is prompted: `request_enrollment(speaker)` says the next utterance is that
    speaker's (the robot asked them to read a sentence), so it is attributed to them without
    scoring and its statistics are added to their centroid, which is re-enrolled at once from
    every utterance this session collected (a new enrollment session replaces an older
    voiceprint: people's voices and microphones change). A request expires after `enroll_timeout_s` so a
    prompt nobody answered cannot take a later stranger's utterance.

    The registry is opened only when a folder already holds one, or at the first enrollment (a
    new "whisper" registry synthesizes its background once, about a minute on a small CPU, in the
    caller's worker thread): a robot that never enrolls anybody pays nothing. `threshold` None:
    the embedder's backend's default; below it the utterance is the unknown speaker's.
    """

    def __init__(self, root: str | Path, embedder: SpeakerEmbedder | Ge2eEmbedder, threshold: float | None = None,
                 enroll_timeout_s: float = 60.0, background: Background | None = None) -> None:
        self.root, self.embedder = Path(root), embedder
        self.threshold = float(DEFAULT_THRESHOLDS[embedder.backend] if threshold is None else threshold)
        self.enroll_timeout_s = float(enroll_timeout_s)
        self._background = background
        self._pending: tuple[str, float] | None = None  # (speaker, deadline on time.monotonic())
        self._collected: dict[str, list[torch.Tensor]] = {}
        self.registry: SpeakerRegistry | None = None
        if (self.root / SpeakerRegistry.HEADER).is_file():
            self.registry = self._registry()

    def _registry(self, background: Background | None = None) -> SpeakerRegistry:
        return SpeakerRegistry(self.root, backend=self.embedder.backend, layer=self.embedder.layer or DEFAULT_LAYER,
                               threshold=self.threshold, background=background)

    @property
    def speakers(self) -> list[str]:
        return self.registry.speakers() if self.registry else []

    @property
    def pending(self) -> str | None:
        if self._pending and time.monotonic() > self._pending[1]:
            self._pending = None
        return self._pending[0] if self._pending else None

    def request_enrollment(self, speaker: str) -> None:
        """The next utterance (within the timeout) is `speaker`'s; raises InvalidSpeakerId."""
        self._pending = (validate_speaker_id(speaker), time.monotonic() + self.enroll_timeout_s)

    def forget(self, speaker: str) -> bool:
        self._collected.pop(speaker, None)
        if self.pending == speaker:
            self._pending = None
        return bool(self.registry and self.registry.remove(speaker))

    def observe(self, samples_16k: np.ndarray) -> SpeakerDecision:
        """Who said this utterance: a pending enrollment's speaker, the closest enrolled one, or nobody."""
        speaker = self.pending
        if speaker is None and not self.speakers:
            return SpeakerDecision(None, -1.0, "unknown")  # nothing to compare with: skip the encoder pass
        stats = self.embedder.stats(samples_16k)
        if speaker is not None:
            self._pending = None
            if self.registry is None and self.embedder.backend != "whisper":
                self.registry = self._registry()
            elif self.registry is None:
                if self._background is None:
                    log.warning("first enrollment: making the voiceprint background in %s from synthesized "
                                "speech (once, about a minute; utterances wait meanwhile)", self.root)
                self.registry = self._registry(self._background or self.embedder.background())
            self._collected.setdefault(speaker, []).append(stats)
            self.registry.enroll(speaker, self._collected[speaker])
            return SpeakerDecision(speaker, 1.0, "enrollment")
        found = self.registry.identify(stats)
        return SpeakerDecision(found.speaker, found.score, "identified" if found.speaker else "unknown")
