"""`tinyalign bench personalize --out DIR`: does on-robot personalization help an unusual voice?

For each held-out atypical voice of the corpus (speakers of the val/test splits marked atypical
in `CORPUS/manifest.csv`: never seen by the base projector), and for the real recordings of
`align.real_speech_clips()` taken as one more "speaker":

- the voice's utterances are split once (seeded): the last `--test` are the test set, the first
  N (N in `--n`, default 10, 25, 50; `--real-n` for the 10 real clips) are what the speaker
  "said to the robot" (stored as consented samples with the text as a correction label and the
  cascade transcript beside it);
- one `Personalizer` round per adapter kind (`--kinds`, default lora and full) on those N, with
  the round's own held-out gate, from the base projector (`--projector`);
- the ASR-LLM WER (greedy "repeat what was said") on the test set before (base projector) and
  after (what the gate let through: the new adapter, or the base when it was refused), with the
  training time and the peak RSS while the round ran (sampled every 50 ms).

The hybrid prompt is used when the projector's metadata says so, with the cascade transcripts
of `CORPUS/asr.csv` (and faster-whisper's for the real clips), and its outputs are anchored to
them (`--max-change`) as assistant_node and the personalizer's gate do. Writes DIR/personalize.json and
DIR/personalize.png (WER before/after against N per voice and kind).
"""
from __future__ import annotations

import argparse
import csv
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from tinyalign_ros.core.heap import rss_mb
from tinyalign_ros.core.metrics import wer, write_result


class PeakRss:
    """Peak resident memory of this process while the `with` block runs (sampled)."""

    def __enter__(self) -> "PeakRss":
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def voice_sets(corpus: Path, encoder, layer: int, hybrid: bool, real: bool) -> dict[str, list[tuple]]:
    """{voice: [(features, text, asr transcript)]} for the held-out atypical voices (+ real speech)."""
    from tinyalign_ros.core.align import (encode_file, load_corpus_features, read_asr_transcripts, read_manifest,
                                          real_speech_clips)

    rows = read_manifest(corpus)
    atypical = {r["speaker"] for r in rows if r["atypical"] == "1" and r["split"] in ("val", "test")}
    asr = read_asr_transcripts(corpus / "asr.csv")
    out: dict[str, list[tuple]] = {}
    for split, fs in load_corpus_features(corpus, corpus / "features", encoder, layer, ("val", "test")).items():
        for i, r in enumerate(fs.rows):
            if r["speaker"] in atypical and (not hybrid or r["path"] in asr):
                out.setdefault(r["speaker"], []).append((fs.get(i), r["text"], asr.get(r["path"], ("",))[0]))
    if real:  # the cascade's transcripts are the yardstick (cascade_wer) and the hybrid prompt's input
        from tinyalign_ros.core.asr import WhisperTranscriber
        from tinyalign_ros.core.audio import load_audio

        whisper = WhisperTranscriber(threads=2)
        out[REAL_VOICE] = [(encode_file(encoder, path, layer).float(), text, whisper.transcribe(load_audio(path)).text)
                           for path, text in real_speech_clips()]
    return out


REAL_VOICE = "real-pocketsphinx"


