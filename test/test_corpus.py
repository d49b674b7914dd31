"""Corpus synthesis: every engine speaks, degradations act, splits hold speakers and sentences
out, builds are reproducible and resumable, the demo file matches its segments, and missing
tools give errors that name the Debian package."""
from __future__ import annotations

import csv
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tinyalign_ros.core import corpus
from tinyalign_ros.core.corpus import (MANIFEST_COLUMNS, SAMPLE_RATE, Sentence, SynthesisError, Voice,
                                       build_corpus, calibration_voices, default_voices, load_sentences,
                                       make_demo_wav, split_speakers, synthesize)

TEXT = "please bring me a glass of water from the kitchen"
ESPEAK = Voice("t-espeak", "espeak", "en-us")
ENGINE_VOICES = [ESPEAK,
                 Voice("t-piper", "piper", "en_US-joe-medium"),
                 Voice("t-slt", "festival", "cmu_us_slt_arctic_hts"),
                 Voice("t-kal", "festival", "kal_diphone")]
TINY_SENTENCES = [Sentence("turn left", "turn_left"),
                  Sentence("go to the kitchen", "go_to"),
                  Sentence("Why is the sky blue?", "")]
TINY_VOICES = [Voice("tiny-espeak", "espeak", "en-gb-scotland+f3", pitch=1.0, rate=0.95),
               Voice("tiny-piper", "piper", "en_US-joe-medium", pitch=-1.0),
               Voice("tiny-kal", "festival", "kal_diphone", degradations=("slow", "noise"))]


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def tiny_build(out_dir: Path) -> Path:
    return build_corpus(out_dir, voices=TINY_VOICES, sentences=TINY_SENTENCES, seed=3, workers=1)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return tiny_build(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def path_with_only(tmp_path, monkeypatch):
    """Make PATH hold only the named tools, as on a machine missing the others."""
    def restrict(*tools: str) -> None:
        for tool in tools:
            (tmp_path / tool).symlink_to(shutil.which(tool))
        monkeypatch.setenv("PATH", str(tmp_path))
    return restrict


@pytest.mark.parametrize("voice", ENGINE_VOICES, ids=lambda v: v.name)
def test_each_engine_speaks_plausibly(voice):
    audio = synthesize(TEXT, voice)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    seconds, words = audio.size / SAMPLE_RATE, len(TEXT.split())
    assert words / 5 < seconds < words / 1.5, f"{seconds:.2f} s for {words} words"
    assert np.sqrt(np.mean(audio ** 2)) > 0.02 and np.abs(audio).max() <= 1.0


def test_synthesis_is_deterministic_per_voice_and_text():
    noisy = dataclasses.replace(ENGINE_VOICES[1], degradations=("noise",))
    assert np.array_equal(synthesize(TEXT, noisy), synthesize(TEXT, noisy))


def test_degradations_change_the_audio():
    clean = synthesize(TEXT, ESPEAK)
    for name in [*corpus.SPEECH_DEGRADATIONS, *corpus.CHANNEL_DEGRADATIONS]:
        degraded = synthesize(TEXT, dataclasses.replace(ESPEAK, degradations=(name,)))
        assert degraded.shape != clean.shape or not np.allclose(degraded, clean, atol=1e-3), name
    slow = synthesize(TEXT, dataclasses.replace(ESPEAK, degradations=("slow",)))
    fast = synthesize(TEXT, dataclasses.replace(ESPEAK, degradations=("fast",)))
    assert slow.size > 1.3 * clean.size and fast.size < 0.8 * clean.size
    phone = synthesize(TEXT, dataclasses.replace(ESPEAK, degradations=("telephone",)))

    def low_band_share(x: np.ndarray) -> float:  # spectral energy below 250 Hz
        spectrum = np.abs(np.fft.rfft(x)) ** 2
        return spectrum[np.fft.rfftfreq(x.size, 1 / SAMPLE_RATE) < 250].sum() / spectrum.sum()

    assert low_band_share(phone) < 0.2 * low_band_share(clean)


def test_atypical_means_the_speech_not_the_channel():
    assert dataclasses.replace(ESPEAK, degradations=("tremolo",)).atypical
    assert dataclasses.replace(ESPEAK, pitch=-6.0).atypical
    assert dataclasses.replace(ESPEAK, rate=0.6).atypical
    assert not dataclasses.replace(ESPEAK, degradations=("telephone", "noise", "reverb")).atypical


def test_bad_voices_are_refused_clearly():
    with pytest.raises(ValueError, match="engine"):
        Voice("x", "sapi", "david")
    with pytest.raises(ValueError, match="unknown degradations"):
        Voice("x", "espeak", "en-us", degradations=("underwater",))
    with pytest.raises(SynthesisError, match="no voice 'en-xx'"):
        synthesize(TEXT, Voice("x", "espeak", "en-xx"))  # espeak-ng itself would fall back silently
    with pytest.raises(SynthesisError, match="not installed"):
        synthesize(TEXT, Voice("x", "festival", "nobody_diphone"))


@pytest.mark.parametrize("voice, present, missing, package", [
    (ESPEAK, ["espeak-ng"], "sox", "sox"),
    (ESPEAK, ["sox"], "espeak-ng", "espeak-ng"),
    (ENGINE_VOICES[2], ["sox"], "text2wave", "festival"),
])
def test_missing_tool_names_its_debian_package(path_with_only, voice, present, missing, package):
    path_with_only(*present)
    with pytest.raises(SynthesisError, match=rf"`{missing}`.*apt-get install {package}\b"):
        synthesize(TEXT, voice)


def test_build_fails_before_any_work_when_a_tool_is_missing(path_with_only, tmp_path):
    path_with_only("sox", "espeak-ng")
    with pytest.raises(SynthesisError, match="text2wave.*festival"):
        build_corpus(tmp_path / "c", voices=TINY_VOICES, sentences=TINY_SENTENCES)
    assert not (tmp_path / "c").exists()


def test_tiny_corpus_manifest(tiny_corpus):
    rows = read_manifest(tiny_corpus)
    assert rows and list(rows[0]) == list(MANIFEST_COLUMNS)
    # 1 of 3 speakers held out for test (no val speakers with so few), 1 of 3 sentences with it
    assert {r["split"] for r in rows} == {"train", "test"}
    assert len(rows) == 2 * 2 + 1 * 1
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    assert not {r["speaker"] for r in by_split["train"]} & {r["speaker"] for r in by_split["test"]}
    assert not {r["text"] for r in by_split["train"]} & {r["text"] for r in by_split["test"]}
    intents = {s.text: s.intent for s in TINY_SENTENCES}
    voices = {v.name: v for v in TINY_VOICES}
    for row in rows:
        info = sf.info(tiny_corpus.parent / row["path"])
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert float(row["duration_s"]) == pytest.approx(info.duration, abs=1e-3)
        assert row["intent"] == intents[row["text"]]
        voice = voices[row["speaker"]]
        assert (row["engine"], row["voice"], row["atypical"]) == (voice.engine, voice.model,
                                                                 str(int(voice.atypical)))
    assert not list(tiny_corpus.parent.rglob("*.tmp"))


def test_corpus_build_is_reproducible(tiny_corpus, tmp_path):
    again = tiny_build(tmp_path)
    assert again.read_text() == tiny_corpus.read_text()
    for row in read_manifest(again):
        a, _ = sf.read(again.parent / row["path"])
        b, _ = sf.read(tiny_corpus.parent / row["path"])
        assert np.array_equal(a, b), row["path"]


def test_rebuild_skips_existing_clips_and_clears_half_files(tiny_corpus, monkeypatch):
    half = next((tiny_corpus.parent / "audio").iterdir()) / ".killed.flac.123.tmp"
    half.write_bytes(b"half a file")
    before = tiny_corpus.read_text()

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("an existing clip was synthesized again")

    monkeypatch.setattr(corpus, "synthesize", must_not_run)
    assert tiny_build(tiny_corpus.parent).read_text() == before
    assert not half.exists()


def test_calibration_speakers_say_the_val_sentences_only(tmp_path):
    voices = [Voice(f"v{i}", "espeak", model) for i, model in enumerate(("en-us", "en-gb", "en-029", "en-us+f3"))]
    calibration = [Voice("cal-a", "espeak", "en-us", pitch=2.0), Voice("cal-b", "espeak", "en-gb", rate=1.1)]
    manifest = build_corpus(tmp_path, voices=voices, sentences=TINY_SENTENCES, calibration=calibration,
                            splits=("val", "calibration"), workers=1)
    rows = read_manifest(manifest)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("val", "calibration")}
    assert {r["split"] for r in rows} == {"val", "calibration"}  # no train/test clips were made
    assert len(list((tmp_path / "audio").rglob("*.flac"))) == len(rows)
    assert sorted(r["speaker"] for r in by_split["calibration"]) == ["cal-a", "cal-b"]
    assert {r["text"] for r in by_split["calibration"]} == {r["text"] for r in by_split["val"]} != set()
    full = read_manifest(build_corpus(tmp_path / "full", voices=voices, sentences=TINY_SENTENCES, workers=1))
    assert [r for r in full if r["split"] == "val"] == by_split["val"]
    assert "calibration" not in {r["split"] for r in full}  # one's own voices: no calibration by default
    with pytest.raises(ValueError, match="splits must be some of"):
        build_corpus(tmp_path, voices=voices, sentences=TINY_SENTENCES, splits=("dev",))


