"""Speaker adapters inside Whisper: training, the personalizer's ASR round and its gate, the Recognizer.

Real tiny.en weights (they load in about a second); decoder-only adapters and a few steps, so each
test runs in seconds. Whether an adapter helps a voice is the benchmark's question
(`tinyalign bench personalize`), not these tests'.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import espeak
from tinyalign_ros.core.adapters import AdapterStore
from tinyalign_ros.core.asr_adapt import AsrAdaptConfig, AsrBase, make_optimizer, train_step
from tinyalign_ros.core.audio import load_audio
from tinyalign_ros.core.personalize import PersonalizeConfig, Personalizer
from tinyalign_ros.core.recognizer import AdapterMismatch, Recognizer
from tinyalign_ros.core.samples import SampleStore

SENTENCES = ["turn left", "go to the kitchen", "bring me a glass of water", "stop", "switch on the lights",
             "follow me", "what can you do", "turn right", "open the door", "come here", "go to the bedroom",
             "bring me the red cup"]


@dataclass
class FakeTranscript:
    text: str
    confidence: float = 0.9


class FixedTranscriber:
    """Stands in for faster-whisper: says the same thing for every utterance."""

    def __init__(self, text: str) -> None:
        self.text, self.calls = text, 0

    def transcribe(self, samples):
        self.calls += 1
        return FakeTranscript(self.text)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[tuple[np.ndarray, str]]:
    folder = tmp_path_factory.mktemp("asr_clips")
    return [(load_audio(espeak(text, folder / f"{i}.wav")), text) for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def base() -> AsrBase:
    return AsrBase()


DECODER_ONLY = AsrAdaptConfig(encoder_layers=0, lr=3e-3, batch=4)


def test_a_fresh_adapter_transcribes_exactly_as_the_base_model(base, clips):
    from tinyalign_ros.core.decoder import decode_text
    from tinyalign_ros.core.encoder import log_mel

    encoder, decoder = base.parts()
    model = base.model(AsrAdaptConfig(encoder_layers=1))
    audio = clips[2][0]
    with torch.no_grad():
        tokens, _ = decoder.greedy(encoder(log_mel(audio, pad_to_30s=True)).output, 40)
    assert model.transcribe(audio)[0] == decode_text(tokens)
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"encoder", "decoder"}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_training_teaches_the_decoder_a_speakers_words(base, clips):
    """Labels the model cannot have heard (the audio says something else) are learned in a few steps:
    the loss falls and the adapter's transcript follows the label, the base's does not."""
    torch.manual_seed(0)  # LoRA's A matrices are drawn when the model is built
    model = base.model(DECODER_ONLY)
    items = [(audio, "purple elephants dance quietly") for audio, _ in clips[:4]]
    data = model.prepare(items)
    opt, rng = make_optimizer(model), random.Random(0)
    with torch.no_grad():
        first = float(model.loss(data, [0, 1, 2, 3]))
    for step in range(12):
        train_step(model, opt, data, [0, 1, 2, 3], step, rng)
    with torch.no_grad():
        last = float(model.loss(data, [0, 1, 2, 3]))
    assert last < 0.3 * first, (first, last)
    label = {"purple", "elephants", "dance", "quietly"}
    assert label & set(model.transcribe(clips[0][0])[0].lower().strip(".").split())
    assert not label & set(base.model(DECODER_ONLY).transcribe(clips[0][0])[0].lower().strip(".").split())


def test_an_encoder_only_adapter_is_decoded_by_faster_whispers_own_model(base, clips):
    """The default adapter (top encoder blocks only) hands its encoder output to CTranslate2's decoder:
    a fresh one writes what our PyTorch decoder writes, a trained one what it was taught (so the
    adapted encoder output is what CTranslate2 decodes), and the Recognizer shares faster-whisper's
    model instead of loading a second Whisper."""
    from tinyalign_ros.core.asr import WhisperTranscriber

    cfg = AsrAdaptConfig(encoder_layers=2, decoder=False, lr=3e-3, batch=4)
    torch.manual_seed(0)
    model, reference = base.model(cfg), base.model(cfg)
    reference.fast = None  # our PyTorch decoder
    assert model.fast is not None
    for audio, _ in clips[:6]:
        assert model.transcribe(audio)[0] == reference.transcribe(audio)[0]
    data = model.prepare([(audio, "purple elephants dance quietly") for audio, _ in clips[:4]])
    opt, rng = make_optimizer(model), random.Random(0)
    for step in range(12):
        train_step(model, opt, data, [0, 1, 2, 3], step, rng)
    label = {"purple", "elephants", "dance", "quietly"}
    assert label & set(model.transcribe(clips[0][0])[0].lower().strip(".").split())
    whisper = WhisperTranscriber(threads=1)
    assert Recognizer(whisper).base.whisper() is whisper.model.model
    assert Recognizer(FixedTranscriber("")).base.whisper() is not None  # loads its own when it must


@pytest.fixture(scope="module")
def trained(base, clips, tmp_path_factory) -> tuple[AdapterStore, int]:
    """An ASR adapter of speaker "alice" in a store, trained to say "purple elephants"."""
    torch.manual_seed(0)
    model = base.model(DECODER_ONLY)
    data = model.prepare([(audio, "purple elephants") for audio, _ in clips[:4]])
    opt, rng = make_optimizer(model), random.Random(0)
    for step in range(12):
        train_step(model, opt, data, [0, 1, 2, 3], step, rng)
    store = AdapterStore(tmp_path_factory.mktemp("adapters"))
    info = store.save("alice", model.adapter_state(), base_hashes={"whisper": base.sha},
                      extra=DECODER_ONLY.metadata())
    return store, info.version


def test_recognizer_uses_the_speakers_adapter_and_the_base_for_everyone_else(base, clips, trained):
    store, version = trained
    whisper = FixedTranscriber("from faster whisper")
    recognizer = Recognizer(whisper, base=base)
    recognizer.set_adapter("alice", store.load("alice", version))
    alice = recognizer.recognize(clips[5][0], "alice")
    assert alice.source == "adapter" and alice.adapter_version == version
    assert "elephant" in alice.text.lower() and 0.0 < alice.confidence <= 1.0
    for other in ("", "bob"):
        heard = recognizer.recognize(clips[5][0], other)
        assert (heard.source, heard.text, heard.adapter_version) == ("whisper", "from faster whisper", 0)
    assert recognizer.drop_adapter("alice") and recognizer.recognize(clips[5][0], "alice").source == "whisper"
    assert recognizer.adapted_speakers == {}


def test_an_adapter_for_another_whisper_or_of_another_kind_is_refused(base, trained, tmp_path):
    store, version = trained
    good = store.load("alice", version)
    recognizer = Recognizer(FixedTranscriber(""), base=base)
    other = AdapterStore(tmp_path)
    foreign = other.load("bob", other.save("bob", good.tensors, base_hashes={"whisper": "0" * 64},
                                           extra=good.info.extra).version)
    with pytest.raises(AdapterMismatch, match="another Whisper"):
        recognizer.set_adapter("bob", foreign)
    projector = other.load("carol", other.save("carol", good.tensors, base_hashes={"projector": "x"},
                                               extra={"kind": "lora"}).version)
    with pytest.raises(AdapterMismatch, match="not an ASR one"):
        recognizer.set_adapter("carol", projector)
    wrong_shape = other.load("dave", other.save("dave", {"x.lora_A.weight": torch.zeros(2, 2)},
                                                base_hashes={"whisper": base.sha}, extra=good.info.extra).version)
    with pytest.raises(AdapterMismatch, match="does not fit"):
        recognizer.set_adapter("dave", wrong_shape)
    assert recognizer.adapted_speakers == {}


def _store(tmp_path, clips, n: int = 10) -> SampleStore:
    samples = SampleStore(tmp_path / "samples", clock=lambda: 1.8e9)  # fixed ids: the same split every run
    samples.grant_consent("alice")
    for i, (audio, text) in enumerate(clips[:n]):
        samples.add("alice", torch.zeros(1, 4), text, "enrollment", utterance_id=f"u{i}", audio=audio)
    return samples


def _personalizer(tmp_path, samples, cascade: str, **cfg) -> Personalizer:
    config = PersonalizeConfig(**{"kind": "asr", "max_steps": 2, "min_samples": 4, "asr_encoder_layers": 0,
                                  "asr_decoder": True, "asr_batch": 4, "gate_min_words": 1, "nice": 0, "threads": 0, **cfg})
    return Personalizer(None, samples, AdapterStore(tmp_path / "adapters"), tmp_path / "work", "",
                        config, asr=AsrBase(transcriber=FixedTranscriber(cascade)))


def test_asr_round_saves_an_adapter_that_beats_the_cascade_on_held_out_samples(tmp_path, clips):
    trainer = _personalizer(tmp_path, _store(tmp_path, clips), cascade="")  # the cascade hears nothing
    result = trainer.run("alice")
    assert result.status == "saved", result.message
    assert result.val_wer_before == 1.0 and result.val_wer_after < 1.0
    adapter = trainer.latest_asr_adapter("alice")
    assert adapter.info.extra["kind"] == "asr" and adapter.info.extra["encoder_layers"] == 0
    assert adapter.info.base_hashes == {"whisper": trainer.asr.sha}
    assert adapter.info.path.stat().st_size < 5e6  # the bound on an adapter
    assert result.n_train + result.n_val == 10


def test_asr_gate_keeps_the_cascade_when_the_candidate_is_not_better(tmp_path, clips):
    samples = _store(tmp_path, clips)
    _, held = samples.split("alice", 0.2, 2)
    trainer = _personalizer(tmp_path, samples, cascade="unused")
    refs = iter([info.text for info in held])
    trainer.asr.cascade = lambda audio: next(refs)  # the cascade is perfect on the held-out samples
    result = trainer.run("alice")
    assert result.status == "rejected" and result.val_wer_before == 0.0, result.message
    assert trainer.latest_asr_adapter("alice") is None


def test_asr_gate_refuses_to_judge_on_too_few_held_out_words(tmp_path, clips):
    trainer = _personalizer(tmp_path, _store(tmp_path, clips), cascade="", gate_min_words=500)
    result = trainer.run("alice")
    assert result.status == "rejected" and "held-out words" in result.message
    assert trainer.latest_asr_adapter("alice") is None


def test_samples_without_audio_do_not_count_for_an_asr_round(tmp_path, clips):
    samples = SampleStore(tmp_path / "samples")
    samples.grant_consent("alice")
    for i, (_, text) in enumerate(clips[:10]):
        samples.add("alice", torch.zeros(1, 4), text, "enrollment", utterance_id=f"u{i}")
    result = _personalizer(tmp_path, samples, cascade="").run("alice")
    assert result.status == "too_few_samples" and "with audio" in result.message


def test_a_stopped_asr_round_resumes_from_its_checkpoint(tmp_path, clips):
    trainer = _personalizer(tmp_path, _store(tmp_path, clips), cascade="", max_steps=4)
    seen = []

    def stop_after_two(progress) -> None:
        seen.append(progress.step)
        if progress.phase == "training" and progress.step == 2:
            trainer._stop.set()

    result = trainer.run("alice", on_progress=stop_after_two)
    assert result.status == "preempted" and result.steps == 2 and trainer.has_checkpoint("alice")
    trainer._stop.clear()
    again = trainer.run("alice")
    assert again.resumed_from_step == 2 and again.steps == 4 and again.status == "saved", again.message
    assert not trainer.has_checkpoint("alice")


def test_config_is_validated():
    with pytest.raises(ValueError):
        AsrAdaptConfig(encoder_layers=0, decoder=False)
    with pytest.raises(ValueError):
        AsrAdaptConfig(time_mask=0.7)
    cfg = AsrAdaptConfig(rank=4, encoder_layers=3)
    assert AsrAdaptConfig.from_metadata(cfg.metadata()) == AsrAdaptConfig(rank=4, alpha=cfg.alpha, encoder_layers=3)


# --------------------------------------------------------------------------- Tiny-Align end to end (kind e2e)
def _e2e_personalizer(tmp_path, samples, cascade, tiny_llm, tokenizer, **cfg) -> Personalizer:
    from tinyalign_ros.core.align import AlignedLLM
    from tinyalign_ros.core.projector import build_projector

    torch.manual_seed(1)
    projector = build_projector("mlp", in_dim=384, out_dim=64, stack=4, hidden=32)  # tiny.en frames -> the tiny LLM
    aligned = AlignedLLM(tiny_llm, tokenizer, projector, max_new_tokens=3)
    config = PersonalizeConfig(**{"kind": "e2e", "max_steps": 2, "min_samples": 4, "asr_encoder_layers": 1,
                                  "asr_batch": 4, "e2e_llm_chunk": 2, "gate_min_words": 1, "gate_confidence": 0.0,
                                  "max_new_tokens": 3, "nice": 0, "threads": 0, **cfg})
    return Personalizer(aligned, samples, AdapterStore(tmp_path / "adapters"), tmp_path / "work", "base-sha",
                        config, asr=AsrBase(transcriber=FixedTranscriber(cascade), fast_decoding=False))


def test_an_e2e_round_trains_whisper_and_projector_through_both_losses_into_one_adapter(
        tmp_path, clips, tiny_llm, tokenizer, monkeypatch):
    from tinyalign_ros.core.personalize import apply_adapter

    trainer = _e2e_personalizer(tmp_path, _store(tmp_path, clips), "", tiny_llm, tokenizer)
    # a random LLM repeats nothing: let the aligned assistant's text be the transcript it is anchored to,
    # so that the gate (which judges that text) sees the adapted Whisper's gain over a deaf cascade
    monkeypatch.setattr(trainer, "aligned_texts", lambda projector, features, heard: list(heard))
    losses = []
    result = trainer.run("alice", on_progress=lambda p: losses.append(p.loss))
    assert result.status == "saved", result.message
    assert result.val_transcript_wer[0] == 1.0 and result.val_transcript_wer[1] < 1.0
    adapter = trainer.latest_asr_adapter("alice")
    assert adapter.info.extra["kind"] == "e2e"
    assert adapter.info.base_hashes == {"whisper": trainer.asr.sha, "projector": "base-sha"}
    asr_keys = [k for k in adapter.tensors if k.startswith("asr.")]
    projector_keys = [k for k in adapter.tensors if k.startswith("projector.")]
    assert asr_keys and projector_keys and len(asr_keys) + len(projector_keys) == len(adapter.tensors)
    # LoRA B starts at zero: only the LLM's loss can have moved the projector's
    assert any(float(v.abs().max()) > 0 for k, v in adapter.tensors.items() if k.startswith("projector.")
               and "lora_B" in k)
    # the assistant's projector for this speaker differs from the base
    frames = torch.randn(1, 12, 384)
    base = trainer.base
    assert not torch.allclose(apply_adapter(base, adapter)(frames, torch.tensor([12]))[0],
                              base(frames, torch.tensor([12]))[0])
    # asr_node's Recognizer takes it: the adapted transcript, and the adapted last-layer features
    from tinyalign_ros.core.encoder import load_whisper_encoder, speech_frames

    encoder = load_whisper_encoder()
    recognizer = Recognizer(FixedTranscriber("from faster whisper"), encoder=encoder, base=trainer.asr)
    audio = clips[5][0]
    plain = recognizer.recognize(audio, "bob")
    recognizer.set_adapter("alice", adapter)
    alice = recognizer.recognize(audio, "alice")
    assert alice.source == "adapter" and alice.adapter_version == adapter.info.version
    assert alice.encoded.layer == encoder.n_layers and alice.encoded.features.shape == plain.encoded.features.shape
    assert alice.encoded.features.shape[0] == speech_frames(audio.size)
    assert not torch.allclose(alice.encoded.features, plain.encoded.features)
    assert recognizer.drop_adapter("alice")
    assert torch.allclose(recognizer.recognize(audio, "alice").encoded.features, plain.encoded.features)


def test_a_fresh_e2e_adapter_gives_the_base_encoders_features(base, clips):
    from tinyalign_ros.core.early_exit import FULL_DEPTH, encode_utterance
    from tinyalign_ros.core.encoder import load_whisper_encoder

    model = base.model(AsrAdaptConfig(encoder_layers=2, decoder=False))
    audio = clips[2][0]
    expected = encode_utterance(load_whisper_encoder(), None, FULL_DEPTH, audio).features
    assert torch.allclose(model.features(audio), expected, atol=1e-4)


def test_the_e2e_gate_refuses_a_candidate_whose_transcripts_got_worse(tmp_path, clips, tiny_llm, tokenizer,
                                                                      monkeypatch):
    samples = _store(tmp_path, clips)
    _, held = samples.split("alice", 0.2, 2)
    trainer = _e2e_personalizer(tmp_path, samples, "", tiny_llm, tokenizer)
    refs = iter([info.text for info in held])
    trainer.asr.cascade = lambda audio: next(refs)  # the cascade is perfect on the held-out samples
    # ...and the aligned assistant's text is better after the round than before: only the transcripts can refuse
    calls = []

    def texts(projector, features, heard):
        calls.append(len(calls))
        return ["x"] * len(heard) if len(calls) == 1 else [info.text for info in held]

    monkeypatch.setattr(trainer, "aligned_texts", texts)
    # a learning rate that wrecks the decoder's LoRA in two steps
    trainer.config = PersonalizeConfig(**{**trainer.config.__dict__, "lr": 0.3, "asr_decoder": True})
    result = trainer.run("alice")
    assert result.val_wer_after == 0.0 < result.val_wer_before
    assert result.val_transcript_wer[1] > result.val_transcript_wer[0] == 0.0
    assert result.status == "rejected" and "transcripts got worse" in result.message, result.message
    assert trainer.latest_asr_adapter("alice") is None


def test_e2e_adapters_for_another_base_projector_are_not_continued(tmp_path, clips, tiny_llm, tokenizer):
    trainer = _e2e_personalizer(tmp_path, _store(tmp_path, clips), "", tiny_llm, tokenizer)
    trainer.adapters.save("alice", {"asr.x": torch.zeros(1)}, base_hashes={"whisper": trainer.asr.sha,
                                                                        "projector": "other"},
                          extra={"kind": "e2e"})
    assert trainer.latest_asr_adapter("alice") is None
    with pytest.raises(ValueError, match="e2e_llm_chunk"):
        PersonalizeConfig(kind="e2e", e2e_llm_chunk=0)
