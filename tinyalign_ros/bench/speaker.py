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

Side by side with that (section "backends"), the speaker backends of core/speaker.py: "whisper"
(the layer above) and "ge2e" (core/ge2e.py, a voice encoder trained on real speakers), each on
three populations:

- synthetic: the default voices above (threshold of each backend = its equal-error point on the
  calibration half; figures on the evaluation half);
- corpus: the voices of the corpus `tinyalign synth` made (its val/test splits: 8 of the
  synthetic voices, among them the severe atypical ones the ASR adapters are trained for, saying
  other sentences), `--corpus-enroll` enrollment and `--corpus-test` test utterances each;
- real: the only multi-speaker real speech on the machine, pocketsphinx-testdata (the "cards"
  speaker, the LibriVox reader) and alsa-utils' channel-test voice; enrolled with
  `--real-enroll` recordings each, tested on the others. pocketsphinx's goforward, numbers,
  something and tidigits/dhd recordings are never enrolled: they are the unknown voice.

Per population: verification EER (every test utterance against every enrolled centroid: own =
genuine, others = impostor trials), closed-set accuracy, and at the backend's threshold the
genuine accept, wrong-speaker accept (a wrong adapter) and unknown-speaker accept rates
(leave-one-speaker-out, plus the never-enrolled voices).

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
from tinyalign_ros.core.audio import load_audio
from tinyalign_ros.core.encoder import load_whisper_encoder, log_mel
from tinyalign_ros.core.ge2e import VoiceEncoder
from tinyalign_ros.core.metrics import write_result
from tinyalign_ros.core.models import data_home
from tinyalign_ros.core.speaker import (BACKENDS, BACKGROUND_SENTENCES, DEFAULT_BACKEND, DEFAULT_LAYER,
                                        DEFAULT_POOLING, DEFAULT_THRESHOLDS, POOLINGS, Background, Ge2eEmbedder,
                                        SpeakerEmbedder, embed, pool)

NORMS = ("none", "center", "zscore")  # against the background: nothing, minus its mean, z-score
VARIANTS = tuple(f"{p}/{n}" for p in POOLINGS for n in NORMS)
CHOSEN = f"{DEFAULT_POOLING}/zscore"
POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
ALSA_VOICE = Path("/usr/share/sounds/alsa")  # alsa-utils' speaker-test clips: one real voice
# Real speakers: name -> recordings. Never-enrolled voices (the unknown speaker) under UNKNOWN.
REAL_SPEAKERS = {
    "cards": [POCKETSPHINX / "cards" / f"00{i}.wav" for i in range(1, 6)],
    "librivox": sorted((POCKETSPHINX / "librivox").glob("*.wav")),
    "alsa": [ALSA_VOICE / f"{n}.wav" for n in ("Front_Center", "Front_Left", "Front_Right", "Rear_Center",
                                              "Rear_Left", "Rear_Right", "Side_Left", "Side_Right")],
}
UNKNOWN = "unknown"
REAL_UNKNOWN = [POCKETSPHINX / n for n in ("goforward.raw", "numbers.raw", "something.raw", "tidigits/dhd.2934z.raw")]


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


