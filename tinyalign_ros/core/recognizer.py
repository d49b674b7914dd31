"""One utterance's recognition, in one place: samples + speaker -> transcript + encoder features.

asr_node calls `Recognizer.recognize` once per utterance and the benches call the same method,
so what is measured is what runs. The pipeline:

1. our PyTorch Whisper encoder with early exits (features for the aligned assistant and the
   personalizer; the exit layer); for a speaker with an end-to-end adapter (kind "e2e", Tiny-Align
   trained through the LLM, core/personalize.py) the adapted encoder's final-layer features instead,
   which that speaker's projector LoRA (assistant_node) was trained on,
2. the transcript, from the first that applies:
   - `exit_head` transcriber: the booster-fused exit head (when `fuse` says it boosted), else
     the exit head's own text;
   - the speaker has an ASR adapter (core/asr_adapt.py): the adapted Whisper (an encoder-only
     adapter's output decoded by faster-whisper's own CTranslate2 decoder);
   - everyone else: faster-whisper, exactly as without personalization (same speed); when a
     booster sent its transcript of the utterance in time (`prefix`, core/boost.py text hints),
     faster-whisper's decoder starts with the teacher's words and decodes the rest.

Adapters are hot-swapped with `set_adapter` / `drop_adapter` from any thread; a swap takes the
lock that `recognize` holds while it transcribes, so it lands between utterances, never inside
one. One `SpeakerAsr` model is kept per adapter shape and each speaker's LoRA tensors (a few MB)
are loaded into it for that speaker's utterance, so N speakers cost N small tensor sets, not N
copies of Whisper.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ctranslate2
import numpy as np
import torch

from .adapters import Adapter
from .asr_adapt import AUDIO_KINDS, E2E_KIND, AsrAdaptConfig, AsrBase, SpeakerAsr, asr_tensors
from .decoder import looks_looped
from .early_exit import EncodedUtterance, ExitHeads, ExitPolicy, encode_utterance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recognition:
    text: str
    confidence: float
    encoded: EncodedUtterance | None  # None without the PyTorch encoder
    source: str  # "whisper", "whisper+hints" (teacher words forced), "adapter", "exit_head" or "boost"
    adapter_version: int = 0  # the speaker's ASR adapter version that produced the text (0 = none)
    boosted: object | None = None  # what `fuse` returned
    hint: object | None = None  # what `prefix` returned (core.boost.TextPrefix)


class AdapterMismatch(ValueError):
    """An adapter that is not an ASR adapter of this Whisper (the message says why)."""


class Recognizer:
    def __init__(self, transcriber, encoder=None, heads: ExitHeads | None = None, base: AsrBase | None = None,
                 exit_head_transcripts: bool = False) -> None:
        self.transcriber = transcriber
        self.encoder, self.heads = encoder, heads
        if base is None:
            # faster-whisper's CTranslate2 model decodes encoder-only adapters too: one int8 Whisper in memory
            base = AsrBase()
            fast = getattr(getattr(transcriber, "model", None), "model", None)
            if (isinstance(fast, ctranslate2.models.Whisper)
                    and Path(getattr(transcriber, "model_dir", "")) == Path(base.model_dir)):
                base = AsrBase(whisper=fast)
        self.base = base
        self.exit_head_transcripts = exit_head_transcripts
        self._lock = threading.Lock()
        self._models: dict[tuple, SpeakerAsr] = {}
        # speaker -> (model key, LoRA tensors, version, whether the adapter makes the features too: kind e2e)
        self._adapters: dict[str, tuple[tuple, dict[str, torch.Tensor], int, bool]] = {}
        self._loaded: str | None = None  # whose tensors are in the model now

    # -- adapters ----------------------------------------------------------------------------
    @property
    def adapted_speakers(self) -> dict[str, int]:
        return {s: v for s, (_, _, v, _) in self._adapters.items()}

    def set_adapter(self, speaker: str, adapter: Adapter) -> None:
        """Use `adapter` for `speaker` from the next utterance on (AdapterMismatch if it does not fit)."""
        extra = adapter.info.extra
        kind = extra.get("kind")
        if kind not in AUDIO_KINDS:
            raise AdapterMismatch(f"adapter v{adapter.info.version} of {speaker} is a {kind!r} adapter, "
                                  "not an ASR one")
        if adapter.info.base_hashes.get("whisper") != self.base.sha:
            raise AdapterMismatch(f"adapter v{adapter.info.version} of {speaker} was made for another Whisper model")
        try:
            cfg = AsrAdaptConfig.from_metadata(extra)
        except (KeyError, ValueError, TypeError) as exc:
            raise AdapterMismatch(f"adapter v{adapter.info.version} of {speaker} has unusable metadata: {exc}") from exc
        key = (cfg.rank, cfg.alpha, cfg.encoder_layers, cfg.decoder)
        model = self._models.get(key)
        if model is None:
            model = self.base.model(cfg)
        tensors = {k: v.float() for k, v in asr_tensors(kind, adapter.tensors).items()}
        try:
            with self._lock:
                model.load_adapter_state(tensors)  # checks that the tensors fit
                self._models[key] = model
                self._adapters[speaker] = (key, tensors, adapter.info.version, kind == E2E_KIND)
                self._loaded = speaker
        except (ValueError, RuntimeError) as exc:
            raise AdapterMismatch(f"adapter v{adapter.info.version} of {speaker} does not fit: {exc}") from exc

    def drop_adapter(self, speaker: str) -> bool:
        with self._lock:
            if self._loaded == speaker:
                self._loaded = None
            return self._adapters.pop(speaker, None) is not None

    def _model_of(self, speaker: str) -> tuple[SpeakerAsr, int] | None:
        """The adapted model holding `speaker`'s tensors, and their version (call with the lock held)."""
        entry = self._adapters.get(speaker) if speaker else None
        if entry is None:
            return None
        key, tensors, version, _ = entry
        model = self._models[key]
        if self._loaded != speaker:
            model.load_adapter_state(tensors)
            self._loaded = speaker
        return model, version

    def _adapted(self, speaker: str, samples: np.ndarray) -> tuple[str, float, int] | None:
        found = self._model_of(speaker)
        if found is None:
            return None
        text, confidence = found[0].transcribe(samples)
        return text, confidence, found[1]

    def _adapted_features(self, speaker: str, samples: np.ndarray) -> EncodedUtterance | None:
        """An end-to-end adapter's speaker: their adapted final-layer features (full depth: the
        projector their adapter was trained with reads the last layer); else None."""
        with self._lock:
            entry = self._adapters.get(speaker) if speaker else None
            if entry is None or not entry[3]:
                return None
            model = self._model_of(speaker)[0]
            return EncodedUtterance(model.encoder.n_layers, model.features(samples), None)

    # -- one utterance ----------------------------------------------------------------------
    def recognize(self, samples: np.ndarray, speaker: str = "", policy: ExitPolicy | None = None,
                  pad_to_30s: bool = False, fuse: Callable[[EncodedUtterance], object] | None = None,
                  prefix: Callable[[], object] | None = None) -> Recognition:
        """`prefix`: called just before faster-whisper decodes, returns the booster's words to force
        (an object with `.text`, "" for none): the hints that are there then, never waited for."""
        encoded = None
        if self.encoder is not None:
            encoded = self._adapted_features(speaker, samples)
            if encoded is None:
                encoded = encode_utterance(self.encoder, self.heads, policy or ExitPolicy(), samples, pad_to_30s)
        boosted = fuse(encoded) if fuse is not None and encoded is not None else None
        if self.exit_head_transcripts and boosted is not None and getattr(boosted, "boosted", False):
            return Recognition(boosted.text, boosted.confidence, encoded, "boost", boosted=boosted)
        if self.exit_head_transcripts and encoded is not None and encoded.exit is not None:
            return Recognition(encoded.exit.text, encoded.exit.confidence, encoded, "exit_head", boosted=boosted)
        with self._lock:
            adapted = self._adapted(speaker, samples)
        if adapted is not None:
            text, confidence, version = adapted
            return Recognition(text, confidence, encoded, "adapter", version, boosted)
        hint = prefix() if prefix is not None else None
        if hint is not None and hint.text:
            transcript = self.transcriber.transcribe(samples, prefix=hint.text)
            if not looks_looped(transcript.text):  # forced words Whisper could not end after: decode unforced
                return Recognition(transcript.text, transcript.confidence, encoded, "whisper+hints",
                                   boosted=boosted, hint=hint)
        transcript = self.transcriber.transcribe(samples)
        return Recognition(transcript.text, transcript.confidence, encoded, "whisper", boosted=boosted, hint=hint)
