"""nodes/common.py helpers that need no running graph."""
from __future__ import annotations

from collections import OrderedDict

from tinyalign_ros.nodes.common import from_time_msg, remember, to_time_msg


def test_remember_keeps_the_newest_and_a_repeated_key_becomes_newest():
    table: OrderedDict[str, int] = OrderedDict()
    for i in range(5):
        assert remember(table, f"u{i}", i, limit=3) == i
    assert list(table.items()) == [("u2", 2), ("u3", 3), ("u4", 4)]
    remember(table, "u2", 20, limit=3)  # seen again: refreshed, so the oldest is now u3
    remember(table, "u5", 5, limit=3)
    assert list(table.items()) == [("u4", 4), ("u2", 20), ("u5", 5)]


def test_time_messages_round_trip():
    for t in (0.0, 1.5, 1_796_173_878.123456789, 2.999_999_999_9):
        msg = to_time_msg(t)
        assert 0 <= msg.nanosec < 1_000_000_000 and abs(from_time_msg(msg) - t) < 1e-6


def test_worker_backlog_counts_queued_and_running_items_and_reports_each_one_done():
    """Worker.backlog is what asr_node reports as `pending` to a lossless file source: it must count
    the item being handled, leave out dropped ones, and `on_done` must follow every handled item."""
    import threading

    from conftest import wait_for
    from tinyalign_ros.nodes.common import Worker

    release, started = threading.Event(), threading.Event()
    dropped: list[int] = []
    done: list[int] = []

    def handle(item: int) -> None:
        started.set()
        release.wait(10)
        if item == 3:
            raise RuntimeError("a bad item")  # a failed item is reported done as well

    worker = Worker("test-worker", handle, 2, dropped.append, lambda item, exc: None)
    try:
        worker.on_done = lambda: done.append(worker.backlog)
        worker.put(1)
        assert started.wait(10)
        assert worker.backlog == 1 and worker.depth == 0  # running, not queued
        for item in (2, 3, 4):
            worker.put(item)
        assert dropped == [2] and worker.backlog == 3  # 1 running + 3, 4 queued; 2 dropped
        release.set()
        wait_for(lambda: len(done) == 3, what="three items handled")
        assert done == [2, 1, 0] and worker.idle
    finally:
        worker.stop()
