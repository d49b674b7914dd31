"""`tinyalign train align`: train the Tiny-Align projector (encoder and LLM frozen).

    tinyalign train align --corpus build/corpus --out models/projector.safetensors --minutes 25

Encoder features of the corpus are cached once under --cache (default: CORPUS/features), so a
second run or a resumed one starts training at once. The projector with the best validation
WER is written to --out; OUT.ckpt.{safetensors,json} make a killed run resumable (--no-resume
starts over) and OUT.log.jsonl has the training curve. At the end, WER on the test split and on
the real recordings of pocketsphinx-testdata is measured and written to OUT.metrics.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch


def parse_args(argv: list[str] | None):
    from tinyalign_ros.core.align import TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="tinyalign train align", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="folder with manifest.csv (tinyalign synth)")
    ap.add_argument("--out", type=Path, default=Path("models/projector.safetensors"))
    ap.add_argument("--cache", type=Path, default=None, help="feature cache folder (default CORPUS/features)")
    ap.add_argument("--llm", default="", help="transformers LLM folder ('' = SmolLM2-135M-Instruct)")
    ap.add_argument("--encoder-layer", type=int, default=0, help="encoder layer to align (0 = last)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--no-inject", action="store_true", help="no instruction before the audio tokens")
    ap.add_argument("--hybrid", action="store_true",
                    help="hybrid prompt: the cascade ASR's transcript follows the audio tokens (reads "
                         "CORPUS/asr.csv; clips without a transcript there are left out)")
    ap.add_argument("--max-change", type=float, default=None,
                    help="hybrid: anchor the output to the ASR transcript (core.align.anchor_to_transcript; "
                         "default DEFAULT_MAX_CHANGE, -1 = report only the raw output)")
    ap.add_argument("--transcribe", action="store_true",
                    help="with --hybrid: first transcribe the clips missing from CORPUS/asr.csv (~0.6 s/clip)")
    ap.add_argument("--no-test", action="store_true", help="skip the final test-split and real-speech WER")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: measure OUT on the test split and real speech, next to the cascade")
    ap.add_argument("--no-card", action="store_true", help="do not write the OUT.md model card")
    ap.add_argument("--max-test", type=int, default=0, help="evaluate on a seeded subset of N test clips (0 = all)")
    ap.add_argument("--cascade", action="store_true",
                    help="also measure the cascade (faster-whisper tiny.en transcripts) on the same clips")
    for f in fields(d):
        if f.name in ("inject", "hybrid"):
            continue
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)), default=getattr(d, f.name))
    return ap.parse_args(argv)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def model_card(m: dict, corpus: Path) -> str:
    """The projector's model card (markdown) from the metrics summary."""
    cfg = m.get("config", {})
    real = m.get("real", {})
    anchor = m.get("anchor") or {}
    val = m.get("val", [])
    lines = [
        "# Base projector (Tiny-Align)",
        "",
        "Maps Whisper tiny.en encoder frames (layer {layer}, after the final LayerNorm, unpadded input as asr_node "
        "computes them) to SmolLM2-135M-Instruct input embeddings; encoder and LLM frozen.".format(layer=4),
        "",
        f"- Projector: {cfg.get('kind')} (stack {cfg.get('stack')} frames -> 1 token, hidden {cfg.get('hidden')}), "
        f"{m.get('trainable_params', 0) / 1e6:.2f}M parameters, stored float16.",
        f"- Data: `{corpus}` (tinyalign synth), {m.get('n_train')} training clips; validation/test speakers and "
        "sentences are never seen in training.",
        f"- Training: {m.get('steps')} steps, batch {cfg.get('batch')}, AdamW lr {cfg.get('lr')}, "
        f"{m.get('train_s', 0) / 60:.1f} min on this CPU (2 threads), median step {m.get('median_step_s', 0):.2f} s, "
        f"peak RSS {m.get('peak_rss_mb', 0):.0f} MB; best validation at step {m.get('best_step')}.",
        f"- Prompt: instruction injection {'on' if cfg.get('inject', True) else 'off'} "
        "(\"Speech:\" before the audio tokens, \"Repeat exactly what was said.\" after)"
        + ("; **hybrid**: the cascade's transcript (faster-whisper tiny.en) follows the audio tokens as "
           "\"Transcript: ...\", so the LLM reads the audio anchored on Whisper's text." if cfg.get("hybrid")
           else "; audio only (the LLM never sees the ASR's text)."),
        "",
        "| measure | aligned (this projector) | cascade (faster-whisper tiny.en) |",
        "|---|---|---|",
        f"| WER, synthetic validation ({cfg.get('val_n')} clips) | {_pct(m.get('best_val_wer'))} | |",
        f"| WER, synthetic test ({m.get('n_test')} clips, unseen voices and sentences) | {_pct(m.get('test_wer'))} "
        f"| {_pct(m.get('cascade_test_wer'))} |",
        f"| WER, test without instruction injection | "
        f"{_pct((m.get('instruction_injection') or {}).get('test_wer_without'))} | |",
        f"| command intent, test ({(m.get('intent') or {}).get('n_commands')} commands; scorer's ceiling on the "
        f"reference text {_pct((m.get('intent') or {}).get('reference_accuracy'))}) "
        f"| {_pct((m.get('intent') or {}).get('aligned_accuracy'))} | {_pct((m.get('intent') or {}).get('cascade_accuracy'))} |",
        f"| WER, **real speech** (pocketsphinx-testdata, {real.get('n_clips')} clips, {real.get('n_words')} words) "
        f"| {_pct(real.get('aligned_wer'))} | {_pct(real.get('cascade_wer'))} |",
        *([f"| unanchored hybrid output (no `max_change`): test / real speech | "
           f"{_pct(anchor.get('test_wer_unanchored'))} / {_pct(anchor.get('real_wer_unanchored'))} | |"] if anchor else []),
        "",
        *([f"The aligned figures are the default path: the hybrid output **anchored** to the ASR transcript "
           f"(`aligned.max_change` {anchor.get('max_change')}: kept where it changes at most that share of the "
           f"transcript's words, else the transcript stands; kept on {100 * anchor.get('test_kept_share', 0):.0f}% "
           "of the test clips; `core.align.anchor_to_transcript`).", ""] if anchor else []),
        "Validation WER during training: " + ", ".join(f"step {v['step']}: {_pct(v['val_wer'])}" for v in val),
        "",
        ("**Limits.** Trained on synthesized speech of a few hundred sentences only: on real human speech the "
         "aligned path is far behind the cascade (see the table), which is why `cascade` stays the default "
         "mode of assistant_node." if (real.get("aligned_wer") or 9) > 1.5 * (real.get("cascade_wer") or 0)
         else "**Limits.** Trained on synthesized speech of a few hundred sentences only; real speech measured "
              "on a handful of clips.") + " Real-speech examples (reference -> aligned output"
        + (" <- cascade transcript it was given):" if cfg.get("hybrid") else "):"),
        "",
        *[f"- \"{r}\" -> \"{_short(h)}\"" + (f" <- \"{_short(c[1])}\"" if cfg.get("hybrid") else "")
          for (r, h), c in zip(real.get("examples", [])[:5], real.get("cascade_examples") or [[None, ""]] * 5)],
        "",
        "Reproduce (CPU, ~{:.0f} min; features are cached in CORPUS/features):".format(m.get("train_s", 0) / 60 + 10),
        "",
        "```",
        f"{m.get('command', 'tinyalign train align --corpus build/corpus')}",
        f"tinyalign train align --corpus {corpus} --out models/projector.safetensors --eval-only --cascade "
        f"{'--hybrid ' if cfg.get('hybrid') else ''}"
        f"--max-test {m.get('n_test')}",
        "```",
        "",
    ]
    return "\n".join(lines)


