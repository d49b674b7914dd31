"""Keep a long-running process's resident memory flat: large buffers out of the malloc heap.

Why this exists: every utterance allocates tensors of its own length (features, KV cache,
logits). glibc serves blocks above its mmap threshold with their own mapping, returned to the
OS on free, but it *raises* that threshold (up to 32 MB) each time such a block is freed, so
after warm-up the tensors come from the per-thread heaps instead and leave holes there that stay
resident. The soak graph (`tinyalign bench soak`'s) measured with mallinfo2: over 15 minutes the heap's live bytes
(`uordblks`) stayed flat at ~355 MB while its free-but-kept bytes (`fordblks`) grew from 145 to 227
MB, and RSS with them. `configure` pins the threshold (setting it explicitly turns the raising
off, mallopt(3)).

Pinned, the heap still fragments, because glibc gives threads arenas of their own (up to 8 per
core) and a block freed in one arena can serve no other: the soak's free-but-kept bytes were ~100
MB at 10 min (~125 at 25) with the live bytes flat. `configure` also caps the arenas at
ARENA_MAX, as MALLOC_ARENA_MAX=2 does; a 10-min soak with that cap kept them at 12-19 MB, RSS
1364 MB at 10 min instead of 1449, with the same latency (1.20 s against 1.24 s to the first
token). No library wraps these glibc calls; on another libc they are no-ops that say so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS), or glibc < 2.33 without mallinfo2
        return None


M_MMAP_THRESHOLD = -3  # mallopt parameter numbers in glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, now kept
ARENA_MAX = 2  # the value commonly used for many-threaded servers; the soak's latency did not change


def configure() -> bool:
    """Pin glibc's mmap threshold so large buffers never settle in the heap, and cap its arenas;
    call once per process before threads start and models load (every node executable and the
    embedded graph do). False off glibc. What each setting bought is in the module docstring.
    """
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(M_ARENA_MAX, ARENA_MAX))


def heap_mb() -> dict[str, float] | None:
    """malloc's memory in MB: `in_use` (live heap allocations), `free` (freed but kept by malloc,
    resident) and `mapped` (live blocks with their own mapping); None off glibc. A leak
    grows `in_use` or `mapped`; fragmentation grows `free`."""
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return {"in_use": round(info.uordblks / 2**20, 1), "free": round(info.fordblks / 2**20, 1),
            "mapped": round(info.hblkhd / 2**20, 1)}


def _status_mb(*fields: str) -> list[float]:
    """Fields of /proc/self/status in MB (NaN where the kernel has no such field)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:  # "VmRSS:\t 123456 kB"
            found[name] = int(value.split()[0]) / 1024
    return [found.get(f, float("nan")) for f in fields]


def rss_mb() -> float:
    """Current resident memory of this process."""
    return _status_mb("VmRSS")[0]


def memory_mb() -> dict[str, float]:
    """Where this process's memory is, in MB: resident in all (`rss`), file-backed (`rss_file`:
    model weights mapped from disk, flat once loaded), anonymous (`rss_anon`), and malloc's view
    of the anonymous part (`heap_in_use`, `heap_free`, `heap_mapped`, see heap_mb; NaN off glibc).
    A growing `rss_anon` with a flat `heap_in_use` + `heap_mapped` is fragmentation, not a leak."""
    rss, anon, file = _status_mb("VmRSS", "RssAnon", "RssFile")
    heap = heap_mb() or {}
    return {"rss": round(rss, 1), "rss_anon": round(anon, 1), "rss_file": round(file, 1),
            **{f"heap_{k}": heap.get(k, float("nan")) for k in ("in_use", "free", "mapped")}}
