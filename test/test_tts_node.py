"""tts_node with real rclpy: streaming speech, the speaking state, barge-in, devices, WAV output."""
from __future__ import annotations

import time

import numpy as np
import pytest
import soundfile as sf
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.parameter import Parameter
from std_msgs.msg import Bool, Empty, Float32

from conftest import wait_for
from tinyalign_ros.core.audio import AudioError, find_device
from tinyalign_ros.msg import AudioChunk, Response, ResponseToken
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS, LATCHED_QOS, to_time_msg
from tinyalign_ros.nodes.tts_node import TtsNode

LONG_ANSWER = ("The kitchen is down the hall on your left. The living room is straight ahead of you. "
               "The bathroom is upstairs, second door on the right. Ask me again if you get lost.")


def tts(ros, **params) -> TtsNode:
    defaults = {"engine": "espeak-ng", "play": False}
    return ros.add(TtsNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {**defaults, **params}.items()]))


class Driver:
    """Plays the assistant (tokens, responses, barge-in) and records what tts_node says."""

    def __init__(self, ros) -> None:
        node = ros.node("driver")
        self.node = node
        self.tokens = node.create_publisher(ResponseToken, "response_tokens", EVENT_QOS)
        self.responses = node.create_publisher(Response, "response", EVENT_QOS)
        self.barge = node.create_publisher(Empty, "barge_in", EVENT_QOS)
        self.speaking: list[tuple[float, bool]] = []
        self.chunks: list[AudioChunk] = []
        self.diagnostics: list[DiagnosticStatus] = []
        self.spoken_after: list[float] = []  # metrics/end_of_speech_to_audio_s
        node.create_subscription(Float32, "metrics/end_of_speech_to_audio_s",
                                 lambda m: self.spoken_after.append(m.data), EVENT_QOS)
        node.create_subscription(Bool, "speaking", lambda m: self.speaking.append((time.monotonic(), m.data)),
                                 LATCHED_QOS)
        node.create_subscription(AudioChunk, "speech_audio", self.chunks.append, AUDIO_QOS)
        node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(
            s for s in m.status if s.name.startswith("tts_node")), 10)
        self.index: dict[str, int] = {}

    def connected(self) -> None:
        wait_for(lambda: (self.tokens.get_subscription_count() and self.responses.get_subscription_count()
                          and self.barge.get_subscription_count() and self.speaking),
                 what="tts_node's subscriptions and its latched speaking state")

    def say(self, uid: str, text: str, final: bool = False) -> None:
        """Publish `text` as word tokens (like an LLM streams), optionally closing the answer."""
        words = [w if i == 0 else f" {w}" for i, w in enumerate(text.split())] + ([""] if final else [])
        for j, word in enumerate(words):
            i = self.index.get(uid, 0)
            msg = ResponseToken(utterance_id=uid, index=i, text=word, final=final and j == len(words) - 1)
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.tokens.publish(msg)
            self.index[uid] = i + 1

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def respond(self, uid: str, text: str, end_of_speech: float | None = None,
                first_token: float | None = None) -> None:
        """Publish the final Response; its latencies are relative to `end_of_speech` (default 0.5 s ago)."""
        now = self.now()
        end_of_speech = now - 0.5 if end_of_speech is None else end_of_speech
        first_token = end_of_speech + 0.2 if first_token is None else first_token
        msg = Response(utterance_id=uid, text=text, mode="cascade",
                       latency_first_token_s=first_token - end_of_speech, latency_last_token_s=now - end_of_speech)
        msg.header.stamp = to_time_msg(now)
        self.responses.publish(msg)

    @property
    def is_speaking(self) -> bool:
        return bool(self.speaking) and self.speaking[-1][1]

    def audio_s(self) -> float:
        return sum(len(c.samples) for c in self.chunks) / self.chunks[0].sample_rate if self.chunks else 0.0


