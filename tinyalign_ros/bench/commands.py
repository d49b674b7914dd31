"""`tinyalign bench commands --out DIR`: spoken requests -> skill calls (core/commands.py).

Held-out requests (`--split heldout`, the default: data/skill_requests_heldout.tsv and
data/chatter_heldout.txt, written 2026-12-07 before the twentieth round of parser changes and never
used to tune anything) and chatter, or a dev split that cues, aliases, prompts and thresholds may
be tuned on (`dev`: data/skill_requests_dev.tsv + the even lines of data/questions.txt; `dev2`:
data/skill_requests_dev2.tsv + data/chatter_dev2.txt + the odd lines of questions.txt; `dev3`:
data/skill_requests_dev3.tsv + data/chatter_dev3.txt; `dev4` ... `dev20` likewise; dev2 ... dev20
were held out until their errors were looked at; `extra1`, `extra2`: written as training data for
the skill probe, never held out), are spoken by several typical synthetic voices
(core.corpus, as `tinyalign synth`), each voice's clips in one file with 1.2 s gaps, and played at
real time through the embedded graph exactly as `tinyalign run --input` does (VAD -> Whisper ->
assistant_node; `--fast`: as fast as the graph takes it). Each Command is matched to its request
by the time of its utterance (`match`: where the VAD cut a sentence in two at a pause, the
request's call is the one skill call among the halves; two different calls count as wrong). Per
mode:

- `exact_acc`: share of the commands whose published call (skill and every argument) is right;
- `args_acc`: of the commands with the right skill and at least one argument, the share whose
  arguments are all right;
- `none_precision`: share of the chatter the robot mapped to "none" (no action; what the issue
  calls the precision of "none" on questions and chatter); `none_precision_strict`: of all the
  utterances mapped to "none", the share that were chatter;
- `latency_p50_s`: end of speech -> Command of the requests (the Command carries it); with
  `--fast`, from a separate real-time run of `--latency-n` requests (a fast run's clock is not
  the speaker's).

`text` is the same parser on the reference text (no speech): the ceiling the ASR leaves.
Writes DIR/commands.json and DIR/commands.png (a confusion matrix of skills per mode).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tinyalign_ros.core.commands import NONE, CommandParser, SkillSet, default_skills_file
from tinyalign_ros.core.metrics import portable_path, write_result
from tinyalign_ros.core.skill_probe import SkillProbe, probe_path
from tinyalign_ros.core.skill_data import SAMPLE_RATE, SPLITS, Item, load_items, spoken_clip, typical_voices

WORK = Path(__file__).resolve().parents[2] / "build" / "bench_commands"  # the speech files (not results)
GAP_S = 1.2


def speech_file(voice, texts: list[str], out: Path) -> list[tuple[float, float]]:
    """One file of `texts` by `voice` with GAP_S gaps; (start_s, end_s) of each (cached clips)."""
    import soundfile as sf

    gap = np.zeros(round(GAP_S * SAMPLE_RATE), dtype=np.float32)
    parts, spans = [np.zeros(SAMPLE_RATE // 2, dtype=np.float32)], []
    for text in texts:
        clip = spoken_clip(text, voice)
        start = sum(p.size for p in parts)
        spans.append((start / SAMPLE_RATE, (start + clip.size) / SAMPLE_RATE))
        parts += [clip, gap]
    sf.write(out, np.concatenate(parts + [gap]), SAMPLE_RATE)
    return spans


def run_file(path: Path, mode: str, fast: bool, method: str, skills_file: str, threads: int = 2, log=print,
             probe_file: str = ""):
    """Play `path` through the embedded graph; [(utterance start_s, end_s, transcript, Command)]."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    from rclpy.node import Node

    from tinyalign_ros.msg import Command
    from tinyalign_ros.nodes.common import EVENT_QOS
    from tinyalign_ros.nodes.graph import NAMESPACE, EmbeddedGraph

    utterances: dict[str, tuple[float, float, str]] = {}
    commands: list = []
    overrides = {
        "mic_node": {"input_file": str(path), "playback_rate": 0.0 if fast else 1.0},
        "asr_node": {"echo_gate": False, "whisper.threads": threads},
        # answers to chatter are not scored: short ones (aligned mode writes its transcript with the same limit)
        "assistant_node": {"mode": mode, "llm.max_new_tokens": 32 if mode == "aligned" else 12,
                           "max_pending_utterances": 1000,
                           "commands.method": method, "commands.skills_file": skills_file, "llm.threads": threads,
                           "commands.probe_file": probe_file},
        "tts_node": {"play": False, "realtime": False},
    }
    if mode == "aligned":  # the projector reads the last encoder layer (as `tinyalign run --mode aligned`)
        overrides["asr_node"].update({"exit.mode": "budget", "exit.max_layer": 0})

    def on_utterance(u) -> None:
        utterances[u.id] = (u.stream_start_s, u.stream_end_s, u.transcript)

    with EmbeddedGraph(overrides=overrides, on_utterance=on_utterance, exclude=("personalizer_node",)) as graph:
        probe = Node("bench_commands", namespace=NAMESPACE, context=graph.context)
        probe.create_subscription(Command, "command", commands.append, EVENT_QOS)
        graph.executor.add_node(probe)
        if not graph.wait_file_done(3600):
            log(f"warning: {path.name} not done after an hour")
        graph.executor.remove_node(probe)
        probe.destroy_node()
    out = []
    for c in commands:
        start, end, transcript = utterances.get(c.utterance_id, (float("nan"), float("nan"), ""))
        out.append((start, end, transcript, c))
    return out


