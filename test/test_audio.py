"""Audio normalization: every kind of bad input gets a clear error or a documented repair."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from conftest import write
from tinyalign_ros.core.audio import SAMPLE_RATE, AudioError, chunks, load_audio, normalize


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused(bad):
    x = tone(0.1, SAMPLE_RATE)
    x[10] = bad
    with pytest.raises(AudioError, match="NaN/Inf"):
        normalize(x, SAMPLE_RATE)


def test_empty_audio_is_refused():
    with pytest.raises(AudioError, match="empty"):
        normalize(np.zeros(0, np.float32), SAMPLE_RATE)


def test_bad_rate_and_shape_are_refused():
    with pytest.raises(AudioError, match="sample rate"):
        normalize(tone(0.1, SAMPLE_RATE), 0)
    with pytest.raises(AudioError, match="shape"):
        normalize(np.zeros((2, 2, 2), np.float32), SAMPLE_RATE)


def test_int16_stereo_44k_becomes_16k_mono_float():
    mono = tone(1.0, 44100)
    stereo_int16 = (np.stack([mono, mono], axis=1) * 32767).astype(np.int16)
    out = normalize(stereo_int16, 44100)
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1
    assert out.resampled_from == 44100
    assert abs(out.samples.size - SAMPLE_RATE) <= 2
    # same tone: the amplitude survives scaling, channel averaging and resampling
    assert np.max(np.abs(out.samples)) == pytest.approx(0.5, abs=0.02)


def test_clipped_audio_is_clipped_and_counted():
    x = tone(0.1, SAMPLE_RATE) * 3
    out = normalize(x, SAMPLE_RATE)
    assert out.clipped > 0 and np.max(np.abs(out.samples)) <= 1.0


def test_load_audio_any_rate_and_channels(tmp_path):
    path = write(tmp_path / "a.flac", np.stack([tone(0.5, 22050)] * 2, axis=1), 22050)
    out = load_audio(path)
    assert out.dtype == np.float32 and abs(out.size - SAMPLE_RATE // 2) <= 2


def test_load_audio_errors_are_clear(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(tmp_path / "junk.wav")
    long = write(tmp_path / "long.wav", np.zeros(16000 * 5, np.float32), 16000)
    with pytest.raises(AudioError, match="more than"):
        load_audio(long, max_duration_s=2.0)


def test_ten_minute_file_loads_in_bounded_memory(tmp_path):
    path = tmp_path / "ten_min.flac"
    with sf.SoundFile(str(path), "w", samplerate=16000, channels=1, subtype="PCM_16") as f:
        for _ in range(10):
            f.write(tone(60.0, 16000))
    out = load_audio(path)
    assert out.size == 16000 * 600 and out.nbytes == 4 * 16000 * 600


def test_chunks_are_fixed_size_and_keep_every_sample():
    x = np.arange(1000, dtype=np.float32)
    parts = chunks(x, 300)
    assert [p.size for p in parts] == [300] * 4
    assert np.array_equal(np.concatenate(parts)[:1000], x)
    with pytest.raises(ValueError):
        chunks(x, 0)


def test_find_device_by_name_or_index_of_the_right_kind(monkeypatch):
    import sounddevice as sd

    from tinyalign_ros.core.audio import find_device

    devices = [{"name": "Mic In", "max_input_channels": 1, "max_output_channels": 0},
               {"name": "USB Speaker", "max_input_channels": 0, "max_output_channels": 2},
               {"name": "USB Headset", "max_input_channels": 1, "max_output_channels": 2}]
    monkeypatch.setattr(sd, "query_devices", lambda: devices)
    assert find_device("usb", "output") == 1 and find_device("usb", "input") == 2
    assert find_device("0", "input") == 0 and find_device(" ", "output") is None
    with pytest.raises(AudioError, match=r"no output audio device '0'; available output devices: 1: USB Speaker; 2"):
        find_device("0", "output")  # an input-only device is not an output
    with pytest.raises(AudioError, match="no input audio device 'speaker'; available input devices: 0: Mic In"):
        find_device("speaker", "input")
    monkeypatch.setattr(sd, "query_devices", lambda: devices[:1])
    with pytest.raises(AudioError, match="no output audio device ''; available output devices: none"):
        find_device("", "output")  # no default to fall back on
