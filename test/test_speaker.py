"""Speaker recognition with the real tiny.en encoder on synthesized voices, and the registry."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyalign_ros.core.adapters import InvalidSpeakerId
from tinyalign_ros.core.corpus import Voice, synthesize
from tinyalign_ros.core.speaker import (
    DEFAULT_LAYER,
    DEFAULT_THRESHOLDS,
    Background,
    Ge2eEmbedder,
    SpeakerEmbedder,
    SpeakerIdentifier,
    SpeakerRegistry,
    registry_backend,
    SpeakerRegistryError,
    embed,
    pool,
)

ENROLL = ("Turn on the lights in the living room.", "What time is it right now?",
          "Please open the door for me.")
TEST = ("Can you bring me my keys from the table?", "Stop moving and wait here.")
VOICES = {  # two enrolled speakers (different accents and sexes) and a stranger (another synthesizer)
    "alice": Voice("alice", "espeak", "en-gb+f2"),
    "bruno": Voice("bruno", "espeak", "en-gb-x-gbclan+m2", pitch=-1.0),
    "stranger": Voice("stranger", "festival", "kal_diphone"),
}
# Like the default background (default_voices(seed=1)), a mix of engines, none of them enrolled.
BACKGROUND_VOICES = [Voice(f"bg{i}", "espeak", m) for i, m in
                     enumerate(("en-us+m3", "en-029+f4", "en-gb-scotland+m1", "en-us+f5"))] + [
    Voice("bg-piper", "piper", "en_US-joe-medium", pitch=3.0), Voice("bg-slt", "festival", "cmu_us_slt_arctic_hts")]


@pytest.fixture(scope="module")
def embedder() -> SpeakerEmbedder:
    from tinyalign_ros.core.encoder import load_whisper_encoder

    torch.set_num_threads(2)
    return SpeakerEmbedder(load_whisper_encoder(), layer=DEFAULT_LAYER)


@pytest.fixture(scope="module")
def stats(embedder) -> dict[str, dict[str, list[torch.Tensor]]]:
    """Pooled statistics of every voice's enrollment and test sentences (~20 short clips)."""
    return {name: {"enroll": [embedder.stats(synthesize(t, v)) for t in ENROLL],
                   "test": [embedder.stats(synthesize(t, v)) for t in TEST]}
            for name, v in VOICES.items()}


@pytest.fixture(scope="module")
def background(embedder) -> Background:
    return embedder.background(BACKGROUND_VOICES)


@pytest.fixture
def registry(tmp_path, background, stats) -> SpeakerRegistry:
    reg = SpeakerRegistry(tmp_path / "speakers", background=background)
    for name in ("alice", "bruno"):
        reg.enroll(name, stats[name]["enroll"])
    return reg


