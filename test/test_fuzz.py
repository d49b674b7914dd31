"""Malformed messages at the subscribers: the node logs and survives, and keeps working after."""
from __future__ import annotations

import numpy as np

from conftest import wait_for
from tinyalign_ros.msg import AudioChunk, Utterance
from tinyalign_ros.nodes.asr_node import AsrNode
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS


def nasty_chunks(rng: np.random.Generator) -> list[AudioChunk]:
    def chunk(samples, rate=16000, offset=0, end=False) -> AudioChunk:
        return AudioChunk(sample_rate=rate, offset=offset, end_of_stream=end,
                          samples=np.asarray(samples, dtype=np.float32))

    out = [
        chunk([], 16000), chunk(np.full(1600, np.nan)), chunk(np.full(1600, np.inf)),
        chunk(np.full(1600, -np.inf)), chunk(rng.normal(size=1600), rate=0),
        chunk(rng.normal(size=1600), rate=4_294_967_295), chunk(rng.normal(size=3), rate=1),
        chunk(rng.normal(size=1600) * 1e30), chunk(np.ones(1600) * 3.0),
        chunk(rng.normal(size=1600), offset=2**63), chunk(rng.normal(size=1600), offset=5),
        chunk([], end=True), chunk(rng.normal(size=16000 * 30) * 0.3),  # 30 s in one chunk
        chunk(np.zeros(1), end=True),
    ]
    for _ in range(30):  # random sizes, rates, offsets and values
        n = int(rng.integers(0, 5000))
        values = rng.normal(size=n) * rng.choice([1e-6, 0.1, 1.0, 1e6])
        if n and rng.random() < 0.3:
            values[rng.integers(0, n)] = rng.choice([np.nan, np.inf])
        out.append(chunk(values, rate=int(rng.choice([8000, 16000, 22050, 44100, 48000, 1, 0])),
                         offset=int(rng.integers(0, 2**40)), end=bool(rng.random() < 0.1)))
    return out


def test_asr_node_survives_malformed_audio_and_still_transcribes(ros, speech_16k):
    node = ros.add(AsrNode(namespace="tinyalign", context=ros.context))
    probe = ros.node("fuzzer")
    utterances: list[Utterance] = []
    probe.create_subscription(Utterance, "utterance", utterances.append, EVENT_QOS)
    pub = probe.create_publisher(AudioChunk, "audio", AUDIO_QOS)
    wait_for(lambda: pub.get_subscription_count() > 0 and node.utterance_pub.get_subscription_count() > 0,
             what="discovery")
    nasty = nasty_chunks(np.random.default_rng(0))
    for msg in nasty:
        pub.publish(msg)
    wait_for(lambda: node.chunks_received >= len(nasty), timeout=60, what="every malformed chunk handled")
    wait_for(lambda: node.idle, timeout=120, what="the queue of whatever the noise produced to drain")
    before = len(utterances)
    # then a clean stream: the node must still work
    audio = np.concatenate([np.zeros(8000, np.float32), speech_16k, np.zeros(16000, np.float32)])
    for i in range(0, len(audio), 1600):
        pub.publish(AudioChunk(sample_rate=16000, offset=10**6 + i, samples=audio[i:i + 1600],
                               end_of_stream=i + 1600 >= len(audio)))
    wait_for(lambda: len(utterances) > before and node.idle, timeout=60, what="the clean utterance")
    assert "left" in utterances[-1].transcript.lower()
    assert node.rejected_chunks >= 5
