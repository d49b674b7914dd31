"""Barge-in detector on arrays: the robot's own voice coming back never stops it, the operator's
voice on top of it does, within a bound; clicks do not; bad input is a clear error."""
from __future__ import annotations

import numpy as np
import pytest
import soxr

from tinyalign_ros.core.echo import BargeInDetector, DoubleTalkConfig, Heard, VoiceBargeIn

SR = 16000
FAR_RATE = 22050  # piper's rate: the speaker side is not at the microphone's rate
T0 = 1_700_000_000.0  # wall clock of the first sample the robot plays
ROBOT_TEXT = ("The kitchen is down the hall on your left. The living room is straight ahead of you. "
              "The bathroom is upstairs, second door on the right.")


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    """The robot's piper voice and two operator sentences by another voice (festival, female)."""
    from tinyalign_ros.core.corpus import Voice, synthesize

    operator = Voice("operator-slt", "festival", "cmu_us_slt_arctic_hts")
    return {"robot": synthesize(ROBOT_TEXT, Voice("robot-joe", "piper", "en_US-joe-medium")),
            "hold_on": synthesize("Hold on a second, please.", operator),
            "no_wait": synthesize("No, wait, I meant the bedroom.", operator)}


def room(robot: np.ndarray, gain: float, delay_s: float) -> np.ndarray:
    """What the microphone hears of the robot: direct path plus one reflection, room noise."""
    n = robot.size + SR
    out = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    for g, d in ((gain, delay_s), (0.4 * gain, delay_s + 0.03)):
        i = int(d * SR)
        out[i:i + robot.size] += g * robot[:n - i]
    return out


def play(robot: np.ndarray, mic: np.ndarray, clock_offset_s: float = 0.04, detector=None) -> list[float]:
    """Feed the detector as tts_node does: 50 ms speaker blocks at 22.05 kHz stamped when played,
    100 ms microphone chunks stamped on a clock `clock_offset_s` off; returns the barge-in times
    (seconds after the robot started)."""
    detector = detector or BargeInDetector()
    far = soxr.resample(robot, SR, FAR_RATE).astype(np.float32)
    block = int(0.05 * FAR_RATE)
    f, events = 0, []
    for m in range(0, mic.size, 1600):
        while f < far.size and f / FAR_RATE <= m / SR + 0.1:  # the speaker runs a little ahead of the mic
            detector.far(T0 + f / FAR_RATE, far[f:f + block], FAR_RATE)
            f += block
        event = detector.near(T0 + m / SR + clock_offset_s, mic[m:m + 1600])
        if event:
            events.append(event.at - T0 - clock_offset_s)
    return events


def onset(clip: np.ndarray) -> float:
    return float(np.flatnonzero(np.abs(clip) > 0.02)[0]) / SR


@pytest.mark.parametrize("gain, delay_s, clock_offset_s", [
    (0.1, 0.02, 0.0), (0.3, 0.08, 0.04), (0.4, 0.15, -0.1), (0.3, 0.08, 0.14)])
def test_the_robots_own_voice_never_barges_in(voices, gain, delay_s, clock_offset_s):
    detector = BargeInDetector()
    assert play(voices["robot"], room(voices["robot"], gain, delay_s), clock_offset_s, detector) == []
    p50, p95 = detector.echo_ratios()
    assert p50 < p95 < detector.config.threshold  # the echo gain it measured is below the threshold
    assert p95 > 0.5 * gain  # ...and is the echo gain: the ratios are not trivially small


@pytest.mark.parametrize("sentence", ["hold_on", "no_wait"])
def test_the_operator_talking_over_the_robot_barges_in_within_400_ms(voices, sentence):
    operator = voices[sentence]
    delays = []
    for at in np.arange(0.5, 5.0, 0.5):  # wherever in the robot's answer the operator starts
        mic = room(voices["robot"], 0.3, 0.08)
        i = int(at * SR)
        mic[i:i + operator.size] += operator[:mic.size - i]
        events = play(voices["robot"], mic)
        assert events, f"no barge-in for the operator starting at {at:.1f} s"
        delays.append(events[0] - at - onset(operator))
    assert 0 < min(delays) and max(delays) < 0.4, np.round(delays, 2)