def test_embedding_from_asr_hidden_states_matches(embedder, stats):
    """asr_node can reuse the hidden states it computed anyway: same statistics."""
    from tinyalign_ros.core.encoder import log_mel

    audio = synthesize(TEST[0], VOICES["alice"])
    with torch.inference_mode():
        hidden = embedder.encoder(log_mel(audio, pad_to_30s=False)).hidden_states
    frames = -(-audio.size // 320)
    assert torch.allclose(embedder.stats_from_hidden_states(hidden, frames), embedder.stats(audio), atol=1e-4)


def test_enrolled_voices_identified_stranger_refused(registry, stats):
    """Same voice -> its id (or "unknown": the benchmark measures ~75% genuine accept at the
    equal-error threshold), never the other speaker's id; a stranger -> unknown."""
    for name in ("alice", "bruno"):
        results = [registry.identify(s) for s in stats[name]["test"]]
        assert all(r.closest == name for r in results), (name, [registry.scores(s) for s in stats[name]["test"]])
        assert all(r.speaker in (name, None) for r in results)
        assert any(r.speaker == name for r in results), [r.score for r in results]
    for s in stats["stranger"]["test"]:
        result = registry.identify(s)
        assert result.speaker is None, registry.scores(s)
        assert result.closest in ("alice", "bruno") and result.score < registry.threshold


def test_different_voices_different_ids(registry, stats):
    ids = {name: {registry.identify(s).speaker for s in stats[name]["test"]} - {None} for name in ("alice", "bruno")}
    assert ids == {"alice": {"alice"}, "bruno": {"bruno"}}


def test_registry_round_trip(tmp_path, registry, stats, background):
    again = SpeakerRegistry(registry.root)  # reads layer/pooling-checked header and background
    assert again.speakers() == ["alice", "bruno"]
    assert torch.equal(again.background.mean, background.mean)
    s = stats["alice"]["test"][1]
    assert again.scores(s) == pytest.approx(registry.scores(s))
    assert again.identify(s).speaker == "alice"
    assert again.remove("bruno") and not again.remove("bruno")
    assert SpeakerRegistry(registry.root).speakers() == ["alice"]
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_registry_refuses_other_layer_and_bad_files(registry):
    with pytest.raises(SpeakerRegistryError, match="layer"):
        SpeakerRegistry(registry.root, layer=DEFAULT_LAYER + 1)
    (registry.root / "Not-A-Speaker.safetensors").write_bytes(b"stray file")  # not a speaker id: ignored
    assert SpeakerRegistry(registry.root).speakers() == ["alice", "bruno"]
    (registry.root / "carol.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpeakerRegistryError, match="carol"):
        SpeakerRegistry(registry.root)


def test_registry_backend_names_what_a_folder_holds(tmp_path, registry):
    """asr_node reads it to keep using an older registry's backend instead of refusing to start."""
    assert registry_backend(registry.root) == "whisper" and registry_backend(tmp_path / "none") is None
    SpeakerRegistry(tmp_path / "g", backend="ge2e")
    assert registry_backend(tmp_path / "g") == "ge2e"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SpeakerRegistry.HEADER).write_bytes(b"not safetensors")
    with pytest.raises(SpeakerRegistryError, match="not a valid"):
        registry_backend(tmp_path / "bad")


def test_empty_registry_and_bad_ids(tmp_path, stats, background):
    with pytest.raises(SpeakerRegistryError, match="needs a background"):
        SpeakerRegistry(tmp_path / "new")
    reg = SpeakerRegistry(tmp_path / "r", background=background)
    result = reg.identify(stats["alice"]["test"][0])
    assert result.speaker is None and result.closest is None
    for bad in ("../x", "Alice", "", "a/b"):
        with pytest.raises(InvalidSpeakerId):
            reg.enroll(bad, stats["alice"]["enroll"])
    with pytest.raises(ValueError, match="at least one"):
        reg.enroll("alice", [])


def test_pool_and_embed_shapes():
    h = torch.randn(50, 384)
    s = pool(h)
    assert s.shape == (768,) and torch.allclose(s[:384], h.mean(0))
    assert embed(s, pooling="mean").shape == (384,) and embed(s, pooling="mean+std").shape == (768,)
    assert torch.linalg.norm(embed(s)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pool(torch.zeros(0, 384))


@pytest.fixture(scope="module")
def clips() -> dict[str, list]:
    return {name: [synthesize(t, v) for t in ENROLL + TEST] for name, v in VOICES.items() if name != "bruno"}


def test_identifier_enrolls_on_request_then_recognizes(tmp_path, embedder, background, clips):
    """Nothing enrolled: unknown, without an encoder pass; a requested enrollment takes the next
    utterance whoever it sounds like; afterwards the same voice is identified (or unknown at
    worst), the stranger never gets alice's id, and the registry survives a restart."""
    from tinyalign_ros.core.speaker import SpeakerIdentifier

    ident = SpeakerIdentifier(tmp_path / "speakers", embedder, background=background)
    assert ident.observe(clips["alice"][0]).how == "unknown" and ident.registry is None
    for clip in clips["alice"][:3]:
        ident.request_enrollment("alice")
        assert ident.pending == "alice"
        decision = ident.observe(clip)
        assert (decision.speaker, decision.how) == ("alice", "enrollment") and ident.pending is None
    assert ident.speakers == ["alice"]
    seen = [ident.observe(c) for c in clips["alice"][3:]]
    assert all(d.speaker in ("alice", None) for d in seen) and any(d.how == "identified" for d in seen), seen
    assert all(ident.observe(c).speaker is None for c in clips["stranger"][3:])
    again = SpeakerIdentifier(tmp_path / "speakers", embedder)
    assert again.speakers == ["alice"]
    assert again.forget("alice") and again.speakers == [] and not again.forget("alice")


def test_identifier_refuses_bad_ids_and_expires_unanswered_prompts(tmp_path, embedder, background, clips,
                                                                    monkeypatch):
    from tinyalign_ros.core.speaker import SpeakerIdentifier

    ident = SpeakerIdentifier(tmp_path / "speakers", embedder, background=background, enroll_timeout_s=5.0)
    with pytest.raises(InvalidSpeakerId):
        ident.request_enrollment("../etc")
    ident.request_enrollment("alice")
    import time as time_module

    now = time_module.monotonic()
    monkeypatch.setattr(time_module, "monotonic", lambda: now + 6.0)
    assert ident.pending is None
    assert ident.observe(clips["stranger"][0]).speaker is None and ident.speakers == []


# ------------------------------------------------------------------ the ge2e backend (default)

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
REAL = {  # two real speakers (pocketsphinx-testdata, a `make setup` package)
    "cards": [POCKETSPHINX / "cards" / f"00{i}.wav" for i in range(1, 6)],
    "reader": sorted((POCKETSPHINX / "librivox").glob("*.wav")),
}
REAL_STRANGER = [POCKETSPHINX / n for n in ("goforward.raw", "numbers.raw", "something.raw")]  # a third voice


def _real(path: Path) -> np.ndarray:
    from tinyalign_ros.core.audio import load_audio

    if path.suffix == ".raw":  # 16 kHz 16-bit mono, no header
        return np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
    return load_audio(path)


@pytest.fixture(scope="module")
def ge2e() -> Ge2eEmbedder:
    return Ge2eEmbedder()


def test_ge2e_tells_real_speakers_apart_and_refuses_a_stranger(tmp_path, ge2e):
    """Enrolled from 2 recordings each, the other 3 recordings of two real speakers are closest to
    their own voiceprint, never named as the other, and at least 2 of 3 are sure enough to be named
    (the threshold is conservative: unsure means the base model); a third real voice is unknown."""
    reg = SpeakerRegistry(tmp_path / "speakers", backend="ge2e")
    for name, paths in REAL.items():
        reg.enroll(name, [ge2e.stats(_real(p)) for p in paths[:2]])
    for name, paths in REAL.items():
        scores = [reg.scores(ge2e.stats(_real(p))) for p in paths[2:]]
        other = next(n for n in REAL if n != name)
        assert all(s[name] > s[other] + 0.1 for s in scores), scores
        named = [reg.identify(ge2e.stats(_real(p))).speaker for p in paths[2:]]
        assert set(named) <= {name, None} and named.count(name) >= 2, (named, scores)
    strangers = [reg.identify(ge2e.stats(_real(p))) for p in REAL_STRANGER]
    assert [s.speaker for s in strangers] == [None] * 3, [(s.closest, round(s.score, 3)) for s in strangers]


def test_ge2e_identifier_enrolls_synthetic_voices_without_background(tmp_path, ge2e, clips):
    """A new ge2e registry needs no background (enrollment is immediate); a synthetic stranger is
    not accepted as alice; the registry refuses to be read as another backend's."""
    ident = SpeakerIdentifier(tmp_path / "speakers", ge2e)
    assert ident.threshold == DEFAULT_THRESHOLDS["ge2e"]
    for clip in clips["alice"][:3]:
        ident.request_enrollment("alice")
        assert ident.observe(clip).how == "enrollment"
    seen = [ident.observe(c) for c in clips["alice"][3:]]
    assert [d.speaker for d in seen] == ["alice"] * len(seen), seen
    assert all(ident.observe(c).speaker is None for c in clips["stranger"][3:])
    assert SpeakerIdentifier(tmp_path / "speakers", ge2e).speakers == ["alice"]
    with pytest.raises(SpeakerRegistryError, match="'ge2e' speaker backend"):
        SpeakerRegistry(tmp_path / "speakers")  # a whisper registry reader
    with pytest.raises(ValueError, match="no background"):
        SpeakerRegistry(tmp_path / "other", backend="ge2e", background=Background(torch.zeros(2), torch.ones(2)))


def test_ge2e_bad_weights_give_clear_errors(tmp_path, monkeypatch):
    from tinyalign_ros.core import ge2e as ge2e_module
    from tinyalign_ros.core.ge2e import VoiceEncoderError, load_network

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(VoiceEncoderError, match="garbage.pt"):
        load_network(garbage)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model_state": {"lstm.weight_ih_l0": torch.zeros(3, 3)}}, wrong)
    with pytest.raises(VoiceEncoderError, match="lstm.weight_ih_l0 is \\(3, 3\\), expected \\(1024, 40\\)"):
        load_network(wrong)
    marker = tmp_path / "code-ran"

    class Payload:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model_state": Payload()}, evil)
    with pytest.raises(VoiceEncoderError, match="evil.pt"):
        load_network(evil)
    assert not marker.exists()
    with pytest.raises(VoiceEncoderError, match="not found"):
        load_network(tmp_path / "missing.pt")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    with monkeypatch.context() as m:
        m.setattr(ge2e_module.importlib.metadata, "distribution", not_installed)
        with pytest.raises(SpeakerRegistryError, match="not installed"):  # asr_node's startup error
            Ge2eEmbedder()
    tampered = tmp_path / "pretrained.pt"  # the wheel's file, one byte changed
    data = bytearray(ge2e_module.default_weights().read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(ge2e_module, "default_weights", lambda: tampered)
    with pytest.raises(VoiceEncoderError, match="sha256"):
        load_network()


def test_ge2e_embedding_shape_and_bad_audio(ge2e):
    e = ge2e.stats(synthesize(TEST[0], VOICES["alice"]))
    assert e.shape == (256,) and torch.linalg.norm(e).item() == pytest.approx(1.0, abs=1e-5)
    short = ge2e.stats(np.zeros(800, dtype=np.float32))  # 50 ms of silence: one padded partial, no crash
    assert short.shape == (256,) and torch.isfinite(short).all()
    with pytest.raises(ValueError, match="non-finite"):
        ge2e.stats(np.full(16000, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        ge2e.stats(np.zeros((2, 16000), dtype=np.float32))
