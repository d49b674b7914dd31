"""The `tinyalign` command: run the embedded graph, prepare models, synthesize speech.

    tinyalign run [--input FILE [--stay]] [--fast] [--jsonl] [--speak] [--speak-to WAV] [--booster]   the node graph in one process
    tinyalign setup-models                            convert the packaged LLM once (~15 s)
    tinyalign synth --out DIR                         synthesize a labelled speech corpus
    tinyalign demo-audio OUT.wav                      synthesize the demo speech file
    tinyalign personalize SPEAKER [--budget-s S] [--wait]   train a speaker's adapter now, in the running graph
    tinyalign forget SPEAKER                          delete a speaker's samples, consent, adapters and voiceprint
    tinyalign enroll SPEAKER [--sentences N]          prompted enrollment: read N sentences to the running graph
    tinyalign train NAME [...]                        train a model we ship (tinyalign_ros/train/NAME.py)
    tinyalign bench NAME --out DIR [...]              a benchmark (tinyalign_ros/bench/NAME.py)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path


def _cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from tinyalign_ros.core.audio import AudioError
    from tinyalign_ros.nodes.graph import EmbeddedGraph

    overrides: dict[str, dict] = {"mic_node": {}, "asr_node": {}, "assistant_node": {}, "tts_node": {"play": args.speak}}
    if args.mode:
        overrides["assistant_node"]["mode"] = args.mode
        if args.mode == "aligned":  # the projector reads the last encoder layer: no early exit
            overrides["asr_node"].update({"exit.mode": "budget", "exit.max_layer": 0})
    if args.speak_to:
        overrides["tts_node"]["speak_to_file"] = str(Path(args.speak_to).resolve())
    if args.input:
        overrides["mic_node"]["input_file"] = str(Path(args.input).resolve())
        overrides["asr_node"]["echo_gate"] = False  # a file holds no echo of the robot's voice
        if args.fast:  # lossless: mic_node is paced by what asr_node and assistant_node have taken
            overrides["mic_node"]["playback_rate"] = 0.0
            if not args.speak:  # nobody listens: speaking at real time would only make the run last longer
                overrides["tts_node"]["realtime"] = False
    elif args.device:
        overrides["mic_node"]["device"] = args.device
    lock = threading.Lock()

    def emit(text: str) -> None:
        with lock:
            print(text, flush=True)

    def on_utterance(u) -> None:
        if not args.jsonl:
            depth = f"   (encoder exit at layer {u.feature_layer})" if u.feature_layer >= 0 else ""
            emit(f"[{u.stream_start_s:6.2f}-{u.stream_end_s:6.2f} s] you:   {u.transcript}{depth}")

    graph_ref: list = []

    def on_response(r) -> None:
        if args.jsonl:
            u = graph_ref[0].listener.utterances.get(r.utterance_id)
            emit(json.dumps({
                "dropped": False,
                "utterance_id": r.utterance_id,
                "start_s": round(u.stream_start_s, 3) if u else None,
                "end_s": round(u.stream_end_s, 3) if u else None,
                "speaker": r.speaker,
                "transcript": r.transcript,
                "confidence": round(u.confidence, 3) if u else None,
                "exit_layer": u.feature_layer if u and u.feature_layer >= 0 else None,
                "response": r.text,
                "mode": r.mode,
                "latency_first_token_s": round(r.latency_first_token_s, 3),
                "latency_last_token_s": round(r.latency_last_token_s, 3),
            }))
        else:
            with lock:  # its Command, if it came first (it is published first, on another topic)
                answered.add(r.utterance_id)
                command = commands.pop(r.utterance_id, None)
            if command is not None:
                emit(command)
            emit(f"{'':17} robot: {r.text}   (first token {r.latency_first_token_s:.2f} s, "
                 f"last {r.latency_last_token_s:.2f} s after end of speech)")

    commands: dict[str, str] = {}
    answered: set[str] = set()

    def on_command(c) -> None:
        line = (f"{'':17} command: {c.skill} {c.arguments if c.skill != 'none' else ''}   (confidence "
                f"{c.confidence:.2f}{'' if c.sure else ', asked back'}, {c.latency_s:.2f} s after end of speech)")
        with lock:
            late = c.utterance_id in answered
            if not late:
                commands[c.utterance_id] = line
        if late:
            emit(line)

    def on_dropped(d: dict) -> None:
        """An utterance a bounded queue (or a failure) lost, or a sentence left unspoken: never silent."""
        u = graph_ref[0].listener.utterances.get(d.get("utterance_id") or "") if graph_ref else None
        start = d.get("start_s") if d.get("start_s") is not None else (round(u.stream_start_s, 3) if u else None)
        end = d.get("end_s") if d.get("end_s") is not None else (round(u.stream_end_s, 3) if u else None)
        if args.jsonl:
            emit(json.dumps({"dropped": True, "stage": d.get("stage"), "reason": d.get("reason"),
                             "utterance_id": d.get("utterance_id") or None, "start_s": start, "end_s": end,
                             "transcript": d.get("transcript") or (u.transcript if u else ""),
                             "text": d.get("text", "")}))
        else:
            span = f"[{start:6.2f}-{end:6.2f} s]" if start is not None and end is not None else f"{'':17}"
            what = f" {d['text']!r}" if d.get("text") else ""
            emit(f"{span} DROPPED by {d.get('stage')} ({d.get('reason')}){what}")

    try:
        graph = EmbeddedGraph(args.config, overrides, on_utterance, on_response,
                              exclude=("personalizer_node",) if args.no_personalizer else (),
                              include=("booster_node",) if args.booster else (), on_dropped=on_dropped)
    except (AudioError, FileNotFoundError, ValueError) as exc:
        print(f"tinyalign run: {exc}", file=sys.stderr)
        return 2
    graph_ref.append(graph)
    if not args.jsonl:  # the skill call of each utterance, printed just above its answer
        _watch_commands(graph, lambda c: on_command(c))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if args.input:
            if not graph.wait_file_done(args.timeout):
                print(f"tinyalign run: not done after {args.timeout:.0f} s", file=sys.stderr)
                return 1
            if args.stay:
                print("tinyalign run: file done; the graph keeps running (Ctrl-C to stop)", file=sys.stderr, flush=True)
                stop.wait()
        else:
            stop.wait()
    finally:
        graph.shutdown()
    return 0


def _watch_commands(graph, on_command) -> None:
    """Subscribe `on_command` to /tinyalign/command inside the embedded graph."""
    from rclpy.node import Node

    from tinyalign_ros.msg import Command
    from tinyalign_ros.nodes.common import EVENT_QOS
    from tinyalign_ros.nodes.graph import NAMESPACE

    probe = Node("run_commands", namespace=NAMESPACE, context=graph.context)
    probe.create_subscription(Command, "command", on_command, EVENT_QOS)
    graph.executor.add_node(probe)


def _graph_client(command: str, call) -> int:
    """Run a client of the running graph (nodes/client.py); a graph that is not there, or a bad
    speaker id, is one line on stderr and exit code 2."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from tinyalign_ros.core.adapters import InvalidSpeakerId
    from tinyalign_ros.nodes.client import ServiceUnavailable

    try:
        return call()
    except (ServiceUnavailable, InvalidSpeakerId) as exc:
        print(f"tinyalign {command}: {exc}", file=sys.stderr)
        return 2


