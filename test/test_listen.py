"""ListenGate: continuous, push-to-talk windows, wake phrase (ROS-free, times in seconds)."""
from __future__ import annotations

import pytest

from tinyalign_ros.core.listen import ListenGate, strip_phrase, words


def test_continuous_passes_everything_and_refuses_a_listen_call():
    gate = ListenGate()
    assert gate.check_segment(12.0).passed
    verdict = gate.check_transcript("Turn left.", 12.0, 13.0)
    assert verdict.passed and verdict.transcript == "Turn left."
    with pytest.raises(ValueError, match="continuous"):
        gate.open(10.0)


def test_push_to_talk_one_utterance_per_call():
    gate = ListenGate("push_to_talk", timeout_s=5.0, grace_s=0.3)
    assert not gate.check_segment(1.0).passed  # no call yet
    assert "listen call" in gate.check_segment(1.0).reason
    gate.open(10.0)
    assert gate.is_open(12.0)
    assert gate.check_segment(10.5).passed
    assert not gate.is_open(10.6)
    assert not gate.check_segment(11.5).passed  # the call was used up
    assert gate.check_transcript("Anything.", 11.5, 12.0).passed  # the transcript check is the wake word's


def test_push_to_talk_window_times_out_and_ignores_earlier_speech():
    gate = ListenGate("push_to_talk", timeout_s=2.0, grace_s=0.2)
    gate.open(10.0)
    assert gate.check_segment(9.9).passed  # VAD pre-roll reaching back before the call
    gate.open(20.0)
    early = gate.check_segment(19.0)  # someone was already talking before the call
    assert not early.passed and "before the window" in early.reason
    assert gate.check_segment(21.9).passed  # ...the window stayed open for the operator
    gate.open(30.0)
    assert not gate.is_open(32.1)
    late = gate.check_segment(32.5)
    assert not late.passed and "no speech started within 2 s" in late.reason
    assert not gate.check_segment(33.0).passed  # closed for good


def test_wake_phrase_is_matched_as_words_and_stripped():
    gate = ListenGate("wake_word", wake_phrase="Hey tiny", timeout_s=5.0)
    assert gate.check_segment(0.0).passed  # the decision needs the transcript
    v = gate.check_transcript(" Hey, Tiny! turn on the lights.", 1.0, 3.0)
    assert v.passed and v.transcript == "Turn on the lights."
    assert not gate.check_transcript("Turn on the lights.", 5.0, 6.0).passed
    assert not gate.check_transcript("Hey, tin roof.", 7.0, 8.0).passed
    assert not gate.check_transcript("They tiny robots.", 7.0, 8.0).passed  # whole words only
    assert gate.check_transcript("HEY-TINY what's the time?", 9.0, 10.0).transcript == "What's the time?"


def test_wake_phrase_alone_opens_the_window_for_the_next_utterance():
    gate = ListenGate("wake_word", wake_phrase="hey tiny", timeout_s=4.0, grace_s=0.2)
    alone = gate.check_transcript("Hey Tiny.", 1.0, 1.8)
    assert not alone.passed and "next utterance" in alone.reason
    nxt = gate.check_transcript("Bring me a cup.", 2.9, 4.0)  # started after the phrase, before 1.8 + 4 s
    assert nxt.passed and nxt.transcript == "Bring me a cup."
    assert not gate.check_transcript("And a spoon.", 4.5, 5.0).passed  # one utterance per wake phrase
    gate.check_transcript("hey tiny", 10.0, 10.5)
    assert not gate.check_transcript("Too late.", 15.0, 16.0).passed
    gate.open(20.0)  # the listen service works in wake_word mode too
    assert gate.check_transcript("Without the phrase.", 20.5, 21.0).passed


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "sometimes"}, "mode must be one of"),
    ({"mode": "wake_word", "wake_phrase": " ,!"}, "wake phrase"),
    ({"mode": "push_to_talk", "timeout_s": 0}, "timeout_s"),
    ({"mode": "push_to_talk", "timeout_s": float("nan")}, "timeout_s"),
    ({"grace_s": -1.0}, "grace_s"),
])
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ListenGate(**kwargs)


def test_words_and_strip_phrase():
    assert words("Hey, TINY! What's up?") == ["hey", "tiny", "whats", "up"]
    assert strip_phrase("hey tiny", ["hey", "tiny"]) == ""
    assert strip_phrase("hey", ["hey", "tiny"]) is None
    assert strip_phrase("Hey tiny... go.", ["hey", "tiny"]) == "Go."
