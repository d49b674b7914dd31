"""Speech synthesis (piper, espeak-ng, fallback) and the streaming sentence splitter."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from tinyalign_ros.core.tts import (MAX_OPEN_ANSWERS, RECENT_IDS, AnswerLatency, AnswerStreams, Sentence,
                                   SentenceBuffer, Synthesizer, clean_text)

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



def test_the_first_clause_is_spoken_on_its_own_then_whole_sentences():
    pieces = ["Sure", ",", " I", " will", " bring", " it", ",", " right", " away", ".", " Then", ",", " more", "."]
    buffer = SentenceBuffer(first_clause_chars=4)
    # "Sure," goes out once the next word has started (a comma in "1,000" is no clause mark)
    assert _stream(buffer, pieces) == [(2, "Sure,"), (10, "I will bring it, right away.")]
    assert buffer.flush() == ["Then, more."]  # later sentences are not cut at their commas
    # a whole first sentence at once is cut too (a skill's confirmation): its clause is synthesized sooner
    assert buffer.push("Yes, 1,000 of them. Ok, then. ") == ["Yes,", "1,000 of them.", "Ok, then."]
    assert SentenceBuffer(first_clause_chars=8).push("Sure, I will, yes ") == ["Sure, I will,"]  # too short a clause
    assert SentenceBuffer().push("Sure, I will bring it ") == []  # 0: off, as before
    assert SentenceBuffer(first_clause_chars=1).push(", , and so ") == []  # a clause needs a word
    with pytest.raises(ValueError, match="first_clause_chars"):
        SentenceBuffer(max_chars=40, first_clause_chars=41)


def test_answer_streams_pass_the_first_clause_setting_to_each_answer():
    streams = AnswerStreams(first_clause_chars=4)
    assert [s.text for s in streams.token("u1", 0, "Okay, I am on", False)] == ["Okay,"]
    assert [s.text for s in streams.token("u2", 0, "Fine, thanks", False)] == ["Fine,"]
    assert [s.text for s in AnswerStreams(stream_tokens=False, first_clause_chars=4).response("u3", "No, it is off.")] \
        == ["No,", "it is off."]


# ------------------------------------------------ AnswerStreams / AnswerLatency (tts_node's logic)
def _tokens(streams: AnswerStreams, uid: str, text: str, start: int = 0, final: bool = True):
    """Feed `text` as word tokens of answer `uid`; the sentences they complete, as (generation, text)."""
    words = [w if i == 0 else f" {w}" for i, w in enumerate(text.split())]
    out = []
    for i, word in enumerate(words):
        got = streams.token(uid, start + i, word, final and i == len(words) - 1)
        out += [(s.generation, s.text) for s in got] if got is not None else [None]
    return out


def test_answer_streams_speak_each_answer_once_from_its_tokens_or_its_response():
    streams = AnswerStreams()
    assert _tokens(streams, "u1", "Hello there. How are you") == [(0, "Hello there."), (0, "How are you")]
    assert streams.response("u1", "Hello there. How are you") == []  # its tokens already spoke it
    assert [s.text for s in streams.response("u2", "Fine. Thanks!")] == ["Fine.", "Thanks!"]  # never streamed
    assert _tokens(streams, "u2", "Fine. Thanks!") == [None, None]  # late tokens of a whole-spoken answer
    assert not streams.streaming
    whole = AnswerStreams(stream_tokens=False)  # responses only: every response is spoken
    assert [s.text for s in whole.response("u1", "One. Two.")] == ["One.", "Two."]
    assert [s.text for s in whole.response("u1", "One. Two.")] == ["One.", "Two."]


def test_a_barge_in_cancels_streaming_and_playing_answers_with_their_late_tokens():
    streams = AnswerStreams()
    (sentence,) = streams.token("u1", 0, "First sentence. ", False)
    assert streams.start(sentence) and streams.current(sentence.generation)
    assert _tokens(streams, "u2", "Half a", final=False) == []
    assert streams.streaming
    assert streams.interrupt() is True  # u2 was still streaming
    assert not streams.current(sentence.generation) and not streams.start(sentence)
    assert streams.token("u1", 1, "Second sentence.", True) is None  # cancelled: u1 was playing
    assert _tokens(streams, "u2", "sentence.", start=2) == [None]
    assert streams.response("u2", "Half a sentence.") == []
    assert _tokens(streams, "u3", "A new answer.") == [(1, "A new answer.")]  # the new generation
    assert streams.interrupt() is False  # u3 was complete and never started: not cancelled
    assert streams.token("u3", 3, " And more.", True) is not None
    assert _tokens(streams, "u4", "Still heard.", start=0) == [(2, "Still heard.")]


def test_answers_that_went_quiet_are_not_cancelled_by_a_later_barge_in():
    streams = AnswerStreams()
    (sentence,) = streams.token("u1", 0, "Done.", True)
    assert streams.start(sentence)
    streams.quiet()  # spoken to the end, nothing streaming: u1 is no longer playing
    streams.interrupt()
    assert streams.token("u1", 1, " More.", True) is not None  # not cancelled
    streams.token("u2", 0, "Open", False)
    assert streams.start(Sentence(streams.generation, "u3", "Playing."))
    streams.quiet()  # u2 still streaming: u3 still counts as playing
    streams.interrupt()
    assert streams.token("u3", 0, "late", True) is None


def test_answer_streams_bound_what_they_remember(caplog):
    streams = AnswerStreams(logger=logging.getLogger("test"))
    with caplog.at_level(logging.WARNING, "test"):
        for i in range(MAX_OPEN_ANSWERS + 1):  # answers whose final token never comes
            streams.token(f"u{i}", 0, "never finished", False)
        assert "u0: no final token" in caplog.text
        assert [s.text for s in streams.token("u0", 3, " ends.", True)] == ["ends."]  # u0 forgot its text
        assert "token 3 arrived, expected 0" in caplog.text
    for i in range(RECENT_IDS + 10):
        streams.response(f"w{i}", "Hi.")
        streams.interrupt()
    assert len(streams._spoken_whole) == RECENT_IDS and len(streams._cancelled) <= RECENT_IDS
    with pytest.raises(ValueError, match="max_chars"):
        AnswerStreams(max_sentence_chars=5)


def test_answer_latency_reports_each_figure_once_when_both_ends_are_known():
    latency = AnswerLatency(limit=2)
    latency.token("u1", 10.0)
    latency.token("u1", 10.5)  # only the first token counts
    assert latency.due("u1") == {}  # no audio yet
    assert latency.first_audio("u1", 11.0) and not latency.first_audio("u1", 12.0)
    assert latency.due("u1") == {"first_token_to_audio_s": 1.0}
    assert latency.due("u1") == {}
    latency.response("u1", stamp=13.0, latency_first_token_s=0.5, latency_last_token_s=3.0)
    assert latency.due("u1") == {"end_of_speech_to_audio_s": 1.0}  # 11.0 - (13.0 - 3.0)
    # a whole response without tokens: its first token is inferred from the response's latencies
    latency.response("u2", stamp=20.0, latency_first_token_s=0.5, latency_last_token_s=2.0)
    latency.first_audio("u2", 19.0)
    assert latency.due("u2") == pytest.approx({"first_token_to_audio_s": 0.5, "end_of_speech_to_audio_s": 1.0})
    latency.token("u3", 30.0)  # past the limit: the oldest answer is forgotten
    assert latency.due("u1") == {} and latency.first_audio("u1", 40.0)