def test_the_operator_between_sentences_barges_in_at_once(voices):
    """The speaker is silent (far end empty): any speech on the microphone is the operator's."""
    detector = BargeInDetector()
    detector.far(T0, voices["robot"][: SR // 2], SR)  # a short sentence, then nothing queued
    mic = np.zeros(3 * SR, np.float32)
    mic[2 * SR:2 * SR + SR] = voices["hold_on"][:SR]
    events = [e for m in range(0, mic.size, 1600) if (e := detector.near(T0 + m / SR, mic[m:m + 1600]))]
    assert events and events[0].ratio == float("inf")
    assert events[0].at - T0 - 2.0 - onset(voices["hold_on"]) < 0.25


def test_knocks_and_claps_over_the_robot_do_not_barge_in(voices):
    rng = np.random.default_rng(1)
    knock = (np.exp(-np.arange(800) / 60) * rng.standard_normal(800) * 0.9).astype(np.float32)
    mic = room(voices["robot"], 0.3, 0.08)
    for at in np.arange(0.5, 6.0, 0.25):  # a knock every 250 ms, louder than the robot
        i = int(at * SR)
        mic[i:i + knock.size] += knock
    assert play(voices["robot"], mic) == []


def test_bad_input_is_a_clear_error():
    detector = BargeInDetector()
    with pytest.raises(ValueError, match="float32"):
        detector.near(T0, np.zeros(1600, np.int16))
    with pytest.raises(ValueError, match="NaN"):
        detector.near(T0, np.full(1600, np.nan, np.float32))
    with pytest.raises(ValueError, match="sample_rate"):
        detector.far(T0, np.zeros(100, np.float32), 0)
    with pytest.raises(ValueError, match="speaker audio contains NaN"):
        detector.far(T0, np.full(100, np.inf, np.float32), SR)
    for kwargs, name in (({"threshold": 0}, "threshold"), ({"echo_window_s": -1.0}, "echo_window_s"),
                         ({"min_speech_ms": float("nan")}, "min_speech_ms"), ({"vad_threshold": 1.0}, "vad_threshold")):
        with pytest.raises(ValueError, match=f"double_talk.{name}"):
            DoubleTalkConfig(**kwargs)


# ------------------------------------------------------------ VoiceBargeIn (what tts_node wires up)
def test_voice_barge_in_judges_the_microphone_only_while_speaking_and_on_this_clock(voices):
    voice = VoiceBargeIn()
    voice.speaker(T0, voices["robot"][: SR // 2], SR)  # half a second of the robot, then silence
    mic = np.zeros(3 * SR, np.float32)
    mic[2 * SR:] = voices["hold_on"][:SR]

    def hear(speaking: bool, lag_s: float = 0.05) -> list[Heard]:
        return [voice.microphone(speaking, T0 + m / SR + lag_s, T0 + m / SR, mic[m:m + 1600], SR)
                for m in range(0, mic.size, 1600)]

    assert hear(speaking=False) == [Heard()] * 30  # the robot is quiet: nothing is judged
    assert voice.off_clock_chunks == 0 and voice.detector.echo_ratios() is None
    heard = hear(speaking=True)
    assert not any(h.skipped for h in heard)
    events = [h.event for h in heard if h.event]
    assert events and events[0].ratio == float("inf")
    assert 0 < events[0].at - T0 - 2.0 - onset(voices["hold_on"]) < 0.25

    # a microphone on another clock (2 s ahead, or 6 s behind) is skipped and counted, never judged
    for lag_s in (-2.0, 6.0):
        heard = voice.microphone(True, T0 + 2.5 + lag_s, T0 + 2.5, mic[2 * SR:2 * SR + 1600], SR)
        assert heard.event is None and "from this node's clock" in heard.skipped
    assert voice.off_clock_chunks == 2

    # bad audio is skipped with the reason; any rate and channel count is normalized first
    heard = voice.microphone(True, T0 + 3.0, T0 + 3.0, np.full(1600, np.nan, np.float32), SR)
    assert heard.event is None and "NaN" in heard.skipped
    stereo_8k = np.repeat(soxr.resample(mic[2 * SR:], SR, 8000)[:, None], 2, axis=1)
    heard = voice.microphone(True, T0 + 3.05, T0 + 3.0, stereo_8k, 8000)
    assert heard.skipped == ""


def test_voice_barge_in_forgets_the_last_stretch_of_speech():
    """Speech cut off by a pause: a new stretch starts afresh, half a barge-in does not carry over."""
    calls = []

    class Spy(BargeInDetector):
        def reset(self) -> None:
            calls.append("reset")
            super().reset()

    voice = VoiceBargeIn()
    voice.detector = Spy()
    calls.clear()  # its constructor resets too
    chunk = np.zeros(1600, np.float32)
    for speaking in (True, True, False, False, True):
        voice.microphone(speaking, T0, T0, chunk, SR)
    assert calls == ["reset", "reset"]  # once per stretch of speech, not per chunk
