"""Encoder benchmark: WER and compute of every early exit, and of the confidence policy.

    tinyalign bench encoder --out DIR [--corpus build/corpus] [--device cpu|cuda]

For each exit layer: greedy-CTC WER of its head on the synthesized test split (`wer_synth`) and
on real human speech (`wer_real`: every utterance of Debian's pocketsphinx-testdata that comes
with a transcript), the real-time factor of the encoder up to that layer plus the head (`rtf`,
unpadded input, log-mel front end excluded and reported apart), and `relative_compute`: the
multiply-accumulates up to that layer (conv stem, blocks with attention at the clip's length,
the head) as a share of the full encoder plus the last head, summed over the test clips.

The confidence policy ("exit at the first head whose confidence reaches the threshold") is
evaluated at several thresholds by replaying the per-layer outputs of one pass (the policy is
deterministic given them; a policy exiting at layer k costs the blocks up to k plus every head
it consulted). The threshold is chosen on the corpus's *calibration* split (a fresh draw of every
speaker kind saying the validation sentences; the val split when a corpus has none): the largest
compute saving at <= 10 % relative WER loss against the deepest exit, else the lowest WER that
saves anything. It is reported on test and real speech. Whisper tiny.en (faster-whisper, int8,
greedy) is the reference on the same clips. Writes DIR/encoder.json (metrics.write_result) and DIR/encoder.png.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyalign_ros.core.early_exit import ExitHeads, ctc_confidence, greedy_ctc, load_heads

REPO = Path(__file__).resolve().parents[2]
POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
# every 0.005: the shipped heads' exits move from layer 1 to layer 4 between 0.7 and 0.85, and
# the policy is a replay of one pass per clip, so a fine grid costs nothing
THRESHOLDS = tuple(round(0.5 + 0.005 * i, 3) for i in range(100))  # 0.5 .. 0.995
MAX_REL_WER_LOSS = 0.10
SETS = (("test", "synth"), ("real", "real"), ("val", "val"), ("calibration", "cal"))  # (clips, key)
SELECT_ON = ("cal", "val", "synth")  # the policy is chosen on the first of these a corpus has


@dataclass
class Clip:
    name: str
    text: str
    samples: np.ndarray

    @property
    def duration_s(self) -> float:
        return len(self.samples) / 16000


def real_speech(root: Path = POCKETSPHINX) -> list[Clip]:
    """Every pocketsphinx-testdata recording with a transcript (`<s> words </s> (id)` lines)."""
    from tinyalign_ros.core.audio import load_audio

    clips = []
    for transcript in sorted(root.glob("*/*transcription")):
        for line in transcript.read_text().splitlines():
            m = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+)\)\s*", line)
            if not m:
                continue
            wav = transcript.parent / f"{m.group(2)}.wav"
            if wav.is_file():
                clips.append(Clip(f"{transcript.parent.name}/{wav.name}", " ".join(m.group(1).split()),
                                  load_audio(wav)))
    return clips


def corpus_clips(corpus: Path, split: str, limit: int | None = None) -> list[Clip]:
    """Clips of one split of a synthesized corpus (the first `limit` in an even spread)."""
    from tinyalign_ros.core.audio import load_audio

    with (corpus / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return [Clip(r["path"], r["text"], load_audio(corpus / r["path"])) for r in rows]


# --------------------------------------------------------------------------- one pass per clip


@dataclass
class ClipRun:
    """What every exit head says about one clip, and what each stage cost."""

    texts: list[str]
    confidences: list[float]
    stage_s: list[float]  # stem, block 1..L
    head_s: list[float]  # per exit head
    stage_macs: list[float]
    head_macs: float
    mel_s: float
    duration_s: float


def encoder_macs(encoder, mel_frames: int) -> list[float]:
    """Multiply-accumulates of the stem and each block for an unpadded input of `mel_frames`."""
    c = encoder.config
    t = (mel_frames + 1) // 2
    stem = mel_frames * c.n_mels * c.d_model * 3 + t * c.d_model * c.d_model * 3
    block = t * 12 * c.d_model ** 2 + 2 * t * t * c.d_model
    return [float(stem)] + [float(block)] * c.n_layers


def run_clip(encoder, heads: ExitHeads, samples: np.ndarray, device: str) -> ClipRun:
    from tinyalign_ros.core.encoder import log_mel

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    mel = log_mel(samples, pad_to_30s=False).unsqueeze(0).to(device)
    sync()
    mel_s = time.perf_counter() - t0
    stage_s, head_s, texts, confidences = [], [], [], []
    with torch.inference_mode():
        blocks = encoder.layers(mel)
        depth = -1
        for layer in range(encoder.n_layers + 1):
            t0 = time.perf_counter()
            hidden = next(blocks)
            sync()
            stage_s.append(time.perf_counter() - t0)
            depth += 1
            if depth in heads.layers:
                t0 = time.perf_counter()
                logits = heads(depth, hidden)[0]
                sync()
                head_s.append(time.perf_counter() - t0)
                logits = logits.float().cpu()
                texts.append(greedy_ctc(logits, heads.vocab))
                confidences.append(ctc_confidence(logits))
    t = hidden.shape[1]
    return ClipRun(texts, confidences, stage_s, head_s, encoder_macs(encoder, mel.shape[-1]),
                   float(t * heads.macs_per_frame()), mel_s, len(samples) / 16000)


def run_set(encoder, heads, clips: Sequence[Clip], device: str, desc: str) -> list[ClipRun]:
    from tqdm import tqdm

    return [run_clip(encoder, heads, c.samples, device) for c in tqdm(clips, desc=desc, unit="clip", mininterval=5)]


# --------------------------------------------------------------------------- figures


def exit_cost(run: ClipRun, heads: ExitHeads, k: int, consulted: Sequence[int]) -> tuple[float, float]:
    """(MACs, seconds) of exiting at head index k having consulted the heads `consulted`."""
    layer = heads.layers[k]
    macs = sum(run.stage_macs[:layer + 1]) + run.head_macs * len(consulted)
    secs = sum(run.stage_s[:layer + 1]) + sum(run.head_s[j] for j in consulted)
    return macs, secs


def policy_exit(run: ClipRun, threshold: float) -> int:
    """Head index the confidence policy exits at (same rule as early_exit.encode_with_exit)."""
    for k, c in enumerate(run.confidences):
        if c >= threshold:
            return k
    return len(run.confidences) - 1


def summarize(heads: ExitHeads, runs: dict[str, list[ClipRun]], clips: dict[str, list[Clip]],
              thresholds: Sequence[float] = THRESHOLDS) -> dict:
    from tinyalign_ros.core.metrics import wer

    def set_wer(name: str, hyps: list[str]) -> float | None:
        if not clips.get(name):
            return None
        return round(wer([c.text for c in clips[name]], hyps), 4)

    last = len(heads.layers) - 1
    full = {s: sum(exit_cost(r, heads, last, [last])[0] for r in rs) for s, rs in runs.items()}
    full_s = {s: sum(exit_cost(r, heads, last, [last])[1] for r in rs) for s, rs in runs.items()}
    exits = []
    basis = "test" if runs.get("test") else next(iter(runs))
    audio_s = sum(r.duration_s for r in runs[basis])
    for k, layer in enumerate(heads.layers):
        macs = sum(exit_cost(r, heads, k, [k])[0] for r in runs[basis])
        secs = sum(exit_cost(r, heads, k, [k])[1] for r in runs[basis])
        exits.append({
            "layer": layer,
            **{f"wer_{key}": set_wer(name, [r.texts[k] for r in runs.get(name, [])]) for name, key in SETS},
            "rtf": round(secs / audio_s, 5),
            "relative_compute": round(macs / full[basis], 4),
            "relative_time": round(secs / full_s[basis], 4),
        })
    sweep = []
    for th in thresholds:
        entry: dict = {"threshold": th}
        for name, key in SETS:
            if not runs.get(name):
                continue
            ks = [policy_exit(r, th) for r in runs[name]]
            costs = [exit_cost(r, heads, k, list(range(k + 1))) for r, k in zip(runs[name], ks)]
            entry[f"wer_{key}"] = set_wer(name, [r.texts[k] for r, k in zip(runs[name], ks)])
            entry[f"compute_saved_{key}"] = round(1 - sum(c[0] for c in costs) / full[name], 4)
            entry[f"time_saved_{key}"] = round(1 - sum(c[1] for c in costs) / full_s[name], 4)
            entry[f"mean_exit_layer_{key}"] = round(float(np.mean([heads.layers[k] for k in ks])), 3)
        entry["compute_saved"] = entry.get("compute_saved_synth")
        sweep.append(entry)
    present = {key for name, key in SETS if runs.get(name)}
    select_on = next(key for key in SELECT_ON if key in present)
    deepest = exits[-1][f"wer_{select_on}"]

    def loss(e):
        return (e[f"wer_{select_on}"] - deepest) / max(deepest, 1e-9)

    ok = [e for e in sweep if loss(e) <= MAX_REL_WER_LOSS]
    if ok:
        best = max(ok, key=lambda e: (e[f"compute_saved_{select_on}"], -e[f"wer_{select_on}"]))
    else:
        saving = [e for e in sweep if e[f"compute_saved_{select_on}"] > 0] or sweep
        best = min(saving, key=lambda e: e[f"wer_{select_on}"])
    deepest_test = exits[-1]["wer_synth"]
    policy = {
        "name": f"confidence>={best['threshold']}",
        "threshold": best["threshold"],
        "compute_saved": best.get("compute_saved_synth"),
        "wer_synth": best.get("wer_synth"),
        "wer_real": best.get("wer_real"),
        "compute_saved_real": best.get("compute_saved_real"),
        "time_saved": best.get("time_saved_synth"),
        "mean_exit_layer": best.get("mean_exit_layer_synth"),
        "relative_wer_loss_synth": (round((best["wer_synth"] - deepest_test) / max(deepest_test, 1e-9), 4)
                                    if best.get("wer_synth") is not None and deepest_test is not None else None),
        "selected_on": select_on,
        # what the choice rested on: the selection split's own figures at that threshold
        f"compute_saved_{select_on}": best[f"compute_saved_{select_on}"],
        f"relative_wer_loss_{select_on}": round(loss(best), 4),
    }
    policy["goal_met"] = bool(policy["compute_saved"] is not None and policy["relative_wer_loss_synth"] is not None
                              and policy["compute_saved"] >= 0.30
                              and policy["relative_wer_loss_synth"] <= MAX_REL_WER_LOSS)
    mel_rtf = sum(r.mel_s for r in runs[basis]) / audio_s
    return {"exits": exits, "policy": policy, "policy_sweep": [e for e in sweep if e is not best],
            "rtf_log_mel": round(mel_rtf, 5)}


def whisper_reference(clips: dict[str, list[Clip]], limit: int | None) -> dict:
    """faster-whisper tiny.en (int8, greedy, no VAD) WER on the same clips."""
    from tinyalign_ros.core.asr import WhisperTranscriber
    from tinyalign_ros.core.metrics import wer
    from tqdm import tqdm

    model = WhisperTranscriber(threads=torch.get_num_threads())
    out: dict = {"model": "faster-whisper tiny.en int8 greedy (full decoder)"}
    for name, key in (("test", "synth"), ("real", "real")):
        subset = clips.get(name) or []
        if limit is not None and name == "test" and limit < len(subset):
            subset = [subset[i] for i in np.linspace(0, len(subset) - 1, limit).round().astype(int)]
        if not subset:
            continue
        t0 = time.perf_counter()
        hyps = [model.transcribe(c.samples).text for c in tqdm(subset, desc=f"whisper {name}", mininterval=5)]
        out[f"wer_{key}"] = round(wer([c.text for c in subset], hyps), 4)
        out[f"n_{key}"] = len(subset)
        out[f"rtf_{key}"] = round((time.perf_counter() - t0) / sum(c.duration_s for c in subset), 4)
    return out


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    exits = figures["exits"]
    x = [e["relative_compute"] for e in exits]
    for key, saved, label, color in (("wer_synth", "compute_saved", "synthesized test", "tab:blue"),
                                     ("wer_real", "compute_saved_real", "real speech", "tab:red")):
        y = [e[key] for e in exits]
        if any(v is None for v in y):
            continue
        ax.plot(x, y, "o-", color=color, label=f"exit heads, {label}")
        for e in exits:
            ax.annotate(f"L{e['layer']}", (e["relative_compute"], e[key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=color)
        pol = figures["policy"]
        if pol.get(key) is not None and pol.get(saved) is not None:  # at the compute of that set
            ax.plot([1 - pol[saved]], [pol[key]], "*", ms=13, color=color,
                    label=f"{pol['name']}, {label}")
        ref = figures.get("whisper", {}).get(key)
        if ref is not None:
            ax.axhline(ref, ls="--", lw=1, color=color, alpha=0.6, label=f"Whisper tiny.en decoder, {label}")
    ax.set_xlabel("relative encoder compute (MACs up to the exit, incl. heads)")
    ax.set_ylabel("WER")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Whisper tiny.en encoder early exits: WER vs compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out_dir: Path, corpus: Path | None = None, heads_path: Path | None = None, device: str = "cpu",
        limit: int | None = None, real: bool = True, whisper: bool = True, whisper_limit: int | None = None,
        thresholds: Sequence[float] = THRESHOLDS, heads: ExitHeads | None = None,
        real_limit: int | None = None) -> Path:
    """Measure and write out_dir/encoder.json and encoder.png; returns the JSON path."""
    from tinyalign_ros.core.encoder import load_whisper_encoder
    from tinyalign_ros.core.metrics import write_result
    from tinyalign_ros.core.models import shipped_model

    corpus = Path(corpus) if corpus is not None else REPO / "build" / "corpus"
    heads_path = Path(heads_path) if heads_path is not None else shipped_model("exit_heads.safetensors")
    heads = (heads or load_heads(heads_path)).to(device).eval()
    encoder = load_whisper_encoder(device=device)
    clips = {name: corpus_clips(corpus, name, limit) for name in ("test", "val", "calibration")}
    if real:
        clips["real"] = real_speech()[:real_limit]
    clips = {k: v for k, v in clips.items() if v}
    if not clips.get("test"):
        raise SystemExit(f"{corpus}: no test clips")
    run_clip(encoder, heads, clips["test"][0].samples, device)  # warm-up (allocator, kernels)
    runs = {name: run_set(encoder, heads, cs, device, name) for name, cs in clips.items()}
    figures = summarize(heads, runs, clips, thresholds)
    figures["data"] = {"corpus": str(corpus), "n_synth": len(clips["test"]), "n_val": len(clips.get("val", [])),
                       "n_cal": len(clips.get("calibration", [])),
                       "n_real": len(clips.get("real", [])),
                       "real_source": "pocketsphinx-testdata (cards, librivox), every clip with a transcript",
                       "heads": str(heads_path), "head": {"hidden": heads.hidden, "kernel": heads.kernel},
                       "device": device, "input": "unpadded log-mel (speech frames only)",
                       "compute_basis": "MACs of stem + blocks up to the exit + consulted heads, over the full "
                                        "encoder + last head, summed over the synthesized test clips"}
    if whisper:
        figures["whisper"] = whisper_reference(clips, whisper_limit)
    out_dir = Path(out_dir)
    path = write_result(out_dir, "encoder", figures)
    plot(figures, out_dir / "encoder.png")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench encoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "corpus")
    parser.add_argument("--heads", type=Path, help="exit heads file (default: models/exit_heads.safetensors)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--limit", type=int, help="at most N clips per synthesized split (even spread)")
    parser.add_argument("--whisper-limit", type=int, help="at most N synthesized test clips for Whisper")
    parser.add_argument("--no-whisper", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = run(args.out, args.corpus, args.heads, args.device, args.limit, whisper=not args.no_whisper,
               whisper_limit=args.whisper_limit)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
