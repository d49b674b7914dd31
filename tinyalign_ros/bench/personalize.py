"""`tinyalign bench personalize --out DIR`: does on-robot personalization help an unusual voice?

Per voice, side by side in one run, with the same split: the speaker's adapter of each method
(`--methods`), trained by one `Personalizer` round (the gate included, as personalizer_node runs
it) on the first N utterances (N in `--n`), then judged on the last `--test` utterances by the
transcript the robot would act on, produced by `core.recognizer.Recognizer` (what asr_node runs):

- `asr`: LoRA in Whisper's top encoder layers (`--encoder-layers`, default 2) and decoder,
  trained with the decoder's cross-entropy on the speaker's audio (core/asr_adapt.py);
- `asr-dec`: the same with the decoder only (encoder output cached: ~5x cheaper steps);
- `asr-enc`: the encoder blocks only (the decoder, hence the text prior, stays the base's);
- `lora` / `full`: the projector adapters of before (aligned mode; greedy "repeat what was said"
  through the frozen LLM, anchored to the cascade transcript): the transcript never changes, which
  is why they could not help. They need the LLM and the corpus features; slow.

Voices: the held-out atypical synthetic voices of the corpus (`CORPUS/manifest.csv`), the real
recordings of pocketsphinx-testdata (`real-pocketsphinx`, 10 clips), and the same real clips made
atypical with sox (`real-atypical`: slowed, pitch-lowered, band-limited, reverberant, noisy).
`cascade_wer` is faster-whisper tiny.en (int8, greedy, temperature 0 so that it repeats) on the
same test clips: the yardstick.
Rows record training seconds, the round's wall time (data preparation and validation included),
the process's peak RSS while the round ran (sampled every 50 ms; `round_added_mb`: above the RSS
the process had when the round started, i.e. what a round costs beside a running graph) and the
adapter's size; `recognize_s_adapter` (median seconds per test utterance of the Recognizer with the
speaker's adapter, or the candidate when the gate refused it) beside `recognize_s_base` (faster-whisper
alone, what an unknown speaker costs). The PyTorch encoder that asr_node runs for every utterance
(features, exits) is outside both.
Writes DIR/personalize.json, DIR/personalize.csv and DIR/personalize.png (test WER against N and
against training seconds per voice and method).
"""
from __future__ import annotations

import argparse
import csv
import random
import subprocess
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tinyalign_ros.core.heap import rss_mb
from tinyalign_ros.core.metrics import wer, word_errors, write_result


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


REAL_VOICE = "real-pocketsphinx"
REAL_ATYPICAL = "real-atypical"
# a real voice made atypical, as a new user with a speech impairment or an unusual accent might sound
ATYPICAL_SOX = ["tempo", "-s", "0.8", "pitch", "-300", "sinc", "300-3400", "reverb", "40", "50", "60",
                "rate", "-v", "16000", "gain", "-n", "-3"]
FIXED_CLOCK = 1.8e9
# method -> (encoder layers with LoRA (None = --encoder-layers), LoRA in the decoder)
ASR_METHODS = {"asr": (None, True), "asr-dec": (0, True), "asr-enc": (None, False), "e2e": (None, False)}
ALIGNED_METHODS = {"e2e", "lora", "full"}  # judged by the aligned assistant's text


@dataclass
class Item:
    audio: np.ndarray
    text: str
    features: torch.Tensor | None = None  # projector methods only
    heard: str = ""  # the cascade's transcript (the hybrid projector's input)


def make_atypical(path: Path) -> np.ndarray:
    """A real recording through the sox chain ATYPICAL_SOX, plus white noise at 20 dB SNR."""
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        # -R: sox's dither seeded the same every run (by default it differs, and so would the figures)
        subprocess.run(["sox", "-R", str(path), "-c", "1", str(out), *ATYPICAL_SOX], check=True, capture_output=True)
        audio, _ = sf.read(out, dtype="float32")
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # the same noise in every run
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noisy = audio + rng.standard_normal(audio.size) * np.sqrt(power / 10 ** 2.0)
    return (noisy * min(1.0, 0.99 / float(np.max(np.abs(noisy))))).astype(np.float32)


