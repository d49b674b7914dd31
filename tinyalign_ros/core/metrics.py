"""Quality figures and benchmark records, the same way everywhere (docs/design.md section 6).

WER is computed with jiwer on normalized text: lower case, digits spelled out (num2words), no
punctuation. Whisper writes "2 meters" where our references say "two meters"; without this the
cascade would be charged for formatting, not for mishearing.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jiwer
from num2words import num2words

from .files import atomic_write_bytes
from .models import data_home

REPO = Path(__file__).resolve().parents[2]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PUNCT = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
    text = text.lower().replace("%", " percent")
    text = _NUMBER.sub(lambda m: " " + num2words(float(m.group()) if "." in m.group() else int(m.group())) + " ",
                       text)
    text = text.replace("-", " ")
    text = _PUNCT.sub(" ", text).replace("'", "")
    return " ".join(text.split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER over normalized text; an empty reference set is an error, not 0."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    if not any(refs):
        raise ValueError("no reference words")
    hyps = [normalize_text(h) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def word_errors(references: list[str], hypotheses: list[str]) -> list[int]:
    """Word errors (substitutions + deletions + insertions) of each pair, on normalized text as `wer`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    out = []
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref), normalize_text(hyp)
        if not r:
            out.append(len(h.split()))
            continue
        o = jiwer.process_words(r, h or "")
        out.append(o.substitutions + o.deletions + o.insertions)
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
        threads = torch.get_num_threads()
    except ImportError:
        threads = os.cpu_count()
    return {"cpu": cpu, "threads": threads, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _program() -> str:
    # `python -m tinyalign_ros.cli` and the `tinyalign` script are the same command
    name = Path(sys.argv[0]).name
    return "tinyalign" if name in ("cli.py", "tinyalign") else name


def portable_path(value: str | os.PathLike, repo: Path = REPO) -> str:
    """A path as a committed file (result, model card) may carry it, meaning the same on any machine.

    - under the repository: relative to it (`models/projector.safetensors`, `build/corpus`);
    - under `$TINYALIGN_HOME`: `$TINYALIGN_HOME/...`;
    - under the user's home or the temp folder: only its name (the rest names this machine);
    - anything else unchanged: relative paths, system data locations (`/usr/share/pocketsphinx/...`
      is where Debian puts pocketsphinx-testdata on every machine), ROS names, plain text.
    """
    text = os.fspath(value)
    if not text.startswith("/") or any(c.isspace() for c in text):
        return text
    path = Path(os.path.normpath(text))
    for root, prefix in ((repo, ""), (data_home(), "$TINYALIGN_HOME/")):
        for candidate in {root, root.resolve()}:
            if path.is_relative_to(candidate):
                rel = path.relative_to(candidate).as_posix()
                return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
    if any(path.is_relative_to(private) for private in {Path.home(), Path(tempfile.gettempdir())}):
        return path.name
    return text


def portable_command(argv: Iterable[str]) -> str:
    """A command line with `portable_path` applied to every argument (`--opt=/path` forms too)."""
    def one(arg: str) -> str:
        if arg.startswith("-") and "=" in arg:
            option, value = arg.split("=", 1)
            return f"{option}={portable_path(value)}"
        return portable_path(arg)
    return " ".join(one(a) for a in argv)


def portable_record(value: Any) -> Any:
    """`value` (JSON-like: dicts, lists, strings, numbers) with `portable_path` applied to every string."""
    if isinstance(value, str):
        return portable_path(value)
    if isinstance(value, dict):
        return {k: portable_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_record(v) for v in value]
    return value


def write_result(out_dir: Path, name: str, figures: dict[str, Any]) -> Path:
    """`out_dir/name.json` with the provenance every result must carry, written atomically.

    Paths in it are made portable (`portable_record`): a committed result names no build machine."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": portable_command([_program(), *sys.argv[1:]]),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **portable_record(figures),
    }
    path = out_dir / f"{name}.json"
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
    return path
