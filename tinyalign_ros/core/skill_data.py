"""The labelled spoken requests and chatter of data/ (the skill-call splits), the typical voices
that speak them, and their cached clips: what `tinyalign bench commands` measures on and what
`tinyalign train skills` fits the skill probe on (core/skill_probe.py). ROS-free.

Splits: `heldout` (data/skill_requests_heldout.tsv + data/chatter_heldout.txt: the quoted figures,
never used to tune or fit anything); `dev` (skill_requests_dev.tsv + the even lines of
questions.txt), `dev2` (skill_requests_dev2.tsv + chatter_dev2.txt + the odd lines of
questions.txt), `dev3` ... `dev20` (skill_requests_devN.tsv + chatter_devN.txt): what the parser's
rules may be tuned on and the probe fit on. dev2-dev20 were each the held-out set once, until
their errors were read. `extra1`, `extra2` (skill_requests_extraN.tsv + chatter_extraN.txt, about
85 requests and 105 chatter lines each) were written as training data for the probe, by someone who
had seen neither the parser nor any split, and were never held out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .commands import NONE

DATA = Path(__file__).resolve().parents[2] / "data"
SPLITS = ("heldout", "dev", "dev2", "dev3", "dev4", "dev5", "dev6", "dev7", "dev8", "dev9", "dev10", "dev11", "dev12",
          "dev13", "dev14", "dev15", "dev16", "dev17", "dev18", "dev19", "dev20", "extra1", "extra2")
DEV_SPLITS = tuple(s for s in SPLITS if s != "heldout")
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Item:
    text: str
    skill: str  # NONE for chatter
    arguments: dict


def data_lines(path: Path) -> list[str]:
    """The lines of a data/ file that hold something: blank lines and `#` comments dropped."""
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def load_items(split: str, n_chatter: int, n_commands: int | None = None) -> list[Item]:
    """The split's requests (the first `n_commands`), then its chatter (the first `n_chatter`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [line.split("\t") for line in data_lines(DATA / f"skill_requests_{split}.tsv")][1:]
    items = [Item(t, s, json.loads(a)) for t, s, a in rows][:n_commands]
    questions = data_lines(DATA / "questions.txt")
    chatter = {"dev": questions[0::2], "dev2": data_lines(DATA / "chatter_dev2.txt") + questions[1::2]}.get(split)
    if chatter is None:
        chatter = data_lines(DATA / f"chatter_{split}.txt")
    return items + [Item(c, NONE, {}) for c in chatter[:n_chatter]]


def typical_voices(n: int):
    """Typical (not atypical, not channel-degraded) default voices, alternating engines, each a
    different speaker model (piper joe, festival slt, espeak en-us m3, festival kal, espeak en-gb f2,
    ...) before any speaker comes twice with another pitch and rate."""
    from . import corpus

    voices = [v for v in corpus.default_voices(0) if not v.atypical and not v.degradations]
    seen: set[str] = set()
    first = [v for v in voices if not (v.model in seen or seen.add(v.model))]
    picked: list = []
    for pool in (first, [v for v in voices if v not in first]):  # new speakers, then the same ones again
        by_engine: dict[str, list] = {}
        for v in pool:
            by_engine.setdefault(v.engine, []).append(v)
        order = [e for e in ("piper", "festival", "espeak") if e in by_engine]
        while len(picked) < n and any(by_engine[e] for e in order):
            for e in order:
                if by_engine[e] and len(picked) < n:
                    picked.append(by_engine[e].pop(0))
    return picked


def spoken_clip(text: str, voice) -> np.ndarray:
    """`text` said by `voice` (16 kHz float32, silence trimmed), synthesized once and cached under
    the data home (cache/commands/<voice>/)."""
    import soundfile as sf

    from . import corpus
    from .models import data_home

    cache = data_home() / "cache" / "commands" / voice.key
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{corpus._digest(text)[:16]}.flac"
    if path.is_file():
        return sf.read(path, dtype="float32")[0]
    clip = corpus.synthesize(text, voice)
    loud = np.flatnonzero(np.abs(clip) > 0.003)
    clip = clip[loud[0]:loud[-1] + 1] if loud.size else clip
    sf.write(path, clip, SAMPLE_RATE)
    return clip
