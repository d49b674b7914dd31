"""core.heap: large buffers keep their own mapping, so freeing them leaves no holes in the heap."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinyalign_ros.core import heap

pytestmark = pytest.mark.skipif(heap.heap_mb() is None, reason="needs glibc (mallinfo2, mallopt)")

# In a fresh process: a busy one may serve the blocks from holes it already has, whatever the threshold.
PROBE = """
import json, sys
from tinyalign_ros.core import heap
if sys.argv[1] == "configure":
    assert heap.configure()
big = [bytearray(b"x" * 4_000_000) for _ in range(10)]  # mapped; freeing them raises an unpinned
del big  # threshold to 4 MB, so the 500 kB blocks below then land in the heap
before = heap.heap_mb()
blocks = [bytearray(b"x" * 500_000) for _ in range(200)]
during = heap.heap_mb()
del blocks
print(json.dumps([before, during, heap.heap_mb()]))
"""


def _probe(mode: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_configure_keeps_large_blocks_out_of_the_heap_after_large_frees():
    before, during, after = _probe("configure")
    assert during["mapped"] - before["mapped"] > 90  # ~95 MB: every block has its own mapping
    assert during["in_use"] - before["in_use"] < 5  # and none of it is in the heap
    assert after["mapped"] - before["mapped"] < 5  # unmapped on free: given back to the OS


def test_without_configure_glibc_moves_them_into_the_heap():
    """What configure() is for: the same blocks, unpinned, become heap memory that leaves holes."""
    before, during, _ = _probe("default")
    assert during["in_use"] - before["in_use"] > 90


def test_memory_snapshot_splits_resident_memory():
    m = heap.memory_mb()
    assert set(m) == {"rss", "rss_anon", "rss_file", "heap_in_use", "heap_free", "heap_mapped"}
    assert 0 < m["rss_anon"] <= m["rss"] and 0 < m["rss_file"] <= m["rss"]
    assert m["heap_in_use"] > 0  # glibc here (the fallback is NaN)


ARENA_PROBE = """
import ctypes, sys, threading
from tinyalign_ros.core import heap
if sys.argv[1] == "configure":
    assert heap.configure()
start = threading.Barrier(8)
def work():
    start.wait()  # all at once: contention is what makes glibc open an arena per thread
    blocks = [bytearray(1000) for _ in range(20000)]
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def _arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], check=True, capture_output=True, text=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def test_configure_caps_the_arenas_threads_fragment():
    assert _arenas("configure") <= heap.ARENA_MAX
    assert _arenas("default") > heap.ARENA_MAX  # what the cap is for: 8 busy threads get arenas of their own
