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
import json
import time
from pathlib import Path

import numpy as np

from tinyalign_ros.core.metrics import write_result
from tinyalign_ros.core.skill_data import DATA, data_lines

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


def speech_end_offsets(run, segments: list[dict]) -> dict[str, float]:
    """Per utterance: how far its end (Utterance.end, the VAD segment's end with its end pad) lies after
    the true end of speech in the demo file (the synthesized sentence's last loud sample)."""
    if not segments or run.loop_s <= 0:
        return {}
    ends = sorted(s["end_s"] for s in segments)
    offsets = {}
    for uid, end in run.stream_end_s.items():
        t = end % run.loop_s
        before = [e for e in ends if e <= t + 1e-3]
        if before and t - before[-1] < 1.0:
            offsets[uid] = max(t - before[-1], 0.0)
    return offsets


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`NODE.PARAM=VALUE` (VALUE read as YAML) -> {node: {param: value}}."""
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or not param:
            raise SystemExit(f"--set wants NODE.PARAM=VALUE, got {item!r}")
        out.setdefault(node, {})[param] = yaml.safe_load(value)
    return out


def breakdown(run, responses, warm_ids: set[str]) -> dict[str, dict]:
    """{stage: {p50, p95}} over the measured utterances, stages in pipeline order (core/latency.py)."""
    from tinyalign_ros.core.latency import STAGES, merge_stages

    merged = merge_stages(run.stages)
    ids = [r.utterance_id for r in responses if r.utterance_id not in warm_ids]
    out = {}
    for stage in STAGES:
        values = [merged[i][stage] for i in ids if stage in merged.get(i, {})]
        if values:
            out[stage] = {**p50_p95(values), "n": len(values)}
    return out


def throughput_sentences(n: int) -> list[str]:
    """`n` sentences alternating a spoken request (data/skill_requests_dev.tsv) and a question
    (data/questions.txt): what a multi-minute recording of someone talking to the robot holds."""
    requests = [line.split("\t")[0] for line in data_lines(DATA / "skill_requests_dev.tsv")][1:]
    questions = data_lines(DATA / "questions.txt")
    mixed = [s for pair in zip(requests, questions) for s in pair]
    return mixed[:n]


def throughput(n_sentences: int, work_dir: Path, overrides: dict[str, dict], timeout_s: float = 3600.0) -> dict:
    """`tinyalign run --fast` on a multi-minute file of `n_sentences` (piper voice, 1.2 s gaps): the
    file source waits for the graph (lossless), so this is the graph's own speed: audio seconds per
    wall second from the moment the models are loaded to the last answer spoken (synthesized, not
    played), and whether every sentence got its Response with nothing dropped."""
    import os

    from tinyalign_ros.core.corpus import make_demo_wav
    from tinyalign_ros.nodes.graph import EmbeddedGraph

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ["ROS_DOMAIN_ID"] = os.environ.get("TINYALIGN_BENCH_DOMAIN_ID", str(1 + os.getpid() % 100))
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / f"throughput-{n_sentences}.wav"
    segments = make_demo_wav(path, throughput_sentences(n_sentences))
    ov = {node: dict(params) for node, params in overrides.items()}
    ov.setdefault("mic_node", {}).update({"input_file": str(path), "loop": False, "playback_rate": 0.0})
    ov.setdefault("asr_node", {})["echo_gate"] = False
    ov.setdefault("tts_node", {}).update({"play": False, "realtime": False})  # as `tinyalign run --fast`
    responses: list = []
    with EmbeddedGraph(overrides=ov, on_response=responses.append) as graph:
        t0 = time.monotonic()
        done = graph.wait_file_done(timeout_s)
        wall = time.monotonic() - t0
        mic, asr, assistant = (graph.nodes[n] for n in ("mic_node", "asr_node", "assistant_node"))
        audio_s = sum(c.size for c in getattr(mic, "_chunks", [])) / 16000
        record = {
            "audio_s": round(audio_s, 1), "wall_s": round(wall, 1),
            "audio_s_per_wall_s": round(audio_s / wall, 3) if wall > 0 else None,
            "sentences": len(segments), "utterances": asr.published, "answered": len(responses),
            "dropped": asr.dropped_utterances + (assistant.handled - assistant.answered),
            "finished": done,
        }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench latency", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for latency.json and latency.png")
    parser.add_argument("--input", help="speech file to loop (default: the synthesized demo file)")
    parser.add_argument("--utterances", type=int, default=12, help="answered utterances to measure")
    parser.add_argument("--warmup", type=int, default=1, help="first answered utterances left out of the figures")
    parser.add_argument("--gap", type=float, default=8.0,
                        help="demo file: seconds of silence after each sentence, long enough for the robot to finish "
                             "its answer (the echo gate drops what is said while it speaks)")
    parser.add_argument("--mode", choices=("cascade", "aligned"), help="assistant_node mode (default: the YAML's)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                        help="override a parameter of config/assistant.yaml, e.g. asr_node.vad.min_silence_ms=300")
    parser.add_argument("--device", default="cpu", help="accepted for symmetry; the graph runs on CPU")
    parser.add_argument("--throughput-sentences", type=int, default=60,
                        help="then play a file of this many sentences with --fast (lossless) for the throughput "
                             "record `fast` (0: skip)")
    args = parser.parse_args(argv)

    import os

    overrides = parse_overrides(args.set)
    if args.mode:
        overrides.setdefault("assistant_node", {})["mode"] = args.mode
    # a file has no acoustic echo: with the gate on, a sentence that starts while the robot still speaks a
    # long answer would be cut or lost (`tinyalign run --input` turns it off too)
    overrides.setdefault("asr_node", {}).setdefault("echo_gate", False)
    path, segments = demo_input(args.input, args.out / "work", None if args.input else args.gap)
    load_before = os.getloadavg()
    run = run_graph(path, stop_after_responses=args.utterances + args.warmup, overrides=overrides)
    load_after = os.getloadavg()
    fast = None
    if args.throughput_sentences:
        try:  # the latency figures above are written whatever happens to this second run
            fast = throughput(args.throughput_sentences, args.out / "work", overrides)
        except Exception as exc:  # noqa: BLE001 - recorded in the result, not hidden
            fast = {"error": repr(exc)[:300]}
    answered = [r for _, r in run.responses if r.text]
    warm_ids = {r.utterance_id for r in answered[:args.warmup]}
    responses = answered[args.warmup:]
    first = [r.latency_first_token_s for r in responses]
    last = [r.latency_last_token_s for r in responses]
    audio_first = run.spoken_s[args.warmup:]  # tts_node reports answers in order
    offsets = speech_end_offsets(run, segments)
    true_first = [r.latency_first_token_s + offsets[r.utterance_id] for r in responses if r.utterance_id in offsets]
    from tinyalign_ros.core.audio import load_audio

    audio = load_audio(path)
    clips = [audio[int(s["start_s"] * 16000):int(s["end_s"] * 16000)] for s in segments] or [audio]
    stages = breakdown(run, responses, warm_ids)
    figures = {
        "end_of_speech_to_first_token_s": p50_p95(first),
        "to_last_token_s": p50_p95(last),
        "end_of_speech_to_first_audio_s": p50_p95(audio_first),
        # the same first-token latency from the sentence's last loud sample instead of the VAD segment's end,
        # which carries up to vad.speech_pad_ms of end padding (demo file only: its sentence ends are known)
        "speech_end_to_first_token_s": p50_p95(true_first),
        "breakdown": stages,
        "rtf_encoder": round(encoder_rtf(clips), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n_utterances": len(responses),
        "warmup_utterances": args.warmup,
        "demo_gap_s": None if args.input else args.gap,
        "max_utterance_s": round(max((s["end_s"] - s["start_s"] for s in segments), default=0.0), 2) or None,
        "mode": args.mode or (responses[0].mode if responses else None),
        # how each was answered: in aligned mode an early-exited utterance is answered from its transcript (cascade)
        "response_modes": {m: sum(r.mode == m for r in responses) for m in sorted({r.mode for r in responses})},
        "overrides": overrides,
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "fast": fast,
    }
    json_path = write_result(args.out, "latency", figures)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    series = [(v, label) for v, label in ((first, "first token"), (last, "last token"),
                                          (audio_first, "first spoken sample")) if v]
    ax.hist([v for v, _ in series], bins=12, label=[label for _, label in series])
    ax.set_xlabel("seconds after end of speech")
    ax.set_ylabel("utterances")
    ax.set_title(f"{figures['mode']} mode, {len(responses)} utterances")
    ax.legend(fontsize=8)
    # where the time goes: the p50 of each stage, stacked in pipeline order up to the first token,
    # then the answer's first token -> first audio (tts) on top
    left = 0.0
    colors = plt.cm.tab10.colors
    for i, (stage, v) in enumerate(stages.items()):
        width = v["p50"] or 0.0
        bx.barh([0], [width], left=left, color=colors[i % 10], label=f"{stage[:-2]} {width:.3f} (n={v['n']})")
        left += width
    bx.axvline(0.5, color="k", ls="--", lw=0.8)
    bx.axvline(1.0, color="k", ls=":", lw=0.8)
    bx.set_yticks([])
    bx.set_xlabel("seconds after end of speech (p50 per stage; goals: first token 0.5, first audio 1.0)")
    bx.set_title("p50 of each stage, stacked (n: utterances that went through it)")
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.25), ncol=3, frameon=False)
    fig.suptitle("tinyalign_ros latency")
    fig.tight_layout()
    fig.savefig(args.out / "latency.png", dpi=120)
    print(json_path)
    print(json.dumps({k: figures[k] for k in ("end_of_speech_to_first_token_s", "end_of_speech_to_first_audio_s",
                                                "speech_end_to_first_token_s", "breakdown", "load_average", "fast")},
                     indent=1))
    return 0
