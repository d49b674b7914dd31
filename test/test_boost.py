"""Knowledge boosting core: hint alignment, delay budget, fusion identity, teacher streaming, weights."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tinyalign_ros.core.boost import (CHUNK_SAMPLES, FRAME_SAMPLES, BoostModel, FiLMFusion, Hint, HintBuffer,
                                      Teacher, hint_kbps, load_boost, save_boost, simulate_delay, stream_windows,
                                      whisper_base_dir)
from tinyalign_ros.core.encoder import WeightLoadError, load_whisper_encoder

DIM = 4


def chunk_hint(k: int, value: float | None = None) -> Hint:
    """The hint of chunk k: 5 frames whose values say which frame they are."""
    frames = np.arange(5 * k, 5 * k + 5, dtype=np.float32)[:, None] + np.zeros(DIM, np.float32)
    return Hint(k * CHUNK_SAMPLES, CHUNK_SAMPLES, frames if value is None else np.full((5, DIM), value, np.float32))


# --------------------------------------------------------------------------- HintBuffer


def test_reordered_hints_align_by_offset_not_arrival():
    buf = HintBuffer(DIM, delay_budget_chunks=6)
    for k in (3, 0, 2, 1):  # arrival order
        assert buf.add(chunk_hint(k), arrived_at=4 * CHUNK_SAMPLES) == "ok"
    hints, mask = buf.gather(0, 20)
    assert mask.tolist() == [1.0] * 20
    assert hints[:, 0].tolist() == list(range(20))
    assert buf.stats["reordered"] == 3


def test_gather_from_an_utterance_that_starts_mid_chunk():
    buf = HintBuffer(DIM)
    for k in range(4):
        buf.add(chunk_hint(k), arrived_at=0)
    hints, mask = buf.gather(start=3 * FRAME_SAMPLES + 100, n_frames=6)  # frame centres 3.8, 4.8, ...
    assert mask.tolist() == [1.0] * 6
    assert hints[:, 0].tolist() == [3, 4, 5, 6, 7, 8]


def test_duplicated_hints_keep_the_first_copy():
    buf = HintBuffer(DIM)
    assert buf.add(chunk_hint(1, 1.0), arrived_at=0) == "ok"
    assert buf.add(chunk_hint(1, 9.0), arrived_at=0) == "duplicate"
    hints, mask = buf.gather(CHUNK_SAMPLES, 5)
    assert (hints == 1.0).all() and mask.all()
    assert buf.stats["duplicate_frames"] == 5


def test_missing_hints_are_zeros_with_mask_zero():
    buf = HintBuffer(DIM)
    buf.add(chunk_hint(0, 2.0), arrived_at=0)
    buf.add(chunk_hint(2, 2.0), arrived_at=0)  # chunk 1 never arrives
    hints, mask = buf.gather(0, 15)
    assert mask.tolist() == [1] * 5 + [0] * 5 + [1] * 5
    assert (hints[5:10] == 0).all() and (hints[:5] == 2).all()


def test_hints_later_than_the_delay_budget_are_ignored():
    buf = HintBuffer(DIM, delay_budget_chunks=2)
    end = 3 * CHUNK_SAMPLES  # the utterance covers chunks 0..2
    buf.add(chunk_hint(0), arrived_at=end)  # on time
    buf.add(chunk_hint(1), arrived_at=end + 2 * CHUNK_SAMPLES)  # exactly at the budget: used
    buf.add(chunk_hint(2), arrived_at=end + 3 * CHUNK_SAMPLES)  # one chunk too late: ignored
    _, mask = buf.gather(0, 15, end=end)
    assert mask.tolist() == [1] * 10 + [0] * 5
    # a larger budget would have used it: the decision depends on the audio clock, not on timing
    buf.delay_budget_chunks = 3
    assert buf.gather(0, 15, end=end)[1].all()


def test_memory_is_bounded_and_stale_hints_are_refused():
    buf = HintBuffer(DIM, horizon_frames=50)
    for k in range(100):  # 500 frames
        buf.add(chunk_hint(k), arrived_at=k * CHUNK_SAMPLES)
        assert len(buf) <= 50 + 5
    assert buf.add(chunk_hint(0), arrived_at=0) == "stale"
    assert buf.gather(0, 5)[1].sum() == 0
    assert buf.gather(99 * CHUNK_SAMPLES, 5)[1].all()


def test_malformed_hints_are_rejected():
    buf = HintBuffer(DIM)
    assert buf.add(Hint(0, CHUNK_SAMPLES, np.zeros((5, DIM + 1), np.float32)), 0) == "rejected"
    assert buf.add(Hint(0, CHUNK_SAMPLES, np.full((5, DIM), np.nan, np.float32)), 0) == "rejected"
    assert buf.add(Hint(-1600, CHUNK_SAMPLES, np.zeros((5, DIM), np.float32)), 0) == "rejected"
    assert len(buf) == 0 and buf.stats["rejected"] == 3


def test_buffer_is_thread_safe_under_concurrent_adds_and_gathers():
    import threading

    buf = HintBuffer(DIM, horizon_frames=10_000)
    errors = []

    def add(ks):
        for k in ks:
            buf.add(chunk_hint(k), arrived_at=0)

    def gather():
        try:
            for _ in range(200):
                buf.gather(0, 200)
        except Exception as exc:  # pragma: no cover - the failure is the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(range(i, 40, 4),)) for i in range(4)] + \
              [threading.Thread(target=gather) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert buf.gather(0, 200)[1].all()


def test_simulated_delay_drops_the_last_chunks():
    n_samples = 10 * CHUNK_SAMPLES - 700  # 9.56 chunks -> 10 chunks, 50 frames
    assert simulate_delay(50, n_samples, 0).all()
    assert simulate_delay(50, n_samples, 3).tolist() == [1] * 35 + [0] * 15
    assert simulate_delay(50, n_samples, 12).sum() == 0


# --------------------------------------------------------------------------- fusion


def random_fusion(seed: int = 0) -> FiLMFusion:
    torch.manual_seed(seed)
    fusion = FiLMFusion(16, DIM, hidden=8)
    for p in fusion.parameters():  # make gamma/beta non-zero (the output layer starts at zero)
        torch.nn.init.normal_(p, std=0.5)
    return fusion


def test_fusion_is_exactly_identity_without_hints():
    fusion = random_fusion()
    x = torch.randn(2, 30, 16)
    h = torch.randn(2, 30, DIM)
    assert torch.equal(fusion(x, h, torch.zeros(2, 30)), x)
    assert not torch.allclose(fusion(x, h, torch.ones(2, 30)), x)


def test_untrained_fusion_is_identity_even_with_hints():
    x = torch.randn(1, 10, 16)
    assert torch.equal(FiLMFusion(16, DIM)(x, torch.randn(1, 10, DIM), torch.ones(1, 10)), x)


def test_missing_hints_do_not_leak_into_neighbouring_frames():
    fusion = random_fusion()
    x, h = torch.randn(1, 20, 16), torch.randn(1, 20, DIM)
    mask = torch.ones(1, 20)
    mask[0, 10:] = 0
    out = fusion(x, h, mask)
    assert torch.equal(out[0, 10:], x[0, 10:])
    garbage = h.clone()
    garbage[0, 10:] = 1e3  # whatever sits under mask 0 must not matter
    assert torch.allclose(fusion(x, garbage, mask), out)


def test_fallback_when_the_booster_stops_mid_utterance():
    """Hints for the first half only: boosted frames there, exactly unboosted after, and no wait."""
    torch.manual_seed(0)
    model = BoostModel(16, 24, DIM, hidden=8, head_hidden=8)
    for p in model.fusion.parameters():
        torch.nn.init.normal_(p, std=0.5)
    buf = HintBuffer(DIM, delay_budget_chunks=2)
    for k in range(4):  # the booster dies after chunk 3 of an 8-chunk utterance
        buf.add(chunk_hint(k, 0.5), arrived_at=(k + 1) * CHUNK_SAMPLES)
    t0 = time.monotonic()
    hints, mask = buf.gather(0, 40, end=8 * CHUNK_SAMPLES)
    assert time.monotonic() - t0 < 0.05  # a lookup, never a wait for hints that will not come
    assert mask.tolist() == [1] * 20 + [0] * 20
    x = torch.randn(1, 40, 16)
    fused = model.fusion(x, torch.from_numpy(hints)[None], torch.from_numpy(mask)[None])
    assert torch.equal(fused[0, 20:], x[0, 20:])
    assert not torch.allclose(fused[0, :20], x[0, :20])
    # and the text path runs with partial, full or no hints
    for m in (mask, np.ones(40, np.float32), None):
        assert isinstance(model.transcribe(x[0], hints, m), str)


def test_hint_bandwidth():
    assert hint_kbps(32) == pytest.approx(6.4)  # 50 frames/s x 32 x 4 bytes
    assert hint_kbps(16, bytes_per_value=2) == pytest.approx(1.6)


# --------------------------------------------------------------------------- weights


def test_boost_model_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = BoostModel(16, 24, DIM, hidden=8, head_hidden=8, teacher={"window_s": 1.0, "layer": 2})
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "fusion.safetensors"
    save_boost(model, path)
    loaded = load_boost(path)
    assert loaded.teacher == {"window_s": 1.0, "layer": 2} and loaded.hint_dim == DIM
    x, h, m = torch.randn(1, 12, 16), torch.randn(1, 12, DIM), torch.ones(1, 12)
    assert torch.equal(loaded(x, h, m), model.eval()(x, h, m))
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_fusion_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightLoadError, match="not found"):
        load_boost(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightLoadError, match="not a valid safetensors"):
        load_boost(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(WeightLoadError, match="not a boost fusion file"):
        load_boost(tmp_path / "other.safetensors")


def test_shipped_fusion_loads_and_matches_the_teacher():
    from tinyalign_ros.core.models import shipped_model

    path = shipped_model("boost_fusion.safetensors")
    if not path.is_file():
        pytest.fail(f"{path} missing: run `tinyalign train boost`")
    model = load_boost(path)
    assert model.config["student_dim"] == 384 and model.config["teacher_dim"] == 512
    assert model.teacher["window_s"] > 0
    x = torch.randn(1, 20, 384)
    assert torch.equal(model.fusion(x, torch.randn(1, 20, model.hint_dim), torch.zeros(1, 20)), x)


# --------------------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def tiny_teacher_parts():
    torch.manual_seed(0)
    return load_whisper_encoder(), torch.nn.Linear(384, 8)  # tiny.en stands in for base: same code, faster


def test_streaming_teacher_equals_the_batched_training_path(tiny_teacher_parts, speech_16k):
    """booster_node (push chunk by chunk) and `train boost` (stream_windows) give the same hints."""
    encoder, projection = tiny_teacher_parts
    teacher = Teacher(encoder, projection, window_s=0.5)
    x = speech_16k[: 6 * CHUNK_SAMPLES]
    pushed = [teacher.push(x[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES], k * CHUNK_SAMPLES) for k in range(6)]
    assert [h.offset for h in pushed] == [k * CHUNK_SAMPLES for k in range(6)]
    assert all(h.data.shape == (5, 8) and h.n_samples == CHUNK_SAMPLES for h in pushed)
    batched = teacher.features(stream_windows(x, teacher.window), 5)
    np.testing.assert_allclose(np.stack([h.data for h in pushed]), batched, atol=1e-4)


def test_teacher_restarts_its_window_on_a_gap_or_new_stream(tiny_teacher_parts, speech_16k):
    encoder, projection = tiny_teacher_parts
    teacher = Teacher(encoder, projection, window_s=0.5)
    chunk = speech_16k[:CHUNK_SAMPLES]
    first = teacher.push(chunk, 0).data
    teacher.push(speech_16k[CHUNK_SAMPLES:2 * CHUNK_SAMPLES], CHUNK_SAMPLES)
    after_gap = teacher.push(chunk, 10 * CHUNK_SAMPLES)  # a gap: the old audio is not its context
    assert after_gap.offset == 10 * CHUNK_SAMPLES
    np.testing.assert_allclose(after_gap.data, first, atol=1e-5)


def test_teacher_handles_chunks_that_are_not_whole_frames(tiny_teacher_parts, speech_16k):
    encoder, projection = tiny_teacher_parts
    teacher = Teacher(encoder, projection, window_s=0.5)
    assert teacher.push(speech_16k[:200], 0) is None  # less than one frame yet
    hint = teacher.push(speech_16k[200:1000], 200)  # 1000 samples = 3 frames + 40 carried
    assert (hint.offset, hint.n_samples, hint.frames) == (0, 960, 3)
    hint = teacher.push(speech_16k[1000:1600], 1000)
    assert (hint.offset, hint.frames) == (960, 2)


def test_teacher_rejects_bad_settings(tiny_teacher_parts):
    encoder, projection = tiny_teacher_parts
    with pytest.raises(ValueError, match="window_s"):
        Teacher(encoder, projection, window_s=0.01)
    with pytest.raises(ValueError, match="layer"):
        Teacher(encoder, projection, layer=9)


def test_whisper_base_is_assembled_atomically_from_its_two_packages(tmp_path):
    model_dir = whisper_base_dir(home=tmp_path)
    assert model_dir == tmp_path / "models" / "whisper-base-ct2"
    assert not [p for p in model_dir.iterdir() if "tmp" in p.name]
    stamp = (model_dir / "model.bin").stat().st_mtime_ns
    assert whisper_base_dir(home=tmp_path) == model_dir  # reused, not rebuilt
    assert (model_dir / "model.bin").stat().st_mtime_ns == stamp
    encoder = load_whisper_encoder(model_dir)
    assert (encoder.n_layers, encoder.d_model) == (6, 512)


# --------------------------------------------------------------------------- BoostFuser (the robot's side)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def active_model(seed: int = 0) -> BoostModel:
    """A small BoostModel whose FiLM is not the identity (its trained output layer starts at zero)."""
    torch.manual_seed(seed)
    model = BoostModel(16, 24, DIM, hidden=8, head_hidden=8)
    for p in model.fusion.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_fuser_boosts_the_frames_whose_hints_arrived_in_time_and_never_waits():
    from tinyalign_ros.core.boost import BoostFuser

    fuser = BoostFuser(active_model(), fusion_layer=4, delay_budget_chunks=1)
    for k in range(4):  # the utterance covers chunks 0..3; chunk 3's hint comes 2 chunks after its end
        fuser.on_audio((k + 1) * CHUNK_SAMPLES)
        if k < 3:
            assert fuser.on_hint(chunk_hint(k, 0.5)) == "ok"
    fuser.on_audio(6 * CHUNK_SAMPLES)
    assert fuser.on_hint(chunk_hint(3, 0.5)) == "ok"  # stored, but later than end + 1 chunk
    x = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    t0 = time.monotonic()
    result = fuser.fuse(x, 4, 0, 4 * CHUNK_SAMPLES)
    assert time.monotonic() - t0 < 0.5
    assert result.boosted and result.reason == "" and isinstance(result.text, str)
    assert result.mask.tolist() == [1] * 15 + [0] * 5 and result.coverage == 0.75
    assert torch.equal(result.features[15:], torch.from_numpy(x[15:]))  # late: exactly unboosted
    assert not torch.allclose(result.features[:15], torch.from_numpy(x[:15]))
    assert 0.0 <= result.confidence <= 1.0 and fuser.last is result
    # the same hints with a 2-chunk budget: chunk 3 counts too
    fuser.set_delay_budget(2)
    assert fuser.fuse(x, 4, 0, 4 * CHUNK_SAMPLES).coverage == 1.0


def test_fuser_leaves_other_layers_and_hintless_utterances_unboosted_with_the_reason():
    from tinyalign_ros.core.boost import BoostFuser

    fuser = BoostFuser(active_model(), fusion_layer=4)
    x = np.ones((10, 16), np.float32)
    result = fuser.fuse(x, 4, 0, 2 * CHUNK_SAMPLES)
    assert not result.boosted and result.reason == "no booster" and result.coverage == 0.0
    assert torch.equal(result.features, torch.from_numpy(x))
    fuser.on_audio(2 * CHUNK_SAMPLES)
    fuser.on_hint(chunk_hint(0))
    fuser.on_hint(chunk_hint(1))
    early = fuser.fuse(x, 2, 0, 2 * CHUNK_SAMPLES)  # an early exit: the fusion never saw layer 2
    assert not early.boosted and "layer 2" in early.reason and "layer 4" in early.reason
    assert torch.equal(early.features, torch.from_numpy(x))
    assert fuser.fuse(x, 4, 0, 2 * CHUNK_SAMPLES).boosted
    later = fuser.fuse(x, 4, 20 * CHUNK_SAMPLES, 22 * CHUNK_SAMPLES)  # hints exist, none for this audio
    assert not later.boosted and later.reason == "no hint arrived within the delay budget"


def test_fuser_refuses_bad_hints_with_a_reason():
    from tinyalign_ros.core.boost import MAX_HINT_FRAMES, BoostFuser, HintRejected

    fuser = BoostFuser(active_model(), fusion_layer=4)
    fuser.on_audio(CHUNK_SAMPLES)
    bad = {
        "values per frame": Hint(0, CHUNK_SAMPLES, np.zeros((5, DIM + 3), np.float32)),
        "NaN": Hint(0, CHUNK_SAMPLES, np.full((5, DIM), np.nan, np.float32)),
        "at most": Hint(0, (MAX_HINT_FRAMES + 1) * FRAME_SAMPLES, np.zeros((MAX_HINT_FRAMES + 1, DIM), np.float32)),
        "covers": Hint(0, 7, np.zeros((5, DIM), np.float32)),
        "another stream": Hint(1000 * CHUNK_SAMPLES, CHUNK_SAMPLES, np.zeros((5, DIM), np.float32)),
        "shape": Hint(0, CHUNK_SAMPLES, np.zeros(5 * DIM, np.float32)),
    }
    for words, hint in bad.items():
        with pytest.raises(HintRejected, match=words):
            fuser.on_hint(hint)
    assert fuser.rejected == len(bad) and fuser.received == 0 and len(fuser.buffer) == 0
    assert fuser.link_state().warn  # every hint refused: say so
    with pytest.raises(ValueError, match="0..6"):
        fuser.set_delay_budget(7)


def test_fuser_forgets_the_old_streams_hints_when_the_audio_restarts():
    from tinyalign_ros.core.boost import BoostFuser

    fuser = BoostFuser(active_model(), fusion_layer=4)
    fuser.on_audio(10 * CHUNK_SAMPLES)
    fuser.on_hint(chunk_hint(0, 3.0))
    fuser.on_audio(CHUNK_SAMPLES)  # offsets start again from 0: a new stream
    assert fuser.stream_restarts == 1 and len(fuser.buffer) == 0
    assert not fuser.fuse(np.zeros((5, 16), np.float32), 4, 0, CHUNK_SAMPLES).boosted


def test_link_state_tells_a_vanished_booster_from_an_idle_one():
    from tinyalign_ros.core.boost import BoostFuser

    clock = FakeClock()
    fuser = BoostFuser(active_model(), fusion_layer=4, delay_budget_chunks=2, link_timeout_s=2.0, clock=clock)
    state = fuser.link_state()
    assert not state.warn and "no booster" in state.message and state.last_hint_age_s is None
    for k in range(10):  # real time, each hint one chunk behind the audio
        clock.t += 0.1
        fuser.on_audio((k + 2) * CHUNK_SAMPLES)
        fuser.on_hint(chunk_hint(k))
    state = fuser.link_state()
    assert not state.warn and state.message.startswith("boosting") and state.hints_received == 10
    assert state.lag_chunks == pytest.approx(1.0) and state.hints_per_s == pytest.approx(2.0)
    for k in range(10, 40):  # the booster dies; the audio keeps coming
        clock.t += 0.1
        fuser.on_audio((k + 2) * CHUNK_SAMPLES)
    state = fuser.link_state()
    assert state.warn and "vanished" in state.message and state.last_hint_age_s == pytest.approx(3.0)
    clock.t += 5.0  # and now the audio stops too: nothing to boost, nothing wrong
    assert not fuser.link_state().warn and "idle" in fuser.link_state().message


def test_link_state_warns_when_hints_trail_beyond_the_budget():
    from tinyalign_ros.core.boost import BoostFuser

    clock = FakeClock()
    fuser = BoostFuser(active_model(), fusion_layer=4, delay_budget_chunks=2, clock=clock)
    for k in range(10):  # a booster slower than the robot: 5 chunks behind
        clock.t += 0.1
        fuser.on_audio((k + 6) * CHUNK_SAMPLES)
        fuser.on_hint(chunk_hint(k))
    state = fuser.link_state()
    assert state.warn and state.lag_chunks == pytest.approx(5.0) and "2-chunk budget" in state.message


# --------------------------------------------------------------------------- text hints (the transcript's boost)


def test_forced_words_leave_the_sentence_end_to_whisper():
    from tinyalign_ros.core.boost import forced_prefix

    assert forced_prefix(" turn  left, and stop. ") == "turn left, and stop"
    assert forced_prefix("Is it? ") == "Is it" and forced_prefix("it's") == "it's"
    assert forced_prefix("") == "" and forced_prefix("...") == ""


def test_hints_carry_the_words_the_teachers_last_two_transcripts_agree_on():
    from tinyalign_ros.core.boost import agreed_words

    assert agreed_words("Do you know what I", "Do you know what time it") == "Do you know what"
    assert agreed_words("10 of clubs", "Ten of clubs.") == "Ten of clubs."  # compared as normalized words
    assert agreed_words("", "turn left") == ""  # a first transcript alone is not trusted
    assert agreed_words("turn left now", "turn left") == "turn left"


def test_text_hints_give_the_most_heard_transcript_that_arrived_within_the_budget():
    from tinyalign_ros.core.boost import TextHint, TextHintBuffer

    c = CHUNK_SAMPLES
    buf = TextHintBuffer(delay_budget_chunks=6)
    assert buf.add(TextHint(0, 8 * c, "turn left and"), arrived_at=9 * c) == "ok"
    assert buf.add(TextHint(0, 12 * c, "turn left and stop."), arrived_at=18 * c) == "ok"
    assert buf.add(TextHint(40 * c, 5 * c, "another utterance"), arrived_at=46 * c) == "ok"
    got = buf.prefix(0, 12 * c)  # the whole utterance was heard and arrived 6 chunks after its end
    assert (got.text, got.complete, got.reason) == ("turn left and stop", True, "")
    buf.delay_budget_chunks = 5  # the full transcript is too late now: the partial one
    got = buf.prefix(0, 12 * c)
    assert (got.text, got.complete, got.hint.n_samples) == ("turn left and", False, 8 * c)
    buf.delay_budget_chunks = 0
    assert buf.prefix(0, 12 * c).text == "turn left and"
    # a robot utterance starting a little later (its VAD's pre-roll) still matches; a far one does not
    assert buf.prefix(2 * c, 12 * c).text == "turn left and"
    far = buf.prefix(20 * c, 30 * c)
    assert far.text == "" and not far.boosted and far.hint is None and "no teacher transcript" in far.reason
    # a hint arriving after the budget is named as such
    late = TextHintBuffer(delay_budget_chunks=1)
    late.add(TextHint(0, 12 * c, "turn left and stop"), arrived_at=20 * c)
    assert late.prefix(0, 12 * c).reason == "no teacher transcript arrived within the delay budget"


def test_text_heartbeats_and_the_horizon_bound_memory():
    from tinyalign_ros.core.boost import TEXT_HORIZON_SAMPLES, TextHint, TextHintBuffer

    c = CHUNK_SAMPLES
    buf = TextHintBuffer()
    assert buf.add(TextHint(0, c, ""), arrived_at=c) == "heartbeat"
    assert len(buf) == 0 and buf.covered_until() == c
    for k in range(2000):  # 200 s of one-chunk utterances
        buf.add(TextHint(k * c, c, f"word{k}"), arrived_at=(k + 1) * c)
    assert len(buf) <= TEXT_HORIZON_SAMPLES // c + 1
    assert buf.add(TextHint(0, c, "old"), arrived_at=2001 * c) == "stale"
    assert buf.prefix(1999 * c, 2000 * c).text == "word1999"


def test_fuser_without_a_fusion_takes_text_hints_only():
    from tinyalign_ros.core.boost import BoostFuser, HintRejected, TextHint

    c = CHUNK_SAMPLES
    clock = FakeClock()
    fuser = BoostFuser(None, None, delay_budget_chunks=6, clock=clock)
    assert fuser.prefix(0, 10 * c).reason == "no booster"
    fuser.on_audio(10 * c)
    assert fuser.on_text_hint(TextHint(0, 10 * c, "please turn left")) == "ok"
    got = fuser.prefix(0, 10 * c)
    assert got.text == "please turn left" and fuser.last_prefix is got
    with pytest.raises(HintRejected, match="no fusion"):
        fuser.on_hint(chunk_hint(0))
    with pytest.raises(HintRejected, match="characters"):
        fuser.on_text_hint(TextHint(0, c, "x" * 5000))
    with pytest.raises(HintRejected, match="another stream"):
        fuser.on_text_hint(TextHint(900 * c, c, "from the future"))
    assert fuser.rejected == 3
    result = fuser.fuse(np.zeros((50, 384), np.float32), 4, 0, 10 * c)
    assert not result.boosted and "no fusion" in result.reason
    assert fuser.link_state().message.startswith("boosting")
    fuser.on_audio(2 * c)  # the audio restarted: the old stream's transcripts must not land on it
    assert fuser.prefix(0, 10 * c).text == ""


class CountingTranscriber:
    """Says one word per 0.1 s chunk of audio it was given, the last one changing with the length
    (a stand-in for Whisper base, whose word at the edge of the audio is often cut or guessed)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def transcribe(self, samples, prefix=""):
        from tinyalign_ros.core.asr import Transcript

        self.calls.append((len(samples), prefix))
        n = len(samples) // CHUNK_SAMPLES
        return Transcript(" ".join([f"w{k}" for k in range(n - 1)] + [f"edge{n}"] * (n > 0)), 0.9)