SEVERAL = "(several calls)"  # a span in which the robot made two different skill calls: wrong whatever was asked


def match(spans: list[tuple[float, float]], heard) -> list:
    """What the robot did during each span: [(call, Command)] with call = (skill, arguments), or
    None when no utterance overlapped it. Each utterance belongs to the span it overlaps most. The
    VAD may cut one sentence into two utterances at a pause ("Go to the front door, | the delivery
    guy is here"): the span's call is then the one skill call among them (the robot acts on it;
    the other half asks for nothing), "none" when none asks for a skill, and SEVERAL when they ask
    for different ones (one of them is wrong, so the span counts as wrong, chatter or request).
    The Command reported is the call's (its latency and `sure`), or the longest utterance's."""
    parts: list[list] = [[] for _ in spans]
    for start, end, _, cmd in heard:
        overlaps = [min(e, end) - max(s, start) for s, e in spans]
        if overlaps and max(overlaps) > 0:
            parts[int(np.argmax(overlaps))].append((max(overlaps), cmd))
    got: list = []
    for part in parts:
        if not part:
            got.append(None)
            continue
        said = [((c.skill, json.loads(c.arguments)), c) for _, c in part]  # (call, Command), as `part`
        acting = [(call, c) for call, c in said if call[0] != NONE]
        if len({json.dumps(call, sort_keys=True) for call, _ in acting}) > 1:
            got.append(((SEVERAL, {}), acting[0][1]))
        elif acting:
            got.append(acting[0])
        else:
            got.append(said[max(range(len(part)), key=lambda i: part[i][0])])
    return got


def score(items: list[Item], calls: list, sure: list[bool] | None = None) -> dict:
    """calls: per item (skill, arguments) or None (no Command at all); sure: per item whether the
    robot would act (Command.sure) rather than ask back (None: not scored)."""
    cmd = [(it, c) for it, c in zip(items, calls) if it.skill != NONE]
    chat = [(it, c) for it, c in zip(items, calls) if it.skill == NONE]
    exact = [c is not None and c[0] == it.skill and c[1] == it.arguments for it, c in cmd]
    with_args = [(it, c) for it, c in cmd if c is not None and c[0] == it.skill and it.arguments]
    predicted_none = [it for it, c in zip(items, calls) if c is not None and c[0] == NONE]
    confusion = Counter((it.skill, c[0] if c is not None else "(missed)") for it, c in zip(items, calls))
    asked = {}
    if sure is not None:  # what the confidence is for: ask back on the wrong calls, act on the right ones
        right = [s for it, c, s in zip(items, calls, sure) if c is not None and c[0] != NONE
                 and (c[0], c[1]) == (it.skill, it.arguments)]
        wrong = [s for it, c, s in zip(items, calls, sure) if c is not None and c[0] != NONE
                 and (c[0], c[1]) != (it.skill, it.arguments)]
        asked = {"asked_back_right": round(1 - float(np.mean(right)), 4) if right else None,
                 "asked_back_wrong": round(1 - float(np.mean(wrong)), 4) if wrong else None,
                 "n_wrong_calls": len(wrong),
                 "acted_wrong": round(sum(wrong) / len(items), 4) if items else None}
    return {
        "exact_acc": round(float(np.mean(exact)), 4) if exact else None,
        "args_acc": round(float(np.mean([c[1] == it.arguments for it, c in with_args])), 4) if with_args else None,
        "none_precision": round(float(np.mean([c is not None and c[0] == NONE for _, c in chat])), 4) if chat else None,
        "none_precision_strict": (round(sum(it.skill == NONE for it in predicted_none) / len(predicted_none), 4)
                                  if predicted_none else None),
        "missed": sum(c is None for c in calls),
        "confusion": {f"{r} -> {p}": n for (r, p), n in sorted(confusion.items())},
    } | asked


def pooled(items_per: list[list[Item]], calls_per: list[list], sure_per: list[list[bool]]) -> dict:
    return score([i for items in items_per for i in items], [c for calls in calls_per for c in calls],
                 [s for sure in sure_per for s in sure])


