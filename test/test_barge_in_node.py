"""tts_node's barge-in by voice with real rclpy: a room relays what the robot says back into
its microphone (attenuated, late); the robot talks to the end over its own echo, and stops when
the operator talks over it."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_msgs.msg import Bool

from conftest import wait_for
from tinyalign_ros.msg import AudioChunk, ResponseToken
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS, LATCHED_QOS, from_time_msg, to_time_msg
from tinyalign_ros.nodes.tts_node import TtsNode

SR = 16000
ECHO_GAIN = 0.3
ECHO_DELAY_S = 0.03  # speaker to microphone through the room
MIC_LATENCY_S = 0.05  # a chunk is cut this long after its last sample (the echo arrives over DDS)


@pytest.fixture(scope="module")
def operator_voice() -> np.ndarray:
    from tinyalign_ros.core.corpus import Voice, synthesize

    return synthesize("No, wait, I meant the bedroom.", Voice("operator-joe", "piper", "en_US-joe-medium"))


class Room:
    """A live microphone as a sound card delivers one: 100 ms chunks cut from a sample timeline
    that runs on wall time, each stamped with the time of its first sample however late the timer
    cutting it fires (a loaded CPU skips timer ticks; a sound card does not skip samples). On that
    timeline the robot's speech_audio lands ECHO_DELAY_S after its own stamp, at ECHO_GAIN, plus
    whatever the operator says into it."""

    def __init__(self, ros) -> None:
        self.node = ros.node("room")
        self.mic = self.node.create_publisher(AudioChunk, "audio", AUDIO_QOS)
        self.tokens = self.node.create_publisher(ResponseToken, "response_tokens", EVENT_QOS)
        self.speaking: list[bool] = []
        self.node.create_subscription(Bool, "speaking", lambda m: self.speaking.append(m.data), LATCHED_QOS)
        self.node.create_subscription(AudioChunk, "speech_audio", self._hear, AUDIO_QOS)
        self._lock = threading.Lock()
        self._start = self._now()  # wall time of timeline sample 0
        self._ahead = np.zeros(0, np.float32)  # the timeline from sample `offset` on
        self.offset = 0
        self.node.create_timer(0.02, self._capture)

    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _add(self, t: float, samples: np.ndarray) -> None:
        """Mix `samples` into the timeline from wall time `t` on (what falls before the next chunk is lost)."""
        with self._lock:
            i = round((t - self._start) * SR) - self.offset
            samples = samples[max(0, -i):]
            i = max(0, i)
            if i + samples.size > self._ahead.size:
                self._ahead = np.concatenate([self._ahead, np.zeros(i + samples.size - self._ahead.size, np.float32)])
            self._ahead[i:i + samples.size] += samples

    def _hear(self, msg: AudioChunk) -> None:
        assert msg.sample_rate == SR
        self._add(from_time_msg(msg.header.stamp) + ECHO_DELAY_S, ECHO_GAIN * np.asarray(msg.samples, np.float32))

    def say(self, clip: np.ndarray) -> float:
        """The operator speaks `clip` into the microphone from now on; returns that time."""
        t = self._now()
        self._add(t, clip.astype(np.float32))
        return t

    def _capture(self) -> None:
        """Publish every chunk whose samples are all in the past, and whose echo has had time to
        arrive over DDS (MIC_LATENCY_S)."""
        while (self._now() - MIC_LATENCY_S - self._start) * SR >= self.offset + 1600:
            with self._lock:
                chunk = np.zeros(1600, np.float32)
                part = self._ahead[:1600]
                chunk[:part.size] = part
                self._ahead = self._ahead[1600:]
                msg = AudioChunk(sample_rate=SR, offset=self.offset, samples=chunk)
                msg.header.stamp = to_time_msg(self._start + self.offset / SR)
                self.offset += chunk.size
            self.mic.publish(msg)

    def from_another_clock(self, offset_s: float) -> None:
        """One chunk of the robot's voice from a microphone whose clock is `offset_s` off."""
        msg = AudioChunk(sample_rate=SR, offset=10**9, samples=np.full(1600, 0.5, np.float32))
        msg.header.stamp = to_time_msg(self._now() + offset_s)
        self.mic.publish(msg)

    def answer(self, uid: str, text: str) -> None:
        msg = ResponseToken(utterance_id=uid, index=0, text=text, final=True)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.tokens.publish(msg)