def _cmd_personalize(args: argparse.Namespace) -> int:
    from tinyalign_ros.nodes.client import personalize

    return _graph_client("personalize", lambda: personalize(args.speaker, args.budget_s, args.wait, args.timeout))


def _cmd_forget(args: argparse.Namespace) -> int:
    from tinyalign_ros.nodes.client import forget

    return _graph_client("forget", lambda: forget(args.speaker, args.timeout))


def _cmd_enroll(args: argparse.Namespace) -> int:
    import random

    from tinyalign_ros.core.corpus import load_sentences
    from tinyalign_ros.nodes.client import enroll

    texts = args.text or [s.text for s in random.Random(args.seed).sample(load_sentences(), args.sentences)]
    return _graph_client("enroll", lambda: enroll(args.speaker, texts, args.timeout, args.utterance_timeout))


def _cmd_setup_models(args: argparse.Namespace) -> int:
    from tinyalign_ros.core.llm import convert_gguf

    print(convert_gguf())
    return 0


def _cmd_demo_audio(args: argparse.Namespace) -> int:
    from tinyalign_ros.core.corpus import make_demo_wav

    for seg in make_demo_wav(Path(args.out)):
        print(json.dumps(seg))
    return 0


def _cmd_synth(argv: list[str]) -> int:
    from tinyalign_ros.core.corpus import main

    return int(main(argv) or 0)


