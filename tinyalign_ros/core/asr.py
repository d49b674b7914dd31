"""Transcription of one VAD segment with faster-whisper tiny.en (CTranslate2, int8).

The segment is already cut by our VAD, so Whisper's own VAD and its conditioning on previous
text are off: each utterance is transcribed alone, which keeps one bad segment from
contaminating the next.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel

from .models import whisper_tiny_dir


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
    ) -> None:
        """`temperature` None keeps faster-whisper's fallback (greedy, then sampling at 0.2, 0.4, ...
        when a decode fails its compression or log-prob checks: what the robot uses, and it varies
        run to run on hard audio); 0.0 is greedy only, for comparisons that must repeat."""
        self.model_dir = Path(model_dir or whisper_tiny_dir())
        self.model = WhisperModel(str(self.model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)
        self.beam_size = beam_size
        self.language = language
        self.temperature = temperature

    def transcribe(self, samples: np.ndarray, prefix: str = "") -> Transcript:
        """`prefix`: words forced as the start of the transcript (knowledge boosting's text hint,
        core/boost.py); Whisper decodes only what follows them."""
        prefix = " ".join(prefix.split())
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