def voice_sets(corpus: Path, voices: Sequence[str], real: bool) -> dict[str, list[Item]]:
    """{voice: [Item]} for the named held-out voices of the corpus (default: its atypical ones) and
    the real recordings."""
    from tinyalign_ros.core.align import read_manifest, real_speech_clips
    from tinyalign_ros.core.audio import load_audio

    out: dict[str, list[Item]] = {}
    if corpus.is_dir():
        rows = [r for r in read_manifest(corpus) if r["split"] in ("val", "test")]
        wanted = set(voices) if voices else {r["speaker"] for r in rows if r["atypical"] == "1"}
        missing = wanted - {r["speaker"] for r in rows}
        if missing:
            raise SystemExit(f"no held-out voices {sorted(missing)} in {corpus}/manifest.csv")
        for r in rows:
            if r["speaker"] in wanted:
                out.setdefault(r["speaker"], []).append(Item(load_audio(corpus / r["path"]), r["text"]))
    if real:
        clips = real_speech_clips()
        out[REAL_VOICE] = [Item(load_audio(path), text) for path, text in clips]
        out[REAL_ATYPICAL] = [Item(make_atypical(path), text) for path, text in clips]
    return out


def _projector_round(args, kind: str, pool: list[Item], test: list[Item], tmp: Path, llm_state: dict) -> dict:
    """One projector-adapter round (the pre-[8] methods), judged as before by the aligned LLM."""
    from tinyalign_ros.core.adapters import AdapterStore
    from tinyalign_ros.core.personalize import PersonalizeConfig, Personalizer, apply_adapter
    from tinyalign_ros.core.samples import SampleStore

    aligned, base, base_sha, hybrid, encoder = _llm(args, llm_state)
    _features(pool + test, encoder, llm_state["whisper"])
    samples, adapters = SampleStore(tmp / "s", clock=lambda: FIXED_CLOCK), AdapterStore(tmp / "a")
    samples.grant_consent("bench")
    for k, item in enumerate(pool):
        samples.add("bench", item.features, item.text, "correction", utterance_id=str(k), asr_transcript=item.heard,
                    created=FIXED_CLOCK - len(pool) + k)
    config = PersonalizeConfig(kind=kind, budget_s=args.budget_s, max_steps=args.max_steps,
                               min_samples=min(len(pool), 8), seed=args.seed, nice=0, threads=0)
    trainer = Personalizer(aligned, samples, adapters, tmp / "w", base_sha, config)
    with PeakRss() as rss:
        start_mb = rss.peak
        t0 = time.perf_counter()
        result = trainer.run("bench")
        wall = time.perf_counter() - t0
    adapter = adapters.load_latest("bench")
    projector = apply_adapter(base, adapter) if adapter else base
    aligned.projector = projector
    hyps = _aligned_texts(aligned, [c.features for c in test], [c.heard for c in test] if hybrid else None)
    aligned.projector = base
    return {"result": result, "hyps": hyps, "wall": wall, "rss": rss.peak, "added": rss.peak - start_mb,
            "adapter_mb": adapter.info.path.stat().st_size / 1e6 if adapter else 0.0}


def _features(items: list[Item], encoder, whisper) -> None:
    """Fill in each item's base features (full depth, unpadded: what asr_node publishes) and cascade transcript."""
    from tinyalign_ros.core.early_exit import FULL_DEPTH, encode_utterance

    for item in items:
        if item.features is None:
            item.features = encode_utterance(encoder, None, FULL_DEPTH, item.audio).features.float()
            item.heard = whisper.transcribe(item.audio).text


def _aligned_texts(aligned, features: list[torch.Tensor], heard: list[str] | None) -> list[str]:
    """The aligned assistant's greedy "repeat what was said" of each utterance (its projector as set)."""
    hyps: list[str] = []
    for s in range(0, len(features), 8):
        hyps += aligned.transcribe(features[s:s + 8], 40, heard[s:s + 8] if heard is not None else None)
    return hyps


