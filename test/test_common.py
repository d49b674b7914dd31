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
