"""Consented, bounded, deletable per-speaker training samples for personalization.

A sample is what the personalizer trains the speaker's adapter on: the encoder features of one
utterance (float16, as the ASR path produced them), its audio (16 kHz int16 PCM, optional: the
ASR adapters of core/asr_adapt.py train on it; samples stored before this field have none), the
text it is labelled with, where that label came from, and how sure we are of it:

- "enrollment": the robot asked the speaker to read a sentence; the sentence is the label.
- "correction": the operator corrected a transcript; the corrected text is the label.
- "teacher":    a stronger model's transcript; kept only at or above `teacher_min_confidence`.

Each sample may also carry `asr_transcript`, what the cascade ASR heard: a hybrid-prompt projector
(align.AlignPrompt(transcript=True)) reads it next to the audio tokens, so it must be trained with
it. Sample files written before this field existed read back with an empty one.

Rules the store enforces (never the caller):
- Consent first: nothing is stored for a speaker without `grant_consent(speaker)`; `revoke`
  deletes the consent record and every sample; `forget` deletes the samples only.
- Bounded: at most `max_samples` per speaker (the oldest are evicted) and none older than
  `max_age_s` (pruned on every write and listing).
- Atomic: every file is written through a temp file + fsync + rename (adapters.atomic_write_bytes).
- A correction or enrollment label replaces an earlier label of the same `utterance_id`; a
  teacher label never overrides a human one.
- `split` puts each sample in train or held-out by a hash of (speaker, sample id): the same
  sample stays on the same side as the store grows, so a validation sample never leaks into a
  later training round.

Layout: `<root>/<speaker>/consent.json` and `<root>/<speaker>/<sample id>.safetensors`, where
the sample id starts with the zero-padded creation time, so names sort oldest first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from .adapters import _fsync_dir, atomic_write_bytes, validate_speaker_id
from .audio import SAMPLE_RATE
from .models import data_home

log = logging.getLogger(__name__)

SAMPLE_FORMAT = "tinyalign-sample/1"
SOURCES = ("enrollment", "correction", "teacher")
HUMAN_SOURCES = ("enrollment", "correction")
CONSENT_FILE = "consent.json"
_FP16_MAX = 65504.0
# What 30 s of speech can say, with room to spare (the same bound as llm.MAX_USER_CHARS): a longer
# label or transcript is malformed input, and would make every training round of its speaker fail.
MAX_TEXT_CHARS = 2000
MAX_AUDIO_S = 30.0  # Whisper's window: a longer utterance is cut by the VAD before it gets here


class ConsentError(PermissionError):
    """The speaker has not consented to having samples stored."""


class SampleStoreError(RuntimeError):
    """A sample cannot be stored or read (unknown id, corrupt file)."""


@dataclass(frozen=True)
class SampleInfo:
    id: str
    speaker: str
    text: str
    source: str
    confidence: float
    created: float  # Unix time
    utterance_id: str
    layer: int  # encoder layer of the features (0 = unknown)
    frames: int
    # What the cascade ASR heard (the hybrid prompt's text input); "" for samples stored before
    # this field existed or when no transcript was available.
    asr_transcript: str = ""
    audio_s: float = 0.0  # seconds of stored audio (0 = features only)


@dataclass(frozen=True)
class Sample:
    features: torch.Tensor  # (frames, d) float16
    info: SampleInfo
    audio: np.ndarray | None = None  # 16 kHz mono float32 in [-1, 1], when stored


class SampleStore:
    def __init__(self, root: str | Path | None = None, *, max_samples: int = 500,
                 max_age_s: float = 90 * 86400.0, teacher_min_confidence: float = 0.9,
                 clock: Callable[[], float] = time.time) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        if not 0.0 <= teacher_min_confidence <= 1.0:
            raise ValueError(f"teacher_min_confidence must be in [0, 1], got {teacher_min_confidence}")
        self.root = Path(root) if root is not None else data_home() / "samples"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_age_s = int(max_samples), float(max_age_s)
        self.teacher_min_confidence = float(teacher_min_confidence)
        self.clock = clock

    # ---------------------------------------------------------------- consent

    def _dir(self, speaker: str) -> Path:
        return self.root / validate_speaker_id(speaker)

    def grant_consent(self, speaker: str, how: str = "parameter") -> None:
        """Record that `speaker` agreed to have samples kept (`how`: parameter, enrollment, ...)."""
        folder = self._dir(speaker)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"speaker": speaker, "granted": self.clock(), "how": str(how)}
        atomic_write_bytes(folder / CONSENT_FILE, (json.dumps(record) + "\n").encode())

    def has_consent(self, speaker: str) -> bool:
        return (self._dir(speaker) / CONSENT_FILE).is_file()

    def revoke(self, speaker: str) -> bool:
        """Withdraw consent: delete the consent record and every sample. True if anything existed."""
        folder = self._dir(speaker)
        if not folder.exists():
            return False
        # Consent goes first: if we crash half-way, no new sample can be added to the remains.
        (folder / CONSENT_FILE).unlink(missing_ok=True)
        shutil.rmtree(folder)
        _fsync_dir(self.root)
        return True

    def speakers(self) -> list[str]:
        """Speakers with recorded consent."""
        return sorted(p.parent.name for p in self.root.glob(f"*/{CONSENT_FILE}"))

    # ---------------------------------------------------------------- write

    def add(self, speaker: str, features: torch.Tensor | np.ndarray, text: str, source: str,
            confidence: float = 1.0, *, utterance_id: str = "", layer: int = 0,
            created: float | None = None, asr_transcript: str = "",
            audio: np.ndarray | None = None) -> str | None:
        """Store one labelled utterance; returns its sample id, or None when the rules drop it.

        Dropped (None): a teacher label below `teacher_min_confidence`, or a teacher label for an
        utterance a person already labelled. Refused (exception): no consent (ConsentError), an
        unknown source, empty text, text or asr_transcript longer than MAX_TEXT_CHARS, a confidence
        outside [0, 1], features that are not (frames, d), audio that is not 1-D finite samples of at
        most MAX_AUDIO_S seconds.
        """
        folder = self._dir(speaker)
        if source not in SOURCES:
            raise ValueError(f"label source must be one of {SOURCES}, got {source!r}")
        text = " ".join(str(text).split())
        if not text:
            raise ValueError("a sample needs a non-empty label text")
        asr_transcript = " ".join(str(asr_transcript).split())
        if max(len(text), len(asr_transcript)) > MAX_TEXT_CHARS:
            raise ValueError(f"a label or transcript of {max(len(text), len(asr_transcript))} characters is not "
                             f"an utterance's (at most {MAX_TEXT_CHARS})")
        confidence = float(confidence)
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence must be in [0, 1], got {confidence}")
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[0] == 0 or not features.is_floating_point():
            raise ValueError(f"features must be a float (frames, d) tensor, got {features.dtype} "
                             f"{tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinity")
        pcm = None
        if audio is not None and np.asarray(audio).size:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim != 1 or audio.size > MAX_AUDIO_S * SAMPLE_RATE or not np.isfinite(audio).all():
                raise ValueError(f"audio must be finite 1-D 16 kHz samples of at most {MAX_AUDIO_S:.0f} s, got "
                                 f"shape {audio.shape}")
            pcm = torch.from_numpy(np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16))
        if not self.has_consent(speaker):
            raise ConsentError(f"speaker {speaker!r} has not consented to storing samples: "
                               "grant_consent first (enrollment or the consent parameter)")
        if source == "teacher" and confidence < self.teacher_min_confidence:
            log.debug("dropping teacher label (confidence %.2f < %.2f)", confidence, self.teacher_min_confidence)
            return None
        previous = [s for s in self.list(speaker) if utterance_id and s.utterance_id == utterance_id]
        if previous and source == "teacher" and any(s.source in HUMAN_SOURCES for s in previous):
            return None

        created = self.clock() if created is None else float(created)
        f16 = features.detach().cpu().float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).contiguous()
        # time-ordered, and named by its content: two samples added in the same microsecond differ,
        # and the same data gives the same id (so the held-out split does not change between runs)
        content = hashlib.sha256(f"{speaker}\0{source}\0{utterance_id}\0{text}\0".encode())
        content.update(f16.view(torch.int16).numpy().tobytes())
        if pcm is not None:
            content.update(pcm.numpy().tobytes())
        sample_id = f"{int(created * 1e6):017d}-{content.hexdigest()[:8]}"
        metadata = {"format": SAMPLE_FORMAT, "speaker": speaker, "text": text, "source": source,
                    "confidence": repr(confidence), "created": repr(created), "utterance_id": str(utterance_id),
                    "layer": str(int(layer)), "asr_transcript": asr_transcript}
        tensors = {"features": f16} if pcm is None else {"features": f16, "audio": pcm}
        atomic_write_bytes(folder / f"{sample_id}.safetensors", save_safetensors(tensors, metadata=metadata))
        for old in previous:  # the new label supersedes the old one (written first: never zero copies)
            if old.id != sample_id:
                self._remove(speaker, old.id)
        self._enforce_bounds(speaker)
        return sample_id

    def _remove(self, speaker: str, sample_id: str) -> None:
        (self._dir(speaker) / f"{sample_id}.safetensors").unlink(missing_ok=True)

    def _enforce_bounds(self, speaker: str) -> None:
        files = self._files(speaker)
        cutoff = self.clock() - self.max_age_s
        keep = []
        for path in files:
            if self._created_of(path) < cutoff:
                path.unlink(missing_ok=True)
            else:
                keep.append(path)
        for path in keep[: max(0, len(keep) - self.max_samples)]:  # oldest first
            path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- read

    def _files(self, speaker: str) -> list[Path]:
        folder = self._dir(speaker)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))

    @staticmethod
    def _created_of(path: Path) -> float:
        return int(path.name.split("-", 1)[0]) / 1e6

    def _read(self, path: Path, speaker: str, with_features: bool) -> Sample:
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features") if with_features else None
                frames = f.get_slice("features").get_shape()[0]
                has_audio = "audio" in f.keys()
                pcm = f.get_tensor("audio") if with_features and has_audio else None
                audio_n = f.get_slice("audio").get_shape()[0] if has_audio else 0
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise SampleStoreError(f"sample {path} is unreadable: {exc}") from exc
        if meta.get("format") != SAMPLE_FORMAT or meta.get("speaker") != speaker:
            raise SampleStoreError(f"{path} is not a sample of {speaker!r}")
        try:
            info = SampleInfo(id=path.stem, speaker=speaker, text=meta["text"], source=meta["source"],
                              confidence=float(meta["confidence"]), created=float(meta["created"]),
                              utterance_id=meta.get("utterance_id", ""), layer=int(meta.get("layer", 0)),
                              frames=int(frames), asr_transcript=meta.get("asr_transcript", ""),
                              audio_s=audio_n / SAMPLE_RATE)
        except (KeyError, ValueError) as exc:
            raise SampleStoreError(f"sample {path} has unusable metadata: {exc}") from exc
        audio = None if pcm is None else pcm.numpy().astype(np.float32) / 32767.0
        return Sample(features, info, audio)  # type: ignore[arg-type]

    def list(self, speaker: str) -> list[SampleInfo]:
        """The speaker's samples, oldest first (expired ones are pruned; unreadable ones skipped)."""
        if self._files(speaker):
            self._enforce_bounds(speaker)
        infos = []
        for path in self._files(speaker):
            try:
                infos.append(self._read(path, speaker, with_features=False).info)
            except SampleStoreError as exc:
                log.warning("skipping %s", exc)
        return infos

    def count(self, speaker: str) -> int:
        return len(self.list(speaker))

    def load(self, speaker: str, sample_id: str) -> Sample:
        path = self._dir(speaker) / f"{sample_id}.safetensors"
        if "/" in sample_id or sample_id.startswith(".") or not path.is_file():
            raise SampleStoreError(f"speaker {speaker!r} has no sample {sample_id!r}")
        return self._read(path, speaker, with_features=True)

    def forget(self, speaker: str) -> int:
        """Delete the speaker's samples (consent stays recorded); returns how many were deleted."""
        files = self._files(speaker)
        for path in files:
            path.unlink(missing_ok=True)
        if files:
            _fsync_dir(self._dir(speaker))
        return len(files)

    # ---------------------------------------------------------------- split

    def split(self, speaker: str, held_out_fraction: float = 0.2,
              min_held_out: int = 1) -> tuple[list[SampleInfo], list[SampleInfo]]:
        """(train, held_out): deterministic per speaker and sample, stable as the store grows.

        A sample is held out when sha256(speaker/sample id) falls below `held_out_fraction`; if
        that leaves fewer than `min_held_out` (small stores), the samples with the lowest hashes
        are added, which are the same ones every time. A single sample always trains.
        """
        if not 0.0 <= held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        infos = self.list(speaker)
        if len(infos) < 2:  # nothing to validate against: a lone sample trains
            return infos, []

        def u(info: SampleInfo) -> float:
            digest = hashlib.sha256(f"{speaker}/{info.id}".encode()).digest()
            return int.from_bytes(digest[:8], "big") / 2**64

        held = {i.id for i in infos if u(i) < held_out_fraction}
        want = min(min_held_out, len(infos) - 1) if held_out_fraction > 0 else 0
        for info in sorted(infos, key=u):
            if len(held) >= want:
                break
            held.add(info.id)
        for info in sorted(infos, key=u, reverse=True):  # always keep something to train on
            if len(held) < len(infos):
                break
            held.discard(info.id)
        return [i for i in infos if i.id not in held], [i for i in infos if i.id in held]