def _subcommand_modules(group: str) -> list[str]:
    import pkgutil

    package = importlib.import_module(f"tinyalign_ros.{group}")
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def _cmd_group(group: str, argv: list[str]) -> int:
    """`tinyalign train|bench NAME ...` runs tinyalign_ros/<group>/<NAME>.py's main(argv)."""
    names = _subcommand_modules(group)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: tinyalign {group} {{{','.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"tinyalign_ros.{group}.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:
        return _cmd_synth(argv[1:])
    if argv[:1] in (["train"], ["bench"]):
        return _cmd_group(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="tinyalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the node graph in one process")
    run.add_argument("--input", help="WAV/FLAC file to play instead of the microphone")
    run.add_argument("--device", help="microphone name fragment or index")
    run.add_argument("--config", type=Path, help="parameter YAML (default: config/assistant.yaml)")
    run.add_argument("--fast", action="store_true",
                     help="play the file as fast as the graph takes it, not real time; nothing is dropped")
    run.add_argument("--jsonl", action="store_true",
                     help="one JSON object per answered utterance on stdout, and one per dropped one (\"dropped\": true)")
    run.add_argument("--speak", action="store_true", help="play the answers through the sound card")
    run.add_argument("--speak-to", metavar="FILE", help="also write the spoken answers to this WAV file")
    run.add_argument("--mode", choices=("cascade", "aligned"),
                     help="assistant mode (default: the config's); aligned also runs the encoder to its last layer")
    run.add_argument("--timeout", type=float, default=600.0, help="give up on a file after this many seconds")
    run.add_argument("--stay", action="store_true",
                     help="keep the graph running after the file (Ctrl-C stops it), e.g. to call "
                          "`tinyalign personalize` from another terminal")
    run.add_argument("--no-personalizer", action="store_true",
                     help="leave personalizer_node out (no sample collection, no on-idle training)")
    run.add_argument("--booster", action="store_true",
                     help="also run booster_node (Whisper base teacher; slower than real time on a small CPU) "
                          "in the graph; its hints change the transcript only with asr_node transcriber: exit_head")
    run.set_defaults(func=_cmd_run)
    pers = sub.add_parser("personalize", help="call /tinyalign/personalize of the running graph "
                                              "(like `ros2 service call`)")
    pers.add_argument("speaker", help="speaker id with consented samples")
    pers.add_argument("--budget-s", type=float, default=0.0, help="training seconds (0 = the node's train.budget_s)")
    pers.add_argument("--wait", action="store_true", help="follow the round and print its outcome")
    pers.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the service")
    pers.set_defaults(func=_cmd_personalize)
    forg = sub.add_parser("forget", help="call /tinyalign/forget: delete a speaker's samples, consent and adapters")
    forg.add_argument("speaker")
    forg.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the service")
    forg.set_defaults(func=_cmd_forget)
    enr = sub.add_parser("enroll", help="prompted enrollment of a speaker in the running graph (voiceprint, "
                                        "consent, labelled samples)")
    enr.add_argument("speaker", help="speaker id to enroll (letters, digits, - and _)")
    enr.add_argument("--sentences", type=int, default=5, help="how many sentences to read (from data/)")
    enr.add_argument("--text", action="append", help="a sentence to read (repeatable; replaces --sentences)")
    enr.add_argument("--seed", type=int, default=None, help="seed of the sentence choice (default: random)")
    enr.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the graph")
    enr.add_argument("--utterance-timeout", type=float, default=60.0, help="seconds to wait for each sentence")
    enr.set_defaults(func=_cmd_enroll)
    sub.add_parser("setup-models", help="convert the packaged LLM for fast loading").set_defaults(
        func=_cmd_setup_models)
    demo = sub.add_parser("demo-audio", help="synthesize the demo speech file")
    demo.add_argument("out")
    demo.set_defaults(func=_cmd_demo_audio)
    sub.add_parser("synth", help="synthesize a labelled speech corpus (see `tinyalign synth -h`)")
    sub.add_parser("train", help="train a model we ship (see `tinyalign train -h`)")
    sub.add_parser("bench", help="run a benchmark, writing DIR/NAME.json and DIR/NAME.png")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
