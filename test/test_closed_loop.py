"""Closed loop: the robot's own voice fed back into its microphone input.

With the echo gate the robot answers the operator once and never itself; without it (the
control, which shows the loop is real) it transcribes its own answer.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from rclpy.node import Node

from conftest import wait_for
from tinyalign_ros.msg import AudioChunk
from tinyalign_ros.nodes.common import AUDIO_QOS
from tinyalign_ros.nodes.graph import NAMESPACE, EmbeddedGraph


@pytest.fixture(scope="module")
def one_command(tmp_path_factory):
    from tinyalign_ros.core.corpus import make_demo_wav

    path = tmp_path_factory.mktemp("loop") / "command.wav"
    make_demo_wav(path, ["Please turn on the lights in the kitchen."])
    return path


def add_loopback(graph: EmbeddedGraph) -> Node:
    """A quiet room with a live microphone: 100 ms chunks of silence, plus whatever tts_node says."""
    relay = Node("loopback", namespace=NAMESPACE, context=graph.context)
    pub = relay.create_publisher(AudioChunk, "audio", AUDIO_QOS)
    heard: list[np.ndarray] = []
    offset = 10**9  # a stream of its own, after the file's

    def speak_into_room(msg: AudioChunk) -> None:
        heard.append(np.asarray(msg.samples, dtype=np.float32))

    def microphone() -> None:
        nonlocal offset
        room = np.concatenate(heard) if heard else np.zeros(0, np.float32)
        chunk = np.zeros(1600, np.float32)
        chunk[: min(1600, room.size)] = room[:1600]
        heard[:] = [room[1600:]] if room.size > 1600 else []
        msg = AudioChunk(sample_rate=16000, offset=offset, samples=chunk)
        msg.header.stamp = relay.get_clock().now().to_msg()
        offset += 1600
        pub.publish(msg)

    relay.create_subscription(AudioChunk, "speech_audio", speak_into_room, AUDIO_QOS)
    graph.executor.add_node(relay)
    graph.nodes["mic_node"].finished.wait(30)  # the operator's command first, then the room
    relay.create_timer(0.1, microphone)
    return relay


@pytest.mark.parametrize("gate", [True, False])
def test_robot_never_answers_itself(one_command, gate):
    overrides = {
        "mic_node": {"input_file": str(one_command), "playback_rate": 0.0},
        "asr_node": {"echo_gate": gate},
        "tts_node": {"play": False, "sample_rate": 16000, "engine": "espeak-ng"},
    }
    with EmbeddedGraph(overrides=overrides) as graph:
        relay = add_loopback(graph)
        tts = graph.nodes["tts_node"]
        listener = graph.listener
        wait_for(lambda: listener.responses, timeout=120, what="the answer to the operator")
        wait_for(lambda: tts.speaking, timeout=60, what="the robot to start speaking")
        if gate:
            wait_for(lambda: graph.file_done() and not tts.speaking, timeout=120, what="the robot to finish")
            time.sleep(1.0)  # a window for any echo utterance to surface: none must
            assert len(listener.utterances) == 1, [u.transcript for u in listener.utterances.values()]
            assert graph.nodes["asr_node"].gated_chunks > 0  # its voice did reach the microphone
        else:
            wait_for(lambda: len(listener.utterances) >= 2, timeout=120, what="the robot hearing itself")
        relay.destroy_node()