def test_streams_tokens_to_speech_from_the_first_sentence(ros):
    node = tts(ros, engine="piper", tail_s=0.3)
    driver = Driver(ros)
    driver.connected()
    assert driver.speaking[-1][1] is False
    end_of_speech = driver.now() - 0.4  # the operator stopped talking 0.4 s before the first token
    first_token = driver.now()
    driver.say("u1", "Hello there. The kitchen")  # one complete sentence, the next still streaming
    wait_for(lambda: driver.is_speaking, timeout=10, what="speaking True after the first sentence")
    # speaking goes True just before the first chunk is published: wait for it, don't race it
    wait_for(lambda: driver.chunks, timeout=10, what="audio published while speaking")
    driver.say("u1", "is on your left.", final=True)
    driver.respond("u1", "Hello there. The kitchen is on your left.", end_of_speech, first_token)
    wait_for(lambda: not driver.is_speaking, timeout=15, what="speaking False after the answer")
    states = [v for _, v in driver.speaking]
    # False, then speaking, then False at the end (a short dip between sentences is allowed when
    # the next sentence is not synthesized within tail_s on a loaded CPU)
    assert states[0] is False and True in states and states[-1] is False
    last_chunk = driver.chunks[-1]
    assert {c.sample_rate for c in driver.chunks} == {22050}
    assert [c.offset for c in driver.chunks] == list(np.cumsum([0] + [len(c.samples) for c in driver.chunks[:-1]]))
    assert 1.5 < driver.audio_s() < 6.0  # both sentences, at plausible length
    true_at, false_at = driver.speaking[1][0], driver.speaking[2][0]
    assert false_at - true_at >= driver.audio_s() * 0.9  # played at real time, then the tail
    assert len(last_chunk.samples) <= 0.05 * 22050 + 1
    assert node.sentences_spoken == 2
    # latency: this node's share (first token -> first sample) and end of speech -> first sample
    assert 0 < node.last_first_token_to_audio_s < 3.0
    assert abs(node.last_end_of_speech_to_audio_s - node.last_first_token_to_audio_s - 0.4) < 0.02
    wait_for(lambda: driver.spoken_after, timeout=5, what="the latency on metrics/end_of_speech_to_audio_s")
    assert driver.spoken_after == [pytest.approx(node.last_end_of_speech_to_audio_s, abs=1e-5)]  # once per answer
    wait_for(lambda: any(kv.key == "end_of_speech_to_audio_s" and kv.value != "nan"
                         for s in driver.diagnostics for kv in s.values), timeout=5, what="latency on /diagnostics")


def test_barge_in_stops_speech_mid_answer_and_drops_the_rest(ros):
    node = tts(ros, tail_s=0.3)
    driver = Driver(ros)
    driver.connected()
    driver.say("u1", LONG_ANSWER, final=False)  # still streaming when interrupted
    wait_for(lambda: driver.is_speaking, timeout=10, what="speaking True")
    time.sleep(0.5)
    started = time.monotonic()
    driver.barge.publish(Empty())
    wait_for(lambda: not driver.is_speaking, timeout=2, what="speaking False after barge-in")
    stopped_after = time.monotonic() - started
    assert stopped_after < 0.5  # no tail: the operator is talking now
    time.sleep(0.3)
    spoken = driver.audio_s()
    driver.say("u1", "More words of the interrupted answer.", final=True)  # late tokens stay silent
    time.sleep(1.0)
    assert driver.audio_s() == spoken and not driver.is_speaking
    assert spoken < 2.5  # the whole answer is ~10 s
    assert node.barge_ins == 1
    driver.say("u2", "Yes?", final=True)  # the next answer is spoken again
    wait_for(lambda: driver.is_speaking, timeout=10, what="speaking again for the next answer")


def test_barge_in_parameter_false_ignores_it(ros):
    node = tts(ros, barge_in=False, tail_s=0.0)
    driver = Driver(ros)
    driver.connected()
    driver.say("u1", "One two three four five six.", final=True)
    wait_for(lambda: driver.is_speaking, timeout=10, what="speaking True")
    driver.barge.publish(Empty())
    time.sleep(0.5)
    assert driver.is_speaking and node.barge_ins == 0


def test_missing_device_is_a_clear_error_and_speech_is_still_published(ros):
    with pytest.raises(AudioError, match="available output devices"):
        find_device("no-such-speaker-xyz", "output")
    import sounddevice as sd

    if not any(d["max_output_channels"] > 0 for d in sd.query_devices()):  # this machine: no sound card
        with pytest.raises(AudioError, match="no output audio device ''; available output devices: none"):
            find_device("", "output")
    node = tts(ros, play=True, device="no-such-speaker-xyz", tail_s=0.0)
    assert "no output audio device 'no-such-speaker-xyz'" in node.device_error
    assert "available output devices" in node.device_error
    driver = Driver(ros)
    driver.connected()
    driver.say("u1", "Still working.", final=True)
    wait_for(lambda: driver.chunks and not driver.is_speaking and node.idle, timeout=10, what="speech published")
    assert driver.audio_s() > 0.5
    wait_for(lambda: any(s.level == DiagnosticStatus.WARN and "device unavailable" in s.message
                         for s in driver.diagnostics), timeout=5, what="a WARN diagnostic about the device")


