"""`tinyalign bench speaker --out DIR`: speaker identification from the Whisper encoder.

Every default corpus voice (corpus.default_voices) is enrolled with `--enroll` utterances and
identified on `--test` other utterances (different sentences). For each encoder layer and each
embedding variant it measures:

- closed-set accuracy: the closest enrolled speaker is the right one;
- open-set figures at a threshold: genuine accept (right speaker and score >= threshold), and the
  false-accept rate of *unknown* speakers: each voice in turn is removed from the registry and its
  test utterances must come out as "unknown" (leave-one-speaker-out). Voices built on the same
  synthesizer model (e.g. three piper "joe" speakers that differ only in pitch/rate/channel) are
  near-twins; the false-accept rate is reported over all impostors and over impostors whose
  synthesizer model is not enrolled under another name ("distinct").

The threshold is chosen on half of each voice's test utterances (equal-error point) and the
open-set figures are reported on the other half, so the reported rates are not tuned on
themselves. The background (see core/speaker.py) comes from a disjoint speaker population:
default_voices(seed + 1), whose pitch and rate differ, saying speaker.BACKGROUND_SENTENCES, which
is what SpeakerEmbedder.background() does for a new registry on the robot.

Pooled statistics of every layer are cached per clip (safetensors under $TINYALIGN_HOME/cache) so the
analysis can be re-run without re-synthesizing.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinyalign_ros.core import corpus
from tinyalign_ros.core.adapters import atomic_write_bytes
from tinyalign_ros.core.encoder import load_whisper_encoder, log_mel
from tinyalign_ros.core.metrics import write_result
from tinyalign_ros.core.models import data_home
from tinyalign_ros.core.speaker import (BACKGROUND_SENTENCES, DEFAULT_LAYER, DEFAULT_POOLING, POOLINGS,
                                        Background, embed, pool)

NORMS = ("none", "center", "zscore")  # against the background: nothing, minus its mean, z-score
VARIANTS = tuple(f"{p}/{n}" for p in POOLINGS for n in NORMS)
CHOSEN = f"{DEFAULT_POOLING}/zscore"


def _clip(corpus_dir: Path | None, voice: corpus.Voice, text: str) -> Path | None:
    """The clip of `text` by `voice` in a corpus made by `tinyalign synth`, if it is there."""
    if corpus_dir is None:
        return None
    path = corpus_dir / "audio" / voice.key / f"{corpus._digest(text)[:12]}.flac"
    return path if path.is_file() else None


def _plan(seed: int, n_enroll: int, n_test: int, n_background: int, corpus_dir: Path | None = None):
    """[(group, voice, sentence text)]: enroll/test per default voice, plus background clips.

    Sentences already synthesized in `corpus_dir` are preferred (same voices, same audio path),
    so the benchmark does not re-synthesize what `tinyalign synth` has made.
    """
    rng = np.random.default_rng(seed)
    texts = [s.text for s in corpus.load_sentences()]
    voices = corpus.default_voices(seed)
    plan = []
    for v in voices:
        have = [t for t in texts if _clip(corpus_dir, v, t)]
        pool_ = have if len(have) >= n_enroll + n_test else texts
        picked = rng.choice(len(pool_), n_enroll + n_test, replace=False)
        plan += [("enroll" if i < n_enroll else "test", v, pool_[j]) for i, j in enumerate(picked)]
    for v in corpus.default_voices(seed + 1):  # what SpeakerEmbedder.background() does
        plan += [("background", v, t) for t in BACKGROUND_SENTENCES[:n_background]]
    return voices, plan


def _clip_key(voice: corpus.Voice, text: str) -> str:
    return hashlib.sha256(f"{voice.key}\n{text}".encode()).hexdigest()[:24]


def _collect(plan, cache: Path, corpus_dir: Path | None) -> tuple[torch.Tensor, list[float]]:
    """Pooled statistics (clips, layers+1, 2d) of every clip.

    Cached per clip (voice key + text) in one safetensors file, so a re-run with other
    --enroll/--test counts only encodes the clips it has not seen.
    """
    from safetensors.torch import load_file, save

    cached = load_file(cache) if cache.is_file() else {}
    encoder = None
    stats, seconds = [], []
    for k, (_, voice, text) in enumerate(plan):
        key = _clip_key(voice, text)
        if key not in cached:
            if encoder is None:
                encoder = load_whisper_encoder()
            clip = _clip(corpus_dir, voice, text)
            if clip is not None:
                import soundfile as sf

                audio = sf.read(clip, dtype="float32")[0]
            else:
                audio = corpus.synthesize(text, voice)
            t0 = time.perf_counter()
            with torch.inference_mode():
                hidden = encoder(log_mel(audio, pad_to_30s=False)).hidden_states
            frames = max(1, int(np.ceil(audio.size / 320)))
            cached[key] = torch.stack([pool(h[0, :frames]) for h in hidden])
            seconds.append(time.perf_counter() - t0)
        stats.append(cached[key])
        if k % 50 == 0:
            print(f"  {k}/{len(plan)} clips ({len(seconds)} encoded)", flush=True)
    if seconds:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, save({k: v.contiguous() for k, v in cached.items()}))
    return torch.stack(stats), seconds


def _embed(stats: torch.Tensor, variant: str, background: Background) -> torch.Tensor:
    pooling, norm = variant.split("/")
    if norm == "none":
        return embed(stats, None, pooling)
    if norm == "center":
        return embed(stats, Background(background.mean, torch.full_like(background.std, 1 - 1e-3)), pooling)
    return embed(stats, background, pooling)


def _evaluate(emb_enroll, emb_test, n_voices, models, threshold=None):
    """Scores and figures for one layer/variant. emb_enroll (V, E, D), emb_test (V, T, D)."""
    centroids = F.normalize(emb_enroll.mean(1), dim=-1)  # (V, D)
    sims = torch.einsum("vtd,kd->vtk", emb_test, centroids)  # (V, T, V)
    V, T, _ = sims.shape
    truth = torch.arange(V)[:, None].expand(V, T)
    closed = (sims.argmax(-1) == truth).float()
    genuine = sims.gather(-1, truth[..., None])[..., 0]  # (V, T) score to own centroid
    best = sims.max(-1).values
    masked = sims.clone()
    masked[torch.arange(V), :, torch.arange(V)] = -2.0  # leave-one-speaker-out: own centroid gone
    impostor = masked.max(-1).values  # (V, T) best score among the *other* speakers
    # "distinct" impostors: no other enrolled voice shares this voice's synthesizer model
    distinct = torch.tensor([sum(m == models[v] for m in models) == 1 for v in range(V)])
    return dict(sims=sims, closed=closed, genuine=genuine, best=best, impostor=impostor, distinct=distinct,
                correct_top=(sims.argmax(-1) == truth))


def _eer_threshold(genuine_accept_scores: torch.Tensor, impostor_scores: torch.Tensor) -> float:
    """Threshold where false-reject of correct identifications equals false-accept of unknowns."""
    candidates = torch.cat([genuine_accept_scores, impostor_scores]).sort().values
    best, best_gap = float(candidates[0]), float("inf")
    for t in candidates.tolist():
        frr = float((genuine_accept_scores < t).float().mean())
        far = float((impostor_scores >= t).float().mean())
        if abs(frr - far) < best_gap:
            best, best_gap = t, abs(frr - far)
    return best


def _open_set(r, cal: slice, ev: slice, threshold: float | None = None):
    ok_cal = r["best"][:, cal][r["correct_top"][:, cal]]
    imp_cal = r["impostor"][:, cal].flatten()
    thr = threshold if threshold is not None else _eer_threshold(ok_cal, imp_cal)
    best, correct = r["best"][:, ev], r["correct_top"][:, ev]
    imp = r["impostor"][:, ev]
    return {
        "threshold": round(thr, 4),
        "closed_set_accuracy": round(float(r["closed"][:, ev].mean()), 4),
        "genuine_accept": round(float((correct & (best >= thr)).float().mean()), 4),
        "genuine_wrong_speaker": round(float((~correct & (best >= thr)).float().mean()), 4),
        "false_accept_unknown": round(float((imp >= thr).float().mean()), 4),
        "false_accept_unknown_distinct": round(float((imp[r["distinct"]] >= thr).float().mean()), 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench speaker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/speaker.json and OUT/speaker.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enroll", type=int, default=3, help="enrollment utterances per voice")
    parser.add_argument("--test", type=int, default=10, help="test utterances per voice (half calibrate)")
    parser.add_argument("--background", type=int, default=len(BACKGROUND_SENTENCES),
                        help="utterances per background voice")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=Path("build/corpus"),
                        help="reuse clips of a corpus made by `tinyalign synth` (same seed) where present")
    args = parser.parse_args(argv)
    if args.test < 2 or args.enroll < 1:
        parser.error("need --enroll >= 1 and --test >= 2")
    torch.set_num_threads(args.threads)

    corpus_dir = args.corpus if args.corpus and (args.corpus / "audio").is_dir() else None
    voices, plan = _plan(args.seed, args.enroll, args.test, args.background, corpus_dir)
    cache = data_home() / "cache" / "speaker-clip-stats.safetensors"
    t0 = time.perf_counter()
    stats, encode_s = _collect(plan, cache, corpus_dir)
    collect_s = time.perf_counter() - t0
    groups = [g for g, _, _ in plan]
    idx = {g: [i for i, x in enumerate(groups) if x == g] for g in ("enroll", "test", "background")}
    V, E, T = len(voices), args.enroll, args.test
    n_layers = stats.shape[1] - 1
    models = [f"{v.engine}:{v.model}" for v in voices]
    cal, ev = slice(0, T // 2), slice(T // 2, T)

    table, results = [], {}
    for layer in range(n_layers + 1):
        s = stats[:, layer]
        background = Background.from_stats(list(s[idx["background"]]))
        for variant in VARIANTS:
            enroll = _embed(s[idx["enroll"]], variant, background).view(V, E, -1)
            test = _embed(s[idx["test"]], variant, background).view(V, T, -1)
            r = _evaluate(enroll, test, V, models)
            row = {"layer": layer, "variant": variant, **_open_set(r, cal, ev)}
            row["closed_set_accuracy_all"] = round(float(r["closed"].mean()), 4)
            table.append(row)
            results[(layer, variant)] = r

    chosen_variant = CHOSEN
    best_row = max((row for row in table if row["variant"] == chosen_variant),
                   key=lambda row: (row["closed_set_accuracy_all"], -row["false_accept_unknown_distinct"]))
    chosen = results[(DEFAULT_LAYER, chosen_variant)]
    s = stats[:, DEFAULT_LAYER]
    background = Background.from_stats(list(s[idx["background"]]))
    by_enroll = {}
    for n in range(1, E + 1):  # fewer enrollment utterances: the first n of each voice
        enroll = _embed(s[idx["enroll"]], chosen_variant, background).view(V, E, -1)[:, :n]
        test = _embed(s[idx["test"]], chosen_variant, background).view(V, T, -1)
        by_enroll[n] = round(float(_evaluate(enroll, test, V, models)["closed"].mean()), 4)
    per_voice = []
    for v, voice in enumerate(voices):
        per_voice.append({
            "voice": voice.name, "accuracy": round(float(chosen["closed"][v].mean()), 3),
            "confused_with": sorted({voices[k].name for k in chosen["sims"][v].argmax(-1).tolist() if k != v}),
        })
    figures = {
        "setup": {"voices": V, "enroll_per_voice": E, "test_per_voice": T,
                  "background_clips": len(idx["background"]), "seed": args.seed,
                  "calibration": "threshold = equal-error point on the first half of each voice's test "
                                 "utterances; open-set figures on the second half",
                  "closed_set_accuracy_all": "over all test utterances"},
        "chosen": {"layer": DEFAULT_LAYER, "variant": chosen_variant,
                   **next(r for r in table if r["layer"] == DEFAULT_LAYER and r["variant"] == chosen_variant)},
        "best_layer_for_chosen_variant": best_row["layer"],
        "closed_set_accuracy_by_enrollment_utterances": by_enroll,
        "table": table,
        "per_voice": per_voice,
        "timing": {"collect_s": round(collect_s, 1),
                   "encoder_s_per_clip_full_depth": round(float(np.mean(encode_s)), 4) if encode_s else None},
    }
    out = write_result(args.out, "speaker", figures)
    _plot(args.out / "speaker.png", table, chosen, n_layers, cal, ev, figures["chosen"]["threshold"])
    print(f"wrote {out}")
    for row in table:
        print(f"layer {row['layer']} {row['variant']:15s} closed {row['closed_set_accuracy_all']:.3f} "
              f"thr {row['threshold']:.3f} accept {row['genuine_accept']:.3f} "
              f"FA {row['false_accept_unknown']:.3f} FA-distinct {row['false_accept_unknown_distinct']:.3f}")
    return 0


def _plot(path: Path, table, chosen, n_layers, cal, ev, threshold) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    shown = [v for v in VARIANTS if v.endswith(("/none", "/zscore"))]
    width = 0.8 / len(shown)
    for i, variant in enumerate(shown):
        acc = [next(r["closed_set_accuracy_all"] for r in table if r["layer"] == l and r["variant"] == variant)
               for l in range(n_layers + 1)]
        a.bar(np.arange(n_layers + 1) + (i - (len(shown) - 1) / 2) * width, acc, width, label=variant)
    a.set_xticks(range(n_layers + 1), ["stem"] + [str(l) for l in range(1, n_layers + 1)])
    a.set_xlabel("encoder layer pooled")
    a.set_ylabel("closed-set identification accuracy")
    a.set_ylim(0, 1.2)
    a.set_yticks(np.linspace(0, 1, 6))
    a.legend(loc="upper center", ncol=2, fontsize=8)
    a.set_title("Speaker ID on synthesized voices")
    best = chosen["best"][:, ev][chosen["correct_top"][:, ev]].numpy()
    imp = chosen["impostor"][:, ev].flatten().numpy()
    bins = np.linspace(min(best.min(), imp.min()), 1, 40)
    b.hist(best, bins, alpha=0.6, label="enrolled speaker (correct)")
    b.hist(imp, bins, alpha=0.6, label="unknown speaker (best other)")
    b.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.2f}")
    b.set_xlabel("cosine similarity")
    b.set_title(f"layer {DEFAULT_LAYER}, {CHOSEN} (evaluation half)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
