"""`tinyalign bench whisper --out DIR`: Whisper's encoder window, full (30 s) against speech.

asr_node transcribes each utterance with faster-whisper tiny.en (core/asr.py). Whisper's encoder
reads a 30 s window whatever the length of the speech; the speech window (`whisper.window:
speech`, core/asr.py's docstring) encodes the utterance and `--margin` seconds of silence instead,
and does a decode that fails a check again on the full window. This measures, per window, on

- real recordings: every pocketsphinx-testdata clip with a transcript (`real-pocketsphinx`), and
  the same clips made atypical with sox (`real-atypical`, bench personalize's chain);
- the commands bench's typical synthetic voices saying every request and chatter line of a split
  of the skill data (`--split`, `--voices`), with the bench's 0.2 s of silence around each,

the WER (core/metrics.wer: lower case, numbers spelled out, no punctuation), the
wall time per utterance (p50, p95; the transcription only, one utterance at a time, `--threads`),
and for the speech window the share of utterances done again on the full window. Greedy
(`temperature` 0.0) in both, so the figures repeat; the robot keeps faster-whisper's temperature
fallback on the full window.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from tinyalign_ros.core.asr import SPEECH_MARGIN_S, WINDOWS, WhisperTranscriber
from tinyalign_ros.core.audio import SAMPLE_RATE
from tinyalign_ros.core.metrics import wer, write_result

EDGE_S = 0.2  # silence before and after each synthetic request, as the VAD's speech pad leaves it


def clip_sets(split: str, n_voices: int, real: bool, limit: int | None = None) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{set name: [(reference text, 16 kHz samples)]}; the first `limit` lines of the split."""
    from tinyalign_ros.core.skill_data import load_items, spoken_clip, typical_voices

    sets: dict[str, list[tuple[str, np.ndarray]]] = {}
    if real:
        from tinyalign_ros.bench.personalize import REAL_ATYPICAL, REAL_VOICE, make_atypical
        from tinyalign_ros.core.align import real_speech_clips
        from tinyalign_ros.core.audio import load_audio

        clips = real_speech_clips()
        sets[REAL_VOICE] = [(text, load_audio(path)) for path, text in clips]
        sets[REAL_ATYPICAL] = [(text, make_atypical(path)) for path, text in clips]
    edge = np.zeros(round(EDGE_S * SAMPLE_RATE), dtype=np.float32)
    items = (load_items(split, 10_000) if n_voices else [])[:limit]
    for voice in typical_voices(n_voices) if n_voices else []:
        sets[voice.name] = [(it.text, np.concatenate([edge, spoken_clip(it.text, voice), edge])) for it in items]
    return sets


def measure(transcriber: WhisperTranscriber, clips: list[tuple[str, np.ndarray]]) -> dict:
    """WER, time per utterance and fallbacks of one window on one set."""
    transcriber.speech_windows = transcriber.window_fallbacks = 0
    hyps, seconds = [], []
    for _, samples in clips:
        t = time.perf_counter()
        hyps.append(transcriber.transcribe(samples).text)
        seconds.append(time.perf_counter() - t)
    out = {"wer": round(wer([text for text, _ in clips], hyps), 4),
           "seconds_p50": round(float(np.median(seconds)), 3),
           "seconds_p95": round(float(np.percentile(seconds, 95)), 3)}
    if transcriber.window == "speech":
        out["redone_on_full_window"] = round(transcriber.window_fallbacks / max(len(clips), 1), 3)
    return out, hyps


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench whisper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/whisper.json and OUT/whisper.png")
    parser.add_argument("--split", default="dev14", help="skill-data split the synthetic voices say")
    parser.add_argument("--voices", type=int, default=4, help="typical synthetic voices (0: real recordings only)")
    parser.add_argument("--no-real", action="store_true", help="no real recordings")
    parser.add_argument("--margin", type=float, default=SPEECH_MARGIN_S, help="silence after the speech (s)")
    parser.add_argument("--limit", type=int, help="only the first N lines of the split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    sets = clip_sets(args.split, args.voices, not args.no_real, args.limit)
    if not sets:
        parser.error("nothing to measure: --voices 0 with --no-real")
    figures: dict = {"split": args.split, "margin_s": args.margin, "threads": args.threads,
                     "sets": {name: {"n": len(clips)} for name, clips in sets.items()}, "windows": {}}
    hyps: dict[tuple[str, str], list[str]] = {}  # (set, window) -> transcripts
    for window in WINDOWS:
        transcriber = WhisperTranscriber(threads=args.threads, temperature=0.0, window=window, margin_s=args.margin)
        transcriber.transcribe(next(iter(sets.values()))[0][1])  # warm-up
        for name, clips in sets.items():
            figures["sets"][name][window], hyps[name, window] = measure(transcriber, clips)
            print(window, name, figures["sets"][name][window], flush=True)
    for name, entry in figures["sets"].items():
        entry["transcripts_differ"] = sum(a != b for a, b in zip(hyps[name, "full"], hyps[name, "speech"]))
    for window in WINDOWS:
        every = [entry[window] for entry in figures["sets"].values()]
        figures["windows"][window] = {"wer_mean": round(float(np.mean([e["wer"] for e in every])), 4),
                                      "seconds_p50_mean": round(float(np.mean([e["seconds_p50"] for e in every])), 3)}
    path = write_result(args.out, "whisper", figures)
    plot(figures, args.out / "whisper.png")
    print(f"wrote {path}")
    return 0


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures["sets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in [(axes[0], "wer", "WER"), (axes[1], "seconds_p50", "seconds per utterance (p50)")]:
        for i, window in enumerate(WINDOWS):
            values = [figures["sets"][n][window][key] for n in names]
            bars = ax.bar(np.arange(len(names)) + (i - 0.5) * 0.4, values, 0.4, label=f"{window} window")
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set_xticks(range(len(names)), [n[:22] for n in names], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title(f"Whisper tiny.en WER by encoder window (speech: +{figures['margin_s']:g} s of silence)",
                      fontsize=10)
    axes[1].set_title(f"transcription time, {figures['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
