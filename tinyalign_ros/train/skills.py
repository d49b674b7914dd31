"""Fit the skill probe (core/skill_probe.py) that helps the command parser name the skill:
`tinyalign train skills`.

    tinyalign train skills [--splits dev,dev2,...,dev20] [--voices 4] [--out models/skill_probe.safetensors]

Data: the requests and chatter of the dev splits (core/skill_data.py; never `heldout`, which
`tinyalign bench commands` quotes) and the skills file's `examples:`, as text and as Whisper
tiny.en heard them said by `--voices` typical synthetic voices (the robot acts on what Whisper
heard, misheard words included). Clips and transcripts are cached under the data home
(cache/commands/, cache/commands_heard/), so a second run only refits.

Before the fit on everything, each dev split is predicted by a probe fit on the others (text and
heard): those leave-one-split-out figures, on requests and phrasings the probe never saw, go to the
model card and `<out>.metrics.json` (`--loo-probes DIR` keeps those probes too). Fitting takes
seconds; the first run's transcripts take about 0.35 s per clip and voice on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tinyalign_ros.core.commands import NONE, CommandParser, SkillSet, default_skills_file
from tinyalign_ros.core.skill_data import DEV_SPLITS, SAMPLE_RATE, load_items, spoken_clip, typical_voices
from tinyalign_ros.core.skill_probe import DEFAULT_LAYER, DEFAULT_WEIGHT_DECAY, SkillProbe, llm_fingerprint

REPO = Path(__file__).resolve().parents[2]


def heard(texts: Sequence[str], voices, threads: int, log=print) -> dict[tuple[str, str], str]:
    """{(voice name, text): what Whisper tiny.en heard}, each transcript cached under the data home."""
    from tinyalign_ros.core import corpus
    from tinyalign_ros.core.asr import WhisperTranscriber
    from tinyalign_ros.core.files import atomic_write_bytes
    from tinyalign_ros.core.models import data_home

    asr, out = None, {}
    pad = np.zeros(SAMPLE_RATE // 5, dtype=np.float32)
    for voice in voices:
        cache = data_home() / "cache" / "commands_heard" / voice.key
        cache.mkdir(parents=True, exist_ok=True)
        done = 0
        for text in texts:
            path = cache / f"{corpus._digest(text)[:16]}.txt"
            if not path.is_file():
                asr = asr or WhisperTranscriber(threads=threads)
                said = asr.transcribe(np.concatenate([pad, spoken_clip(text, voice), pad])).text
                atomic_write_bytes(path, said.encode())
                done += 1
                if done % 100 == 0:
                    log(f"{voice.name}: {done} new transcripts")
            out[(voice.name, text)] = path.read_text()
        log(f"{voice.name}: {len(texts)} transcripts ({done} new)")
    return out


def accuracy(probe: SkillProbe, rows: list[tuple[torch.Tensor, str]]) -> dict[str, float | int]:
    """Skill accuracy on the requests, "none" on the chatter."""
    req = [(x, y) for x, y in rows if y != NONE]
    chat = [(x, y) for x, y in rows if y == NONE]

    def share(part):
        hits = sum(max(p := probe.probs(x), key=p.get) == y for x, y in part)
        return round(hits / len(part), 4) if part else None

    return {"skill_acc": share(req), "none_acc": share(chat), "n_requests": len(req), "n_chatter": len(chat)}


def _scores_row(split: str, m: dict) -> str:
    """A model card table row: skill and "none" accuracy on the split's text and as heard."""
    return (f"| {split} | {m['text']['skill_acc']} | {m['heard']['skill_acc']} | {m['text']['none_acc']} | "
            f"{m['heard']['none_acc']} |")


