"""Shared fixtures: an isolated ROS 2 domain per test process, rclpy contexts, speech files."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# DDS traffic stays on this machine and away from other test processes (set before rclpy starts).
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(10 + os.getpid() % 90))

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition",
             state: Callable[[], object] | None = None) -> None:
    """Poll until `predicate` holds: DDS discovery takes 0.1-3 s, so never a fixed sleep.
    `state` says what the graph was doing when it timed out (a rare failure must explain itself)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"; state: {state()}" if state else ""))
        time.sleep(0.02)


@pytest.fixture
def ros() -> Iterator["RosHarness"]:
    """A fresh rclpy context with a MultiThreadedExecutor spinning in a thread."""
    from rclpy.context import Context

    harness = RosHarness(Context())
    yield harness
    harness.close()


class RosHarness:
    def __init__(self, context) -> None:
        import rclpy
        from rclpy.executors import MultiThreadedExecutor

        self.context = context
        rclpy.init(context=context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.nodes = []
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def node(self, name: str):
        from rclpy.node import Node

        return self.add(Node(name, namespace="tinyalign", context=self.context))

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2.0)
        for node in self.nodes:
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)


class Probe:
    """The test's side of a node under test: a node in the /tinyalign namespace that keeps what it
    receives in lists, publishes what the test sends, and waits for discovery both ways."""

    def __init__(self, ros: RosHarness, name: str = "probe") -> None:
        self.node = ros.node(name)

    def collect(self, msg_type, topic: str, qos=None) -> list:
        """Every message on `topic`, in arrival order (EVENT_QOS by default)."""
        from tinyalign_ros.nodes.common import EVENT_QOS

        received: list = []
        self.node.create_subscription(msg_type, topic, received.append, qos or EVENT_QOS)
        return received

    def publisher(self, msg_type, topic: str, qos=None):
        from tinyalign_ros.nodes.common import EVENT_QOS

        return self.node.create_publisher(msg_type, topic, qos or EVENT_QOS)

    @staticmethod
    def connected(*publishers, what: str = "discovery", timeout: float = 20.0) -> None:
        """Wait until each publisher (the probe's, or the node's towards the probe) has a subscriber."""
        wait_for(lambda: all(p.get_subscription_count() > 0 for p in publishers), timeout, what)


def speech_feed(probe: Probe, pub) -> Callable[[np.ndarray], None]:
    """`say(samples)`: publish one utterance on `pub` (AudioChunk) as mic_node would (0.1 s chunks,
    stamped, numbered), with 0.5 s of silence before it and 1 s after, so the VAD closes it."""
    from tinyalign_ros.msg import AudioChunk

    offset = 0

    def say(samples: np.ndarray) -> None:
        nonlocal offset
        silence = np.zeros(8000, np.float32)
        audio = np.concatenate([silence, samples, silence, silence]).astype(np.float32)
        for i in range(0, len(audio), 1600):
            msg = AudioChunk(sample_rate=16000, offset=offset)
            msg.header.stamp = probe.node.get_clock().now().to_msg()
            msg.samples = audio[i:i + 1600]
            pub.publish(msg)
            offset += len(msg.samples)

    return say


def enrollment_graph(ros: RosHarness, tmp_path: Path, asr_params: dict | None = None,
                     personalizer_params: dict | None = None):
    """asr_node + personalizer_node on a new voiceprint registry (the default ge2e speaker backend
    needs no background), and a probe: (asr, personalizer, say(samples), utterances)."""
    from rclpy.parameter import Parameter

    from tinyalign_ros.msg import AudioChunk, Utterance
    from tinyalign_ros.nodes.asr_node import AsrNode
    from tinyalign_ros.nodes.common import AUDIO_QOS
    from tinyalign_ros.nodes.personalizer_node import PersonalizerNode

    asr_params = {"speaker_id.dir": str(tmp_path / "speakers"), "echo_gate": False, **(asr_params or {})}
    pers_params = {"samples.dir": str(tmp_path / "samples"), "adapters.dir": str(tmp_path / "adapters"),
                   "checkpoint_dir": str(tmp_path / "ckpt"), "idle_s": 3600.0, **(personalizer_params or {})}
    asr = ros.add(AsrNode(namespace="tinyalign", context=ros.context,
                          parameter_overrides=[Parameter(k, value=v) for k, v in asr_params.items()]))
    pers = ros.add(PersonalizerNode(namespace="tinyalign", context=ros.context,
                                    parameter_overrides=[Parameter(k, value=v) for k, v in pers_params.items()]))
    probe = Probe(ros)
    utterances = probe.collect(Utterance, "utterance")
    pub = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
    wait_for(lambda: pub.get_subscription_count() > 0 and asr.utterance_pub.get_subscription_count() >= 2,
             what="discovery")
    return asr, pers, speech_feed(probe, pub), utterances


@pytest.fixture
def asr(ros):
    """A default asr_node, and a probe: (node, send(samples, rate, end, chunk), utterances, audio publisher).
    `send` stamps and numbers the chunks as mic_node would."""
    from tinyalign_ros.msg import AudioChunk, Utterance
    from tinyalign_ros.nodes.asr_node import AsrNode
    from tinyalign_ros.nodes.common import AUDIO_QOS

    node = ros.add(AsrNode(namespace="tinyalign", context=ros.context))
    probe = Probe(ros)
    utterances = probe.collect(Utterance, "utterance")
    pub = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
    probe.connected(pub, node.utterance_pub)
    offset = 0

    def send(samples: np.ndarray, rate: int = 16000, end: bool = False, chunk: int = 1600) -> None:
        nonlocal offset
        for i in range(0, max(len(samples), 1), chunk):
            part = np.asarray(samples[i:i + chunk], dtype=np.float32)
            msg = AudioChunk(sample_rate=rate, offset=offset, end_of_stream=end and i + chunk >= len(samples))
            msg.header.stamp = ros.nodes[0].get_clock().now().to_msg()
            msg.samples = part
            pub.publish(msg)
            offset += part.size

    return node, send, utterances, pub


def espeak(text: str, path: Path) -> Path:
    """Speech for tests that only need *some* speech (espeak-ng is fast and always there)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: apt-get install espeak-ng (make test installs it)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    return path


@pytest.fixture(scope="session")
def speech_16k(tmp_path_factory) -> np.ndarray:
    """~1.5 s of espeak-ng speech at 16 kHz mono float32."""
    from tinyalign_ros.core.audio import load_audio

    path = espeak("Please turn left.", tmp_path_factory.mktemp("speech") / "speech.wav")
    return load_audio(path)


@pytest.fixture(scope="session")
def demo_file(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The README demo file (natural piper voice) and its reference segments."""
    from tinyalign_ros.core.corpus import make_demo_wav

    path = tmp_path_factory.mktemp("demo") / "demo.wav"
    return path, make_demo_wav(path)


def write(path: Path, data: np.ndarray, rate: int, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), data, rate, subtype=subtype)
    return path


# -- the LLM's tokenizer and a tiny random LLM with its vocabulary: for the logic of what feeds an LLM ----------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from tinyalign_ros.core.models import default_llm_dir

    return AutoTokenizer.from_pretrained(default_llm_dir())


@pytest.fixture(scope="module")
def tiny_llm(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)