def compare_libraries(tokenizer, skills: SkillSet) -> dict:
    """Install-free figures of the two grammar libraries on this tokenizer and schema."""
    import llguidance
    import llguidance.hf

    out = {}
    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(skills.schema(), overrides={"whitespace_flexible": False})
    build = time.perf_counter() - t
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    t, n = time.perf_counter(), 0
    for tok in tokenizer('{"skill":"go_to","arguments":{"place":"kitchen"}}', add_special_tokens=False)["input_ids"]:
        m.compute_bitmask()
        m.consume_token(tok)
        n += 1
    out["llguidance"] = {"version": llguidance.__version__ if hasattr(llguidance, "__version__") else "1.9.1",
                         "setup_s": round(build, 3), "mask_ms": round((time.perf_counter() - t) / n * 1000, 3)}
    try:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.integrations.transformers import build_token_enforcer_tokenizer_data
        from lmformatenforcer.tokenenforcer import TokenEnforcer
    except ImportError as exc:  # not installed, or (0.11.3) its transformers integration predates transformers 5
        out["lm-format-enforcer"] = {"unavailable": f"{exc.__cause__ or exc}"[:200]}
        return out
    t = time.perf_counter()
    data = build_token_enforcer_tokenizer_data(tokenizer)
    enforcer = TokenEnforcer(data, JsonSchemaParser(skills.schema()))
    build = time.perf_counter() - t
    ids = tokenizer('{"skill": "go_to", "arguments": {"place": "kitchen"}}', add_special_tokens=False)["input_ids"]
    t = time.perf_counter()
    for k in range(len(ids)):
        enforcer.get_allowed_tokens(ids[:k])
    out["lm-format-enforcer"] = {"version": "0.11.3", "setup_s": round(build, 3),
                                 "mask_ms": round((time.perf_counter() - t) / len(ids) * 1000, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyalign bench commands", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for commands.json and commands.png")
    parser.add_argument("--split", choices=SPLITS, default="heldout",
                        help="heldout: the quoted figures; dev ... dev20: what the parser may be tuned on; "
                             "extra1, extra2: written as training data for the skill probe")
    parser.add_argument("--voices", type=int, default=3, help="typical synthetic voices (0: text only)")
    parser.add_argument("--modes", default="cascade,aligned", help="graph modes to run (comma-separated)")
    parser.add_argument("--method", default="choice", choices=("choice", "generate"))
    parser.add_argument("--probe", default="", help='skill probe file ("" = models/skill_probe.safetensors, '
                                                     '"off" = the cue rules alone; core/skill_probe.py)')
    parser.add_argument("--n-chatter", type=int, default=50, help="chatter utterances (the first N of the split's; "
                        "heldout has 50)")
    parser.add_argument("--n-commands", type=int, default=None, help="only the first N requests (smoke runs)")
    parser.add_argument("--latency-n", type=int, default=8, help="with --fast: requests played at real time for the latency")
    parser.add_argument("--fast", action="store_true", help="play the files as fast as the graph takes them (as `tinyalign "
                        "run --fast`), latency from a separate real-time run; default: real time, latency from every command")
    parser.add_argument("--skills", default="", help="skills file (default config/skills.yaml)")
    parser.add_argument("--min-confidence", type=float, default=0.5,
                        help="text mode: below this the robot asks back (the graph: assistant_node's commands.min_confidence)")
    parser.add_argument("--threads", type=int, default=2, help="LLM and Whisper threads (the YAML's are 2; 1 on a "
                        "CPU shared with other jobs, where 2 threads wait on each other)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    skills_file = args.skills or str(default_skills_file())
    skills = SkillSet.load(skills_file)
    items = load_items(args.split, args.n_chatter, args.n_commands)
    modes: dict[str, dict] = {}
    load_before = os.getloadavg()  # a timing bench on a shared CPU: say how busy it was

    # text: the parser alone on the reference text
    from tinyalign_ros.core.llm import ChatLLM

    llm = ChatLLM(threads=args.threads)
    probe_file = probe_path(args.probe)
    probe = None if probe_file == "off" else SkillProbe.load(probe_file)
    parser_ = CommandParser(skills, llm.model, llm.tokenizer, method=args.method, probe=probe)
    calls, seconds, sure, via = [], [], [], Counter()
    for it in items:
        c = parser_.parse(it.text)
        calls.append((c.skill, c.arguments))
        sure.append(c.confidence >= args.min_confidence)
        via[c.via] += 1
        if c.via == "llm":  # the phrase path and the cue gate answer in microseconds
            seconds.append(c.seconds)
        if (c.skill, c.arguments) != (it.skill, it.arguments):
            print(f"text: {it.text!r} -> {c.skill} {c.arguments} (want {it.skill} {it.arguments})", flush=True)
    modes["text"] = score(items, calls, sure) | {"parse_s": {"p50": round(float(np.median(seconds)), 3),
                                                             "p95": round(float(np.percentile(seconds, 95)), 3)},
                                                 "via": dict(via)}
    print("text", {k: v for k, v in modes["text"].items() if k != "confusion"}, flush=True)
    libraries = compare_libraries(llm.tokenizer, skills)
    del parser_, llm

    voices = typical_voices(args.voices)
    texts = [it.text for it in items]
    files = []
    for v in voices:
        path = WORK / f"commands-{v.name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        files.append((v, path, speech_file(v, texts, path)))
    for mode in [m for m in args.modes.split(",") if m] if voices else []:
        per_voice, all_calls, all_sure, latencies = {}, [], [], []
        for v, path, spans in files:
            t = time.perf_counter()
            heard = run_file(path, mode, args.fast, args.method, skills_file, args.threads, probe_file=args.probe)
            matched = match(spans, heard)
            calls = [m[0] if m is not None else None for m in matched]
            got = [m[1] if m is not None else None for m in matched]
            sure = [c is not None and c.sure for c in got]
            for it, c, h in zip(items, calls, got):
                if c != (it.skill, it.arguments):
                    print(f"{mode} {v.name}: {it.text!r} heard {h.text if h else None!r} -> {c} "
                          f"(want {it.skill} {it.arguments})", flush=True)
            per_voice[v.name] = {k: val for k, val in score(items, calls, sure).items() if k != "confusion"}
            per_voice[v.name]["run_s"] = round(time.perf_counter() - t, 1)
            if not args.fast:  # end of speech -> Command of every request, at real time
                latencies += [h.latency_s for it, h in zip(items, got)
                              if h is not None and it.skill != NONE and np.isfinite(h.latency_s)]
            all_calls.append(calls)
            all_sure.append(sure)
            print(mode, v.name, per_voice[v.name], flush=True)
        result = pooled([items] * len(files), all_calls, all_sure)
        if args.fast and args.latency_n > 0:
            v = voices[0]
            sub = [it.text for it in items if it.skill != NONE][:args.latency_n]
            path = WORK / f"latency-{v.name}.wav"
            speech_file(v, sub, path)
            latencies = [c.latency_s for *_, c in run_file(path, mode, False, args.method, skills_file, args.threads,
                                                                probe_file=args.probe)
                         if np.isfinite(c.latency_s)]
        result["latency_p50_s"] = round(float(np.median(latencies)), 3) if latencies else None
        result["latency_p95_s"] = round(float(np.percentile(latencies, 95)), 3) if latencies else None
        result["latency_n"] = len(latencies)
        result["per_voice"] = per_voice
        modes[mode] = result
        print(mode, {k: val for k, val in result.items() if k not in ("confusion", "per_voice")}, flush=True)

    figures = {
        "modes": modes,
        "n_commands": sum(it.skill != NONE for it in items),
        "n_chatter": sum(it.skill == NONE for it in items),
        "voices": [v.name for v in voices],
        "split": args.split,
        "method": args.method,
        "threads": args.threads,
        "skills_file": portable_path(skills_file),
        "probe": portable_path(probe_file),
        "libraries": libraries,
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "definitions": {
            "exact_acc": "commands whose call (skill and all arguments) is right",
            "args_acc": "commands with the right skill and >= 1 argument whose arguments are all right",
            "none_precision": "chatter mapped to none (no action)",
            "none_precision_strict": "utterances mapped to none that were chatter",
            "latency_p50_s": "end of speech -> Command of the requests, graph at real time",
            "asked_back_right": "right skill calls the robot asked back about (Command.sure false): needless questions",
            "asked_back_wrong": "wrong skill calls (a wrong command, or chatter mapped to a skill) it asked back about",
            "acted_wrong": "utterances on which the robot would act on a wrong call (sure and wrong)",
        },
    }
    json_path = write_result(args.out, "commands", figures)
    plot(modes, sorted(skills.skills) + [NONE], args.out / "commands.png")
    print(json_path)
    return 0


def plot(modes: dict, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = labels + ["(missed)", SEVERAL]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.8), squeeze=False)
    for ax, (mode, res) in zip(axes[0], modes.items()):
        m = np.zeros((len(labels), len(cols)))
        for key, n in res["confusion"].items():
            ref, pred = key.split(" -> ")
            if ref in labels and pred in cols:
                m[labels.index(ref), cols.index(pred)] += n
        rows = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(cols)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rows[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted skill")
        ax.set_ylabel("requested skill")
        acc = res.get("exact_acc")
        ax.set_title(f"{mode}: exact {acc if acc is not None else '-'}, none {res.get('none_precision')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