def test_default_calibration_speakers_are_new_draws_of_every_kind():
    voices, calibration = default_voices(0), calibration_voices(0)
    assert calibration == calibration_voices(0)
    assert [(v.engine, v.model, v.degradations) for v in calibration] == [
        (v.engine, v.model, v.degradations) for v in voices]
    assert all(c.name == f"cal-{v.name}" for c, v in zip(calibration, voices))
    drawn = {(v.pitch, v.rate) for v in voices}
    assert sum((c.pitch, c.rate) not in drawn for c in calibration) >= len(voices) - 2
    assert [c.atypical for c in calibration] == [v.atypical for v in voices]


def test_default_speakers_and_their_split():
    voices = default_voices(0)
    assert voices == default_voices(0) and voices != default_voices(1)
    assert len({v.name for v in voices}) == len(voices) >= 20
    assert {v.engine for v in voices} == set(corpus.ENGINES)
    assert sum(v.engine != "espeak" for v in voices) >= len(voices) / 3  # natural voices matter
    for seed in range(10):
        voices = default_voices(seed)
        split = split_speakers(voices, seed)
        held = [v for v, s in zip(voices, split) if s == "test"]
        assert split.count("val") >= 2 and len(held) >= 3
        assert any(v.atypical for v in held) and not all(v.atypical for v in held)
        assert {v.engine for v, s in zip(voices, split) if s == "train"} == set(corpus.ENGINES)