def _collect(plan, cache: Path, corpus_dir: Path | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Features of every clip of the plan (see _features), keyed by voice key + text."""
    items = []
    for _, voice, text in plan:
        clip = _clip(corpus_dir, voice, text)
        items.append((_clip_key(voice, text),
                      (lambda c=clip: load_audio(c)) if clip is not None else (lambda t=text, v=voice: corpus.synthesize(t, v))))
    return _features(items, cache)


class _Extractors:
    """The whisper encoder and the GE2E voice encoder, loaded at first use."""

    def __init__(self) -> None:
        self._whisper, self._ge2e = None, None

    def whisper(self, audio: np.ndarray) -> torch.Tensor:
        """Pooled statistics of every layer (layers+1, 2d)."""
        self._whisper = self._whisper or load_whisper_encoder()
        with torch.inference_mode():
            hidden = self._whisper(log_mel(audio, pad_to_30s=False)).hidden_states
        frames = max(1, int(np.ceil(audio.size / 320)))
        return torch.stack([pool(h[0, :frames]) for h in hidden])

    def ge2e(self, audio: np.ndarray) -> torch.Tensor:
        self._ge2e = self._ge2e or VoiceEncoder()
        return self._ge2e(audio)


def _features(items, cache: Path, extract: _Extractors | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """{"whisper": (clips, layers+1, 2d), "ge2e": (clips, 256)} of [(key, load audio)], and seconds
    per clip of each. Cached per clip key in one safetensors file per backend (`cache` + suffix),
    so a re-run only loads and encodes the clips it has not seen."""
    from safetensors.torch import load_file, save

    extract = extract or _Extractors()
    files = {"whisper": cache, "ge2e": cache.with_name(cache.stem + "-ge2e.safetensors")}
    cached = {b: load_file(f) if f.is_file() else {} for b, f in files.items()}
    out = {b: [] for b in files}
    seconds = {b: [] for b in files}
    for k, (key, load) in enumerate(items):
        audio = None
        for b in files:
            if key not in cached[b]:
                audio = load() if audio is None else audio
                t0 = time.perf_counter()
                cached[b][key] = getattr(extract, b)(audio)
                seconds[b].append(time.perf_counter() - t0)
            out[b].append(cached[b][key])
        if k % 50 == 0:
            print(f"  {k}/{len(items)} clips ({len(seconds['whisper'])} encoded)", flush=True)
    for b, f in files.items():
        if seconds[b]:
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(f, save({k: v.contiguous() for k, v in cached[b].items()}))
    return {b: torch.stack(v) for b, v in out.items()}, seconds


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


def _eer(genuine: torch.Tensor, impostor: torch.Tensor) -> tuple[float, float]:
    """(equal error rate, its threshold): where the false-reject rate of `genuine` scores meets the
    false-accept rate of `impostor` scores (the mean of the two at the closest candidate)."""
    candidates = torch.cat([genuine, impostor]).sort().values
    best, best_gap, rate = float(candidates[0]), float("inf"), 1.0
    for t in candidates.tolist():
        frr = float((genuine < t).float().mean())
        far = float((impostor >= t).float().mean())
        if abs(frr - far) < best_gap:
            best, best_gap, rate = t, abs(frr - far), (frr + far) / 2
    return rate, best


def _eer_threshold(genuine_accept_scores: torch.Tensor, impostor_scores: torch.Tensor) -> float:
    """Threshold where false-reject of correct identifications equals false-accept of unknowns."""
    return _eer(genuine_accept_scores, impostor_scores)[1]


def _population(enroll: Sequence[torch.Tensor], test: Sequence[torch.Tensor], unknown: torch.Tensor | None,
                threshold: float) -> dict:
    """Figures of one backend on one population: enroll[i] (E_i, D) and test[i] (T_i, D) are speaker
    i's unit embeddings, `unknown` (U, D) utterances of never-enrolled voices.

    EER: every test utterance against every centroid (own = genuine trial, another = impostor
    trial) and every unknown utterance against every centroid (impostor). At `threshold`: the
    share of test utterances accepted as the right speaker, accepted as a wrong one, and of
    unknown-speaker utterances accepted as anybody (each speaker's utterances with its own
    voiceprint removed, plus the never-enrolled voices)."""
    centroids = F.normalize(torch.stack([F.normalize(e.mean(0), dim=-1) for e in enroll]), dim=-1)
    V = len(enroll)
    genuine, impostor, right, wrong, closed, unknown_best = [], [], [], [], [], []
    for i, t in enumerate(test):
        sims = t @ centroids.T  # (T_i, V)
        others = [k for k in range(V) if k != i]
        genuine.append(sims[:, i])
        impostor.append(sims[:, others].flatten())
        best, top = sims.max(1)
        closed.append(top == i)
        right.append((top == i) & (best >= threshold))
        wrong.append((top != i) & (best >= threshold))
        if others:
            unknown_best.append(sims[:, others].max(1).values)
    if unknown is not None and len(unknown):
        sims = unknown @ centroids.T
        impostor.append(sims.flatten())
        unknown_best.append(sims.max(1).values)
    eer, eer_threshold = _eer(torch.cat(genuine), torch.cat(impostor))
    unknown_best = torch.cat(unknown_best)

    def rate(xs) -> float:
        return round(float(torch.cat(xs).float().mean()), 4)

    return {"speakers": V, "enroll_utterances": [len(e) for e in enroll], "test_utterances": sum(len(t) for t in test),
            "unknown_utterances": 0 if unknown is None else len(unknown), "unknown_trials": len(unknown_best),
            "eer": round(eer, 4), "eer_threshold": round(eer_threshold, 4), "closed_set_accuracy": rate(closed),
            "threshold": round(threshold, 4), "genuine_accept": rate(right), "wrong_speaker_accept": rate(wrong),
            "false_accept_unknown": round(float((unknown_best >= threshold).float().mean()), 4)}


def _read(path: Path) -> np.ndarray:
    """A real recording: pocketsphinx's .raw files are 16 kHz 16-bit mono without a header."""
    if path.suffix == ".raw":
        return np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
    return load_audio(path)


def _real_items() -> tuple[dict[str, list], list, list[str]]:
    """{speaker: [(key, load)]} of the real speakers whose recordings are all here, the unknown
    voices' [(key, load)], and the sources missing (`make setup` installs pocketsphinx-testdata and alsa-utils)."""
    speakers, missing = {}, []
    for name, paths in REAL_SPEAKERS.items():
        if paths and all(p.is_file() for p in paths):
            speakers[name] = [(f"real:{p}", lambda p=p: _read(p)) for p in paths]
        else:
            missing.append(name)
    unknown = [(f"real:{p}", lambda p=p: _read(p)) for p in REAL_UNKNOWN if p.is_file()]
    missing += [str(p) for p in REAL_UNKNOWN if not p.is_file()]
    return speakers, unknown, missing


def _corpus_items(corpus_dir: Path | None, n_enroll: int, n_test: int, seed: int) -> dict[str, tuple[list, list]]:
    """{speaker: (enroll [(key, load)], test [(key, load)])} of the voices of a `tinyalign synth` corpus."""
    import csv

    if corpus_dir is None or not (corpus_dir / "manifest.csv").is_file():
        return {}
    with (corpus_dir / "manifest.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    by_speaker: dict[str, list[str]] = {}
    for r in rows:
        by_speaker.setdefault(r["speaker"], []).append(r["path"])
    rng = np.random.default_rng(seed)
    out = {}
    for speaker, paths in sorted(by_speaker.items()):
        if len(paths) < n_enroll + n_test:
            continue
        picked = [paths[j] for j in rng.choice(len(paths), n_enroll + n_test, replace=False)]
        items = [(f"corpus:{p}", lambda p=p: load_audio(corpus_dir / p)) for p in picked]
        out[speaker] = (items[:n_enroll], items[n_enroll:])
    return out


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
                        help="reuse clips of a corpus made by `tinyalign synth` (same seed) where present; "
                             "its voices are the held-out population")
    parser.add_argument("--corpus-enroll", type=int, default=3, help="enrollment utterances per corpus voice")
    parser.add_argument("--corpus-test", type=int, default=20, help="test utterances per corpus voice")
    parser.add_argument("--real-enroll", type=int, default=2, help="enrollment recordings per real speaker")
    parser.add_argument("--plot", type=Path, default=None, help="also copy the plot here (e.g. docs/img/speaker.png)")
    args = parser.parse_args(argv)
    if args.test < 2 or args.enroll < 1:
        parser.error("need --enroll >= 1 and --test >= 2")
    torch.set_num_threads(args.threads)

    corpus_dir = args.corpus if args.corpus and (args.corpus / "audio").is_dir() else None
    voices, plan = _plan(args.seed, args.enroll, args.test, args.background, corpus_dir)
    cache = data_home() / "cache" / "speaker-clip-stats.safetensors"
    t0 = time.perf_counter()
    features, encode_s = _collect(plan, cache, corpus_dir)
    stats = features["whisper"]
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
                   "encoder_s_per_clip_full_depth": round(float(np.mean(encode_s["whisper"])), 4)
                   if encode_s["whisper"] else None,
                   "ge2e_s_per_clip": round(float(np.mean(encode_s["ge2e"])), 4) if encode_s["ge2e"] else None},
    }
    figures["backends"], figures["backend_sources"] = _backends(args, features, idx, V, E, T, models, cal, ev,
                                                                cache, corpus_dir)
    figures["default_backend"] = DEFAULT_BACKEND
    out = write_result(args.out, "speaker", figures)
    _plot(args.out / "speaker.png", table, chosen, n_layers, cal, ev, figures["chosen"]["threshold"],
          figures["backends"])
    if args.plot:
        import shutil

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.out / "speaker.png", args.plot)
    print(f"wrote {out}")
    for backend, pops in figures["backends"].items():
        for pop, row in pops["populations"].items():
            print(f"{backend:8s} {pop:10s} EER {row['eer']:.3f} closed {row['closed_set_accuracy']:.3f} "
                  f"thr {row['threshold']:.3f} accept {row['genuine_accept']:.3f} wrong {row['wrong_speaker_accept']:.3f} "
                  f"unknown-FA {row['false_accept_unknown']:.3f}")
    for row in table:
        print(f"layer {row['layer']} {row['variant']:15s} closed {row['closed_set_accuracy_all']:.3f} "
              f"thr {row['threshold']:.3f} accept {row['genuine_accept']:.3f} "
              f"FA {row['false_accept_unknown']:.3f} FA-distinct {row['false_accept_unknown_distinct']:.3f}")
    return 0


