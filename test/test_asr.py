"""faster-whisper transcription (core/asr.py): the speech window against the full 30 s window."""
from __future__ import annotations

import numpy as np
import pytest

from tinyalign_ros.core.asr import WhisperTranscriber
from tinyalign_ros.core.audio import SAMPLE_RATE
from tinyalign_ros.core.metrics import normalize_text

REAL = "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav"


@pytest.fixture(scope="module")
def speech_window():
    return WhisperTranscriber(temperature=0.0)


@pytest.fixture(scope="module")
def full_window():
    return WhisperTranscriber(temperature=0.0, window="full")


def test_the_speech_window_writes_what_the_full_window_writes(speech_window, full_window, speech_16k):
    from tinyalign_ros.core.audio import load_audio

    speech_window.speech_windows = speech_window.window_fallbacks = 0
    for samples in [speech_16k, load_audio(REAL)]:  # espeak, and a real recording (~5 s)
        short, full = speech_window.transcribe(samples), full_window.transcribe(samples)
        assert normalize_text(short.text) == normalize_text(full.text) != ""
        assert 0.5 < short.confidence <= 1.0
    assert (speech_window.speech_windows, speech_window.window_fallbacks) == (2, 0)
    assert full_window.speech_windows == 0


def test_a_decode_that_fails_a_check_is_done_on_the_full_window(speech_window, full_window, speech_16k, monkeypatch):
    import tinyalign_ros.core.decoder as decoder

    monkeypatch.setattr(decoder, "repeats_itself", lambda text: True)  # as if the short decode had looped
    speech_window.speech_windows = speech_window.window_fallbacks = 0
    assert speech_window.transcribe(speech_16k) == full_window.transcribe(speech_16k)
    assert (speech_window.speech_windows, speech_window.window_fallbacks) == (1, 1)


def test_forced_words_start_the_speech_window_transcript(speech_window, speech_16k):
    """Knowledge boosting's text hint (core/boost.py): the forced words, then what Whisper decodes."""
    speech_window.window_fallbacks = 0
    assert normalize_text(speech_window.transcribe(speech_16k, prefix="Please").text) == "please turn left"
    steered = normalize_text(speech_window.transcribe(speech_16k, prefix="Please burn").text)
    assert steered.startswith("please burn") and steered.count("please") == 1
    assert speech_window.window_fallbacks == 0


def test_an_utterance_near_30_s_goes_to_the_full_window(speech_window, speech_16k):
    long = np.zeros(27 * SAMPLE_RATE, dtype=np.float32)
    long[:speech_16k.size] = speech_16k
    speech_window.speech_windows = 0
    assert normalize_text(speech_window.transcribe(long).text) == "please turn left"
    assert speech_window.speech_windows == 0  # 27 s + the margin is no shorter than Whisper's window


@pytest.mark.parametrize("kwargs, message", [({"window": "short"}, "window must be one of speech, full"),
                                              ({"margin_s": 0.0}, "margin must be between 0 and 30 s")])
def test_bad_window_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WhisperTranscriber(**kwargs)


def test_bench_whisper_measures_both_windows(tmp_path):
    import json

    from tinyalign_ros.bench.whisper import main

    assert main(["--out", str(tmp_path), "--split", "dev", "--voices", "1", "--limit", "2", "--no-real"]) == 0
    figures = json.loads((tmp_path / "whisper.json").read_text())
    (voice, entry), = figures["sets"].items()
    assert entry["n"] == 2 and set(figures["windows"]) == {"speech", "full"}
    for window in ("speech", "full"):
        assert 0.0 <= entry[window]["wer"] < 0.5 and entry[window]["seconds_p50"] > 0
    assert 0.0 <= entry["speech"]["redone_on_full_window"] <= 1.0
    assert (tmp_path / "whisper.png").stat().st_size > 0
