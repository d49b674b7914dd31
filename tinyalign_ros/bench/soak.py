"""`tinyalign bench soak`: stream speech through the graph in real time for a long while.

Memory must stay flat and latency must not drift: a robot runs for hours. The demo file (or
--input) loops at real time; resident memory is sampled every few seconds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tinyalign_ros.core.metrics import write_result

from ._graph import demo_input, run_graph


WARMUP_FRACTION = 1 / 3  # the first third loads lazily (caches, DDS histories fill): not counted in the growth


def growth_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (MB per minute) of memory samples (t_s, mb) after the warm-up; None if too few."""
    if not samples:
        return None
    end = samples[-1][0]
    kept = [(t, mb) for t, mb in samples if t >= WARMUP_FRACTION * end]
    if len(kept) < 3:
        return None
    t, mb = np.array(kept).T
    return round(float(np.polyfit(t / 60.0, mb, 1)[0]), 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench soak", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for soak.json and soak.png")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of real-time streaming")
    parser.add_argument("--input", help="speech file to loop (default: the synthesized demo file)")
    parser.add_argument("--device", default="cpu", help="accepted for symmetry; the graph runs on CPU")
    args = parser.parse_args(argv)

    path, _ = demo_input(args.input, args.out / "work")
    run = run_graph(path, stop_after_s=args.duration)
    answered = [(t, r) for t, r in run.responses if r.text]
    figures = {
        "duration_s": args.duration,
        "rss_t_s": [t for t, _ in run.rss],
        # rss_mb, rss_anon_mb, rss_file_mb, heap_in_use_mb, heap_free_mb, heap_mapped_mb (core.heap.memory_mb):
        # a leak grows heap_in_use or heap_mapped, fragmentation grows heap_free
        **{f"{key}_mb": [m[key] for _, m in run.memory] for key in (run.memory[0][1] if run.memory else ())},
        "rss_growth_mb_per_min_after_warmup": growth_per_min(run.rss),
        "latency_s": [round(r.latency_first_token_s, 3) for _, r in answered],
        "latency_t_s": [round(t, 1) for t, _ in answered],
        "dropped_utterances": run.dropped,
        "utterances": len(run.responses),
    }
    json_path = write_result(args.out, "soak", figures)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for key, label in (("rss_mb", "resident (RSS)"), ("rss_anon_mb", "anonymous (RSS - files)"),
                       ("heap_in_use_mb", "malloc heap in use"), ("heap_mapped_mb", "malloc mapped blocks")):
        if key in figures:
            top.plot(figures["rss_t_s"], figures[key], label=label)
    top.legend(loc="center right", fontsize=8)
    top.set_ylabel("memory (MB)")
    top.set_title(f"soak: {args.duration:.0f} s real-time speech, {run.dropped} dropped utterances")
    bottom.plot(figures["latency_t_s"], figures["latency_s"], "o-", markersize=3)
    bottom.set_ylabel("first token after\nend of speech (s)")
    bottom.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(args.out / "soak.png", dpi=120)
    print(json_path)
    return 0
