"""StreamingSegmenter on real (espeak-ng) speech: boundaries, chunking, limits, bad input."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tinyalign_ros.core.vad import Segment, StreamingSegmenter, VadConfig

SR = 16000
PAD_S = VadConfig().speech_pad_ms / 1000
TOLERANCE_S = 0.3  # VAD decisions are per 32 ms window and silero lags speech edges a little
LONG_TEXT = ("the robot walked slowly down the long hallway and then it turned left at the kitchen "
             "door and picked up the red cup from the table and carried it back to the living room")


def synthesize(text: str, folder: Path, name: str) -> np.ndarray:
    """espeak-ng speech, resampled by sox to 16 kHz mono float32 and trimmed to the voice, so
    the clip's first and last samples are the true speech boundaries."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install {tool} (make test installs it)")
    raw, wav = folder / f"{name}_raw.wav", folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(SR), "-c", "1", "-b", "32", "-e", "floating-point", str(wav)],
                   check=True)
    audio, rate = sf.read(str(wav), dtype="float32")
    assert rate == SR and audio.ndim == 1
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[loud[0]:loud[-1] + 1]


def quiet(seconds: float, seed: int = 0) -> np.ndarray:
    """Room-like background (not digital zero, which would make the VAD's job unrealistically easy)."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 1e-3).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("vad_speech")
    return {
        "first": synthesize("Hello robot, please bring me a cup of tea from the kitchen.", folder, "first"),
        "second": synthesize("What time is it now?", folder, "second"),
        "long": synthesize(LONG_TEXT, folder, "long"),
    }


@pytest.fixture(scope="module")
def two_utterances(clips) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """silence + utterance + silence + utterance + silence, and the true speech spans (s)."""
    parts, truth, t = [], [], 0.0
    for i, clip in enumerate((clips["first"], clips["second"])):
        parts += [quiet(1.5, seed=i), clip]
        truth.append((t + 1.5, t + 1.5 + len(clip) / SR))
        t = truth[-1][1]
    parts.append(quiet(1.5, seed=9))
    return np.concatenate(parts), truth


def stream(segmenter: StreamingSegmenter, audio: np.ndarray, chunk: int,
           stamp_s: float | None = None) -> list[Segment]:
    """Push `audio` in chunks of `chunk` samples (stamping the first one only)."""
    out: list[Segment] = []
    for i in range(0, len(audio), chunk):
        out += segmenter.push(audio[i:i + chunk], stamp_s if i == 0 else None)
    return out


def assert_same(got: list[Segment], want: list[Segment]) -> None:
    def times(segments: list[Segment]) -> list[tuple[float, float, bool]]:
        return [(s.start_s, s.end_s, s.truncated) for s in segments]

    assert times(got) == times(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.samples, w.samples)


@pytest.fixture(scope="module")
def reference(two_utterances) -> list[Segment]:
    """The whole stream in one push: what every other chunking must reproduce."""
    audio, _ = two_utterances
    return StreamingSegmenter().push(audio)


def test_two_utterances_match_the_truth(two_utterances):
    audio, truth = two_utterances
    segmenter = StreamingSegmenter()
    segments = stream(segmenter, audio, 512, stamp_s=100.0)
    assert len(segments) == 2
    for seg, (start, end) in zip(segments, truth):
        assert seg.start_s == pytest.approx(100.0 + start - PAD_S, abs=TOLERANCE_S)
        assert seg.end_s == pytest.approx(100.0 + end + PAD_S, abs=TOLERANCE_S)
        assert not seg.truncated
        assert seg.samples.dtype == np.float32
        first = round((seg.start_s - 100.0) * SR)
        np.testing.assert_array_equal(seg.samples, audio[first:first + round((seg.end_s - seg.start_s) * SR)])
    assert segments[0].end_s <= segments[1].start_s
    assert not segmenter.in_speech
    assert segmenter.flush() == []


@pytest.mark.parametrize("chunk", [160, 512, 1600, 16000])
def test_chunk_size_does_not_change_the_result(two_utterances, reference, chunk):
    audio, _ = two_utterances
    assert len(reference) == 2
    assert_same(stream(StreamingSegmenter(), audio, chunk), reference)


def test_random_chunk_sizes_do_not_change_the_result(two_utterances, reference):
    audio, _ = two_utterances
    sizes = np.random.default_rng(0).integers(1, 5000, size=len(audio))
    bounds = np.cumsum(sizes)
    bounds = np.concatenate([[0], bounds[bounds < len(audio)], [len(audio)]])
    segmenter = StreamingSegmenter()
    segments = [s for lo, hi in zip(bounds, bounds[1:]) for s in segmenter.push(audio[lo:hi])]
    assert_same(segments, reference)


@pytest.mark.parametrize("background", ["zeros", "low noise"])
def test_silence_and_noise_give_no_segment(background):
    audio = np.zeros(10 * SR, np.float32) if background == "zeros" else quiet(10.0) * 5
    segmenter = StreamingSegmenter()
    assert stream(segmenter, audio, 1600) == []
    assert not segmenter.in_speech
    assert segmenter.flush() == []


def test_flush_emits_the_trailing_utterance(clips):
    clip = clips["first"]
    audio = np.concatenate([quiet(1.0), clip])
    segmenter = StreamingSegmenter()
    assert stream(segmenter, audio, 1000) == []  # the speech never ended
    assert segmenter.in_speech
    segments = segmenter.flush()
    assert len(segments) == 1
    assert segments[0].start_s == pytest.approx(1.0 - PAD_S, abs=TOLERANCE_S)
    assert segments[0].end_s == pytest.approx(len(audio) / SR)  # includes the partial last window
    assert not segments[0].truncated
    assert segmenter.flush() == []
    assert not segmenter.in_speech


def test_max_utterance_cuts_long_speech_into_truncated_segments(clips):
    clip = clips["long"]
    assert len(clip) / SR > 9.0, "the long sentence should be long enough for three cuts"
    audio = np.concatenate([quiet(1.0), clip, quiet(1.5)])
    segments = stream(StreamingSegmenter(VadConfig(max_utterance_s=3.0)), audio, 1600)
    assert len(segments) >= 3
    assert all(s.truncated for s in segments[:-1]) and not segments[-1].truncated
    assert all(len(s.samples) <= 3.0 * SR for s in segments)
    for before, after in zip(segments, segments[1:]):
        assert after.start_s == before.end_s  # a cut loses and repeats nothing
    assert segments[0].start_s == pytest.approx(1.0 - PAD_S, abs=TOLERANCE_S)
    assert segments[-1].end_s == pytest.approx(1.0 + len(clip) / SR + PAD_S, abs=TOLERANCE_S)


def test_memory_stays_bounded_over_a_minute_of_speech(clips):
    clip = clips["long"]
    audio = np.tile(clip, int(np.ceil(60 * SR / len(clip))))[: 60 * SR]
    config = VadConfig(max_utterance_s=5.0)
    limit = int((config.max_utterance_s + config.speech_pad_ms / 1000) * SR)
    segmenter = StreamingSegmenter(config)
    segments: list[Segment] = []
    for i in range(0, len(audio), 1600):
        segments += segmenter.push(audio[i:i + 1600])
        assert segmenter.buffered_samples <= limit
    assert sum(s.truncated for s in segments) >= 10  # the limit was really reached, many times


@pytest.mark.parametrize("bad, message", [
    (np.array([0.0, np.nan, 0.0], np.float32), "NaN"),
    (np.array([0.0, np.inf], np.float32), "NaN/Inf"),
    (np.zeros((2, 800), np.float32), "1-D"),
    (np.zeros(800, np.int16), "float32"),
    (np.zeros(800, np.float64), "float32"),
    ([0.0] * 800, "numpy array"),
])
def test_bad_input_raises_and_leaves_the_stream_intact(two_utterances, reference, bad, message):
    audio, _ = two_utterances
    half = len(audio) // 2
    segmenter = StreamingSegmenter()
    segments = stream(segmenter, audio[:half], 1600)
    with pytest.raises(ValueError, match=message):
        segmenter.push(bad)
    segments += stream(segmenter, audio[half:], 1600)
    assert_same(segments, reference)


def test_non_finite_stamp_raises():
    with pytest.raises(ValueError, match="stamp_s"):
        StreamingSegmenter().push(np.zeros(512, np.float32), float("nan"))


def test_min_speech_drops_short_bursts(two_utterances):
    audio, _ = two_utterances
    assert stream(StreamingSegmenter(VadConfig(min_speech_ms=5000)), audio, 1600) == []


def test_small_stamp_jitter_is_ignored(two_utterances, reference):
    audio, _ = two_utterances
    rng = np.random.default_rng(1)
    segmenter = StreamingSegmenter()
    segments: list[Segment] = []
    for i in range(0, len(audio), 1600):
        segments += segmenter.push(audio[i:i + 1600], i / SR + rng.uniform(-0.02, 0.02) * (i > 0))
    assert_same(segments, reference)


def test_stamp_gap_closes_the_open_utterance_and_reanchors_the_clock(two_utterances):
    audio, truth = two_utterances
    split = int((truth[0][0] + 1.0) * SR)  # one second into the first utterance
    segmenter = StreamingSegmenter()
    assert segmenter.push(audio[:split], 0.0) == []
    assert segmenter.in_speech
    segments = segmenter.push(audio[split:], 30.0)  # 30 s later on the clock: audio was lost
    assert len(segments) == 3
    assert segments[0].end_s == pytest.approx(split / SR)  # ends where the audio stopped
    assert segments[0].start_s == pytest.approx(truth[0][0] - PAD_S, abs=TOLERANCE_S)
    assert not segments[0].truncated
    assert all(s.start_s >= 30.0 for s in segments[1:])  # the tail and the second utterance
    assert segments[2].start_s == pytest.approx(30.0 + truth[1][0] - split / SR - PAD_S, abs=TOLERANCE_S)


def test_reset_forgets_the_stream(two_utterances, reference):
    audio, truth = two_utterances
    segmenter = StreamingSegmenter()
    segmenter.push(audio[: int((truth[0][0] + 1.0) * SR)], 50.0)
    assert segmenter.in_speech
    segmenter.reset()
    assert not segmenter.in_speech and segmenter.buffered_samples == 0
    assert_same(segmenter.push(audio), reference)  # clock back at 0, model state fresh


@pytest.mark.parametrize("kwargs", [
    {"threshold": 1.5}, {"min_silence_ms": -1},
    {"max_utterance_s": float("inf")}, {"speech_pad_ms": float("nan")},
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        VadConfig(**kwargs)


def test_unsupported_setup_raises():
    with pytest.raises(ValueError, match="16000 Hz"):
        StreamingSegmenter(sample_rate=8000)
    with pytest.raises(ValueError, match="too short"):
        StreamingSegmenter(VadConfig(max_utterance_s=0.3))
