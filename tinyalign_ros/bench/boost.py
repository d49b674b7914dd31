"""Knowledge-boosting benchmark: `tinyalign bench boost --out DIR`.

    tinyalign bench boost --out DIR [--fusion models/boost_fusion.safetensors] [--corpus build/corpus]

On the test split of the synthesized corpus (voices never seen in training), greedy character-CTC
WER of: tiny.en alone (the same ConvHead trained on tiny.en features only, same data, steps and
seed), tiny.en + Whisper-base hints at delays of 0, 1, 3 and 6 chunks (the last `delay` chunks of
each utterance without hints: the robot encodes at the end of speech and waits no longer),
Whisper base alone (same head on its whole-clip features), and the hint bandwidth in kB/s.
Also measured: the teacher's compute per 0.1 s chunk (what the booster machine must sustain in
real time) and the fusion's added cost on the robot. Writes DIR/boost.json and DIR/boost.png.

Features come from the cache of `tinyalign train boost` (same arguments), the baselines from
build/boost/ (retrained if missing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def plot(path: Path, figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [d["chunks"] for d in figures["delays"]]
    ax.plot(xs, [d["wer"] for d in figures["delays"]], "o-", label="tiny.en + base hints")
    ax.axhline(figures["small_alone_wer"], color="tab:red", ls="--", label="tiny.en alone")
    ax.axhline(figures["large_alone_wer"], color="tab:green", ls=":", label="base alone")
    ax.set_xlabel("hint delay (chunks of 0.1 s)")
    ax.set_ylabel("WER (greedy char CTC)")
    ax.set_title(f"Knowledge boosting, hints {figures['hint_kbps']:.1f} kB/s")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_teacher(window_s: float, projection, n: int = 20) -> float:
    """Median seconds to produce one chunk's hint with the booster's Teacher."""
    from tinyalign_ros.core.boost import CHUNK_SAMPLES, Teacher, whisper_base_dir
    from tinyalign_ros.core.encoder import load_whisper_encoder

    teacher = Teacher(load_whisper_encoder(whisper_base_dir()), projection, window_s=window_s)
    rng = np.random.default_rng(0)
    times = []
    for k in range(n):
        x = rng.normal(0, 0.05, CHUNK_SAMPLES).astype(np.float32)
        t0 = time.perf_counter()
        teacher.push(x, k * CHUNK_SAMPLES)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def main(argv: Sequence[str] | None = None) -> int:
    from tinyalign_ros.core.boost import hint_kbps, load_boost
    from tinyalign_ros.core.early_exit import CharVocab
    from tinyalign_ros.core.metrics import write_result
    from tinyalign_ros.train import boost as tb

    parser = argparse.ArgumentParser(prog="tinyalign bench boost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fusion", type=Path, default=REPO / "models" / "boost_fusion.safetensors")
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "corpus")
    parser.add_argument("--cache", type=Path, default=tb.DEFAULT_CACHE)
    parser.add_argument("--max-test", type=int, help="default: what the fusion was trained with")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="default: DIR/boost.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_boost(args.fusion)
    from safetensors import safe_open

    with safe_open(args.fusion, framework="pt") as f:
        extra = json.loads((f.metadata() or {}).get("extra", "{}"))
    train_args = {}
    if (tb.BASELINES / "train.json").is_file():
        train_args = json.loads((tb.BASELINES / "train.json").read_text())["args"]
    window_s = float(model.teacher.get("window_s", 1.0))
    seed = int(extra.get("seed", 0))
    max_test = args.max_test or int(train_args.get("max_test", 100))
    test = tb.cache_split(args.corpus, tb.read_rows(args.corpus, "test", max_test, seed), "test", args.cache,
                          window_s)
    vocab = CharVocab()
    models = {"boost": model}
    for kind, d in (("small", 384), ("large", 512)):
        path = tb.BASELINES / f"{kind}_head.pt"
        if path.is_file():
            head = tb.LargeHead(d, 256, 3, vocab)
            head.load_state_dict(torch.load(path))
            models[kind] = head.eval()
    missing = [k for k in ("small", "large") if k not in models]
    if missing:  # retrain the baselines the way train boost does
        max_train = int(train_args.get("max_train", 320))
        train = tb.cache_split(args.corpus, tb.read_rows(args.corpus, "train", max_train, seed), "train",
                               args.cache, window_s)
        trained, _ = tb.train_models(train, int(extra.get("steps", 800)), seed,
                                     int(train_args.get("batch_size", 24)), float(train_args.get("lr", 3e-3)),
                                     model.hint_dim, 0.2, model.teacher, kinds=tuple(missing))
        models.update(trained)
    metrics = tb.evaluate(models, test)
    teacher_s = time_teacher(window_s, model.projection)
    # fusion cost on the robot for a 2 s utterance (100 frames)
    x, h, m = torch.randn(1, 100, 384), torch.randn(1, 100, model.hint_dim), torch.ones(1, 100)
    with torch.inference_mode():
        model.fusion(x, h, m)
        t0 = time.perf_counter()
        for _ in range(20):
            model.fusion(x, h, m)
        fusion_s = (time.perf_counter() - t0) / 20
    figures = {
        "small_alone_wer": round(metrics["small_alone_wer"], 4),
        "large_alone_wer": round(metrics["large_alone_wer"], 4),
        "delays": [{"chunks": d["chunks"], "wer": round(d["wer"], 4)} for d in metrics["delays"]],
        "hint_kbps": round(hint_kbps(model.hint_dim), 3),
        "boost_no_hints_wer": round(metrics["boost_no_hints_wer"], 4),
        "hint_dim": model.hint_dim,
        "teacher": model.teacher,
        "teacher_s_per_chunk": round(teacher_s, 4),
        "teacher_rtf": round(teacher_s / 0.1, 3),
        "fusion_ms_per_2s_utterance": round(fusion_s * 1000, 3),
        "test_clips": len(test["texts"]),
        "metric": "greedy character-CTC WER of a ConvHead per system, synthesized test split",
    }
    path = write_result(args.out, "boost", figures)
    plot(args.plot or args.out / "boost.png", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
