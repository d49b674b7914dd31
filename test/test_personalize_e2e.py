"""Personalization as a user runs it: the demo graph stays up, `tinyalign personalize` trains a round.

`tinyalign run --input demo.wav --stay` plays the demo file through the whole graph (real models)
with the operator's consent in the YAML; the operator's three utterances become teacher-labelled
samples; then the personalize service is called from other processes, as `ros2 service call`
would, and the round validates, gates and (when it improves) announces the adapter that the
aligned-mode assistant hot-swaps. Whether four steps beat the base projector on one held-out
utterance is up to the data, so both gate outcomes are accepted, each with its own checks; the
deterministic gate and swap cases are in test_personalize.py. `tinyalign forget` removes it all again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import yaml

from conftest import REPO, wait_for
from tinyalign_ros.nodes.graph import default_config


def _config(tmp_path) -> "os.PathLike":
    cfg = yaml.safe_load(default_config().read_text())
    cfg["/tinyalign/asr_node"]["ros__parameters"]["speaker"] = "operator"
    pers = cfg["/tinyalign/personalizer_node"]["ros__parameters"]
    pers.update({"idle_s": 3600.0, "min_confidence": 0.0, "consent": {"speakers": ["operator"]},
                 "samples": {**pers["samples"], "dir": str(tmp_path / "samples")},
                 "adapters": {"dir": str(tmp_path / "adapters")}, "checkpoint_dir": str(tmp_path / "ckpt")})
    # the projector adapter of aligned mode (the ASR adapters' round is test_asr_personalize_e2e's)
    pers["train"].update({"kind": "lora", "min_samples": 3, "max_steps": 4, "batch": 2, "budget_s": 60.0, "lr": 3e-3})
    cfg["/tinyalign/tts_node"]["ros__parameters"]["play"] = False
    path = tmp_path / "assistant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyalign_ros.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_personalize_and_forget_through_the_cli_in_the_running_demo_graph(demo_file, tmp_path):
    path, segments = demo_file
    env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + 37) % 100 + 1))
    graph = subprocess.Popen([sys.executable, "-m", "tinyalign_ros.cli", "run", "--input", str(path), "--fast",
                              "--jsonl", "--stay", "--mode", "aligned", "--config", str(_config(tmp_path))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(graph.stderr), daemon=True).start()
    rows: list[dict] = []
    threading.Thread(target=lambda: rows.extend(json.loads(l) for l in graph.stdout if l.startswith("{")),
                     daemon=True).start()
    try:
        wait_for(lambda: any("graph keeps running" in l for l in stderr) or graph.poll() is not None, 240,
                 "the demo file to be answered")
        assert graph.poll() is None, "".join(stderr)[-3000:]
        assert len(rows) == len(segments) and all(r["speaker"] == "operator" for r in rows), rows

        refused = _cli("personalize", "nobody", env=env)
        assert refused.returncode == 1 and "unknown speaker" in refused.stdout, refused.stdout + refused.stderr

        done = _cli("personalize", "operator", "--wait", env=env)
        out = done.stdout
        assert out.startswith("accepted: training operator (3 samples)"), out + done.stderr
        assert "training: step" in out, out  # progress followed on personalize/progress
        outcome = out.strip().splitlines()[-1]
        assert outcome.startswith(("saved", "rejected")) and "validation WER" in outcome, out
        assert done.returncode == (0 if outcome.startswith("saved") else 1)
        saved = outcome.startswith("saved")
        if saved:  # announced on the latched adapter table, merged and swapped in by assistant_node
            wait_for(lambda: "adapter v1 of operator loaded" in "".join(stderr), 30, "the assistant's hot-swap")

        forgot = _cli("forget", "operator", env=env)
        assert forgot.returncode == 0 and "forgot operator: 3 samples" in forgot.stdout, forgot.stdout
        assert not list((tmp_path / "samples").rglob("*.safetensors"))
        assert not list((tmp_path / "adapters").rglob("*.safetensors"))
        if saved:
            wait_for(lambda: "operator has no adapter any more" in "".join(stderr), 30, "the assistant's fallback")
        again = _cli("personalize", "operator", env=env)
        assert again.returncode == 1 and "unknown speaker" in again.stdout
    finally:
        graph.send_signal(signal.SIGINT)
        try:
            graph.wait(timeout=30)
        except subprocess.TimeoutExpired:
            graph.kill()
    assert graph.returncode == 0, "".join(stderr)[-3000:]


def test_personalize_without_a_running_graph_says_so(tmp_path):
    env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + 41) % 100 + 1))
    proc = _cli("personalize", "operator", "--timeout", "1", env=env, timeout=60)
    assert proc.returncode == 2 and "is the graph running" in proc.stderr
