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
- `AnswerStreams` turns the assistant's streamed tokens (or whole responses) of many answers into
  the sentences to speak, each tagged with a generation: a barge-in starts a new generation and
  cancels every answer it interrupted, late tokens included. `AnswerLatency` keeps, per answer,
  the times the speech-output latency figures are computed from. tts_node wires topics to them.
"""
from __future__ import annotations

import collections
import io
import logging
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

from .bounded import remember
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

    `first_clause_chars` > 0: the answer's *first* piece may be a clause instead of a sentence: as
    soon as a clause mark (`,;:—` then whitespace) ends at least that many characters, the text up
    to it is handed out ("Sure," of "Sure, I will bring it."), so the voice starts while the LLM is
    still writing the rest of the sentence; later pieces are whole sentences again. 0 = off.
    """

    def __init__(self, max_chars: int = 200, first_clause_chars: int = 0) -> None:
        if max_chars < 20:
            raise ValueError(f"max_chars must be >= 20, got {max_chars}")
        if not 0 <= first_clause_chars <= max_chars:
            raise ValueError(f"first_clause_chars must be in [0, max_chars={max_chars}], got {first_clause_chars}")
        self.max_chars = max_chars
        self.first_clause_chars = first_clause_chars
        self._text = ""
        self._started = False  # a piece has been handed out

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
        if not self._started and self.first_clause_chars:
            # even a complete first sentence: its first clause is synthesized (and heard) sooner
            head, rest = self._first_clause(out[0] if out else self._text)
            if head and out:
                out[0:1] = [head, rest]
            elif head:
                out.append(head)
                self._text = rest
        out = self._speakable(out)
        self._started = self._started or bool(out)
        return out

    def flush(self) -> list[str]:
        rest, self._text = self._text, ""
        self._started = False
        return self._speakable([rest])

    def reset(self) -> None:
        self._text = ""
        self._started = False

    def _first_clause(self, text: str) -> tuple[str, str]:
        """(text up to its first clause mark that ends >= first_clause_chars characters in, the rest),
        or ("", text) when there is none or the clause has no word."""
        for m in _CLAUSE.finditer(text):
            if m.end() >= self.first_clause_chars:
                head = text[:m.end()]
                return (head, text[m.end():]) if any(c.isalnum() for c in head) else ("", text)
        return "", text

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


RECENT_IDS = 256  # utterance ids remembered as cancelled / seen / spoken whole (late tokens of old answers)
MAX_OPEN_ANSWERS = 16  # answers whose final token has not come yet; the oldest is dropped past this


@dataclass
class Sentence:
    """One sentence to speak, of answer `utterance_id`, valid while `generation` is current."""
    generation: int
    utterance_id: str
    text: str


