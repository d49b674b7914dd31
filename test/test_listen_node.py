"""asr_node's listen modes with real rclpy, VAD and Whisper: push-to-talk service, wake phrase."""
from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_srvs.srv import Trigger

from conftest import Probe, wait_for
from tinyalign_ros.msg import AudioChunk, Utterance
from tinyalign_ros.nodes.asr_node import AsrNode
from tinyalign_ros.nodes.common import AUDIO_QOS, to_time_msg

SR = 16000


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    """The piper voice (Whisper tiny.en hears it reliably, see corpus.make_demo_wav)."""
    from tinyalign_ros.core.corpus import Voice, synthesize

    voice = Voice("listen-piper-joe", "piper", "en_US-joe-medium")
    texts = {"command": "Please turn left.", "wake_command": "Hey Tiny, please turn left.", "wake": "Hey Tiny.",
             "question": "What time is it?"}
    return {name: synthesize(text, voice) for name, text in texts.items()}


class Mic:
    """Publishes speech as a live microphone would: chunks stamped on the node clock as if
    they were being captured now (sent faster than real time, stamped as real time)."""

    def __init__(self, ros, node: AsrNode) -> None:
        self.node, self.probe = node, Probe(ros)
        self.utterances: list[Utterance] = self.probe.collect(Utterance, "utterance")
        self.pub = self.probe.publisher(AudioChunk, "audio", AUDIO_QOS)
        self.listen = self.probe.node.create_client(Trigger, "listen")
        self.probe.connected(self.pub, node.utterance_pub, what="discovery of asr_node's topics")
        wait_for(self.listen.service_is_ready, what="asr_node's listen service")
        self.offset = 0
        self.base = -float("inf")  # wall time of stream sample 0

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def say(self, clip: np.ndarray, starting_in_s: float = 0.0) -> None:
        """0.5 s of silence, the clip, 1 s of silence: its speech starts ~0.5 s + `starting_in_s` from now."""
        audio = np.concatenate([np.zeros(SR // 2, np.float32), clip, np.zeros(SR, np.float32)])
        # a clip sent right after another continues the stream's clock, which never goes back
        self.base = max(self.base, self.now() + starting_in_s - self.offset / SR)
        for i in range(0, len(audio), 1600):
            part = audio[i:i + 1600]
            msg = AudioChunk(sample_rate=SR, offset=self.offset, samples=part)
            msg.header.stamp = to_time_msg(self.base + self.offset / SR)
            self.pub.publish(msg)
            self.offset += part.size

    def call_listen(self) -> Trigger.Response:
        future = self.listen.call_async(Trigger.Request())
        wait_for(future.done, what="the listen service's answer")
        return future.result()

    def settled(self, dropped: int, published: int) -> None:
        wait_for(lambda: self.node.listen_dropped == dropped and self.node.published == published
                 and len(self.utterances) == published  # counted at publish, received a moment later
                 and self.node.idle and not self.node.segmenter.in_speech, timeout=60,
                 what=f"{dropped} utterances kept back and {published} passed on")


def asr(ros, **listen) -> AsrNode:
    params = {"encoder.enabled": False, **{f"listen.{k}": v for k, v in listen.items()}}
    return ros.add(AsrNode(namespace="tinyalign", context=ros.context,
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]))


def test_push_to_talk_passes_one_utterance_per_listen_call(ros, clips):
    node = asr(ros, mode="push_to_talk", timeout_s=3.0)
    mic = Mic(ros, node)
    mic.say(clips["command"])
    mic.settled(dropped=1, published=0)  # nobody pressed the button
    answer = mic.call_listen()
    assert answer.success and "3 s" in answer.message
    mic.say(clips["command"])
    mic.settled(dropped=1, published=1)
    assert "left" in mic.utterances[-1].transcript.lower()
    mic.say(clips["command"])
    mic.settled(dropped=2, published=1)  # one call, one utterance
    assert mic.call_listen().success
    mic.say(clips["command"], starting_in_s=3.0)  # the operator starts talking after the window lapsed
    mic.settled(dropped=3, published=1)
    refused = node.set_parameters_atomically([Parameter("listen.mode", value="wake_word"),
                                              Parameter("listen.wake_phrase", value="?!")])
    assert not refused.successful and "wake phrase" in refused.reason and node.listen.mode == "push_to_talk"
    assert node.set_parameters([Parameter("listen.mode", value="continuous")])[0].successful  # at run time
    mic.say(clips["command"])
    mic.settled(dropped=3, published=2)


def test_wake_phrase_is_stripped_and_alone_opens_the_next_utterance(ros, clips):
    node = asr(ros, mode="wake_word", wake_phrase="hey tiny")
    mic = Mic(ros, node)
    mic.say(clips["wake_command"])
    mic.settled(dropped=0, published=1)
    assert mic.utterances[-1].transcript.lower().rstrip(".") == "please turn left"
    mic.say(clips["command"])
    mic.settled(dropped=1, published=1)  # not addressed to the robot
    mic.say(clips["wake"])
    mic.say(clips["question"])
    mic.settled(dropped=2, published=2)  # the phrase alone is not passed on, the question after it is
    assert "time" in mic.utterances[-1].transcript.lower()
