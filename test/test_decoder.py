"""Our PyTorch Whisper decoder against CTranslate2 (faster-whisper) on real and synthetic speech."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyalign_ros.core.audio import load_audio
from tinyalign_ros.core.decoder import (EOT, NO_TIMESTAMPS, SOT, decode_text, encode_text, load_whisper_decoder,
                                        looks_looped, max_tokens_for, repeats_itself)
from tinyalign_ros.core.encoder import WeightLoadError, load_whisper_encoder, log_mel

REAL = ["/usr/share/pocketsphinx/test/data/cards/001.wav",
        "/usr/share/pocketsphinx/test/data/cards/005.wav",
        "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav",
        "/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0880.wav"]


@pytest.fixture(scope="module")
def whisper():
    return load_whisper_encoder(), load_whisper_decoder()


@pytest.fixture(scope="module")
def ct2_fp32():
    from faster_whisper import WhisperModel

    from tinyalign_ros.core.models import whisper_tiny_dir

    return WhisperModel(str(whisper_tiny_dir()), device="cpu", compute_type="float32", cpu_threads=2)


def ct2_tokens(model, samples: np.ndarray) -> list[int]:
    segments, _ = model.transcribe(samples, language="en", beam_size=1, temperature=0, vad_filter=False,
                                   condition_on_previous_text=False, without_timestamps=True)
    return [t for s in segments for t in s.tokens]


def ours(whisper, samples: np.ndarray) -> list[int]:
    encoder, decoder = whisper
    with torch.no_grad():
        xa = encoder(log_mel(samples, pad_to_30s=True)).output
    return decoder.greedy(xa, max_tokens_for(samples.size / 16000))[0]


@pytest.mark.parametrize("path", REAL)
def test_greedy_tokens_equal_ctranslate2_on_real_speech(whisper, ct2_fp32, path):
    samples = load_audio(path)
    tokens = ours(whisper, samples)
    assert tokens == ct2_tokens(ct2_fp32, samples), decode_text(tokens)
    assert len(tokens) > 2


def test_greedy_tokens_equal_ctranslate2_on_synthetic_speech(whisper, ct2_fp32, speech_16k):
    tokens = ours(whisper, speech_16k)
    assert tokens and tokens == ct2_tokens(ct2_fp32, speech_16k)


def test_teacher_forced_logits_agree_with_the_cached_step_by_step_pass(whisper, speech_16k):
    encoder, decoder = whisper
    with torch.no_grad():
        xa = encoder(log_mel(speech_16k, pad_to_30s=True)).output
        seq = torch.tensor([[SOT, NO_TIMESTAMPS] + encode_text("turn left please") + [EOT]])
        full, _ = decoder(seq, xa)
        kv, caches, steps = decoder.cross_kv(xa), None, []
        for i in range(seq.shape[1]):
            logits, caches = decoder(seq[:, i:i + 1], kv, caches)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-3, rtol=1e-3)


def test_length_guard_and_loop_detector():
    assert max_tokens_for(1.0) == 18
    assert looks_looped("the " * 60)
    assert not looks_looped("Bring me the red cup from the kitchen, please.")
    assert decode_text(encode_text("Turn on the lights.")) == "Turn on the lights."


@pytest.mark.parametrize("text, looped", [
    ("Go up to the bedroom and wait there. Go up to the bedroom and wait", True),  # a short-window loop
    ("10 of clubs 10 of clubs 10 of", True),
    ("5 5 5 5 5 5", True),
    ("Bring me the red cup from the kitchen, please.", False),
    ("Go to the kitchen, then go to the hallway.", False),  # "go to the" once each with different words after
    ("No, no, stop.", False),
    ("", False),
])
def test_repetition_detector(text, looped):
    assert repeats_itself(text) is looped


def test_a_model_without_a_decoder_is_a_clear_error(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00")
    with pytest.raises(WeightLoadError, match="model.bin"):
        load_whisper_decoder(tmp_path)
