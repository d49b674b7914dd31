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
