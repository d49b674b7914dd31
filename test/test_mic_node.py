"""mic_node with real rclpy: file playback, chunking, stamps, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter

from conftest import wait_for, write
from tinyalign_ros.core.audio import AudioError
from tinyalign_ros.msg import AudioChunk
from tinyalign_ros.nodes.common import AUDIO_QOS
from tinyalign_ros.nodes.mic_node import MicNode, find_input_device


def mic(ros, **params) -> MicNode:
    return ros.add(MicNode(namespace="tinyalign", context=ros.context,
                           parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]))


def test_file_source_publishes_fixed_chunks_with_offsets_and_end_of_stream(ros, tmp_path):
    rate = 44100  # any rate and channel count in, 16 kHz mono out
    data = np.random.default_rng(0).uniform(-0.3, 0.3, size=(rate, 2)).astype(np.float32)
    path = write(tmp_path / "in.wav", data, rate)
    got: list[AudioChunk] = []
    listener = ros.node("listener")
    listener.create_subscription(AudioChunk, "audio", got.append, AUDIO_QOS)
    node = mic(ros, input_file=str(path), chunk_size=1000, playback_rate=0.0, tail_silence_s=0.5)
    wait_for(lambda: got and got[-1].end_of_stream, what="the end-of-stream chunk")
    assert node.finished.is_set()
    assert all(len(c.samples) == 1000 and c.sample_rate == 16000 for c in got)
    assert [c.offset for c in got] == [1000 * i for i in range(len(got))]
    assert sum(c.end_of_stream for c in got) == 1
    assert len(got) == -(-(16000 + 8000) // 1000)  # one second of audio + 0.5 s tail, rounded up
    stamps = [c.header.stamp.sec + c.header.stamp.nanosec * 1e-9 for c in got]
    assert stamps == sorted(stamps)


def test_real_time_playback_takes_real_time(ros, tmp_path):
    path = write(tmp_path / "in.wav", np.zeros(8000, np.float32), 16000)  # 0.5 s
    got: list[AudioChunk] = []
    ros.node("listener").create_subscription(AudioChunk, "audio", got.append, AUDIO_QOS)
    mic(ros, input_file=str(path), chunk_size=1600, playback_rate=1.0, tail_silence_s=0.0)
    wait_for(lambda: got and got[-1].end_of_stream, what="the end-of-stream chunk")
    span = (got[-1].header.stamp.sec + got[-1].header.stamp.nanosec * 1e-9) - (
        got[0].header.stamp.sec + got[0].header.stamp.nanosec * 1e-9)
    assert span >= 0.35  # 5 chunks of 0.1 s: the last is published 0.4 s after the first


def test_missing_file_is_a_clear_error(ros, tmp_path):
    with pytest.raises(AudioError, match="not found"):
        mic(ros, input_file=str(tmp_path / "nope.wav"))


def test_overlong_file_is_refused(ros, tmp_path):
    path = write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(AudioError, match="more than"):
        mic(ros, input_file=str(path), max_file_s=1.0)


def test_missing_device_error_lists_the_available_devices():
    with pytest.raises(AudioError, match="available input devices"):
        find_input_device("no-such-microphone-xyz")
    with pytest.raises(AudioError, match="available input devices"):
        find_input_device("987")