class AnswerStreams:
    """Which sentences of which answers to speak, from the token stream and the whole responses.

    `token()` feeds an answer's streamed pieces through its own `SentenceBuffer` and returns the
    sentences they complete; `response()` returns a whole response's sentences when its tokens
    were never seen (an assistant that does not stream, or `stream_tokens` off), and from then on
    ignores that answer's late tokens, so nothing is spoken twice. `interrupt()` (a barge-in)
    starts a new generation: sentences of an older one are not spoken, and every answer that was
    streaming or playing is cancelled, its late tokens and response ignored. Every memory of ids
    is bounded (`RECENT_IDS`, `MAX_OPEN_ANSWERS`). Not thread-safe: its caller holds one lock.
    """

    def __init__(self, max_sentence_chars: int = 200, stream_tokens: bool = True, logger: Any = None,
                 first_clause_chars: int = 0) -> None:
        SentenceBuffer(max_sentence_chars, first_clause_chars)  # a bad length fails here, not on the first token
        self.max_sentence_chars = max_sentence_chars
        self.first_clause_chars = first_clause_chars
        self.stream_tokens = stream_tokens
        self.generation = 0
        self._log = logger or _log
        self._buffers: dict[str, SentenceBuffer] = {}
        self._next_index: dict[str, int] = {}
        self._cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seen_tokens: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._spoken_whole: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._playing: set[str] = set()  # answers with sentences queued for or in playback

    @property
    def streaming(self) -> bool:
        """Some answer's final token has not come yet."""
        return bool(self._buffers)

    def token(self, uid: str, index: int, text: str, final: bool) -> list[Sentence] | None:
        """Token `index` of answer `uid`: the sentences it completes; None when the answer is
        cancelled or already spoken whole (the token is ignored)."""
        if uid in self._cancelled or uid in self._spoken_whole:
            return None
        remember(self._seen_tokens, uid, None, RECENT_IDS)
        expected = self._next_index.get(uid, 0)
        if index != expected:
            self._log.warning(f"{uid}: token {index} arrived, expected {expected} (lost tokens?)")
        self._next_index[uid] = index + 1
        if uid not in self._buffers and len(self._buffers) >= MAX_OPEN_ANSWERS:  # final tokens that never came
            stale = next(iter(self._buffers))
            self._log.warning(f"{stale}: no final token; dropping its unspoken text")
            del self._buffers[stale]
            self._next_index.pop(stale, None)
        buffer = self._buffers.setdefault(uid, SentenceBuffer(self.max_sentence_chars, self.first_clause_chars))
        texts = buffer.push(text)
        if final:
            texts += buffer.flush()
            del self._buffers[uid]
            self._next_index.pop(uid, None)
        return [Sentence(self.generation, uid, t) for t in texts]

    def response(self, uid: str, text: str) -> list[Sentence]:
        """The whole response of answer `uid`: its sentences if they are to be spoken from it,
        else none (cancelled, or its tokens are being spoken)."""
        if uid in self._cancelled or (self.stream_tokens and uid in self._seen_tokens):
            return []
        if self.stream_tokens:
            # its tokens may still be queued behind this response: they must not speak it twice
            remember(self._spoken_whole, uid, None, RECENT_IDS)
            self._log.info(f"{uid}: no token stream seen; speaking the whole response")
        buffer = SentenceBuffer(self.max_sentence_chars, self.first_clause_chars)
        return [Sentence(self.generation, uid, t) for t in buffer.push(text) + buffer.flush()]

    def current(self, generation: int) -> bool:
        return generation == self.generation

    def start(self, sentence: Sentence) -> bool:
        """`sentence` goes to the player: False if a barge-in has cancelled it meanwhile."""
        if not self.current(sentence.generation):
            return False
        self._playing.add(sentence.utterance_id)
        return True

    def quiet(self) -> None:
        """The robot stopped speaking with nothing left to synthesize: unless an answer is still
        streaming, no answer is playing any more (a later barge-in cancels none of them)."""
        if not self._buffers:
            self._playing.clear()

    def interrupt(self) -> bool:
        """A barge-in: a new generation, every streaming or playing answer cancelled. True if an
        answer was still streaming."""
        streaming = bool(self._buffers)
        self.generation += 1
        for uid in list(self._buffers) + list(self._playing):
            remember(self._cancelled, uid, None, RECENT_IDS)
        self._buffers.clear()
        self._next_index.clear()
        self._playing.clear()
        return streaming


@dataclass
class _Timing:
    first_token: float | None = None     # stamp of the first token
    end_of_speech: float | None = None   # from the response: stamp - latency_last_token_s
    first_audio: float | None = None     # when its first sample went to the device / topic
    reported: set[str] = field(default_factory=set)


class AnswerLatency:
    """Per answer (the last `limit`), the times tts_node's latency figures come from, in one
    clock's seconds: `first_token_to_audio_s` (the answer's first token → its first audio sample)
    and `end_of_speech_to_audio_s` (the operator's end of speech → the first audio sample). `due()`
    hands out each figure once, as soon as both of its ends are known. Not thread-safe."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._timing: collections.OrderedDict[str, _Timing] = collections.OrderedDict()

    def _of(self, uid: str) -> _Timing:
        if uid not in self._timing:
            remember(self._timing, uid, _Timing(), self.limit)
        return self._timing[uid]

    def token(self, uid: str, stamp: float) -> None:
        timing = self._of(uid)
        if timing.first_token is None:
            timing.first_token = stamp

    def response(self, uid: str, stamp: float, latency_first_token_s: float, latency_last_token_s: float) -> None:
        """The whole response, stamped `stamp`, `latency_*` after the operator's end of speech."""
        timing = self._of(uid)
        timing.end_of_speech = stamp - float(latency_last_token_s)
        if timing.first_token is None:
            timing.first_token = stamp - float(latency_last_token_s - latency_first_token_s)

    def first_audio(self, uid: str, t: float) -> bool:
        """The answer's audio started at `t`; False if it had already started."""
        timing = self._of(uid)
        if timing.first_audio is not None:
            return False
        timing.first_audio = t
        return True

    def due(self, uid: str) -> dict[str, float]:
        """The figures of answer `uid` that became known since the last call."""
        t = self._timing.get(uid)
        if t is None or t.first_audio is None:
            return {}
        figures: dict[str, float] = {}
        if t.first_token is not None and "token" not in t.reported:
            t.reported.add("token")
            figures["first_token_to_audio_s"] = t.first_audio - t.first_token
        if t.end_of_speech is not None and "eos" not in t.reported:
            t.reported.add("eos")
            figures["end_of_speech_to_audio_s"] = t.first_audio - t.end_of_speech
        return figures