def _robot_in_a_room(ros, first_clause_chars: int) -> tuple[TtsNode, Room]:
    node = ros.add(TtsNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {"engine": "espeak-ng", "play": False, "sample_rate": SR,
                                           "tail_s": 0.3, "barge_in_on_speech": True,
                                           "first_clause_chars": first_clause_chars}.items()]))
    room = Room(ros)
    wait_for(lambda: room.tokens.get_subscription_count() and room.mic.get_subscription_count()
             and node.audio_pub.get_subscription_count() and room.speaking, what="discovery")
    return node, room


def _counters(node) -> dict:
    """What tts_node was doing, for a wait that timed out (2 of ~15 runs on 2026-12-05 did, once in
    the full suite, without saying why)."""
    return {"barge_ins": node.voice_barge_ins, "interrupted": node.sentences_interrupted,
            "spoken": node.sentences_spoken, "speaking": node.speaking, "idle": node.idle}


def test_the_robot_talks_over_its_echo_and_stops_for_the_operator(ros, operator_voice):
    # whole sentences: the long one below must be playing when the operator cuts in a second into
    # the answer (a first clause alone would end before that; the next test cuts in after it)
    node, room = _robot_in_a_room(ros, first_clause_chars=0)

    room.answer("u1", "The kitchen is down the hall on your left. The living room is straight ahead.")
    wait_for(lambda: node.speaking, timeout=10, what="the robot speaking")
    room.from_another_clock(+2.0)  # no speaker audio is known at that time: not judged, not a barge-in
    wait_for(lambda: node.off_clock_mic_chunks == 1, timeout=5, what="the off-clock chunk skipped")
    wait_for(lambda: not node.speaking and node.idle, timeout=30, what="the robot finishing over its own echo")
    assert node.voice_barge_ins == 0 and node.sentences_spoken == 2 and node.sentences_interrupted == 0
    p50, p95 = node.detector.echo_ratios()
    assert p95 < node.detector.config.threshold and p95 > 0.5 * ECHO_GAIN  # it did hear its echo

    # a long first sentence (~8 s): however late a loaded CPU gets to the microphone chunks, the
    # operator's voice is judged while that sentence plays
    room.answer("u2", "The bathroom is upstairs, second door on the right, just past the linen closet and the "
                      "little window over the garden. Ask me again if you get lost.")
    wait_for(lambda: node.speaking, timeout=10, what="the robot speaking again")
    time.sleep(1.0)  # the operator cuts in a second into the answer (a moment, not a condition)
    cut_in = room.say(operator_voice)
    wait_for(lambda: node.voice_barge_ins == 1 and node.sentences_interrupted == 1 and node.idle, timeout=30,
             what="the barge-in counted and the sentence cut short", state=lambda: _counters(node))
    assert not node.speaking and node.sentences_spoken == 2  # the rest of the answer was dropped
    # decided on the microphone's timeline (not the wall clock of a loaded test machine): within
    # the clip's leading silence plus min_speech_ms of voice
    assert 0 < node.last_voice_barge_in.at - cut_in < 1.0


def test_a_cut_in_after_the_first_clause_stops_the_rest_of_the_answer(ros, operator_voice):
    """The default tts: the answer's first clause ("Sure,") is spoken on its own, then the rest
    sentence by sentence. The operator cuts in once that clause has been played, i.e. across the
    boundary between the first two pieces: the barge-in stops the piece that is playing and drops
    the rest of the answer, as it does within one sentence."""
    node, room = _robot_in_a_room(ros, first_clause_chars=4)

    room.answer("u1", "Sure, the bathroom is upstairs, second door on the right, just past the linen closet "
                      "and the little window over the garden. Ask me again if you get lost.")
    wait_for(lambda: node.sentences_spoken == 1, timeout=20, what="the first clause played")
    assert node.speaking and node.voice_barge_ins == 0  # the robot goes on with the next piece
    cut_in = room.say(operator_voice)
    wait_for(lambda: node.voice_barge_ins == 1 and node.sentences_interrupted == 1 and node.idle, timeout=30,
             what="the barge-in counted and the second piece cut short", state=lambda: _counters(node))
    assert not node.speaking and node.sentences_spoken == 1  # the last sentence was never spoken
    assert 0 < node.last_voice_barge_in.at - cut_in < 1.0
