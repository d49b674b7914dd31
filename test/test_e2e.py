"""End to end: speech file → `tinyalign run` (the whole graph) → transcripts and answers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import yaml

from conftest import REPO, write
from tinyalign_ros.core.metrics import wer
from tinyalign_ros.nodes.graph import NAMESPACE, NODES, EmbeddedGraph, default_config


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # a domain of its own, different from this test process's
    env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + 50) % 100 + 1))
    return subprocess.run([sys.executable, "-m", "tinyalign_ros.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_demo_file_through_tinyalign_run(demo_file):
    path, segments = demo_file
    proc = run_cli("run", "--input", str(path), "--fast", "--jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(segments), proc.stdout
    rows.sort(key=lambda r: r["start_s"])
    for row, seg in zip(rows, segments):  # each answer belongs to the right stretch of the file
        assert row["start_s"] - 0.5 <= seg["start_s"] and seg["end_s"] <= row["end_s"] + 0.5
        assert row["response"].strip(), row
        assert 0 < row["latency_first_token_s"] <= row["latency_last_token_s"]
        assert row["exit_layer"] in (1, 2, 3, 4), row  # the encoder ran, with its exit policy
    assert wer([s["text"] for s in segments], [r["transcript"] for r in rows]) <= 0.2


def test_bad_input_file_is_a_clear_error_not_a_crash(tmp_path):
    proc = run_cli("run", "--input", str(tmp_path / "missing.wav"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    nan = write(tmp_path / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    proc = run_cli("run", "--input", str(nan), "--fast")
    assert proc.returncode == 2 and "NaN" in proc.stderr


def test_embedded_graph_declares_exactly_the_yaml_parameters(tmp_path):
    """`tinyalign run` and the launch file share config/assistant.yaml: every parameter in it
    must be declared by its node, and every declared parameter must be documented in it."""
    def flatten(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    config = yaml.safe_load(default_config().read_text())
    silence = write(tmp_path / "silence.wav", np.zeros(1600, np.float32), 16000)
    with EmbeddedGraph(overrides={"mic_node": {"input_file": str(silence), "playback_rate": 0.0}},
                       include=("booster_node",)) as graph:  # opt-in nodes too: every YAML section is checked
        assert graph.wait_file_done(60)
        for name in NODES:
            declared = set(graph.nodes[name]._parameters) - {"use_sim_time", "start_type_description_service"}
            documented = flatten(config[f"/{NAMESPACE}/{name}"]["ros__parameters"])
            assert declared == documented, name


def test_the_graph_listener_keeps_only_recent_utterances(ros):
    """`tinyalign run` runs for hours: its listener must not keep every Utterance (with features)."""
    from tinyalign_ros.msg import Response, Utterance
    from tinyalign_ros.nodes.graph import Listener

    seen: list[int] = []
    listener = ros.add(Listener(ros.context, lambda u: seen.append(len(u.features)), None, keep=8))
    for i in range(50):
        listener._utterance(Utterance(id=f"u{i}", features=np.zeros(1000, np.float32), feature_frames=1,
                                      feature_dim=1000))
        listener._response(Response(utterance_id=f"u{i}"))
    assert list(listener.utterances) == [f"u{i}" for i in range(42, 50)] and len(listener.responses) == 8
    assert seen == [1000] * 50  # the callback sees the whole message; the table keeps it without features
    assert all(len(u.features) == 0 and u.feature_dim == 1000 for u in listener.utterances.values())
    assert listener.n_responses == 50
