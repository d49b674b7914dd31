"""What every tinyalign node shares: QoS profiles, time conversions, a bounded work queue and
bounded memories of recent utterances."""
from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import rclpy
from builtin_interfaces.msg import Time
from rclpy.node import Node
from visualization_msgs.msg import Marker
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from tinyalign_ros.core import heap
from tinyalign_ros.core.bounded import remember  # noqa: F401 (nodes import it from here)

# Audio is reliable rather than sensor-data best-effort: one lost chunk is a hole in a word.
# The depth bounds memory (100 chunks of 0.1 s = 10 s of audio buffered).
AUDIO_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE)
# Utterances and responses are few and must not be lost.
EVENT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE)
# Late joiners (rviz, a restarted node) get the last value.
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def to_time_msg(seconds: float) -> Time:
    # rounded once, in nanoseconds: rounding the fraction alone turned 2.9999999999 s into 2 s
    sec, nanosec = divmod(round(seconds * 1e9), 1_000_000_000)
    return Time(sec=int(sec), nanosec=int(nanosec))


def from_time_msg(t: Time) -> float:
    return t.sec + t.nanosec * 1e-9


MAX_PLAUSIBLE_LATENCY_S = 600.0  # beyond this a "latency" comes from a zero or foreign-clock stamp


def plausible_latency(seconds: float) -> bool:
    """False for a figure that is not a latency but a bad stamp upstream (unset, another clock):
    published, it would flatten every rqt_plot of the real ones."""
    return 0.0 <= seconds < MAX_PLAUSIBLE_LATENCY_S


T = TypeVar("T")


class Worker(Generic[T]):
    """One background thread draining a bounded queue, so slow model work never blocks a callback.

    When the queue is full the *oldest* item is dropped (the freshest speech matters most to a
    robot) and `on_drop` is told, so the node can warn and count it.

    `backlog` counts the items queued or in progress (exact: kept under the lock, unlike
    `depth`), and `on_done`, when set, is called in the worker thread after each handled item
    (failed or not): a node that reports its progress (asr_node's `audio_consumed`, which paces a
    lossless file source) does it there.
    """

    on_done: Callable[[], None] | None = None

    def __init__(self, name: str, handle: Callable[[T], None], maxsize: int,
                 on_drop: Callable[[T], None], on_error: Callable[[T, BaseException], None]) -> None:
        self._queue: queue.Queue[T] = queue.Queue(maxsize=max(1, maxsize))
        self._handle, self._on_drop, self._on_error = handle, on_drop, on_error
        self._lock = threading.Lock()
        self._busy = False
        self._in_flight = 0  # queued + in progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._lock:
            while True:
                try:
                    self._queue.put_nowait(item)
                    self._in_flight += 1
                    return
                except queue.Full:
                    try:
                        dropped = self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    self._in_flight -= 1
                    self._on_drop(dropped)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being processed."""
        with self._lock:
            return not self._busy and self._queue.empty()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def backlog(self) -> int:
        """Items queued or being handled."""
        with self._lock:
            return self._in_flight

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._lock:
                self._busy = True
            try:
                self._handle(item)
            except Exception as exc:  # a bad item must not kill the worker
                self._on_error(item, exc)
            finally:
                with self._lock:
                    self._busy = False
                    self._in_flight -= 1
            if self.on_done is not None:
                try:
                    self.on_done()
                except Exception as exc:  # a failed report must not kill the worker (nor read as the item's failure)
                    rclpy.logging.get_logger(self._thread.name).error(f"progress report failed: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


# `dropped` (std_msgs/String, one JSON object per message, EVENT_QOS): every utterance a bounded
# queue (or a failure) loses, from the node that lost it, so nothing disappears silently.
# `tinyalign run --jsonl` prints each as a record with "dropped": true. Keys: stage (the node),
# reason, utterance_id ("" when asr_node dropped a segment before it had one), start_s/end_s
# (stream seconds, null if unknown), transcript, text (tts_node: the sentence not spoken).
DROPPED_TOPIC = "dropped"


def adapter_table(data: str) -> dict[str, dict]:
    """The speakers' adapters from personalizer_node's latched `adapter` announcement (String JSON
    `{"adapters": {speaker: {version, path, kind}}, ...}`); ValueError when it is malformed."""
    try:
        return {str(k): dict(v) for k, v in json.loads(data)["adapters"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed adapter announcement: {exc!r}") from exc


def drop_record(stage: str, reason: str, utterance_id: str = "", start_s: float | None = None,
                end_s: float | None = None, transcript: str = "", text: str = "") -> str:
    """The JSON text of one `dropped` message."""
    def seconds(value: float | None) -> float | None:
        return None if value is None else round(float(value), 3)

    return json.dumps({"stage": stage, "reason": reason, "utterance_id": utterance_id, "start_s": seconds(start_s),
                       "end_s": seconds(end_s), "transcript": transcript, "text": text})


def text_marker(text: str, stamp, frame_id: str, ns: str, z: float) -> Marker:
    """A rviz TEXT_VIEW_FACING marker floating above the robot's `frame_id` (rviz's Marker display)."""
    m = Marker(ns=ns, id=0, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, text=text[:200])
    m.header.stamp, m.header.frame_id = stamp, frame_id
    m.pose.position.z = z
    m.pose.orientation.w = 1.0
    m.scale.z = 0.15  # text height in metres
    m.color.r = m.color.g = m.color.b = m.color.a = 1.0
    return m


def run_node(node_class: type[Node], args: list[str] | None = None,
             startup_errors: Sequence[type[BaseException]] = (ValueError, OSError)) -> None:
    """Entry point of every node executable: spin until Ctrl-C.

    A startup error that is the user's to fix (bad parameter, missing or corrupt file, missing
    device: ValueError/OSError and their subclasses) is one fatal log line and exit code 1,
    not a traceback.
    """
    heap.configure()
    rclpy.init(args=args)
    node = None
    try:
        node = node_class()
        rclpy.spin(node)
    except tuple(startup_errors) as exc:
        rclpy.logging.get_logger(node.get_name() if node else node_class.__name__).fatal(str(exc))
        raise SystemExit(1) from exc
    except KeyboardInterrupt:
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