def test_text_teacher_transcribes_the_utterance_heard_so_far_from_its_vad_start(speech_16k):
    from tinyalign_ros.core.boost import TextHint, TextJob, TextTeacher, agreed_words
    from tinyalign_ros.core.vad import StreamingSegmenter, VadConfig

    c = CHUNK_SAMPLES
    vad = VadConfig(min_silence_ms=300)
    x = np.concatenate([np.zeros(10 * c, np.float32), speech_16k, np.zeros(10 * c, np.float32)])
    x = np.concatenate([x, np.zeros(-len(x) % c, np.float32)])
    teacher = TextTeacher(CountingTranscriber(), vad, every_chunks=2)
    robot = StreamingSegmenter(vad)  # what asr_node's VAD makes of the same chunks
    items, segments = [], []
    for k in range(len(x) // c):
        chunk = x[k * c:(k + 1) * c]
        items.append(teacher.push(chunk, k * c))
        segments += robot.push(chunk, k * c / 16000)
    (seg,) = segments
    start = round(seg.start_s * 16000)
    heartbeats = [i for out in items for i in out if isinstance(i, TextHint)]
    jobs = [i for out in items for i in out if isinstance(i, TextJob)]
    assert heartbeats and all(h.text == "" and h.n_samples == c for h in heartbeats)
    partial, final = [j for j in jobs if not j.final], [j for j in jobs if j.final]
    assert len(final) == 1 and final[0].offset == start and len(final[0].samples) == len(seg.samples)
    np.testing.assert_array_equal(final[0].samples, seg.samples)
    assert len(partial) >= 3 and all(j.offset == start for j in partial)
    assert [len(j.samples) for j in partial] == sorted(len(j.samples) for j in partial)  # hears more each time
    for j in partial:  # causal: the audio from the utterance's start up to the chunk just heard
        np.testing.assert_array_equal(j.samples, x[start:start + len(j.samples)])
    hints = [teacher.transcribe(j) for j in jobs]  # in order, on one thread, as booster_node's worker
    assert hints[0].text == ""  # nothing to agree with yet
    assert (hints[-1].offset, hints[-1].n_samples) == (start, len(seg.samples))
    fake = CountingTranscriber()
    said = [fake.transcribe(j.samples).text for j in jobs]
    for k in range(1, len(jobs)):  # each hint: what this transcript and the one before it agree on
        assert hints[k].text == agreed_words(said[k - 1], said[k])
    assert any(h.text for h in hints) and not any("edge" in h.text for h in hints[1:-1])
    # a gap in the offsets starts the VAD afresh; end of stream flushes an open utterance whole
    teacher.push(x[:c], 0)
    mid = 10 * c + len(speech_16k) // 2
    for k in range(12):
        teacher.push(x[k * c:(k + 1) * c], k * c)
    for k in range(12, mid // c):
        teacher.push(x[k * c:(k + 1) * c], k * c)
    (flushed,) = teacher.end_of_stream()
    assert flushed.final and flushed.offset <= 10 * c
    with pytest.raises(ValueError):
        TextTeacher(CountingTranscriber(), vad, every_chunks=0)


def test_recognizer_forces_the_teachers_words_only_when_there_are_some():
    from tinyalign_ros.core.boost import TextPrefix
    from tinyalign_ros.core.recognizer import Recognizer

    whisper = CountingTranscriber()
    recognizer = Recognizer(whisper)
    x = np.zeros(10 * CHUNK_SAMPLES, np.float32)
    plain = recognizer.recognize(x)
    assert plain.source == "whisper" and whisper.calls[-1] == (len(x), "")
    nothing = recognizer.recognize(x, prefix=lambda: TextPrefix("", None, False, "no booster"))
    assert nothing.source == "whisper" and nothing.text == plain.text and nothing.hint.reason == "no booster"
    forced = recognizer.recognize(x, prefix=lambda: TextPrefix("turn left", None, False, ""))
    assert forced.source == "whisper+hints" and whisper.calls[-1] == (len(x), "turn left")


def test_whisper_continues_after_the_forced_words(speech_16k):
    """The real tiny.en decoder: forced words start the transcript, it decodes the rest once."""
    from tinyalign_ros.core.asr import WhisperTranscriber
    from tinyalign_ros.core.metrics import normalize_text

    whisper = WhisperTranscriber(temperature=0.0)
    plain = normalize_text(whisper.transcribe(speech_16k).text)
    assert plain == "please turn left"
    forced = normalize_text(whisper.transcribe(speech_16k, prefix="Please").text)
    assert forced == "please turn left"
    steered = normalize_text(whisper.transcribe(speech_16k, prefix="Please burn").text)
    assert steered.startswith("please burn") and steered.count("please") == 1