def prompt_metadata(prompt) -> dict[str, str]:
    """How the projector was trained to be read, stored in its metadata for assistant_node."""
    return {"prompt": "hybrid" if prompt.transcript else "audio", "inject": str(prompt.inject).lower()}


def evaluate_all(aligned, test, encoder, layer: int, prompt, args, seed: int) -> dict:
    """Test-split and real-speech WER of `aligned`, next to the cascade, with and without injection.

    The cascade's WER is the WER of faster-whisper's transcripts (its text is what the cascade's
    LLM is given). The hybrid prompt needs those transcripts as input, so they are always computed
    then; otherwise only with --cascade.
    """
    import random
    from dataclasses import replace

    from tinyalign_ros.core.align import encode_file, evaluate, read_manifest, real_speech_clips
    from tinyalign_ros.core.intent import IntentMatcher
    from tinyalign_ros.core.metrics import wer

    from tinyalign_ros.core.align import DEFAULT_MAX_CHANGE, anchor_to_transcript

    max_change = DEFAULT_MAX_CHANGE if args.max_change is None else args.max_change
    anchored = prompt.transcript and max_change >= 0

    def anchor(hyps: list[str], heard: list[str]) -> list[str]:
        """The default aligned path: hybrid outputs anchored to the transcripts (raw ones kept apart)."""
        return [anchor_to_transcript(h, c, max_change)[0] for h, c in zip(hyps, heard)] if anchored else hyps

    out: dict = {}
    if args.max_test and args.max_test < len(test):
        test = test.subset(sorted(random.Random(seed).sample(range(len(test)), args.max_test)))
    out["n_test"] = len(test)
    t0 = time.perf_counter()
    aligned.max_change = None  # raw outputs; anchored below from the same generations
    raw_wer, raw = evaluate(aligned, test)
    pairs = list(zip(test.texts, anchor([h for _, h in raw], test.transcripts))) if anchored else raw
    if anchored:
        out["anchor"] = {"max_change": max_change, "test_wer_unanchored": raw_wer,
                         "test_kept_share": sum(a == h for (_, a), (_, h) in zip(pairs, raw)) / max(len(raw), 1)}
    out["test_wer"] = wer(test.texts, [h for _, h in pairs])
    out["test_examples"] = pairs[:10]
    intents = [r.get("intent", "") for r in test.rows]
    matcher = IntentMatcher((r["text"], r["intent"]) for r in read_manifest(args.corpus) if r["split"] == "train")
    out["intent"] = {"n_commands": sum(bool(i) for i in intents),
                     "reference_accuracy": matcher.accuracy(test.texts, intents),
                     "aligned_accuracy": matcher.accuracy([h for _, h in pairs], intents),
                     "aligned_agreement": matcher.agreement([h for _, h in pairs], test.texts, intents)}
    out["test_eval_s"] = time.perf_counter() - t0
    aligned.set_prompt(replace(prompt, inject=not prompt.inject))
    other = [h for _, h in evaluate(aligned, test)[1]]
    out["instruction_injection"] = {"trained_with": prompt.inject, f"test_wer_{'without' if prompt.inject else 'with'}":
                                    wer(test.texts, anchor(other, test.transcripts) if anchored else other)}
    aligned.set_prompt(prompt)
    clips = real_speech_clips()
    refs = [t for _, t in clips]
    feats = [encode_file(encoder, p, layer) for p, _ in clips]
    casc: list[str] | None = None
    if args.cascade or prompt.transcript:
        from tinyalign_ros.core.asr import WhisperTranscriber
        from tinyalign_ros.core.audio import load_audio

        whisper = WhisperTranscriber(threads=args.threads)
        casc = [whisper.transcribe(load_audio(p)).text for p, _ in clips]
        if test.transcripts is None:
            test.transcripts = [whisper.transcribe(load_audio(args.corpus / r["path"])).text for r in test.rows]
        out["cascade_test_wer"] = wer(test.texts, test.transcripts)
        out["intent"]["cascade_accuracy"] = matcher.accuracy(test.transcripts, intents)
        out["intent"]["cascade_agreement"] = matcher.agreement(test.transcripts, test.texts, intents)
    hyps = aligned.transcribe(feats, 60, casc if prompt.transcript else None)
    if anchored:
        out["anchor"]["real_wer_unanchored"] = wer(refs, hyps)
        hyps = anchor(hyps, casc)
    out["real"] = {"aligned_wer": wer(refs, hyps), "n_clips": len(clips), "n_words": sum(len(t.split()) for t in refs),
                   "examples": [[t, h] for t, h in zip(refs, hyps)]}
    if casc is not None:
        out["real"]["cascade_wer"] = wer(refs, casc)
        out["real"]["cascade_examples"] = [[t, h] for t, h in zip(refs, casc)]
    return out


