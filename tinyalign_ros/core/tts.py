"""Speech output: text → audio with the piper neural voice (espeak-ng as the fallback), and a
sentence splitter that lets a streamed answer be spoken from its first sentence on.

- `Synthesizer("piper")` loads the packaged en_US-joe-medium voice (or an .onnx path) through
  the same loader as the corpus builder (`corpus._piper_voice`, cached per process). When piper,
  its voice or its model cannot be loaded, it says why (logger + `fallback_reason`) and speaks
  with espeak-ng instead; a single failed piper call also falls back for that text only.
- `synthesize(text)` returns `(float32 mono samples, sample_rate)` at the engine's native rate
  (22050 Hz for both engines here); `rate` is a speaking-rate factor (1 = normal, 2 = twice as
  fast), `volume` a gain (1 = the engine's normalised level), the result clipped to [-1, 1].
- `SentenceBuffer` collects LLM text pieces and hands out each sentence as soon as it is known
  to be complete (its end punctuation followed by whitespace, so "3.5" and "Dr. Smith" do not
  split), long run-on text at a clause boundary, and the rest on `flush()`.
"""
from __future__ import annotations

import io
import logging
import re
import subprocess
from typing import Any

import numpy as np
import soundfile as sf

from .corpus import PIPER_PACKAGED, SynthesisError, _espeak_catalogue, _piper_voice, _require

ENGINES = ("piper", "espeak-ng")
DEFAULT_PIPER_VOICE = next(iter(PIPER_PACKAGED))  # en_US-joe-medium
DEFAULT_ESPEAK_VOICE = "en-us"
ESPEAK_WPM = 175  # espeak-ng's default speed, the rate=1.0 point

_log = logging.getLogger(__name__)


def clean_text(text: str) -> str:
    """What a voice should read: markdown emphasis/headers/code marks removed, whitespace folded."""
    text = re.sub(r"[*_#`~]+", " ", text)
    return " ".join(text.split())


