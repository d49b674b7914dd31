"""mic_node with real rclpy: file playback, chunking, stamps, and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from rclpy.parameter import Parameter

from conftest import wait_for, write
from tinyalign_ros.core.audio import AudioError, find_device
from std_msgs.msg import String

from tinyalign_ros.msg import AudioChunk, Response
from tinyalign_ros.nodes.common import AUDIO_QOS, DROPPED_TOPIC, EVENT_QOS, LATCHED_QOS, drop_record
from tinyalign_ros.nodes.mic_node import MicNode


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
    node = mic(ros, input_file=str(path), chunk_size=1000, playback_rate=0.0, tail_silence_s=0.5,
               **{"fast.lossless": False})  # no asr_node here to pace it
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
        find_device("no-such-microphone-xyz", "input")
    with pytest.raises(AudioError, match="available input devices"):
        find_device("987", "input")


class FakePipeline:
    """Stands in for asr_node (its `audio_consumed` reports) and assistant_node (`response`,
    `dropped`), so a test decides when the pipeline has taken what."""

    def __init__(self, ros, ack_every_chunk: bool) -> None:
        self.node = ros.node("fake_pipeline")
        self.got: list[AudioChunk] = []
        self.leads: list[int] = []  # samples each chunk was ahead of the last acknowledgement when it arrived
        self.acked, self.pending, self.utterances = 0, 0, 0
        self.ack_every_chunk = ack_every_chunk
        self.consumed = self.node.create_publisher(String, "audio_consumed", LATCHED_QOS)
        self.responses = self.node.create_publisher(Response, "response", EVENT_QOS)
        self.dropped = self.node.create_publisher(String, DROPPED_TOPIC, EVENT_QOS)
        self.node.create_subscription(AudioChunk, "audio", self._on_chunk, AUDIO_QOS)
        self.report()

    def _on_chunk(self, chunk: AudioChunk) -> None:
        self.got.append(chunk)
        self.leads.append(chunk.offset + len(chunk.samples) - self.acked)
        if self.ack_every_chunk:
            self.report(chunk.offset + len(chunk.samples))

    def report(self, offset: int | None = None) -> None:
        self.acked = self.acked if offset is None else offset
        self.consumed.publish(String(data=json.dumps(
            {"offset": self.acked, "pending": self.pending, "utterances": self.utterances})))

    def done(self) -> bool:
        return bool(self.got) and self.got[-1].end_of_stream


def test_fast_source_stays_within_its_window_of_what_asr_node_consumed(ros, tmp_path):
    path = write(tmp_path / "in.wav", np.zeros(16000, np.float32), 16000)  # 10 chunks
    fake = FakePipeline(ros, ack_every_chunk=False)
    node = mic(ros, input_file=str(path), chunk_size=1600, playback_rate=0.0, tail_silence_s=0.0,
               **{"fast.window_chunks": 3, "fast.max_unanswered": 0})
    while not fake.done():
        expected = min(fake.acked // 1600 + 3, 10)
        wait_for(lambda: fake.done() or (len(fake.got) == expected and node.waiting_for),
                 what=f"{expected} chunks published and the source blocked",
                 state=lambda: (len(fake.got), fake.acked, node.waiting_for))
        assert len(fake.got) == expected  # not one chunk past the window
        fake.report(fake.acked + 1600)  # asr_node took one more
    assert [c.offset for c in fake.got] == [1600 * i for i in range(10)]
    assert max(fake.leads) == 3 * 1600
    # the last chunk can reach the fake before mic_node's thread, which published it, marks the end
    wait_for(node.finished.is_set, timeout=10, what="the source to mark the file finished")


def test_fast_source_waits_while_utterances_are_unanswered(ros, tmp_path):
    path = write(tmp_path / "in.wav", np.zeros(16000, np.float32), 16000)  # 10 chunks
    fake = FakePipeline(ros, ack_every_chunk=False)
    node = mic(ros, input_file=str(path), chunk_size=1600, playback_rate=0.0, tail_silence_s=0.0,
               **{"fast.window_chunks": 2, "fast.max_unanswered": 2})

    def stalled() -> bool:  # everything it sent is consumed (the window is open): only the answers hold it
        return (node.waiting_for != "" and node.offset == len(fake.got) * 1600 == node._asr["offset"])

    wait_for(lambda: len(fake.got) == 2 and node.waiting_for, what="the first window of chunks")
    fake.pending, fake.utterances = 1, 1  # one segment transcribing, one utterance waiting for its answer
    fake.report(2 * 1600)  # ...and both chunks consumed
    wait_for(lambda: node.unanswered() == 2 and stalled(), what="the source blocked on 2 unanswered utterances",
             state=lambda: (len(fake.got), node.unanswered(), node.waiting_for))
    assert len(fake.got) == 2
    fake.pending, fake.utterances = 0, 3  # the segment became an utterance, and another one came: 3 unanswered
    fake.report()
    wait_for(lambda: node.unanswered() == 3, what="the report of 3 unanswered utterances")
    fake.responses.publish(Response(utterance_id="asr_node-000001"))  # one answered: still 2 in flight
    wait_for(lambda: node.unanswered() == 2 and stalled(), what="one answer of three seen, the source still blocked",
             state=lambda: (len(fake.got), node.unanswered(), node.waiting_for))
    assert len(fake.got) == 2
    fake.ack_every_chunk = True  # from now on asr_node keeps up with the audio
    # an utterance assistant_node gave up on counts as handled; asr_node's drops are already out of `pending`
    fake.dropped.publish(String(data=drop_record("asr_node", "transcription queue full")))
    fake.dropped.publish(String(data=drop_record("assistant_node", "LLM queue full", "asr_node-000002")))
    wait_for(fake.done, what="the source to go on to the end of the file after the drop",
             state=lambda: (len(fake.got), node.unanswered(), node.waiting_for))
    assert node.unanswered() == 1  # asr_node's drop record did not count as an answer
    assert [c.offset for c in fake.got] == [1600 * i for i in range(10)]
