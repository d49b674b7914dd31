"""booster_node and asr_node's fusion: hints over DDS from a separate process, their alignment on the
robot (reordered, late, duplicated, malformed), the fallback when the booster dies, the embedded graph;
text hints (the teacher's words forced into faster-whisper's transcript) and encoder hints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, Probe, wait_for, write
from tinyalign_ros.core.boost import CHUNK_SAMPLES, BoostModel, Hint, Teacher, load_boost, save_boost
from tinyalign_ros.msg import Hint as HintMsg
from tinyalign_ros.nodes.common import AUDIO_QOS, to_time_msg
from tinyalign_ros.nodes.hints import HINT_QOS, hint_from_msg, hint_to_msg

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
        hint_from_msg(HintMsg())


def test_text_hint_message_roundtrip():
    from tinyalign_ros.core.boost import TextHint

    for hint in (TextHint(16000, 24000, "please turn left"), TextHint(3200, CHUNK_SAMPLES, "")):
        got = hint_from_msg(hint_to_msg(hint, to_time_msg(5.5)))
        assert got.hint == hint and got.stamp_s == pytest.approx(5.5)
    both = hint_to_msg(Hint(0, CHUNK_SAMPLES, np.zeros((5, HINT_DIM), np.float32)), to_time_msg(0.0))
    both.text = "words and numbers"
    with pytest.raises(ValueError, match="both"):
        hint_from_msg(both)


@pytest.fixture(scope="module")
def fusion_file(tmp_path_factory):
    """A small fusion file (random projection, random non-identity FiLM) so the test does not
    depend on training and a boosted frame always differs from its unboosted input."""
    torch.manual_seed(0)
    model = BoostModel(384, 512, HINT_DIM, hidden=16, head_hidden=16,
                       teacher={"layer": 6, "window_s": WINDOW_S})
    for p in model.fusion.parameters():  # the trained output layer starts at zero (identity)
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path_factory.mktemp("fusion") / "fusion.safetensors"
    save_boost(model, path)
    return path


def start_booster(fusion_file, tmp_path, hints: str = "encoder") -> subprocess.Popen:
    log = open(tmp_path / "booster.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "tinyalign_ros.nodes.booster_node", "--ros-args", "-r", "__ns:=/tinyalign",
         "-p", f"fusion_file:={fusion_file}", "-p", "threads:=1", "-p", f"hints:={hints}"],
        cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chunk_sender(probe, audio, chunks: list):
    """send(n) publishes the next n chunks in real time (the booster keeps up, or trails, as it would
    live); sent[0] counts the chunks sent."""
    from tinyalign_ros.msg import AudioChunk

    sent = [0]

    def send(n: int) -> None:
        for _ in range(n):
            k = sent[0]
            msg = AudioChunk(sample_rate=16000, offset=k * CHUNK_SAMPLES, samples=chunks[k])
            msg.header.stamp = probe.node.get_clock().now().to_msg()
            audio.publish(msg)
            sent[0] += 1
            time.sleep(0.1)

    return send, sent


def boost_status(diagnostics: list, level=None, since: int = 0):
    """The newest 'asr_node: knowledge boosting' status (of `level` if given) among
    diagnostics[since:], or None."""
    for array in reversed(diagnostics[since:]):
        for status in array.status:
            if status.name == "asr_node: knowledge boosting" and (level is None or status.level == level):
                return status
    return None


def test_asr_node_fuses_a_live_boosters_hints_and_falls_back_when_it_dies(ros, fusion_file, speech_16k, tmp_path):
    """booster_node in its own process, asr_node here, hints over DDS: the fused features differ
    from the unfused ones the Utterance carries, the transcript is the boost head's; then the
    booster is SIGKILLed mid-utterance: the rest of that utterance is exactly unboosted, nothing
    waited for it, and /diagnostics says it vanished."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.parameter import Parameter

    from tinyalign_ros.core.boost import whisper_base_dir
    from tinyalign_ros.core.encoder import load_whisper_encoder
    from tinyalign_ros.msg import AudioChunk, Utterance
    from tinyalign_ros.nodes.asr_node import AsrNode

    booster = start_booster(fusion_file, tmp_path)
    try:
        asr = ros.add(AsrNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
            Parameter("transcriber", value="exit_head"), Parameter("exit.mode", value="budget"),
            Parameter("exit.max_layer", value=0), Parameter("echo_gate", value=False),
            Parameter("boost.fusion_file", value=str(fusion_file)), Parameter("boost.max_delay_chunks", value=6),
            Parameter("boost.link_timeout_s", value=1.0)]))
        fuser = asr.boost.fuser
        probe = Probe(ros)
        received: list = []
        probe.node.create_subscription(HintMsg, "hints", lambda m: received.append(hint_from_msg(m)), HINT_QOS)
        utterances: list[Utterance] = probe.collect(Utterance, "utterance")
        diagnostics: list = probe.collect(DiagnosticArray, "/diagnostics", 10)
        audio = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
        wait_for(lambda: audio.get_subscription_count() >= 2, 60, "asr_node and booster_node to subscribe to audio")
        wait_for(lambda: asr.count_publishers("/tinyalign/hints") >= 1, 60, "asr_node to see the booster")
        probe.connected(asr.utterance_pub, what="the utterance subscriber")

        silence = np.zeros(5 * CHUNK_SAMPLES, np.float32)
        speech = np.concatenate([speech_16k, np.zeros(-len(speech_16k) % CHUNK_SAMPLES, np.float32)])
        x = np.concatenate([silence, speech, silence, silence, silence, speech, silence, silence])
        chunks = [x[i:i + CHUNK_SAMPLES] for i in range(0, len(x), CHUNK_SAMPLES)]
        send, sent = chunk_sender(probe, audio, chunks)

        # utterance 1, with the booster alive
        first_end = (len(silence) + len(speech) + 2 * len(silence)) // CHUNK_SAMPLES
        send(first_end)
        wait_for(lambda: utterances, 60, "the first utterance")
        u, fused = utterances[0], fuser.last
        assert u.feature_layer == 4 and fused.boosted, fused.reason
        assert fused.coverage > 0.3  # it trails by a chunk or two (more under load): most frames are boosted
        unfused = torch.tensor(np.asarray(u.features, np.float32).reshape(u.feature_frames, u.feature_dim))
        on = torch.from_numpy(fused.mask.astype(bool))
        assert not torch.allclose(fused.features[on], unfused[on], atol=1e-3)  # hints changed the features
        assert torch.equal(fused.features[~on], unfused[~on])
        assert u.transcript == fused.text  # the exit-head transcript is the boost head's
        since = len(diagnostics)  # a report made after this utterance
        wait_for(lambda: boost_status(diagnostics, since=since) is not None, 10, "boost diagnostics")
        status = boost_status(diagnostics, since=since)
        # "boosting", or "idle" once the audio pauses (or, on a loaded CPU, hints trailing the budget)
        assert "vanished" not in status.message and "no booster" not in status.message, status.message
        alive = {kv.key: kv.value for kv in status.values}
        assert int(alive["hints_received"]) > 0 and float(alive["last_utterance_boosted_fraction"]) > 0.3

        # the hints are exactly what the teacher computes here from the same audio
        teacher = Teacher(load_whisper_encoder(whisper_base_dir()), load_boost(fusion_file).projection,
                          window_s=WINDOW_S)
        got = {r.hint.offset: r.hint.data for r in received}
        for k in range(10):
            expected = teacher.push(chunks[k], k * CHUNK_SAMPLES).data
            np.testing.assert_allclose(got[k * CHUNK_SAMPLES], expected, atol=1e-3)

        # utterance 2: the booster dies in its middle
        kill_at = first_end + len(silence) // CHUNK_SAMPLES + len(speech) // CHUNK_SAMPLES // 2
        send(kill_at - first_end)
        wait_for(lambda: fuser.buffer.covered_until() >= kill_at * CHUNK_SAMPLES, 30, "the hints up to the kill")
        stop(booster, signal.SIGKILL)
        send(len(chunks) - kill_at)
        wait_for(lambda: len(utterances) == 2, 60, "the second utterance")
        u, fused = utterances[1], fuser.last
        start = round(u.stream_start_s * 16000)
        frame_centres = start + np.arange(len(fused.mask)) * 320 + 160
        after = frame_centres >= kill_at * CHUNK_SAMPLES
        assert after.any() and (~after).any()
        assert fused.mask[after].sum() == 0  # no hints after the kill: exactly unboosted there...
        unfused = torch.tensor(np.asarray(u.features, np.float32).reshape(u.feature_frames, u.feature_dim))
        assert torch.equal(fused.features[torch.from_numpy(after)], unfused[torch.from_numpy(after)])
        assert fused.mask[~after].sum() > 0  # ...and boosted before it
        # keep the audio flowing: the robot notices the silence of the booster, not of the room
        since = len(diagnostics)

        def vanished():
            warn = boost_status(diagnostics, DiagnosticStatus.WARN, since)
            return warn if warn is not None and "vanished" in warn.message else None

        for _ in range(100):  # 10 s at most
            if vanished():
                break
            chunks.append(np.zeros(CHUNK_SAMPLES, np.float32))
            send(1)
        warn = vanished()
        assert warn is not None, boost_status(diagnostics).message
        assert float({kv.key: kv.value for kv in warn.values}["last_utterance_boosted_fraction"]) < 1.0
    finally:
        stop(booster)
    assert booster.returncode is not None