def _backends(args, features, idx, V, E, T, models, cal, ev, cache, corpus_dir) -> tuple[dict, dict]:
    """Each backend (its configured threshold) on the synthetic, held-out and real populations."""
    extract = _Extractors()
    in_corpus = _corpus_items(corpus_dir, args.corpus_enroll, args.corpus_test, args.seed)
    h_items = [it for enroll, test in in_corpus.values() for it in enroll + test]
    real, real_unknown, missing = _real_items()
    r_items = [it for items in real.values() for it in items] + real_unknown
    other, _ = _features(h_items + r_items, cache, extract)
    row_of = {key: i for i, (key, _) in enumerate(h_items + r_items)}
    background = Background.from_stats(list(features["whisper"][idx["background"], DEFAULT_LAYER]))

    def unit(backend: str, x: torch.Tensor) -> torch.Tensor:
        return _embed(x[:, DEFAULT_LAYER], CHOSEN, background) if backend == "whisper" else F.normalize(x, dim=-1)

    def rows(backend: str, items) -> torch.Tensor:
        return unit(backend, other[backend][[row_of[k] for k, _ in items]])

    out = {}
    for backend in BACKENDS:
        enroll = unit(backend, features[backend][idx["enroll"]]).view(V, E, -1)
        test = unit(backend, features[backend][idx["test"]]).view(V, T, -1)
        calibrated = _open_set(_evaluate(enroll, test, V, models), cal, ev)["threshold"]
        thr = DEFAULT_THRESHOLDS[backend]
        pops = {"synthetic": _population(list(enroll), list(test[:, ev]), None, thr)}
        if in_corpus:
            pops["corpus"] = _population([rows(backend, e) for e, _ in in_corpus.values()],
                                          [rows(backend, t) for _, t in in_corpus.values()], None, thr)
        if len(real) >= 2:
            n = args.real_enroll
            pops["real"] = _population([rows(backend, items[:n]) for items in real.values()],
                                       [rows(backend, items[n:]) for items in real.values()],
                                       rows(backend, real_unknown) if real_unknown else None, thr)
        out[backend] = {
            "embedding": f"whisper layer {DEFAULT_LAYER} {CHOSEN}" if backend == "whisper" else "GE2E (core/ge2e.py)",
            "threshold": thr, "threshold_calibrated": calibrated,
            "calibration": "equal-error point on the synthetic voices' calibration half (the open-set "
                           "definition of `chosen`); the configured threshold is it rounded",
            "populations": pops,
        }
    for backend, embedder in (("whisper", lambda: SpeakerEmbedder(load_whisper_encoder())), ("ge2e", Ge2eEmbedder)):
        clips = [load() for items in real.values() for _, load in items] + [load() for _, load in real_unknown]
        if clips:  # what asr_node pays per utterance (whisper: the encoder up to the speaker layer only)
            emb = embedder()
            t0 = time.perf_counter()
            for clip in clips:
                emb.stats(clip)
            out[backend]["seconds_per_utterance"] = round((time.perf_counter() - t0) / len(clips), 4)
            out[backend]["timed_on"] = (f"{len(clips)} real recordings, "
                                        f"{np.mean([c.size for c in clips]) / 16000:.1f} s on average")
    sources = {"corpus_voices": sorted(in_corpus), "real_speakers": sorted(real),
                      "real_unknown": [str(p) for p in REAL_UNKNOWN if p.is_file()], "missing": missing,
               "real_enroll": "the first --real-enroll recordings of each speaker (sorted names)"}
    return out, sources


def _plot(path: Path, table, chosen, n_layers, cal, ev, threshold, backends) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
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
    pops = list(next(iter(backends.values()))["populations"])
    bars = [(f"{backend} EER", [backends[backend]["populations"][p]["eer"] for p in pops]) for backend in backends]
    bars += [(f"{backend} unknown accepted", [backends[backend]["populations"][p]["false_accept_unknown"]
                                              for p in pops]) for backend in backends]
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        drawn = c.bar(np.arange(len(pops)) + (i - (len(bars) - 1) / 2) * width, values, width, label=label,
                      hatch="//" if "unknown" in label else None)
        c.bar_label(drawn, fmt="%.2f", fontsize=6, rotation=90, padding=2)
    c.set_xticks(range(len(pops)), pops)
    c.set_ylabel("rate (lower is better)")
    c.set_title("Speaker backends: EER; unknown accepted at threshold", fontsize=10)
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
