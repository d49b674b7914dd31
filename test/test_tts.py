"""Speech synthesis (piper, espeak-ng, fallback) and the streaming sentence splitter."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tinyalign_ros.core.tts import SentenceBuffer, Synthesizer, clean_text

SENTENCE = "The kitchen is to your left, next to the dining room."  # ~2.5-3.5 s spoken


def _duration(samples: np.ndarray, rate: int) -> float:
    return samples.size / rate


@pytest.mark.parametrize("engine", ["piper", "espeak-ng"])
def test_a_sentence_gives_speech_of_plausible_length(engine):
    synth = Synthesizer(engine)
    assert synth.engine == engine and not synth.fallback_reason
    started = time.monotonic()
    samples, rate = synth.synthesize(SENTENCE)
    elapsed = time.monotonic() - started
    assert samples.dtype == np.float32 and samples.ndim == 1 and rate == 22050
    seconds = _duration(samples, rate)
    assert 1.5 < seconds < 6.0  # 10 words at 100-400 words per minute
    assert np.abs(samples).max() <= 1.0
    assert float(np.sqrt(np.mean(samples ** 2))) > 0.01  # speech, not silence
    assert elapsed < seconds  # faster than real time, or streaming could not keep up
    short, _ = synth.synthesize("Yes.")
    assert _duration(short, rate) < seconds / 2


@pytest.mark.parametrize("engine", ["piper", "espeak-ng"])
def test_rate_and_volume(engine):
    normal, rate = Synthesizer(engine).synthesize(SENTENCE)
    fast, _ = Synthesizer(engine, rate=2.0).synthesize(SENTENCE)
    quiet, _ = Synthesizer(engine, volume=0.25).synthesize(SENTENCE)
    assert 0.35 < fast.size / normal.size < 0.75
    assert np.abs(quiet).max() < 0.5 * np.abs(normal).max()


def test_missing_piper_voice_falls_back_to_espeak_and_says_why():
    synth = Synthesizer("piper", voice="/nonexistent/voice.onnx")
    assert synth.engine == "espeak-ng"
    assert "not found" in synth.fallback_reason and "voice.onnx" in synth.fallback_reason
    samples, rate = synth.synthesize("Still talking.")
    assert samples.size / rate > 0.3


def test_nothing_to_say_gives_no_audio_and_bad_settings_are_refused():
    synth = Synthesizer("espeak-ng")
    assert synth.synthesize(" ... ")[0].size == 0
    assert synth.synthesize("-v")[0].size > 0  # text is never read as an option
    with pytest.raises(ValueError, match="engine"):
        Synthesizer("festival")
    with pytest.raises(ValueError, match="rate"):
        Synthesizer("espeak-ng", rate=0)


def _stream(buffer: SentenceBuffer, pieces: list[str]) -> list[tuple[int, str]]:
    """(index of the piece after which each sentence came out, sentence)."""
    return [(i, s) for i, piece in enumerate(pieces) for s in buffer.push(piece)]


def test_sentences_come_out_as_soon_as_they_are_complete():
    pieces = ["Sure", "!", " The", " kitchen", " is", " left", ".", " Anything", " else", "?"]
    buffer = SentenceBuffer()
    assert _stream(buffer, pieces) == [(2, "Sure!"), (7, "The kitchen is left.")]
    assert buffer.flush() == ["Anything else?"]  # the final token flushes the last one
    assert buffer.flush() == []


def test_numbers_abbreviations_and_quotes_do_not_split():
    buffer = SentenceBuffer()
    text = 'Dr. Smith paid 3.50 dollars, e.g. for tea. He said "stop." Then he left!\nNew line'
    got = buffer.push(text) + buffer.flush()
    assert got == ["Dr. Smith paid 3.50 dollars, e.g. for tea.", 'He said "stop."', "Then he left!", "New line"]


def test_run_on_text_is_cut_at_a_clause_and_punctuation_only_is_dropped():
    buffer = SentenceBuffer(max_chars=40)
    got = buffer.push("first part of a long answer, second part of it and more words without end")
    assert got and got[0] == "first part of a long answer,"
    assert all(len(s) <= 40 for s in got)
    assert SentenceBuffer().push("... !! ") == []
    assert clean_text("**Bold** and `code`\n# head") == "Bold and code head"