def test_asr_node_forces_a_live_boosters_words_and_runs_unboosted_after_it_dies(ros, fusion_file, speech_16k,
                                                                                tmp_path):
    """booster_node (text hints, Whisper base) in its own process, asr_node here with the default
    `transcriber: whisper`: the teacher's transcript of the utterance heard so far reaches the robot
    before the VAD closes the utterance, and faster-whisper's transcript starts with the teacher's
    words; after a SIGKILL of the booster the next utterance is transcribed exactly unboosted."""
    from rclpy.parameter import Parameter

    from tinyalign_ros.core.boost import TextHint
    from tinyalign_ros.core.metrics import normalize_text
    from tinyalign_ros.msg import AudioChunk, Utterance
    from tinyalign_ros.nodes.asr_node import AsrNode

    booster = start_booster(fusion_file, tmp_path, hints="text")
    try:
        asr = ros.add(AsrNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
            Parameter("echo_gate", value=False), Parameter("boost.fusion_file", value=str(fusion_file))]))
        fuser = asr.boost.fuser
        probe = Probe(ros)
        received: list = []
        probe.node.create_subscription(HintMsg, "hints", lambda m: received.append(hint_from_msg(m).hint), HINT_QOS)
        utterances: list[Utterance] = probe.collect(Utterance, "utterance")
        audio = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
        wait_for(lambda: audio.get_subscription_count() >= 2, 60, "asr_node and booster_node to subscribe to audio")
        wait_for(lambda: asr.count_publishers("/tinyalign/hints") >= 1, 60, "asr_node to see the booster")
        wait_for(lambda: probe.node.count_publishers("/tinyalign/hints") >= 1, 60, "the probe to see the booster")
        probe.connected(asr.utterance_pub, what="the utterance subscriber")

        silence = np.zeros(5 * CHUNK_SAMPLES, np.float32)
        speech = np.concatenate([speech_16k, np.zeros(-len(speech_16k) % CHUNK_SAMPLES, np.float32)])
        x = np.concatenate([silence, speech, silence, silence, speech, silence, silence])
        chunks = [x[i:i + CHUNK_SAMPLES] for i in range(0, len(x), CHUNK_SAMPLES)]
        send, sent = chunk_sender(probe, audio, chunks)

        # utterance 1 in lockstep with the teacher: each chunk is sent once the booster has answered the
        # one before (one message per chunk: a heartbeat, or the transcript of the utterance so far), so
        # that a loaded CPU cannot make the teacher skip transcripts (the robot never waits for hints: the
        # lockstep makes their arrival certain, not their use)
        first_end = (len(silence) + len(speech) + 2 * len(silence)) // CHUNK_SAMPLES
        for k in range(first_end):
            send(1)
            wait_for(lambda: len(received) >= k + 1, 60, f"the booster's answer to chunk {k}")
        wait_for(lambda: utterances, 60, "the first utterance")
        texts = [h for h in received if isinstance(h, TextHint)]
        assert len(texts) == first_end and any(not h.text for h in texts)  # heartbeats in the silence
        assert any(h.text for h in texts), [h.text for h in texts]
        words = fuser.last_prefix
        assert words.boosted and words.hint is not None, words.reason
        assert asr.last_source == "whisper+hints"
        forced = normalize_text(words.text)
        assert forced and normalize_text(utterances[0].transcript).startswith(forced)
        assert forced in normalize_text(words.hint.text)  # the teacher's own words

        stop(booster, signal.SIGKILL)
        send(len(chunks) - sent[0])
        wait_for(lambda: len(utterances) == 2, 60, "the second utterance")
        words = fuser.last_prefix
        assert not words.boosted and words.reason == "no teacher transcript of this utterance"
        assert asr.last_source == "whisper"
        assert normalize_text(utterances[1].transcript) == "please turn left"
    finally:
        stop(booster)


