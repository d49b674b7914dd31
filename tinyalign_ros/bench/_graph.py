"""Shared by the graph-level benchmarks: run the embedded graph on a looping file, measure."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyalign_ros.core.heap import memory_mb, rss_mb


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def p50_p95(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def demo_input(path: str | None, work_dir: Path, gap_s: float | None = None) -> tuple[Path, list[dict]]:
    """The given file, or the README demo file synthesized into work_dir (`gap_s` of silence after
    each sentence; None: the demo's own)."""
    if path:
        return Path(path), []
    from tinyalign_ros.core.corpus import make_demo_wav

    work_dir.mkdir(parents=True, exist_ok=True)
    out = work_dir / "demo.wav"
    return out, make_demo_wav(out) if gap_s is None else make_demo_wav(out, gap_s=gap_s)


@dataclass
class GraphRun:
    """Responses (with arrival time), spoken audio and memory samples of one looping real-time run."""

    started: float = field(default_factory=time.monotonic)
    responses: list[tuple[float, object]] = field(default_factory=list)
    spoken_s: list[float] = field(default_factory=list)  # per answer: end of speech → its first played sample
    memory: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (t_s, core.heap.memory_mb)
    dropped: int = 0
    stages: list[str] = field(default_factory=list)  # the nodes' metrics/stages records (core/latency.py)
    stream_end_s: dict[str, float] = field(default_factory=dict)  # utterance id -> its end on the stream clock
    loop_s: float = 0.0  # length of one pass of the looping file on the stream clock (silences and padding included)

    @property
    def rss(self) -> list[tuple[float, float]]:
        """(t_s, resident MB) of each memory sample."""
        return [(t, m["rss"]) for t, m in self.memory]


def run_graph(input_file: Path, stop_after_s: float | None = None, stop_after_responses: int | None = None,
              sample_every_s: float = 5.0, log=print, overrides: dict[str, dict] | None = None) -> GraphRun:
    """Play `input_file` in a loop at real time through the whole graph until a stop condition
    (`overrides`: more parameters per node, on top of config/assistant.yaml)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # a domain of its own: another graph on this machine (a robot's, a test's, another bench's) publishes on
    # the same topics, and this run would hear its audio and answers (seen: a latency run answering
    # another bench's voices). TINYALIGN_BENCH_DOMAIN_ID picks one; the default depends on the process id.
    os.environ["ROS_DOMAIN_ID"] = os.environ.get("TINYALIGN_BENCH_DOMAIN_ID", str(1 + os.getpid() % 100))
    from rclpy.node import Node
    from std_msgs.msg import Float32, String

    from tinyalign_ros.core.latency import STAGES_TOPIC
    from tinyalign_ros.nodes.common import EVENT_QOS
    from tinyalign_ros.nodes.graph import NAMESPACE, EmbeddedGraph

    run = GraphRun()

    def on_response(r) -> None:
        run.responses.append((time.monotonic() - run.started, r))
        log(f"{time.monotonic() - run.started:7.1f} s  first token {r.latency_first_token_s:.2f} s  "
            f"rss {rss_mb():.0f} MB  '{r.transcript}' -> '{r.text[:60]}'")

    def on_utterance(u) -> None:
        run.stream_end_s[u.id] = u.stream_end_s

    overrides = {node: dict(params) for node, params in (overrides or {}).items()}
    overrides.setdefault("mic_node", {}).update({"input_file": str(input_file), "loop": True, "playback_rate": 1.0})
    with EmbeddedGraph(overrides=overrides, on_response=on_response, on_utterance=on_utterance) as graph:
        # a probe, as rqt_plot would be: tts_node's per-answer figure, measured where both ends are
        # known exactly (the Response's end of speech, the moment its first block was played)
        probe = Node("bench_probe", namespace=NAMESPACE, context=graph.context)
        probe.create_subscription(Float32, "metrics/end_of_speech_to_audio_s",
                                  lambda m: run.spoken_s.append(m.data), EVENT_QOS)
        probe.create_subscription(String, STAGES_TOPIC, lambda m: run.stages.append(m.data), EVENT_QOS)
        graph.executor.add_node(probe)
        mic = graph.nodes["mic_node"]
        run.loop_s = sum(c.size for c in getattr(mic, "_chunks", [])) / 16000
        run.started = time.monotonic()
        next_sample = 0.0
        while True:
            elapsed = time.monotonic() - run.started
            if elapsed >= next_sample:
                run.memory.append((round(elapsed, 1), memory_mb()))
                next_sample += sample_every_s
            if stop_after_s is not None and elapsed >= stop_after_s:
                break
            if stop_after_responses is not None and len(run.responses) >= stop_after_responses:
                break
            time.sleep(0.1)
        asr, assistant = graph.nodes["asr_node"], graph.nodes["assistant_node"]
        run.dropped = asr.dropped_utterances + (assistant.handled - assistant.answered)
        graph.executor.remove_node(probe)
        probe.destroy_node()
    return run
