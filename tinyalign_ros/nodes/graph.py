"""The embedded node graph: every node in one process, on one MultiThreadedExecutor.

`launch/assistant.launch.py` starts the same nodes as separate processes on a real ROS install;
this module is the same graph for a venv with no launch system (docs/design.md section 3), built
from the same YAML. `NODES` is the single list both must agree on (tested).

personalizer_node is part of the graph but cheap to carry: it loads its LLM copy only for its
first training round, which needs a consented speaker; `exclude=("personalizer_node",)` (or
`tinyalign run --no-personalizer`) leaves it out altogether.

booster_node is opt-in (`include=("booster_node",)`, `tinyalign run --booster`): it is meant for a
stronger remote machine (`ros2 launch tinyalign_ros booster.launch.py` there), and Whisper base
on the robot's own CPU runs slower than real time (bench/results/boost.json: a transcript of the
utterance so far takes ~6 chunks' time on 2 cores), so in the embedded graph it demonstrates the
link rather than helps. Without it asr_node runs
unboosted and never waits.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import String

from tinyalign_ros.core import heap
from tinyalign_ros.msg import Response, Utterance

from .common import DROPPED_TOPIC, EVENT_QOS, remember

NAMESPACE = "tinyalign"
# booster_node last: nodes start in reverse order, so it subscribes to the audio before mic_node plays
NODES = ("mic_node", "asr_node", "assistant_node", "tts_node", "personalizer_node", "booster_node")
OPTIONAL_NODES = ("personalizer_node",)  # the graph answers without them
OPT_IN_NODES = ("booster_node",)  # started only when named in `include`
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "assistant.yaml"


def default_config() -> Path:
    """The YAML next to the sources (checkout) or in the installed share folder."""
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("tinyalign_ros")) / "config" / "assistant.yaml"


def _node_class(name: str) -> type[Node]:
    # Imported on demand: each node module pulls in its models.
    if name == "mic_node":
        from .mic_node import MicNode
        return MicNode
    if name == "asr_node":
        from .asr_node import AsrNode
        return AsrNode
    if name == "assistant_node":
        from .assistant_node import AssistantNode
        return AssistantNode
    if name == "tts_node":
        from .tts_node import TtsNode
        return TtsNode
    if name == "personalizer_node":
        from .personalizer_node import PersonalizerNode
        return PersonalizerNode
    if name == "booster_node":
        from .booster_node import BoosterNode
        return BoosterNode
    raise KeyError(f"unknown node '{name}'; known: {', '.join(NODES)}")


class Listener(Node):
    """Keeps the most recent utterances and responses by utterance id, for the console and tests.

    Bounded (`keep` of each), because a graph runs for hours; and an utterance is kept without
    its encoder features (~150 kB for a 2 s utterance, seen by `on_utterance` first), which no
    reader of the table needs: keeping them all cost the soak benchmark +46 MB in 20 min, and 64
    of them would still be ~10 MB. `n_responses` counts every response ever received; the
    `dropped` records (common.drop_record, parsed) go to `on_dropped` and are counted by stage
    in `n_dropped`.
    """

    def __init__(self, context: Context, on_utterance: Callable[[Utterance], None] | None,
                 on_response: Callable[[Response], None] | None, keep: int = 64,
                 on_dropped: Callable[[dict], None] | None = None) -> None:
        super().__init__("run_listener", namespace=NAMESPACE, context=context)
        self.keep = keep
        self.utterances: OrderedDict[str, Utterance] = OrderedDict()
        self.responses: OrderedDict[str, Response] = OrderedDict()
        self.n_responses = 0
        self.n_dropped: dict[str, int] = {}
        self._on_utterance, self._on_response, self._on_dropped = on_utterance, on_response, on_dropped
        self.create_subscription(Utterance, "utterance", self._utterance, EVENT_QOS)
        self.create_subscription(Response, "response", self._response, EVENT_QOS)
        self.create_subscription(String, DROPPED_TOPIC, self._dropped, EVENT_QOS)

    def _utterance(self, msg: Utterance) -> None:
        if self._on_utterance:
            self._on_utterance(msg)
        msg.features = []  # feature_frames/dim/layer still say what it carried
        remember(self.utterances, msg.id, msg, self.keep)

    def _response(self, msg: Response) -> None:
        self.n_responses += 1
        remember(self.responses, msg.utterance_id, msg, self.keep)
        if self._on_response:
            self._on_response(msg)

    def _dropped(self, msg: String) -> None:
        try:
            record = json.loads(msg.data)
            stage = str(record["stage"])
        except (ValueError, KeyError, TypeError) as exc:
            self.get_logger().error(f"malformed dropped record {msg.data[:100]!r}: {exc!r}")
            return
        self.n_dropped[stage] = self.n_dropped.get(stage, 0) + 1
        if self._on_dropped:
            self._on_dropped(record)


class EmbeddedGraph:
    """Start the nodes of `NODES` (less those of `OPTIONAL_NODES` named in `exclude`, and those of
    `OPT_IN_NODES` not named in `include`) with parameters from `config` plus per-node `overrides`."""

    def __init__(self, config: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                 on_utterance: Callable[[Utterance], None] | None = None,
                 on_response: Callable[[Response], None] | None = None, threads: int = 4,
                 exclude: Sequence[str] = (), include: Sequence[str] = (),
                 on_dropped: Callable[[dict], None] | None = None) -> None:
        self.config = Path(config) if config else default_config()
        if not self.config.is_file():
            raise FileNotFoundError(f"parameter file not found: {self.config}")
        heap.configure()  # one process for the whole graph: before any model loads
        self.context = Context()
        rclpy.init(context=self.context, args=["--ros-args", "--params-file", str(self.config)])
        self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.nodes: dict[str, Node] = {}
        overrides = overrides or {}
        unknown = set(overrides) - set(NODES)
        if unknown:
            raise KeyError(f"overrides for unknown nodes: {sorted(unknown)}")
        if set(exclude) - set(OPTIONAL_NODES):
            raise KeyError(f"only {OPTIONAL_NODES} can be left out, not {sorted(set(exclude) - set(OPTIONAL_NODES))}")
        if set(include) - set(OPT_IN_NODES):
            raise KeyError(f"only {OPT_IN_NODES} can be added, not {sorted(set(include) - set(OPT_IN_NODES))}")
        started = [n for n in NODES if n not in exclude and (n not in OPT_IN_NODES or n in include)]
        try:
            self.listener = Listener(self.context, on_utterance, on_response, on_dropped=on_dropped)
            self.executor.add_node(self.listener)
            # Consumers first, so the file source finds its subscribers already there.
            for name in reversed(started):
                params = [Parameter(k, value=v) for k, v in overrides.get(name, {}).items()]
                node = _node_class(name)(namespace=NAMESPACE, context=self.context, parameter_overrides=params)
                self.nodes[name] = node
                self.executor.add_node(node)
        except BaseException:
            self.shutdown()
            raise
        self._thread = threading.Thread(target=self.executor.spin, name="executor", daemon=True)
        self._thread.start()

    def file_done(self) -> bool:
        """A file source has been played and every utterance in it has been answered (and spoken)."""
        mic, asr, assistant, tts = (self.nodes[n] for n in ("mic_node", "asr_node", "assistant_node", "tts_node"))
        return (
            mic.finished.is_set() and asr.stream_ended.is_set() and asr.idle
            and assistant.handled >= asr.published and assistant.idle
            and self.listener.n_responses >= assistant.answered and tts.idle
        )

    def wait_file_done(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.file_done():
                return True
            time.sleep(0.05)
        return False

    def shutdown(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        for node in list(self.nodes.values()) + ([self.listener] if hasattr(self, "listener") else []):
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> "EmbeddedGraph":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