def test_text_lists_we_own():
    sentences = load_sentences()
    commands = [s for s in sentences if s.intent]
    questions = [s for s in sentences if not s.intent]
    assert len(commands) >= 240 and len(questions) >= 240
    assert len({s.intent for s in commands}) >= 20
    assert len({s.text.lower() for s in sentences}) == len(sentences)
    for s in sentences:
        assert s.text.isascii() and not re.search(r"\d", s.text), s.text
    vocabulary = {w for s in sentences for w in re.findall(r"[a-z']+", s.text.lower())}
    assert len(vocabulary) >= 800  # text diversity is the bottleneck (docs/design.md section 4)


def test_demo_wav_has_the_segments_it_reports(demo_file):
    path, segments = demo_file
    audio, rate = sf.read(path, dtype="float32")
    info = sf.info(path)
    assert (rate, audio.ndim, info.subtype) == (SAMPLE_RATE, 1, "FLOAT")
    assert [s["text"] for s in segments] == list(corpus.DEMO_SENTENCES)
    assert segments[0]["start_s"] == pytest.approx(corpus.DEMO_LEAD_IN_S, abs=0.01)
    for before, after in zip(segments, segments[1:]):
        assert after["start_s"] - before["end_s"] == pytest.approx(corpus.DEMO_GAP_S, abs=0.01)
    assert audio.size / rate == pytest.approx(segments[-1]["end_s"] + corpus.DEMO_GAP_S, abs=0.01)
    edges = [0.0] + [t for s in segments for t in (s["start_s"], s["end_s"])] + [audio.size / rate]
    for i, (start, end) in enumerate(zip(edges, edges[1:])):
        part = audio[round((start + 0.005) * rate):round((end - 0.005) * rate)]  # times are in ms
        if i % 2:  # speech
            assert 0.5 < end - start < 5 and np.sqrt(np.mean(part ** 2)) > 0.02
        else:      # silence
            assert np.abs(part).max() == 0.0


def test_demo_wav_takes_own_sentences(tmp_path):
    segments = make_demo_wav(tmp_path / "demo.flac", ["Stop.", "Come here."])
    assert [s["text"] for s in segments] == ["Stop.", "Come here."]
    assert sf.info(tmp_path / "demo.flac").format == "FLAC"


def test_cli_builds_and_summarises(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "default_voices", lambda seed: TINY_VOICES[:1] + [
        dataclasses.replace(TINY_VOICES[0], name="tiny-espeak-2", model="en-us+m3")])
    assert corpus.main(["--out", str(tmp_path), "--sentences", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train:\s+\d+ clips", out) and str(tmp_path / "manifest.csv") in out
    assert len(read_manifest(tmp_path / "manifest.csv")) == 3 + 1  # 1 speaker x 3, 1 x 1


def test_cli_reports_missing_text_lists(tmp_path, capsys):
    assert corpus.main(["--out", str(tmp_path / "c"), "--data", str(tmp_path)]) == 2
    assert "commands.tsv" in capsys.readouterr().err


def test_cli_refuses_unknown_splits(tmp_path, capsys):
    assert corpus.main(["--out", str(tmp_path / "c"), "--splits", "test,dev"]) == 2
    assert "splits must be some of" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
