"""Bounded memories: what a long-running process recalls about recent things (utterance ids it
cancelled, timings, messages) must stay bounded in a process that runs for hours. ROS-free, so
core modules and nodes (through nodes/common.py) share it."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def remember(table: OrderedDict[K, T], key: K, value: T, limit: int) -> T:
    """Put `key` newest in an insertion-ordered table, forgetting the oldest past `limit`: what a
    node recalls about recent utterances (ids it cancelled, timings, messages) must stay bounded
    in a process that runs for hours."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)
    return value