def heldout_wer(aligned, projector, items: Sequence[tuple], hybrid: bool, batch: int = 8) -> float:
    aligned.projector = projector
    hyps: list[str] = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        hyps += aligned.transcribe([c[0] for c in chunk], 40, [c[2] for c in chunk] if hybrid else None)
    return wer([c[1] for c in items], hyps)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tinyalign bench personalize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for personalize.json and personalize.png")
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"), help="folder with manifest.csv")
    ap.add_argument("--projector", type=Path, default=None, help="base projector (default: the shipped one)")
    ap.add_argument("--llm", default="", help="transformers model folder (default: SmolLM2 conversion)")
    ap.add_argument("--n", default="10,25,50", help="comma-separated numbers of personalization utterances")
    ap.add_argument("--real-n", default="5", help="the same for the real recordings (only 10 clips ship)")
    ap.add_argument("--test", type=int, default=25, help="test utterances per voice (the last ones)")
    ap.add_argument("--kinds", default="lora,full", help="adapter kinds to compare")
    ap.add_argument("--voices", default="", help="comma-separated speaker ids (default: every held-out atypical one)")
    ap.add_argument("--no-real", action="store_true", help="skip the real recordings")
    ap.add_argument("--max-change", type=float, default=None,
                    help="hybrid: anchor outputs to the ASR transcript as assistant_node does "
                         "(default core.align.DEFAULT_MAX_CHANGE; -1 = raw outputs)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="training seconds per round")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from tinyalign_ros.core.adapters import AdapterStore, file_sha256
    from tinyalign_ros.core.align import DEFAULT_MAX_CHANGE, AlignedLLM, AlignPrompt
    from tinyalign_ros.core.encoder import load_whisper_encoder
    from tinyalign_ros.core.llm import ChatLLM
    from tinyalign_ros.core.models import resolve_llm, shipped_model
    from tinyalign_ros.core.personalize import PersonalizeConfig, Personalizer, apply_adapter
    from tinyalign_ros.core.projector import load_projector, read_projector_metadata
    from tinyalign_ros.core.samples import SampleStore

    torch.set_num_threads(args.threads)
    projector_file = args.projector or shipped_model("projector.safetensors")
    hybrid = read_projector_metadata(projector_file).get("prompt") == "hybrid"
    chat = ChatLLM(resolve_llm(args.llm), threads=args.threads)
    base = load_projector(projector_file, out_dim=chat.model.get_input_embeddings().embedding_dim)
    aligned = AlignedLLM.from_chat(chat, base, AlignPrompt(transcript=hybrid),
                                   max_change=DEFAULT_MAX_CHANGE if args.max_change is None else args.max_change)
    encoder = load_whisper_encoder()
    sets = voice_sets(args.corpus, encoder, base.cfg.encoder_layer, hybrid, not args.no_real)
    if args.voices:
        sets = {v: sets[v] for v in args.voices.split(",")}
    ns = sorted(int(n) for n in args.n.split(","))
    real_ns = sorted(int(n) for n in args.real_n.split(","))
    base_sha = file_sha256(projector_file)
    runs = []
    for voice, items in sets.items():
        items = list(items)
        random.Random(args.seed).shuffle(items)
        n_test = min(args.test, len(items) // 2)
        test, pool = items[-n_test:], items[:-n_test]
        before = heldout_wer(aligned, base, test, hybrid)
        heard = [c[2] for c in test]
        # faster-whisper on the same test set (an empty transcript counts: that is what the cascade heard)
        cascade = wer([c[1] for c in test], heard) if any(heard) else None
        print(f"{voice}: {len(pool)} utterances to personalize on, {n_test} test; base WER {before:.3f}"
              + (f", cascade {cascade:.3f}" if cascade is not None else ""), flush=True)
        for n in real_ns if voice == REAL_VOICE else ns:
            if n > len(pool):
                continue
            for kind in args.kinds.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    samples, adapters = SampleStore(Path(tmp) / "s"), AdapterStore(Path(tmp) / "a")
                    samples.grant_consent("bench")
                    for k, (feats, text, heard) in enumerate(pool[:n]):
                        samples.add("bench", feats, text, "correction", utterance_id=str(k), asr_transcript=heard)
                    config = PersonalizeConfig(kind=kind, budget_s=args.budget_s, max_steps=args.max_steps,
                                               min_samples=min(n, 8), seed=args.seed, nice=0, threads=0)
                    trainer = Personalizer(aligned, samples, adapters, Path(tmp) / "w", base_sha, config)
                    t0 = time.perf_counter()
                    with PeakRss() as rss:
                        result = trainer.run("bench")
                    wall = time.perf_counter() - t0
                    adapter = adapters.load_latest("bench")
                    after = heldout_wer(aligned, apply_adapter(base, adapter) if adapter else base, test, hybrid)
                    aligned.projector = base
                runs.append({"voice": voice, "real": voice == REAL_VOICE, "n_train": n, "kind": kind,
                             "test_n": n_test, "wer_before": before, "wer_after": after, "cascade_wer": cascade,
                             "gate": result.status, "val_wer_before": result.val_wer_before,
                             "val_wer_after": result.val_wer_after, "steps": result.steps,
                             "train_s": round(result.train_s, 1), "wall_s": round(wall, 1),
                             "peak_mem_mb": round(rss.peak)})
                print(f"  N={n} {kind}: {result.status} after {result.steps} steps ({result.train_s:.0f} s); "
                      f"test WER {before:.3f} -> {after:.3f}; peak RSS {rss.peak:.0f} MB", flush=True)
    figures = {"projector": str(projector_file), "hybrid": hybrid, "max_change": aligned.max_change,
               "budget_s": args.budget_s,
               "max_steps": args.max_steps, "threads": args.threads, "voices": runs}
    out = write_result(args.out, "personalize", figures)
    _plot(runs, args.out / "personalize.png")
    with (args.out / "personalize.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(runs[0]) if runs else ["voice"])
        w.writeheader()
        w.writerows(runs)
    print(f"wrote {out}")
    return 0


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voices = sorted({r["voice"] for r in runs})
    fig, axes = plt.subplots(1, max(1, len(voices)), figsize=(4 * max(1, len(voices)), 3.5), squeeze=False)
    for ax, voice in zip(axes[0], voices):
        mine = [r for r in runs if r["voice"] == voice]
        ns = sorted({r["n_train"] for r in mine})
        if mine:
            ax.plot(ns, [mine[0]["wer_before"]] * len(ns), "k--", label="base")
            if mine[0]["cascade_wer"] is not None:
                ax.plot(ns, [mine[0]["cascade_wer"]] * len(ns), ":", color="grey", label="cascade")
        for kind in sorted({r["kind"] for r in mine}):
            pts = sorted((r["n_train"], r["wer_after"]) for r in mine if r["kind"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        ax.set_title(voice, fontsize=8)
        ax.set_xlabel("personalization utterances N")
        ax.set_ylabel("test WER")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