def main(argv: list[str] | None = None) -> int:
    from tinyalign_ros.core.align import (AlignedLLM, AlignPrompt, TrainConfig, load_corpus_features,
                                          read_asr_transcripts, read_manifest, train_projector, transcribe_rows)
    from tinyalign_ros.core.encoder import load_whisper_encoder
    from tinyalign_ros.core.llm import ChatLLM
    from tinyalign_ros.core.models import resolve_llm
    from tinyalign_ros.core.projector import build_projector

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in ("inject", "hybrid")},
                      inject=not args.no_inject, hybrid=args.hybrid)
    encoder = load_whisper_encoder()
    layer = args.encoder_layer or encoder.n_layers
    cache = args.cache or args.corpus / "features"
    t0 = time.perf_counter()
    data = load_corpus_features(args.corpus, cache, encoder, layer)
    if cfg.hybrid:
        asr_file = args.corpus / "asr.csv"
        asr = (transcribe_rows(args.corpus, read_manifest(args.corpus), asr_file, args.threads) if args.transcribe
               else read_asr_transcripts(asr_file))
        for split, fs in data.items():
            data[split] = fs.with_transcripts(asr)
            if len(data[split]) < len(fs):
                logging.warning("%s: %d of %d clips have no ASR transcript in %s: left out", split,
                                len(fs) - len(data[split]), len(fs), asr_file)
    cache_s = time.perf_counter() - t0
    logging.info("features: %s (%.0f s)", {k: len(v) for k, v in data.items()}, cache_s)
    llm_dir = resolve_llm(args.llm)
    chat = ChatLLM(llm_dir, threads=args.threads)
    hidden = chat.model.get_input_embeddings().embedding_dim
    torch.manual_seed(cfg.seed)
    projector = build_projector(cfg.kind, in_dim=encoder.d_model, out_dim=hidden, stack=cfg.stack,
                                pooling=cfg.pooling, hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                encoder_layer=layer, llm=llm_dir.name)
    prompt = AlignPrompt(inject=cfg.inject, transcript=cfg.hybrid)
    aligned = AlignedLLM.from_chat(chat, projector, prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from tinyalign_ros.core.metrics import portable_command, portable_path

    command = "tinyalign train align " + portable_command(argv if argv is not None else sys.argv[1:])
    metrics = args.out.with_name(args.out.name.replace(".safetensors", "") + ".metrics.json")
    if args.eval_only:
        from tinyalign_ros.core.projector import read_projector_metadata

        trained = read_projector_metadata(args.out).get("prompt", "audio")
        if trained != prompt_metadata(prompt)["prompt"]:
            sys.exit(f"{args.out} was trained with the {trained} prompt: evaluate it "
                     f"{'with' if trained == 'hybrid' else 'without'} --hybrid")
        summary = json.loads(metrics.read_text()) if metrics.is_file() else {}
    else:
        state = train_projector(aligned, data, cfg, args.out, resume=not args.no_resume,
                                extra_meta={"command": command, "trainable_params": projector.n_params(),
                                            **prompt_metadata(prompt)})
        summary = {"command": command, "config": asdict(cfg), "steps": state["step"],
                   "train_s": state["elapsed_s"], "best_step": state.get("best_step"),
                   "best_val_wer": state["best_val_wer"], "trainable_params": projector.n_params(),
                   "feature_cache_s": cache_s, "n_train": len(data["train"]), "val": state["val"],
                   "curve": state["curve"][::5]}
        steps_s = sorted(c["step_s"] for c in state["curve"][1:]) or [0.0]
        summary["median_step_s"] = steps_s[len(steps_s) // 2]
        import resource

        summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not args.no_test:
        from tinyalign_ros.core.projector import load_projector

        aligned.projector = load_projector(args.out, in_dim=encoder.d_model, out_dim=hidden, encoder_layer=layer)
        summary.update(evaluate_all(aligned, data["test"], encoder, layer, prompt, args, cfg.seed))
        logging.info("test WER %.3f, real-speech WER %.3f (cascade %s)", summary["test_wer"],
                     summary["real"]["aligned_wer"], summary["real"].get("cascade_wer"))
    metrics.write_text(json.dumps(summary, indent=1))
    if "test_wer" in summary and not args.no_card:
        card = args.out.with_name(args.out.name.replace(".safetensors", "") + ".md")
        card.write_text(model_card(summary, Path(portable_path(args.corpus))), encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("steps", "train_s", "best_val_wer") if k in summary}
                     | {"test_wer": summary.get("test_wer"), "real": (summary.get("real") or {}).get("aligned_wer")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
