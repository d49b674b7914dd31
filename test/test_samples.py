"""Sample store: consent, label sources, teacher threshold, bounds, forget/revoke, split."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tinyalign_ros.core.adapters import InvalidSpeakerId
from tinyalign_ros.core.samples import ConsentError, SampleStore, SampleStoreError

DAY = 86400.0


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> SampleStore:
    s = SampleStore(tmp_path / "samples", max_samples=5, max_age_s=30 * DAY, teacher_min_confidence=0.8,
                    clock=clock)
    s.grant_consent("alice")
    return s


def feats(frames: int = 20, value: float = 0.5) -> torch.Tensor:
    return torch.full((frames, 384), value)


def add(store: SampleStore, clock: Clock, n: int, speaker: str = "alice", **kw) -> list[str]:
    ids = []
    for i in range(n):
        clock.advance(1.0)
        ids.append(store.add(speaker, feats(value=float(i)), f"sentence {i}", "enrollment", **kw))
    return ids


def test_round_trip_float16_with_provenance(store, clock):
    x = torch.randn(37, 384)
    sid = store.add("alice", x, "  turn   left ", "correction", 1.0, utterance_id="u1", layer=4)
    sample = store.load("alice", sid)
    assert sample.features.dtype == torch.float16 and sample.features.shape == (37, 384)
    assert torch.allclose(sample.features.float(), x, atol=1e-2)
    info = sample.info
    assert (info.text, info.source, info.confidence, info.utterance_id, info.layer, info.frames) == \
        ("turn left", "correction", 1.0, "u1", 4, 37)
    assert info.created == clock()
    with safe_open(store.root / "alice" / f"{sid}.safetensors", framework="pt") as f:  # safetensors, no pickle
        assert f.metadata()["source"] == "correction"
    assert [p.name for p in (store.root / "alice").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_no_consent_no_storage(tmp_path, clock):
    store = SampleStore(tmp_path / "s", clock=clock)
    with pytest.raises(ConsentError, match="has not consented"):
        store.add("bob", feats(), "hello", "enrollment")
    assert store.list("bob") == [] and store.speakers() == []
    store.grant_consent("bob", how="enrollment")
    assert store.has_consent("bob") and store.speakers() == ["bob"]
    assert store.add("bob", feats(), "hello", "enrollment") is not None


def test_teacher_labels_only_above_threshold(store):
    assert store.add("alice", feats(), "maybe this", "teacher", 0.79) is None
    kept = store.add("alice", feats(), "surely this", "teacher", 0.8)
    assert kept is not None
    assert [(s.text, s.source) for s in store.list("alice")] == [("surely this", "teacher")]
    # human labels are kept whatever their confidence field says
    assert store.add("alice", feats(), "operator says", "correction", 0.1) is not None


def test_correction_supersedes_teacher_but_not_the_reverse(store, clock):
    store.add("alice", feats(), "turn lift", "teacher", 0.95, utterance_id="u7")
    clock.advance(1)
    store.add("alice", feats(), "turn left", "correction", utterance_id="u7")
    assert [(s.text, s.source) for s in store.list("alice")] == [("turn left", "correction")]
    clock.advance(1)
    assert store.add("alice", feats(), "turn lift", "teacher", 0.99, utterance_id="u7") is None
    assert [s.text for s in store.list("alice")] == ["turn left"]


@pytest.mark.parametrize("kwargs, error", [
    ({"source": "guess"}, "label source"),
    ({"text": "   "}, "non-empty"),
    ({"confidence": 1.5}, "confidence"),
    ({"features": torch.zeros(384)}, "frames, d"),
    ({"features": torch.zeros(0, 384)}, "frames, d"),
    ({"features": torch.full((3, 384), float("nan"))}, "NaN"),
    ({"text": "word " * 500}, "at most 2000"),  # no utterance says that much: every round would fail on it
    ({"asr_transcript": "word " * 500}, "at most 2000"),
])
def test_bad_samples_refused(store, kwargs, error):
    args = {"features": feats(), "text": "hello", "source": "enrollment", "confidence": 1.0, "asr_transcript": "",
            **kwargs}
    with pytest.raises(ValueError, match=error):
        store.add("alice", args["features"], args["text"], args["source"], args["confidence"],
                  asr_transcript=args["asr_transcript"])
    assert store.list("alice") == []


def test_count_bound_evicts_oldest(store, clock):
    ids = add(store, clock, 8)
    kept = store.list("alice")
    assert [s.id for s in kept] == ids[-5:]
    assert [s.text for s in kept] == [f"sentence {i}" for i in range(3, 8)]


def test_age_bound(store, clock):
    old = add(store, clock, 2)
    clock.advance(20 * DAY)
    new = add(store, clock, 1)
    assert [s.id for s in store.list("alice")] == old + new
    clock.advance(11 * DAY)  # the first two are now older than 30 days
    assert [s.id for s in store.list("alice")] == new
    assert not (store.root / "alice" / f"{old[0]}.safetensors").exists()
    with pytest.raises(SampleStoreError, match="no sample"):
        store.load("alice", old[0])


def test_forget_keeps_consent_revoke_deletes_everything(store, clock):
    add(store, clock, 3)
    store.grant_consent("bob")
    add(store, clock, 2, speaker="bob")
    assert store.forget("alice") == 3
    assert store.list("alice") == [] and store.has_consent("alice")
    assert store.count("bob") == 2
    assert store.revoke("bob") is True
    assert not (store.root / "bob").exists() and not store.has_consent("bob")
    with pytest.raises(ConsentError):
        store.add("bob", feats(), "hello", "enrollment")
    assert store.revoke("bob") is False


def test_split_is_deterministic_disjoint_and_stable(tmp_path, clock):
    store = SampleStore(tmp_path / "s", max_samples=1000, clock=clock)
    for spk in ("alice", "bob"):
        store.grant_consent(spk)
    add(store, clock, 40)
    add(store, clock, 40, speaker="bob")
    train, held = store.split("alice", 0.25)
    assert len(train) + len(held) == 40 and not {s.id for s in train} & {s.id for s in held}
    assert 4 <= len(held) <= 18
    assert store.split("alice", 0.25) == (train, held)  # same store -> same split
    again = SampleStore(store.root, max_samples=1000, clock=clock).split("alice", 0.25)
    assert again == (train, held)  # another process -> same split
    add(store, clock, 10)  # growing the store never moves an existing sample across the split
    train2, held2 = store.split("alice", 0.25)
    assert {s.id for s in held} <= {s.id for s in held2} and {s.id for s in train} <= {s.id for s in train2}
    assert {s.id for s in store.split("bob", 0.25)[1]}.isdisjoint({s.id for s in held})


def test_sample_ids_are_named_by_time_and_content(tmp_path, store, clock):
    """The same data recorded at the same time gets the same id in any store (so a test's split is
    the same on every run); different data in the same microsecond gets its own."""
    other = SampleStore(tmp_path / "other", clock=clock)
    other.grant_consent("alice")
    a = store.add("alice", feats(value=1.0), "turn left", "enrollment")
    assert other.add("alice", feats(value=1.0), "turn left", "enrollment") == a
    b = store.add("alice", feats(value=2.0), "turn left", "enrollment")  # same microsecond, other audio
    c = store.add("alice", feats(value=1.0), "turn right", "enrollment")  # same audio, other label
    assert len({a, b, c}) == 3 and len(store.list("alice")) == 3
    assert store.add("alice", feats(), "go", "correction", utterance_id="u1") == \
        store.add("alice", feats(), "go", "correction", utterance_id="u1")  # the same label again
    assert [s.text for s in store.list("alice") if s.utterance_id == "u1"] == ["go"]  # replaced itself: kept


def test_split_small_store_holds_out_at_least_one(store, clock):
    add(store, clock, 1)
    assert [len(x) for x in store.split("alice", 0.2)] == [1, 0]  # a single sample trains
    add(store, clock, 2)
    train, held = store.split("alice", 0.2)
    assert len(held) >= 1 and len(train) >= 1 and len(held) + len(train) == 3  # 1 or 2 held, as the ids hash
    assert store.split("alice", 0.0)[1] == []


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "Alice", "..", "ａ"])
def test_speaker_ids_validated(store, bad):
    with pytest.raises(InvalidSpeakerId):
        store.grant_consent(bad)
    with pytest.raises(InvalidSpeakerId):
        store.add(bad, feats(), "hello", "enrollment")
    with pytest.raises(InvalidSpeakerId):
        store.revoke(bad)


def test_sample_id_cannot_escape(store, clock):
    add(store, clock, 1)
    for bad in ("../consent", "../../x", ".hidden"):
        with pytest.raises(SampleStoreError):
            store.load("alice", bad)


def test_audio_round_trips_as_16_bit_pcm_and_bad_audio_is_refused(store):
    import numpy as np

    audio = (0.5 * np.sin(np.arange(24000) / 10.0)).astype(np.float32)
    sid = store.add("alice", feats(), "turn left", "enrollment", audio=audio)
    sample = store.load("alice", sid)
    assert sample.audio.dtype == np.float32 and np.abs(sample.audio - audio).max() < 1 / 30000
    assert sample.info.audio_s == 1.5 and store.list("alice")[0].audio_s == 1.5
    without = store.load("alice", store.add("alice", feats(), "turn right", "enrollment"))
    assert without.audio is None and without.info.audio_s == 0.0
    for bad in (np.zeros((2, 100), np.float32), np.full(100, np.nan, np.float32), np.zeros(31 * 16000, np.float32)):
        with pytest.raises(ValueError, match="audio"):
            store.add("alice", feats(), "go", "enrollment", audio=bad)
    assert store.count("alice") == 2
