"""Transcription of one VAD segment with faster-whisper tiny.en (CTranslate2, int8).

The segment is already cut by our VAD, so Whisper's own VAD and its conditioning on previous
text are off: each utterance is transcribed alone, which keeps one bad segment from
contaminating the next.

**The speech window** (`window="speech"`, the default). Whisper's encoder reads a 30 s window
whatever the length of the speech; for a 2-3 s command that pass was 0.30 of the 0.37 s
transcription on this 2-core CPU, before the decoder wrote a word. CTranslate2's encoder takes a
shorter log-mel, so the utterance is encoded with `margin_s` of silence after it, rounded up to
whole seconds. The silence is padded in the audio: with the log-mel padded by zeros instead (what
`pad_or_trim` does), the decoder repeated the sentence rather than end it in 20 of 40 festival slt
requests at a 1 s margin (docs/design.md §4's "unpadded encoder output loops"); with silent audio,
14 of 40 at 1 s, 7 at 2 s, none at 4 s. The margin, 6 s, was chosen on dev13's requests and chatter
in the commands bench's 4 voices and on the 10 real pocketsphinx clips (mean WER full window
0.111, margin 3 s 0.115, 4 s 0.102, 6 s 0.100; 0.11-0.13 s an utterance against 0.38-0.40 s).
The decoder is greedy, with faster-whisper's prompt and suppressed tokens.
A decode that fails a check is done again on the full window by faster-whisper (with its
temperature fallback), so a failure costs time, never a worse transcript than before: no end of
text within core/decoder.py's length guard, a repetition (`repeats_itself`, `looks_looped`), or a
mean log-probability below faster-whisper's -1.0. faster-whisper's `transcribe` cannot do this
itself: it pads every segment's log-mel to 30 s (`pad_or_trim`). `tinyalign bench whisper`
measures both windows (WER on real recordings and synthetic voices, time per utterance).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from .audio import SAMPLE_RATE
from .models import whisper_tiny_dir

FRAMES_PER_S = 100  # Whisper's log-mel hop: 10 ms
WINDOWS = ("speech", "full")  # the encoder's window: the utterance + a margin of silence, or Whisper's 30 s
FULL_WINDOW_S = 30
SPEECH_MARGIN_S = 6.0  # silence after the speech in the speech window (tinyalign bench whisper)
LOG_PROB_THRESHOLD = -1.0  # faster-whisper's: a decode less likely than this is done again


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float  # exp(mean token log-probability), 0..1


class WhisperTranscriber:
    def __init__(
        self,
        model_dir: str | Path | None = None,
        compute_type: str = "int8",
        threads: int = 2,
        beam_size: int = 1,
        language: str = "en",
        temperature: float | None = None,
        window: str = "speech",
        margin_s: float = SPEECH_MARGIN_S,
    ) -> None:
        """`temperature` None keeps faster-whisper's fallback (greedy, then sampling at 0.2, 0.4, ...
        when a decode fails its compression or log-prob checks: what the robot uses, and it varies
        run to run on hard audio); 0.0 is greedy only, for comparisons that must repeat. `window`:
        "speech" (the module docstring) or "full" (faster-whisper as it is: 30 s); `margin_s`: the
        silence after the speech in the speech window."""
        if window not in WINDOWS:
            raise ValueError(f"whisper window must be one of {', '.join(WINDOWS)}, got {window!r}")
        if not 0.0 < margin_s < FULL_WINDOW_S:
            raise ValueError(f"whisper window margin must be between 0 and {FULL_WINDOW_S} s, got {margin_s}")
        self.model_dir = Path(model_dir or whisper_tiny_dir())
        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)
        self.beam_size = beam_size
        self.language = language
        self.temperature = temperature
        self.window, self.margin_s = window, float(margin_s)
        self.speech_windows = 0  # utterances decoded on the speech window ...
        self.window_fallbacks = 0  # ... of which failed a check and were done again on the full window
        self._tokenizer = self._suppress = None

    def transcribe(self, samples: np.ndarray, prefix: str = "") -> Transcript:
        """`prefix`: words forced as the start of the transcript (knowledge boosting's text hint,
        core/boost.py); Whisper decodes only what follows them."""
        prefix = " ".join(prefix.split())
        if self.window == "speech":
            found = self._speech_window(samples, prefix)
            if found is not None:
                return found
        return self._full_window(samples, prefix)

    def _speech_window(self, samples: np.ndarray, prefix: str) -> Transcript | None:
        """Greedy decode on the utterance + `margin_s` of silence; None when it fails a check (or the
        window would be no shorter than 30 s): the caller decodes on the full window."""
        from .decoder import looks_looped, max_tokens_for, repeats_itself

        seconds = math.ceil(samples.size / SAMPLE_RATE + self.margin_s)
        if seconds >= FULL_WINDOW_S:
            return None
        self.speech_windows += 1
        model = self.model
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe",
                                        language=self.language)
            self._suppress = list(get_suppressed_tokens(self._tokenizer, [-1]))
        audio = np.zeros(seconds * SAMPLE_RATE, dtype=np.float32)
        audio[:samples.size] = samples
        features = model.feature_extractor(audio)[:, :seconds * FRAMES_PER_S]
        prompt = model.get_prompt(self._tokenizer, [], without_timestamps=True, prefix=prefix or None)
        limit = min(len(prompt) + max_tokens_for(samples.size / SAMPLE_RATE), model.max_length)
        result = model.model.generate(model.encode(features), [prompt], beam_size=self.beam_size, max_length=limit,
                                      return_scores=True, suppress_blank=True, suppress_tokens=self._suppress)[0]
        tokens = result.sequences_ids[0]  # the forced words (prefix) included, as faster-whisper's
        written = len(self._tokenizer.sot_sequence) + 1 + len(tokens)  # + <|notimestamps|>; max_length counts them
        text = self._tokenizer.decode(tokens).strip()
        mean_logprob = float(result.scores[0]) * len(tokens) / (len(tokens) + 1)  # faster-whisper's avg_logprob
        if (not text or written >= limit or mean_logprob < LOG_PROB_THRESHOLD
                or repeats_itself(text) or looks_looped(text)):
            self.window_fallbacks += 1
            return None
        return Transcript(text, float(math.exp(min(mean_logprob, 0.0))))

    def _full_window(self, samples: np.ndarray, prefix: str) -> Transcript:
        """faster-whisper's own transcription: the segment padded to Whisper's 30 s window."""
        segments, _ = self.model.transcribe(
            samples,
            prefix=prefix or None,
            language=self.language,
            beam_size=self.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            without_timestamps=True,
            **({} if self.temperature is None else {"temperature": self.temperature}),
        )
        segments = list(segments)
        # faster-whisper's segment text starts with the forced words (CTranslate2 returns the prefix)
        text = " ".join(s.text.strip() for s in segments).strip()
        if not segments:
            return Transcript(prefix, 0.0)
        # Weight each segment's mean log-prob by its token count.
        n = sum(max(len(s.tokens), 1) for s in segments)
        mean_logprob = sum(s.avg_logprob * max(len(s.tokens), 1) for s in segments) / n
        return Transcript(text, float(math.exp(min(mean_logprob, 0.0))))
