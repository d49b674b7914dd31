"""`tinyalign bench latency`: end of speech → first/last answer token and → first sample of the
spoken answer, through the whole graph.

The demo file (or --input) loops at real time through the embedded graph, exactly as
`tinyalign run` would hear a microphone; token latencies are the ones each Response carries,
the spoken one is what tts_node publishes per answer on `metrics/end_of_speech_to_audio_s`
(the Response's end of speech → the moment the answer's first audio block went to the sound
card / `speech_audio`). tts_node measures it because only it knows which block starts which
answer: matching `speech_audio` stamps to answers from outside fails as soon as a slow answer
is still being spoken when the next one starts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tinyalign_ros.core.metrics import write_result

from ._graph import demo_input, p50_p95, peak_rss_mb, run_graph


def encoder_rtf(samples: list[np.ndarray]) -> float:
    """Real-time factor of our PyTorch encoder (full depth, unpadded) on the given utterances."""
    import torch

    from tinyalign_ros.core.encoder import load_whisper_encoder, log_mel

    encoder = load_whisper_encoder()
    seconds = compute = 0.0
    with torch.inference_mode():
        for x in samples:
            mel = log_mel(x, pad_to_30s=False).unsqueeze(0)
            t = time.perf_counter()
            encoder(mel)
            compute += time.perf_counter() - t
            seconds += x.size / 16000
    return compute / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench latency", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for latency.json and latency.png")
    parser.add_argument("--input", help="speech file to loop (default: the synthesized demo file)")
    parser.add_argument("--utterances", type=int, default=12, help="answered utterances to measure")
    parser.add_argument("--device", default="cpu", help="accepted for symmetry; the graph runs on CPU")
    args = parser.parse_args(argv)

    path, segments = demo_input(args.input, args.out / "work")
    run = run_graph(path, stop_after_responses=args.utterances)
    responses = [r for _, r in run.responses if r.text]
    first = [r.latency_first_token_s for r in responses]
    last = [r.latency_last_token_s for r in responses]
    audio_first = run.spoken_s
    from tinyalign_ros.core.audio import load_audio

    audio = load_audio(path)
    clips = [audio[int(s["start_s"] * 16000):int(s["end_s"] * 16000)] for s in segments] or [audio]
    figures = {
        "end_of_speech_to_first_token_s": p50_p95(first),
        "to_last_token_s": p50_p95(last),
        "end_of_speech_to_first_audio_s": p50_p95(audio_first),
        "rtf_encoder": round(encoder_rtf(clips), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n_utterances": len(responses),
        "mode": responses[0].mode if responses else None,
    }
    json_path = write_result(args.out, "latency", figures)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = [(v, label) for v, label in ((first, "first token"), (last, "last token"),
                                          (audio_first, "first spoken sample")) if v]
    ax.hist([v for v, _ in series], bins=12, label=[label for _, label in series])
    ax.set_xlabel("seconds after end of speech")
    ax.set_ylabel("utterances")
    ax.set_title(f"tinyalign_ros latency ({figures['mode']} mode, {len(responses)} utterances)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "latency.png", dpi=120)
    print(json_path)
    return 0
