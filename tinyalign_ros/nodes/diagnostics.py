"""A small diagnostic_updater: periodic /diagnostics from named status tasks.

ROS 2's diagnostic_updater has no pip wheel (docs/design.md section 3), so this keeps its shape:
`Updater(node).add(name, task)` where `task(status)` fills a `Status` with a level, a message and
key/values; the updater publishes one DiagnosticArray per period on /diagnostics, which
rqt_robot_monitor shows (hardware_id = the node's fully qualified name).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


class Status:
    """What a task reports; the worst `summary` wins, like DiagnosticStatusWrapper.mergeSummary."""

    def __init__(self) -> None:
        self.level, self.message = OK, "ok"
        self.values: list[KeyValue] = []

    def summary(self, level: int, message: str) -> None:
        if level > self.level or self.message == "ok":
            self.level, self.message = max(level, self.level), message

    def add(self, key: str, value: object) -> None:
        self.values.append(KeyValue(key=key, value=f"{value:.3f}" if isinstance(value, float) else str(value)))


class RateMeter:
    """Events per second over a sliding window (diagnostic_updater's FrequencyStatus, simplified)."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] > self.window_s:
                self._times.popleft()
            return len(self._times) / self.window_s


class Updater:
    def __init__(self, node: Node, period_s: float = 1.0) -> None:
        self.node = node
        self.tasks: list[tuple[str, Callable[[Status], None]]] = []
        self.pub = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        node.create_timer(period_s, self.update)

    def add(self, name: str, task: Callable[[Status], None]) -> None:
        self.tasks.append((name, task))

    def update(self) -> None:
        msg = DiagnosticArray()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        for name, task in self.tasks:
            status = Status()
            try:
                task(status)
            except Exception as exc:  # a broken task reports itself instead of killing the timer
                status.summary(ERROR, f"diagnostic task failed: {exc!r}")
            msg.status.append(DiagnosticStatus(
                level=status.level, name=f"{self.node.get_name()}: {name}", message=status.message,
                hardware_id=self.node.get_fully_qualified_name(), values=status.values))
        self.pub.publish(msg)