class Synthesizer:
    """Text to speech with one engine, falling back from piper to espeak-ng with a reason."""

    def __init__(self, engine: str = "piper", voice: str = "", espeak_voice: str = DEFAULT_ESPEAK_VOICE,
                 rate: float = 1.0, volume: float = 1.0, logger: Any = None) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if not volume >= 0:
            raise ValueError(f"volume must be >= 0, got {volume}")
        self.requested_engine = engine
        self.voice = voice or DEFAULT_PIPER_VOICE
        self.espeak_voice = espeak_voice or DEFAULT_ESPEAK_VOICE
        self.rate, self.volume = float(rate), float(volume)
        self._log = logger or _log
        self.fallback_reason = ""
        self.fallbacks = 0  # piper calls that failed and were spoken by espeak-ng instead
        self._piper = None
        self.engine = engine
        if engine == "piper":
            try:
                self._piper = _piper_voice(self.voice)
                self.sample_rate = int(self._piper.config.sample_rate)
            except SynthesisError as exc:
                self._fall_back(str(exc))
            except Exception as exc:  # a corrupt .onnx, an onnxruntime problem, ...
                self._fall_back(f"piper could not load voice {self.voice!r}: {exc!r}")
        if self.engine == "espeak-ng":
            self._check_espeak()
            self.sample_rate = 22050  # espeak-ng's fixed output rate (checked on every call)

    @property
    def description(self) -> str:
        return f"piper {self.voice}" if self.engine == "piper" else f"espeak-ng {self.espeak_voice}"

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.engine = "espeak-ng"
        self._log.warning(f"piper unavailable ({reason}); speaking with espeak-ng voice {self.espeak_voice!r}")

    def _check_espeak(self) -> None:
        exe = _require("espeak-ng")
        base, _, variant = self.espeak_voice.partition("+")
        voices, variants = _espeak_catalogue(exe)
        if base.lower() not in voices or (variant and variant.lower() not in variants):
            # espeak-ng silently uses its default voice for unknown names: refuse instead
            raise SynthesisError(f"espeak-ng has no voice {self.espeak_voice!r} (see `espeak-ng --voices=en`)")

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Speak `text`: (float32 mono samples, sample rate). Text with nothing to say gives 0 samples."""
        text = clean_text(text)
        if not any(c.isalnum() for c in text):
            return np.zeros(0, np.float32), self.sample_rate
        if self.engine == "piper":
            try:
                samples, rate = self._synthesize_piper(text)
            except Exception as exc:
                self.fallbacks += 1
                self._log.warning(f"piper failed on {text[:60]!r} ({exc!r}); using espeak-ng for it")
                samples, rate = self._synthesize_espeak(text)
        else:
            samples, rate = self._synthesize_espeak(text)
        if self.volume != 1.0:
            samples = samples * np.float32(self.volume)
        return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False), rate

    def _synthesize_piper(self, text: str) -> tuple[np.ndarray, int]:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=1.0 / self.rate)
        chunks = list(self._piper.synthesize(text, config))
        if not chunks:
            return np.zeros(0, np.float32), self.sample_rate
        return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32), chunks[0].sample_rate

    def _synthesize_espeak(self, text: str) -> tuple[np.ndarray, int]:
        # text on stdin, never argv: an answer starting with "-" must not read as an option
        cmd = [_require("espeak-ng"), "-v", self.espeak_voice, "-s", str(round(ESPEAK_WPM * self.rate)),
               "--stdin", "--stdout"]
        try:
            result = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=60, check=False)
        except subprocess.TimeoutExpired as exc:
            raise SynthesisError(f"espeak-ng did not finish in {exc.timeout:.0f} s") from exc
        if result.returncode != 0:
            raise SynthesisError(f"espeak-ng failed (exit {result.returncode}): "
                                 f"{result.stderr.decode(errors='replace').strip()[-300:]}")
        samples, rate = sf.read(io.BytesIO(result.stdout), dtype="float32", always_2d=False)
        return np.asarray(samples, np.float32).reshape(-1), int(rate)


# Words whose final period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e approx no fig inc ltd co mt ave dept est".split())
_END = re.compile(r"[.!?…]+[\"')\]]*\s|\n+")     # end punctuation (+ closing quotes) then whitespace
_CLAUSE = re.compile(r"[,;:\u2014]\s")           # where an over-long sentence may be cut


class SentenceBuffer:
    """Turns streamed text pieces into whole sentences as early as they are known to be complete.

    A sentence ends at `.`, `!`, `?` or `…` (plus closing quotes/brackets) once the next
    character is whitespace, or at a newline; a single-letter or known abbreviation before a
    period ("Dr.", "e.g.") and a period inside a number do not end one. Text running past
    `max_chars` without an end is cut at its last clause mark (`,;:—`) or space, so a run-on
    answer still starts speaking. Pieces with nothing speakable (only punctuation) are dropped.
    """

    def __init__(self, max_chars: int = 200) -> None:
        if max_chars < 20:
            raise ValueError(f"max_chars must be >= 20, got {max_chars}")
        self.max_chars = max_chars
        self._text = ""

    @property
    def pending(self) -> str:
        return self._text

    def push(self, piece: str) -> list[str]:
        self._text += piece
        out: list[str] = []
        start = 0
        for match in _END.finditer(self._text):
            if match.group().startswith(".") and self._is_abbreviation(self._text[start:match.start()]):
                continue
            out.append(self._text[start:match.end()])
            start = match.end()
        self._text = self._text[start:]
        while len(self._text) > self.max_chars:
            head = self._text[: self.max_chars]
            cuts = [m.end() for m in _CLAUSE.finditer(head)] or [i + 1 for i, c in enumerate(head) if c.isspace()]
            cut = cuts[-1] if cuts else self.max_chars
            out.append(self._text[:cut])
            self._text = self._text[cut:]
        return self._speakable(out)

    def flush(self) -> list[str]:
        rest, self._text = self._text, ""
        return self._speakable([rest])

    def reset(self) -> None:
        self._text = ""

    @staticmethod
    def _is_abbreviation(sentence: str) -> bool:
        words = sentence.split()
        if not words:
            return False
        last = words[-1].lower().strip("(\"'")
        return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha() and last not in "ai")

    @staticmethod
    def _speakable(parts: list[str]) -> list[str]:
        return [" ".join(p.split()) for p in parts if any(c.isalnum() for c in p)]
