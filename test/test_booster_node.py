"""booster_node: hints over DDS from a separate process, their alignment on the robot, and fallback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, wait_for
from tinyalign_ros.core.boost import CHUNK_SAMPLES, BoostModel, Hint, HintBuffer, Teacher, load_boost, save_boost
from tinyalign_ros.nodes.booster_node import HINT_MSG_TYPE, HINT_QOS, hint_from_msg, hint_to_msg
from tinyalign_ros.nodes.common import AUDIO_QOS, to_time_msg

HINT_DIM = 8
WINDOW_S = 0.5


def test_hint_message_roundtrip():
    data = np.random.default_rng(0).normal(size=(5, HINT_DIM)).astype(np.float32)
    msg = hint_to_msg(Hint(123 * CHUNK_SAMPLES, CHUNK_SAMPLES, data), to_time_msg(1700000000.25))
    got = hint_from_msg(msg)
    assert (got.hint.offset, got.hint.n_samples, got.hint.frames, got.hint.dim) == (123 * 1600, 1600, 5, HINT_DIM)
    np.testing.assert_array_equal(got.hint.data, data)
    assert got.stamp_s == pytest.approx(1700000000.25, abs=1e-6)


def test_malformed_hint_messages_are_refused():
    msg = hint_to_msg(Hint(0, CHUNK_SAMPLES, np.zeros((5, HINT_DIM), np.float32)), to_time_msg(0.0))
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError):
        hint_from_msg(msg)
    with pytest.raises(ValueError):
        hint_from_msg(HINT_MSG_TYPE())


@pytest.fixture(scope="module")
def fusion_file(tmp_path_factory):
    """A small fusion file (random projection) so the test does not depend on training."""
    torch.manual_seed(0)
    model = BoostModel(384, 512, HINT_DIM, hidden=16, head_hidden=16,
                       teacher={"layer": 6, "window_s": WINDOW_S})
    path = tmp_path_factory.mktemp("fusion") / "fusion.safetensors"
    save_boost(model, path)
    return path


def start_booster(fusion_file, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "booster.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "tinyalign_ros.nodes.booster_node", "--ros-args", "-r", "__ns:=/tinyalign",
         "-p", f"fusion_file:={fusion_file}", "-p", "threads:=1"],
        cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_booster_in_another_process_sends_aligned_hints_and_the_robot_falls_back_when_it_dies(
        ros, fusion_file, speech_16k, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray

    from tinyalign_ros.core.encoder import load_whisper_encoder
    from tinyalign_ros.core.boost import whisper_base_dir
    from tinyalign_ros.msg import AudioChunk

    booster = start_booster(fusion_file, tmp_path)
    try:
        robot = ros.node("robot")
        buffer = HintBuffer(HINT_DIM, delay_budget_chunks=6)
        received: list = []
        stream_pos = [0]  # the robot's audio clock: end offset of the newest chunk it sent

        def on_hint(msg) -> None:
            r = hint_from_msg(msg)
            received.append(r)
            buffer.add(r.hint, arrived_at=stream_pos[0])

        diagnostics: list = []
        robot.create_subscription(HINT_MSG_TYPE, "hints", on_hint, HINT_QOS)
        robot.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
        audio = robot.create_publisher(AudioChunk, "audio", AUDIO_QOS)
        wait_for(lambda: audio.get_subscription_count() > 0, 60, "booster_node to subscribe to audio")

        x = np.concatenate([speech_16k, np.zeros(CHUNK_SAMPLES, np.float32)])
        n_chunks = len(x) // CHUNK_SAMPLES
        half = n_chunks // 2

        def send(k: int) -> None:
            msg = AudioChunk(sample_rate=16000, offset=k * CHUNK_SAMPLES, end_of_stream=False,
                             samples=x[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES])
            msg.header.stamp = robot.get_clock().now().to_msg()
            stream_pos[0] = (k + 1) * CHUNK_SAMPLES
            audio.publish(msg)
            time.sleep(0.1)  # real time

        for k in range(half):
            send(k)
        wait_for(lambda: len(received) >= half, 60, "the first half's hints")
        assert sorted(r.hint.offset for r in received) == [k * CHUNK_SAMPLES for k in range(half)]
        wait_for(lambda: any(s.name == "booster_node: booster" for d in diagnostics for s in d.status), 10,
                 "booster diagnostics")

        # the hints are exactly what the teacher computes here from the same audio
        teacher = Teacher(load_whisper_encoder(whisper_base_dir()), load_boost(fusion_file).projection,
                          window_s=WINDOW_S)
        expected = [teacher.push(x[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES], k * CHUNK_SAMPLES).data
                    for k in range(half)]
        got = {r.hint.offset: r.hint.data for r in received}
        for k in range(half):
            np.testing.assert_allclose(got[k * CHUNK_SAMPLES], expected[k], atol=1e-3)

        # the booster dies mid-utterance; the robot keeps streaming and never waits for it
        stop(booster, signal.SIGKILL)
        for k in range(half, n_chunks):
            send(k)
        t0 = time.monotonic()
        hints, mask = buffer.gather(0, n_chunks * 5, end=n_chunks * CHUNK_SAMPLES)
        assert time.monotonic() - t0 < 0.05
        assert mask.tolist() == [1.0] * (5 * half) + [0.0] * (5 * (n_chunks - half))
        assert np.abs(hints[: 5 * half]).sum() > 0 and (hints[5 * half:] == 0).all()
    finally:
        stop(booster)
    assert booster.returncode is not None


def test_booster_refuses_a_mismatched_hint_dim(fusion_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tinyalign_ros.nodes.booster_node", "--ros-args", "-r", "__ns:=/tinyalign",
         "-p", f"fusion_file:={fusion_file}", "-p", f"hint_dim:={HINT_DIM + 1}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "hint_dim" in proc.stderr + proc.stdout


def test_booster_launch_file_matches_the_node():
    """launch/booster.launch.py (real ROS installs; `launch` is not on pip, so read its AST)
    starts booster_node alone in the graph's namespace with exactly the node's parameters."""
    import ast
    import re

    tree = ast.parse((REPO / "launch" / "booster.launch.py").read_text())
    calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "Node"]
    assert len(calls) == 1
    kw = {k.arg: k.value for k in calls[0].keywords}
    assert (kw["package"].value, kw["executable"].value, kw["name"].value) == (
        "tinyalign_ros", "booster_node", "booster_node")
    assert (REPO / "bin" / "booster_node").is_file()
    args = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "ARGS")
    launch_params = {k.value for k in args.keys}
    source = (REPO / "tinyalign_ros" / "nodes" / "booster_node.py").read_text()
    node_params = set(re.findall(r'\bp\("(\w+)"', source))
    assert launch_params == node_params
    from tinyalign_ros.nodes.graph import NAMESPACE

    declared = {c.args[0].value: {k.arg: k.value for k in c.keywords} for c in ast.walk(tree)
                if isinstance(c, ast.Call) and getattr(c.func, "id", None) == "DeclareLaunchArgument"
                and isinstance(c.args[0], ast.Constant)}
    assert declared["namespace"]["default_value"].value == NAMESPACE