def write_card(path: Path, args, counts: dict, metrics: dict, seconds: float) -> None:
    rows = "\n".join(f"{_scores_row(s, m)} {m['text']['n_requests']} / {m['text']['n_chatter']} |"
                     for s, m in metrics["leave_one_split_out"].items())
    baseline = ""
    if "baseline" in metrics:
        old = metrics["baseline"]["scores"]
        base_rows = "\n".join(_scores_row(s, m) for s, m in old.items())
        baseline = f"""
## The probe it replaces (`--baseline {metrics['baseline']['file']}`, fit on {metrics['baseline']['splits']})

Scored on the same rows; on the splits it was not fit on, compare with the leave-one-split-out table.

| split | skill acc, text | skill acc, heard | "none" acc, text | "none" acc, heard |
|---|---|---|---|---|
{base_rows}
"""
    path.write_text(f"""# skill_probe.safetensors — which skill a request asks for, read off the frozen LLM

A multinomial logistic regression (core/skill_probe.py) on the mean hidden state after layer
{args.layer} of SmolLM2-135M-Instruct over the request's tokens, in the command parser's own prompt
(system prompt with the skills, few-shot turns, the request). The parser (core/commands.py) adds
its log probabilities to the skill scores where a cue word was said, and lets it alone name the
skill where none was (above a threshold). Labels: the skills of config/skills.yaml + "none".
Fit for: {', '.join(counts['labels'])}; LLM `{counts['llm']}`. A probe fit for other skills or
another LLM is refused at start-up (the parser then runs on its cue rules alone): retrain with the
command below after changing the skills.

## Data

- Splits {', '.join(args.splits)} (data/skill_requests_<split>.tsv and their chatter; never
  `heldout`) and the skills file's examples: {counts['texts']} texts ({counts['requests']} requests,
  {counts['chatter']} chatter lines).
- The same said by {args.voices} typical synthetic voices ({', '.join(counts['voices'])}) and
  transcribed by Whisper tiny.en: {counts['heard']} transcripts.
- L2 weight decay {args.weight_decay}, L-BFGS; fit in {seconds:.1f} s (features included) on 2 CPU cores.

## Leave-one-split-out (fit on the other splits, text and heard)

| split | skill acc, text | skill acc, heard | "none" acc, text | "none" acc, heard | requests / chatter |
|---|---|---|---|---|---|
{rows}

Skill accuracy here is the probe alone, without the cue rules and without arguments; the parser's
figures on held-out spoken requests are in bench/results/commands.json (`tinyalign bench commands`).
{baseline}
## Reproduce

```
tinyalign train skills --splits {','.join(args.splits)} --voices {args.voices} --layer {args.layer} --weight-decay {args.weight_decay}
```
""")