def _llm(args, state: dict):
    if "aligned" not in state:
        from tinyalign_ros.core.adapters import file_sha256
        from tinyalign_ros.core.align import DEFAULT_MAX_CHANGE, AlignedLLM, AlignPrompt
        from tinyalign_ros.core.encoder import load_whisper_encoder
        from tinyalign_ros.core.llm import ChatLLM
        from tinyalign_ros.core.models import resolve_llm, shipped_model
        from tinyalign_ros.core.projector import load_projector, read_projector_metadata

        projector_file = args.projector or shipped_model("projector.safetensors")
        hybrid = read_projector_metadata(projector_file).get("prompt") == "hybrid"
        chat = ChatLLM(resolve_llm(args.llm), threads=args.threads)
        base = load_projector(projector_file, out_dim=chat.model.get_input_embeddings().embedding_dim)
        aligned = AlignedLLM.from_chat(chat, base, AlignPrompt(transcript=hybrid), max_change=DEFAULT_MAX_CHANGE)
        state["aligned"] = (aligned, base, file_sha256(projector_file), hybrid, load_whisper_encoder())
    return state["aligned"]


def extra_items(voice: str, count: int, avoid: set[str], seed: int) -> list[Item]:
    """`count` more utterances of a corpus voice (the same `Voice` of `default_voices`), on sentences
    it does not say in the corpus: the corpus has 75 per voice, too few for N = 100 and a test set."""
    from tinyalign_ros.core.corpus import default_voices, load_sentences, synthesize

    spec = {v.name: v for v in default_voices(seed)}.get(voice)
    if spec is None:
        raise SystemExit(f"--extra: {voice} is not one of the corpus' default voices (seed {seed})")
    texts = sorted({s.text for s in load_sentences()} - avoid)
    random.Random(f"extra-{voice}").shuffle(texts)
    print(f"{voice}: synthesizing {min(count, len(texts))} more utterances", flush=True)
    return [Item(synthesize(text, spec), text) for text in texts[:count]]