def test_reordered_late_duplicated_and_malformed_hints_through_asr_node(ros, fusion_file, speech_16k):
    """Hint messages published to asr_node out of order, late, twice (the second copy different)
    and malformed: the utterance's fused features are exactly what the stamp alignment rule says
    (frames whose hint arrived within the budget, first copy wins), and bad messages are refused."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.parameter import Parameter

    from tinyalign_ros.msg import AudioChunk, Utterance
    from tinyalign_ros.nodes.asr_node import AsrNode

    budget = 1
    asr = ros.add(AsrNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("transcriber", value="exit_head"), Parameter("exit.mode", value="budget"),
        Parameter("exit.max_layer", value=0), Parameter("echo_gate", value=False),
        Parameter("boost.fusion_file", value=str(fusion_file)), Parameter("boost.max_delay_chunks", value=budget)]))
    fuser = asr.boost.fuser
    probe = Probe(ros)
    utterances: list[Utterance] = probe.collect(Utterance, "utterance")
    diagnostics: list = probe.collect(DiagnosticArray, "/diagnostics", 10)
    audio = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
    hints = probe.publisher(HintMsg, "hints", HINT_QOS)
    probe.connected(audio, hints, asr.utterance_pub)

    def hint_msg(j: int, sign: float = 1.0):
        data = sign * np.random.default_rng(j).normal(size=(5, HINT_DIM)).astype(np.float32)
        return hint_to_msg(Hint(j * CHUNK_SAMPLES, CHUNK_SAMPLES, data), to_time_msg(0.0))

    # malformed first: wrong size, NaN, 600 frames, frames x dim not matching the data
    bad = [hint_to_msg(Hint(0, CHUNK_SAMPLES, np.zeros((5, HINT_DIM + 1), np.float32)), to_time_msg(0.0)),
           hint_to_msg(Hint(0, CHUNK_SAMPLES, np.full((5, HINT_DIM), np.nan, np.float32)), to_time_msg(0.0)),
           hint_to_msg(Hint(0, 600 * 320, np.zeros((600, HINT_DIM), np.float32)), to_time_msg(0.0)),
           hint_msg(0)]
    bad[-1].frames = 4
    for msg in bad:
        hints.publish(msg)
    wait_for(lambda: fuser.rejected == 3 and asr.boost.malformed == 1, 10, "the bad hints to be refused")

    x = np.concatenate([np.zeros(5 * CHUNK_SAMPLES, np.float32), speech_16k, np.zeros(12 * CHUNK_SAMPLES, np.float32)])
    n_chunks = len(x) // CHUNK_SAMPLES

    def arrival(j: int) -> int:
        """Audio chunk after which hint j is sent: odd hints trail by 3 chunks, even ones by 4, so
        hint j-1 often comes after hint j (reordered), and the last ones are later than the budget."""
        return j + 3 + (j % 2 == 0)

    for k in range(n_chunks):
        msg = AudioChunk(sample_rate=16000, offset=k * CHUNK_SAMPLES, samples=x[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES])
        msg.header.stamp = probe.node.get_clock().now().to_msg()
        audio.publish(msg)
        wait_for(lambda: asr.chunks_received == k + 1, 10, "the audio chunk")
        due = sorted((j for j in range(k + 1) if arrival(j) == k), reverse=True)  # newest first
        for j in due:
            before = fuser.received
            hints.publish(hint_msg(j))
            hints.publish(hint_msg(j, -1.0))  # a duplicate with other values: the first copy must win
            wait_for(lambda: fuser.received == before + 2, 10, "the hint and its duplicate")
    wait_for(lambda: utterances, 60, "the utterance")
    u, fused = utterances[0], fuser.last
    assert fuser.buffer.stats["reordered"] > 0 and fuser.buffer.stats["duplicate_frames"] > 0

    # what the alignment rule says, computed here from the schedule alone
    start, end = round(u.stream_start_s * 16000), round(u.stream_end_s * 16000)
    n = u.feature_frames
    expected_mask = np.zeros(n, np.float32)
    expected_hints = np.zeros((n, HINT_DIM), np.float32)
    for i in range(n):
        frame = (start + 320 * i + 160) // 320
        j = frame // 5
        if (arrival(j) + 1) * CHUNK_SAMPLES <= end + budget * CHUNK_SAMPLES:
            expected_mask[i] = 1
            expected_hints[i] = np.random.default_rng(j).normal(size=(5, HINT_DIM)).astype(np.float32)[frame % 5]
    assert 0 < expected_mask.sum() < n  # some frames in time, some too late
    np.testing.assert_array_equal(fused.mask, expected_mask)
    unfused = torch.tensor(np.asarray(u.features, np.float32).reshape(n, u.feature_dim))
    model = load_boost(fusion_file)
    with torch.inference_mode():
        want = model.fusion(unfused[None], torch.from_numpy(expected_hints)[None],
                            torch.from_numpy(expected_mask)[None])[0]
    torch.testing.assert_close(fused.features, want, atol=1e-5, rtol=1e-5)
    assert u.transcript == fused.text
    since = len(diagnostics)
    wait_for(lambda: boost_status(diagnostics, since=since) is not None, 10, "boost diagnostics")
    values = {kv.key: kv.value for kv in boost_status(diagnostics, since=since).values}
    assert int(values["hints_rejected"]) == 3 and int(values["malformed_hint_messages"]) == 1
    assert values["last_rejection"]
    # the budget is a run-time parameter, within the trained range only
    assert asr.set_parameters([Parameter("boost.max_delay_chunks", value=3)])[0].successful
    assert fuser.delay_budget_chunks == 3
    refused = asr.set_parameters([Parameter("boost.max_delay_chunks", value=9)])[0]
    assert not refused.successful and "0..6" in refused.reason and fuser.delay_budget_chunks == 3


def test_embedded_graph_runs_with_a_booster_node(speech_16k, tmp_path):
    """`tinyalign run --booster`: booster_node in the same graph, the shipped fusion, real time.
    The robot answers, and its exit-head transcript came from the boosted head."""
    from tinyalign_ros.nodes.graph import EmbeddedGraph

    path = write(tmp_path / "speech.wav", np.concatenate([np.zeros(8000, np.float32), speech_16k]), 16000)
    overrides = {"mic_node": {"input_file": str(path)},
                 "asr_node": {"echo_gate": False, "transcriber": "exit_head", "exit.mode": "budget"},
                 "tts_node": {"play": False}, "booster_node": {"threads": 1, "hints": "encoder"}}
    with EmbeddedGraph(overrides=overrides, exclude=("personalizer_node",), include=("booster_node",)) as graph:
        assert graph.wait_file_done(120)
        fuser = graph.nodes["asr_node"].boost.fuser
        assert graph.nodes["booster_node"].published > 0 and fuser.received > 0
        assert len(graph.listener.responses) == 1
        last = fuser.last
        assert last.boosted and last.coverage > 0, last.reason
        (utterance,) = graph.listener.utterances.values()
        assert utterance.transcript == last.text


def test_booster_refuses_a_mismatched_hint_dim(fusion_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tinyalign_ros.nodes.booster_node", "--ros-args", "-r", "__ns:=/tinyalign",
         "-p", f"fusion_file:={fusion_file}", "-p", f"hint_dim:={HINT_DIM + 1}", "-p", "hints:=encoder"],
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
    # the YAML section (embedded graph, assistant.launch.py booster:=true) has the same defaults
    import yaml

    from tinyalign_ros.nodes.graph import default_config

    section = yaml.safe_load(default_config().read_text())[f"/{NAMESPACE}/booster_node"]["ros__parameters"]
    assert set(section) == launch_params
    for k, v in zip(args.keys, args.values):
        default, kind = v.elts[0].value, {"str": str, "int": int, "float": float}[v.elts[1].id]
        assert kind(default) == section[k.value], k.value