def main(argv: Sequence[str] | None = None) -> int:
    from tinyalign_ros.core.files import atomic_write_bytes
    from tinyalign_ros.core.llm import ChatLLM
    from tinyalign_ros.core.metrics import portable_path

    parser = argparse.ArgumentParser(prog="tinyalign train skills", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", type=Path, default=None, help="skills file (default: config/skills.yaml)")
    parser.add_argument("--splits", default=",".join(DEV_SPLITS), help="dev splits to fit on (comma-separated)")
    parser.add_argument("--voices", type=int, default=4, help="typical voices whose Whisper transcripts are added")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY)
    parser.add_argument("--out", type=Path, default=REPO / "models" / "skill_probe.safetensors")
    parser.add_argument("--no-card", action="store_true", help="do not write the model card")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also score this probe file on every split (e.g. the shipped probe on the splits it "
                             "was not fit on: compare with the leave-one-split-out figures)")
    parser.add_argument("--loo-probes", type=Path, default=None,
                        help="also save each leave-one-split-out probe there, as without_<split>.safetensors: the "
                             "parser's thresholds can then be chosen on predictions no fit saw")
    args = parser.parse_args(argv)
    args.splits = [s for s in args.splits.split(",") if s]
    bad = [s for s in args.splits if s not in DEV_SPLITS]
    if bad or not args.splits:
        raise SystemExit(f"--splits: {bad or 'none given'}; choose among the dev splits {DEV_SPLITS} "
                         "(the held-out split is never fit on)")
    baseline = SkillProbe.load(args.baseline) if args.baseline is not None else None  # SkillProbeError: says why
    if baseline is not None and baseline.layer != args.layer:
        raise SystemExit(f"--baseline {args.baseline} reads layer {baseline.layer}, not --layer {args.layer}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    skills = SkillSet.load(args.skills or default_skills_file())
    names = list(skills.skills) + [NONE]
    by_split = {s: [(it.text, it.skill) for it in load_items(s, 10_000)] for s in args.splits}
    for s, rows in by_split.items():
        unknown = sorted({k for _, k in rows} - set(names))
        if unknown:
            raise SystemExit(f"split {s} labels skills {unknown} that {skills.source} does not declare")
    examples = [(ex.text, ex.skill) for ex in skills.examples]
    voices = typical_voices(args.voices) if args.voices > 0 else []
    texts = sorted({t for rows in by_split.values() for t, _ in rows})
    said = heard(texts, voices, args.threads)
    llm = ChatLLM(threads=args.threads)
    command_parser = CommandParser(skills, llm.model, llm.tokenizer)
    llm_id = llm_fingerprint(llm.model)
    if baseline is not None:
        baseline.check(names, llm_id)  # fit for these skills and this LLM, before the long part
    t_fit = time.perf_counter()
    feats: dict[str, torch.Tensor] = {}

    def rows_of(pairs):
        out = []
        for text, skill in pairs:
            if text.strip():
                if text not in feats:
                    feats[text] = command_parser.features(text, args.layer)
                out.append((feats[text], skill))
        return out

    text_rows = {s: rows_of(rows) for s, rows in by_split.items()}
    heard_rows = {s: rows_of([(said[(v.name, t)], k) for v in voices for t, k in rows])
                  for s, rows in by_split.items()}
    ex_rows = rows_of(examples)

    def fit(rows):
        return SkillProbe.fit(torch.stack([x for x, _ in rows]), [y for _, y in rows], names, args.layer, llm_id,
                              weight_decay=args.weight_decay)

    metrics = {"leave_one_split_out": {}}
    if baseline is not None:
        metrics["baseline"] = {"file": portable_path(args.baseline), "splits": baseline.meta.get("splits"),
                               "scores": {s: {"text": accuracy(baseline, text_rows[s]),
                                              "heard": accuracy(baseline, heard_rows[s]) if voices else None}
                                          for s in args.splits}}
        for s, m in metrics["baseline"]["scores"].items():
            print(f"baseline {s}: {m}", flush=True)
    if len(args.splits) > 1:
        for s in args.splits:
            rest = [r for o in args.splits if o != s for r in text_rows[o] + heard_rows[o]] + ex_rows
            probe = fit(rest)
            if args.loo_probes is not None:
                probe.meta = {"splits": [o for o in args.splits if o != s], "left_out": s,
                              "voices": [v.name for v in voices], "weight_decay": args.weight_decay}
                args.loo_probes.mkdir(parents=True, exist_ok=True)
                probe.save(args.loo_probes / f"without_{s}.safetensors")
            metrics["leave_one_split_out"][s] = {"text": accuracy(probe, text_rows[s]),
                                                 "heard": accuracy(probe, heard_rows[s]) if voices else None}
            print(f"{s}: {metrics['leave_one_split_out'][s]}", flush=True)
    everything = [r for s in args.splits for r in text_rows[s] + heard_rows[s]] + ex_rows
    counts = {"labels": names, "llm": llm_id, "texts": sum(len(r) for r in text_rows.values()) + len(ex_rows),
              "requests": sum(k != NONE for rows in by_split.values() for _, k in rows),
              "chatter": sum(k == NONE for rows in by_split.values() for _, k in rows),
              "voices": [v.name for v in voices], "heard": sum(len(r) for r in heard_rows.values())}
    probe = fit(everything)
    probe.meta = {"splits": args.splits, "voices": counts["voices"], "weight_decay": args.weight_decay,
                  "n_rows": len(everything), "skills_file": portable_path(skills.source)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    probe.save(args.out)
    seconds = time.perf_counter() - t_fit
    metrics.update(counts=counts, fit_s=round(seconds, 1), total_s=round(time.perf_counter() - t0, 1),
                   command="tinyalign train skills " + " ".join(sys.argv[3:] if argv is None else argv))
    atomic_write_bytes(args.out.with_suffix(".metrics.json"), (json.dumps(metrics, indent=1) + "\n").encode())
    if not args.no_card and voices:
        write_card(args.out.with_suffix(".md"), args, counts, metrics, seconds)
    print(f"wrote {args.out} ({len(everything)} rows, {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