def _asr_round(args, method: str, pool: list[Item], test: list[Item], tmp: Path, asr_base, transcriber,
               llm_state: dict) -> dict:
    """One ASR-adapter round as personalizer_node runs it, judged by the Recognizer asr_node runs
    (e2e: and by the aligned assistant reading that Recognizer's features, with the adapter's projector)."""
    from tinyalign_ros.core.adapters import AdapterStore
    from tinyalign_ros.core.asr_adapt import E2E_KIND
    from tinyalign_ros.core.personalize import PersonalizeConfig, Personalizer, apply_adapter
    from tinyalign_ros.core.recognizer import Recognizer
    from tinyalign_ros.core.samples import SampleStore

    e2e = method == E2E_KIND
    aligned = base = encoder = None
    base_sha, hybrid = "", False
    if e2e:  # the samples carry what asr_node heard (the hybrid prompt's transcript)
        aligned, base, base_sha, hybrid, encoder = _llm(args, llm_state)
        _features(pool + test, encoder, transcriber)
    # a fixed clock: sample ids (hence the held-out split) are the same for every method and seed
    samples, adapters = SampleStore(tmp / "s", clock=lambda: FIXED_CLOCK), AdapterStore(tmp / "a")
    samples.grant_consent("bench")
    for k, item in enumerate(pool):
        samples.add("bench", torch.zeros(1, 1), item.text, "correction", utterance_id=str(k), audio=item.audio,
                    asr_transcript=item.heard, created=FIXED_CLOCK - len(pool) + k)
    layers, decoder = ASR_METHODS[method]
    config = PersonalizeConfig(kind=E2E_KIND if e2e else "asr", budget_s=args.budget_s, max_steps=args.max_steps,
                               min_samples=min(len(pool), 8), seed=args.seed, nice=0, threads=0,
                               asr_encoder_layers=args.encoder_layers if layers is None else layers, asr_decoder=decoder,
                               lr=args.lr, asr_epochs=args.epochs, e2e_llm_weight=args.llm_weight)
    trainer = Personalizer(aligned, samples, adapters, tmp / "w", base_sha, config, asr=asr_base)
    torch.manual_seed(args.seed)
    with PeakRss() as rss:
        start_mb = rss.peak
        t0 = time.perf_counter()
        result = trainer.run("bench")
        wall = time.perf_counter() - t0
    # e2e: with the encoder, so that the speaker's adapted features come out as asr_node publishes them
    recognizer = Recognizer(transcriber, encoder=encoder, base=asr_base)
    seconds: list[float] = []
    transcripts: list[str] = []  # of the last adapter judged: the kept one, else the candidate

    def heard(candidate) -> list[str]:
        """What the speaker gets with `candidate`: the transcript (asr), the aligned assistant's text (e2e)."""
        recognizer.set_adapter("bench", candidate)
        got, took = _timed(lambda audio: recognizer.recognize(audio, "bench"), test)
        seconds.extend(took)
        texts = [r.text for r in got]
        transcripts[:] = texts
        if not e2e:
            return texts
        aligned.projector = apply_adapter(base, candidate)
        try:
            return _aligned_texts(aligned, [r.encoded.features for r in got], texts if hybrid else None)
        finally:
            aligned.projector = base

    adapter = trainer.latest_asr_adapter("bench")
    # the gate kept the cascade: hyps None (its transcripts, decoded once per voice); the candidate is
    # judged on the test clips either way, so that the gate's decisions can be judged too
    hyps = heard(adapter) if adapter is not None else None
    candidate_hyps = hyps if hyps is not None else heard(result.candidate) if result.candidate is not None else None
    return {"result": result, "hyps": hyps, "candidate_hyps": candidate_hyps, "wall": wall, "rss": rss.peak,
            "transcripts": transcripts if transcripts and e2e else None,
            "recognize_s": float(np.median(seconds)) if seconds else None,
            "added": rss.peak - start_mb, "adapter_mb": adapter.info.path.stat().st_size / 1e6 if adapter else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tinyalign bench personalize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for personalize.json, .csv and .png")
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"), help="folder with manifest.csv")
    ap.add_argument("--methods", default="asr-enc,asr",
                    help="comma-separated: asr-enc (the default adapter), asr, asr-dec, e2e, lora, full")
    ap.add_argument("--n", default="10,25,50", help="comma-separated numbers of personalization utterances")
    ap.add_argument("--real-n", default="5", help="the same for the real recordings (only 10 clips ship)")
    ap.add_argument("--test", type=int, default=25, help="test utterances per voice (the last ones)")
    ap.add_argument("--voices", default="", help="comma-separated held-out corpus speaker ids (default: every "
                                                 "atypical one; a typical one checks that the gate protects it)")
    ap.add_argument("--extra", type=int, default=0, help="synthesize this many more utterances per corpus voice "
                                                         "(personalization pool only, never test): N = 100 needs 75")
    ap.add_argument("--corpus-seed", type=int, default=0, help="the corpus' voice seed (for --extra)")
    ap.add_argument("--no-real", action="store_true", help="skip the real recordings")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (the spread over seeds is the stability)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="training seconds per round")
    ap.add_argument("--max-steps", type=int, default=40, help="steps per round at most (as train.max_steps)")
    ap.add_argument("--encoder-layers", type=int, default=2, help="top encoder blocks with LoRA for `asr`")
    ap.add_argument("--epochs", type=float, default=6.0, help="asr methods: passes over the samples per round")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate (0 = the kind's default)")
    ap.add_argument("--llm-weight", type=float, default=1.0, help="e2e: weight of the LLM's loss beside the decoder's")
    ap.add_argument("--projector", type=Path, default=None, help="projector methods: base projector")
    ap.add_argument("--llm", default="", help="projector methods: transformers model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the split's seed")
    args = ap.parse_args(argv)

    from tinyalign_ros.core.align import read_manifest
    from tinyalign_ros.core.asr import WhisperTranscriber
    from tinyalign_ros.core.asr_adapt import AsrBase
    from tinyalign_ros.core.personalize import paired_improvement

    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = set(methods) - set(ASR_METHODS) - {"lora", "full"}
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    # greedy only: the cascade yardstick and the gate's baseline must repeat (the fallback samples)
    transcriber = WhisperTranscriber(threads=args.threads, temperature=0.0)
    asr_base = AsrBase(transcriber=transcriber)
    sets = voice_sets(args.corpus, [v for v in args.voices.split(",") if v], not args.no_real)
    atypical = ({r["speaker"]: r["atypical"] == "1" for r in read_manifest(args.corpus)} if args.corpus.is_dir()
                else {})
    ns = sorted(int(n) for n in args.n.split(","))
    real_ns = sorted(int(n) for n in args.real_n.split(","))
    runs, llm_state = [], {"whisper": transcriber}
    for voice, items in sets.items():
        items = list(items)
        random.Random(args.seed).shuffle(items)
        n_test = min(args.test, len(items) // 2)
        test, pool = items[-n_test:], items[:-n_test]
        real = voice in (REAL_VOICE, REAL_ATYPICAL)
        if args.extra and not real:  # after the corpus' own: N = 10, 25, 50 stay what they were
            pool += extra_items(voice, args.extra, {i.text for i in items}, args.corpus_seed)
        refs = [i.text for i in test]
        cascade_hyps, cascade_s = _timed(lambda audio: transcriber.transcribe(audio).text, test)
        cascade, cascade_errors = wer(refs, cascade_hyps), word_errors(refs, cascade_hyps)
        print(f"{voice}: {len(pool)} utterances to personalize on, {n_test} test; cascade WER {cascade:.3f}", flush=True)
        aligned_hyps = aligned_errors = None  # the aligned assistant without an adapter: the yardstick of the methods judged by it
        if set(methods) & ALIGNED_METHODS:
            aligned, base, _, hybrid, encoder = _llm(args, llm_state)
            _features(test, encoder, transcriber)
            aligned_hyps = _aligned_texts(aligned, [i.features for i in test], [i.heard for i in test] if hybrid else None)
            aligned_errors = word_errors(refs, aligned_hyps)
            print(f"{voice}: aligned assistant (base projector) WER {wer(refs, aligned_hyps):.3f}", flush=True)
        for n in real_ns if real else ns:
            if n > len(pool):
                continue
            for method in methods:
                for seed in [int(x) for x in args.seeds.split(",")]:
                    with tempfile.TemporaryDirectory() as tmp:
                        run_args = argparse.Namespace(**{**vars(args), "seed": seed})
                        if method in ASR_METHODS:
                            out = _asr_round(run_args, method, pool[:n], test, Path(tmp), asr_base, transcriber,
                                             llm_state)
                        else:
                            out = _projector_round(run_args, method, pool[:n], test, Path(tmp), llm_state)
                    result = out["result"]
                    # what the speaker gets without an adapter: the cascade's transcript, or the aligned assistant's text
                    now = aligned_hyps if method in ALIGNED_METHODS else cascade_hyps
                    now_errors = aligned_errors if method in ALIGNED_METHODS else cascade_errors
                    after = wer(refs, now if out["hyps"] is None else out["hyps"])
                    candidate = out.get("candidate_hyps")
                    candidate_errors = None if candidate is None else word_errors(refs, candidate)
                    runs.append({"voice": voice, "real": real, "atypical": atypical.get(voice, voice != REAL_VOICE),
                                 "method": method,
                                 "seed": seed, "n_train": n, "test_n": n_test, "wer_before": wer(refs, now),
                                 "wer_after": after, "cascade_wer": cascade, "ratio": after / cascade if cascade else None,
                                 "gate": result.status, "val_wer_before": result.val_wer_before,
                                 "val_wer_after": result.val_wer_after, "p_better": result.p_better,
                                 "n_val": result.n_val, "val_words": result.val_words,
                                 "wer_candidate": None if candidate is None else wer(refs, candidate),
                                 # is the candidate's difference on the test clips more than luck? (the gate's
                                 # paired bootstrap, on the test clips against the cascade)
                                 "p_better_test": None if candidate is None else paired_improvement(
                                     now_errors, candidate_errors),
                                 "p_worse_test": None if candidate is None else paired_improvement(
                                     candidate_errors, now_errors),
                                 # aligned methods: the aligned assistant's WER without an adapter (wer_before), and
                                 # (e2e) the WER of the transcripts the judged adapter gave (cascade mode, the anchor)
                                 "aligned_base_wer": None if aligned_hyps is None else wer(refs, aligned_hyps),
                                 "wer_transcript": None if out.get("transcripts") is None
                                 else wer(refs, out["transcripts"]),
                                 "steps": result.steps,
                                 "train_s": round(result.train_s, 1), "wall_s": round(out["wall"], 1),
                                 "peak_mem_mb": round(out["rss"]), "round_added_mb": round(out["added"]),
                                 "adapter_mb": round(out["adapter_mb"], 2),
                                 "recognize_s_base": round(float(np.median(cascade_s)), 3),
                                 "recognize_s_adapter": None if out.get("recognize_s") is None
                                 else round(out["recognize_s"], 3)})
                    print(f"  N={n} {method} seed {seed}: {result.status} after {result.steps} steps "
                          f"({result.train_s:.0f} s train, {out['wall']:.0f} s round); test WER {cascade:.3f} -> "
                          f"{after:.3f} (candidate {_num(runs[-1]['wer_candidate'])}, validation "
                          f"{_num(result.val_wer_before)} -> {_num(result.val_wer_after)}, P(better) "
                          f"{_num(result.p_better)}); peak RSS {out['rss']:.0f} MB", flush=True)
    figures = {"methods": methods, "budget_s": args.budget_s, "max_steps": args.max_steps, "epochs": args.epochs,
               "encoder_layers": args.encoder_layers, "threads": args.threads, "atypical_sox": " ".join(ATYPICAL_SOX),
               "voices": runs}
    out_path = write_result(args.out, "personalize", figures)
    _plot(runs, args.out / "personalize.png")
    with (args.out / "personalize.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(runs[0]) if runs else ["voice"])
        w.writeheader()
        w.writerows(runs)
    print(f"wrote {out_path}")
    return 0


def _timed(transcribe, items: list[Item]) -> tuple[list[str], list[float]]:
    """`transcribe(audio)` of each item, and the seconds each took."""
    texts, seconds = [], []
    for item in items:
        t0 = time.perf_counter()
        texts.append(transcribe(item.audio))
        seconds.append(time.perf_counter() - t0)
    return texts, seconds


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voices = sorted({r["voice"] for r in runs})
    # one colour per method in every panel
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["method"] for r in runs}))}
    fig, axes = plt.subplots(2, max(1, len(voices)), figsize=(4 * max(1, len(voices)), 6.5), squeeze=False)
    for col, voice in enumerate(voices):
        mine = [r for r in runs if r["voice"] == voice]
        top, bottom = axes[0][col], axes[1][col]
        ns = sorted({r["n_train"] for r in mine})
        top.plot(ns, [mine[0]["cascade_wer"]] * len(ns), ":", color="grey", label="cascade (no adapter)")
        for method in sorted({r["method"] for r in mine}):
            rows = [r for r in mine if r["method"] == method]
            pts = sorted((n, float(np.mean([r["wer_after"] for r in rows if r["n_train"] == n]))) for n in ns
                         if any(r["n_train"] == n for r in rows))
            top.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[method], label=method)
            bottom.scatter([r["train_s"] for r in rows], [r["wer_after"] for r in rows], color=colors[method],
                           label=method, s=14)
        bottom.axhline(mine[0]["cascade_wer"], ls=":", color="grey")
        top.set_title(voice, fontsize=8)
        top.set_xlabel("personalization utterances N")
        top.set_ylabel("test WER (mean over seeds)")
        bottom.set_xlabel("training seconds")
        bottom.set_ylabel("test WER")
        top.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