class _FakeStream:
    """A sounddevice.OutputStream stand-in: blocks like a sound card, can be made to fail."""

    fail_after = None
    instances: list["_FakeStream"] = []

    def __init__(self, device=None, channels=1, samplerate=48000, dtype="float32") -> None:
        self.samplerate, self.latency, self.written, self.aborts = samplerate, 0.02, [], 0
        _FakeStream.instances.append(self)

    def start(self) -> None:
        pass

    def write(self, data: np.ndarray) -> None:
        if self.fail_after is not None and len(self.written) >= self.fail_after:
            raise RuntimeError("Stream is stopped [PaErrorCode -9983]")
        assert data.dtype == np.float32 and data.ndim == 2
        self.written.append(data.copy())
        time.sleep(data.shape[0] / self.samplerate)

    def abort(self) -> None:
        self.aborts += 1

    def close(self) -> None:
        pass


def test_plays_on_a_named_device_and_survives_its_failure(ros, monkeypatch):
    import sounddevice as sd

    devices = [{"name": "Mic In", "max_input_channels": 1, "max_output_channels": 0, "default_samplerate": 16000},
               {"name": "USB Speaker", "max_input_channels": 0, "max_output_channels": 2, "default_samplerate": 48000}]
    monkeypatch.setattr(sd, "query_devices", lambda device=None, kind=None: devices if kind is None else devices[device])
    monkeypatch.setattr(sd, "OutputStream", _FakeStream)
    _FakeStream.instances.clear()
    assert find_device("usb", "output") == 1 and find_device("1", "output") == 1
    assert find_device("", "output") is None
    with pytest.raises(AudioError, match="1: USB Speaker"):
        find_device("0", "output")  # an input-only device is not an output
    node = tts(ros, play=True, device="USB", tail_s=0.0)
    assert node.device_name == "USB Speaker" and not node.device_error
    driver = Driver(ros)
    driver.connected()
    driver.say("u1", "Hello from the speaker.", final=True)
    wait_for(lambda: driver.speaking[-1:] and not driver.is_speaking and node.idle and driver.chunks,
             timeout=10, what="the answer played")
    stream = _FakeStream.instances[0]
    played = sum(len(w) for w in stream.written) / 48000  # resampled to the card's rate
    assert abs(played - driver.audio_s()) < 0.05 and played > 0.5
    stream.fail_after = len(stream.written) + 3  # the card goes away mid-answer
    before = driver.audio_s()
    driver.say("u2", "This answer loses its speaker but is still published.", final=True)
    wait_for(lambda: node.device_error and node.idle and driver.audio_s() - before > 1.5, timeout=15,
             what="speech going on after the device failed")
    assert "PaErrorCode" in node.device_error


def test_speak_to_file_appends_every_answer_to_one_wav(ros, tmp_path):
    path = tmp_path / "out" / "spoken.wav"
    node = tts(ros, stream_tokens=False, speak_to_file=str(path), realtime=False, publish_audio=False,
               tail_s=0.0)
    assert path.is_file() and sf.info(str(path)).frames == 0  # created (truncated) at start
    driver = Driver(ros)
    wait_for(lambda: driver.responses.get_subscription_count(), what="tts_node's response subscription")
    driver.respond("u1", "First answer. It has two sentences.")
    wait_for(lambda: node.sentences_spoken == 2 and node.idle, timeout=10, what="the first answer spoken")
    first = sf.info(str(path))
    assert first.samplerate == 22050 and 1.5 < first.duration < 6.0
    driver.respond("u2", "Second answer.")
    wait_for(lambda: node.sentences_spoken == 3 and node.idle, timeout=10, what="the second answer spoken")
    second = sf.info(str(path))
    assert second.duration - first.duration > 0.5
    data, _ = sf.read(str(path))
    assert np.sqrt(np.mean(data ** 2)) > 0.01
    assert not driver.chunks  # publish_audio false


def test_a_response_without_tokens_is_spoken_once(ros):
    node = tts(ros, realtime=False, tail_s=0.0)
    driver = Driver(ros)
    driver.connected()
    driver.respond("u1", "Only a response.")  # an assistant that does not stream
    wait_for(lambda: node.sentences_spoken == 1 and node.idle, timeout=10, what="the response spoken")
    driver.say("u1", "Only a response.", final=True)  # tokens arriving late must not repeat it
    time.sleep(0.5)
    assert node.sentences_spoken == 1
