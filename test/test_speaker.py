"""Speaker recognition with the real tiny.en encoder on synthesized voices, and the registry."""
from __future__ import annotations

import pytest
import torch

from tinyalign_ros.core.adapters import InvalidSpeakerId
from tinyalign_ros.core.corpus import Voice, synthesize
from tinyalign_ros.core.speaker import (
    DEFAULT_LAYER,
    Background,
    SpeakerEmbedder,
    SpeakerRegistry,
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
