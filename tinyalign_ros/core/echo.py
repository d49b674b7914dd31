"""Barge-in by voice: is the operator talking over the robot, or is the microphone hearing the
robot's own voice?

The microphone hears both. Without echo cancellation (an adaptive filter that models the
speaker → room → microphone path and subtracts the echo; not done here) the classic way to tell
them apart is the **Geigel double-talk detector** (Duttweiler, "A twelve-channel digital echo
canceler", IEEE Trans. Commun. 1978): the echo of the far end (here: what the robot plays) can
never be louder at the microphone than the far end's recent peak times the echo path gain, so

    max |mic| over a window  >  threshold * max |speaker| over the echo window before it

means a second talker (double talk). It needs the far-end signal exactly, which is why it runs
in tts_node, the one place that knows every sample it plays and when. Three things make it a
barge-in decision rather than a level trigger:

- **Echo window and clock tolerance.** Microphone chunks carry their capture wall time
  (header.stamp); tts_node records the wall time each block reaches the speaker (publish time
  plus the sound card's latency). The clocks come from different devices and stamps jitter by
  up to a chunk, so the far-end peak is taken over `[t - echo_window_s - clock_tolerance_s,
  t + window + clock_tolerance_s]`: a wider window only makes the detector more conservative.
- **Speech, not noise.** A door slam or a clap is louder than the echo too; silero VAD
  (core/vad.py, ~0.2 ms per 100 ms of audio) must also call the window speech.
- **Minimum duration.** Barge-in fires when at least `min_speech_ms` of the last
  2 x `min_speech_ms` of windows were double talk *and* speech, which rides over the gaps
  between syllables while a single loud click never fires.

Limits (honest): `threshold` must be above the robot's own echo gain (mic peak / speaker peak
while it talks alone; `echo_ratios()` measures it, tts_node shows it on /diagnostics), and the
operator must then be louder at the microphone than `threshold` x the robot's recent peak: a
quiet operator under a loud robot is not detected, which a real echo canceller would fix.
Short knocks and claps do not barge in (too short), but loud *steady* noise (a vacuum cleaner,
music) starting while the robot talks does: the VAD hears the robot's own voice under it.
A reverberant room adds echo energy after the direct path; `echo_window_s` must cover it.

Times are wall-clock seconds; the microphone must be 16 kHz mono float32 (graph audio), the
speaker any rate. Thread-safe: tts_node feeds the speaker side from its player thread and the
microphone side from its audio callback. `VoiceBargeIn` is what tts_node wires to its topics:
the detector plus when to judge a microphone chunk at all (only while the robot speaks, only
audio on this machine's clock, any rate or channel count normalized first).
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass

import numpy as np

from .audio import AudioError, normalize
from .vad import SAMPLE_RATE, WINDOW, SileroStream

FAR_BIN_S = 0.005  # resolution of the stored speaker envelope (peak per 5 ms)
FAR_HISTORY_S = 10.0  # speaker envelope kept when the microphone stream is late or absent
# A microphone stamp further than this from the running sample clock starts a new stretch of
# audio (a gap); closer ones are jitter.
NEAR_GAP_S = 0.1


@dataclass(frozen=True)
class DoubleTalkConfig:
    """The tts_node `double_talk.*` parameters."""

    threshold: float = 0.5  # Geigel: mic peak / recent speaker peak above this = a second talker
    echo_window_s: float = 0.25  # how long the robot's voice keeps arriving at the mic (delay + reverb)
    clock_tolerance_s: float = 0.15  # mic and speaker stamps may disagree by this much
    min_speech_ms: int = 150  # double talk that is speech for this long is a barge-in
    vad_threshold: float = 0.5  # silero probability that counts as speech

    def __post_init__(self) -> None:
        # Checked here so a bad ROS parameter fails at node start, not on the first chunk.
        for name, positive in (("threshold", True), ("min_speech_ms", True), ("echo_window_s", False),
                               ("clock_tolerance_s", False)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise ValueError(f"double_talk.{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {value!r}")
        if not (isinstance(self.vad_threshold, (int, float)) and 0.0 < self.vad_threshold < 1.0):
            raise ValueError(f"double_talk.vad_threshold must be in (0, 1), got {self.vad_threshold!r}")


@dataclass(frozen=True)
class BargeIn:
    """The operator was detected talking over the robot."""

    at: float  # wall time of the end of the microphone window that completed the decision
    ratio: float  # its mic peak / speaker peak (how far above the echo it was)


class BargeInDetector:
    """Geigel double talk + silero speech + minimum duration (see the module docstring)."""

    def __init__(self, config: DoubleTalkConfig | None = None) -> None:
        self.config = config or DoubleTalkConfig()
        self._window_s = WINDOW / SAMPLE_RATE
        self._needed = max(1, math.ceil(self.config.min_speech_ms / 1000 / self._window_s))
        self._lock = threading.Lock()
        self._vad = SileroStream()
        self._far_t = np.zeros(0)  # start time of each speaker envelope bin
        self._far_peak = np.zeros(0, dtype=np.float32)
        self._ratios: collections.deque[float] = collections.deque(maxlen=512)
        self.reset()

    def reset(self) -> None:
        """Forget the microphone side (the robot starts speaking again); the speaker envelope stays,
        its echo may still be arriving."""
        with self._lock:
            self._vad.reset()
            self._pending = np.zeros(0, dtype=np.float32)
            self._pending_t = 0.0
            self._hits: collections.deque[bool] = collections.deque(maxlen=2 * self._needed)

    def far(self, t0: float, samples: np.ndarray, sample_rate: int) -> None:
        """The speaker plays `samples` (any rate, float) from wall time `t0` on."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
        samples = np.abs(np.asarray(samples, dtype=np.float32).reshape(-1))
        if samples.size == 0:
            return
        if not np.isfinite(samples).all():
            raise ValueError("speaker audio contains NaN/Inf")
        per_bin = max(1, round(FAR_BIN_S * sample_rate))
        n_bins = math.ceil(samples.size / per_bin)
        padded = np.zeros(n_bins * per_bin, dtype=np.float32)
        padded[: samples.size] = samples
        peaks = padded.reshape(n_bins, per_bin).max(axis=1)
        times = t0 + np.arange(n_bins) * (per_bin / sample_rate)
        with self._lock:
            self._far_t = np.concatenate([self._far_t, times])
            self._far_peak = np.concatenate([self._far_peak, peaks])
            self._forget_far_before(times[-1] - FAR_HISTORY_S)

    def near(self, t0: float, samples: np.ndarray) -> BargeIn | None:
        """The microphone captured `samples` (16 kHz mono float32) from wall time `t0` on.
        Returns the barge-in they complete, if any (then the decision starts afresh)."""
        samples = np.asarray(samples)
        if samples.dtype != np.float32 or samples.ndim != 1:
            raise ValueError(f"microphone audio must be 1-D float32 at {SAMPLE_RATE} Hz, "
                             f"got {samples.dtype} with shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise ValueError("microphone audio contains NaN/Inf")
        with self._lock:
            expected = self._pending_t + self._pending.size / SAMPLE_RATE
            if self._pending.size == 0 or abs(t0 - expected) > NEAR_GAP_S:
                self._pending, self._pending_t = samples, t0  # a new stretch of audio
            else:
                self._pending = np.concatenate([self._pending, samples])
            n = self._pending.size // WINDOW
            if n == 0:
                return None
            windows = self._pending[: n * WINDOW].reshape(n, WINDOW)
            start_t = self._pending_t
            self._pending = self._pending[n * WINDOW:].copy()
            self._pending_t = start_t + n * self._window_s
            probs = self._vad(windows)
            event = None
            for i, (window, prob) in enumerate(zip(windows, probs)):
                a = start_t + i * self._window_s
                event = self._decide(a, float(np.abs(window).max()), float(prob)) or event
            self._forget_far_before(self._pending_t - self.config.echo_window_s
                                    - 2 * self.config.clock_tolerance_s - 1.0)
            return event

    def echo_ratios(self) -> tuple[float, float] | None:
        """Median and 95th percentile of mic peak / speaker peak over the recent windows heard
        while the robot was playing: with the robot talking alone, its echo gain, which
        `threshold` must exceed."""
        with self._lock:
            if not self._ratios:
                return None
            values = np.fromiter(self._ratios, dtype=np.float64)
        return float(np.percentile(values, 50)), float(np.percentile(values, 95))

    # -- internals -------------------------------------------------------------------------------
    def _decide(self, a: float, near_peak: float, prob: float) -> BargeIn | None:
        """One 32 ms microphone window starting at wall time `a`."""
        c = self.config
        lo = a - c.echo_window_s - c.clock_tolerance_s
        hi = a + self._window_s + c.clock_tolerance_s
        mask = (self._far_t < hi) & (self._far_t + FAR_BIN_S > lo)
        far_peak = float(self._far_peak[mask].max()) if mask.any() else 0.0
        if far_peak > 0:
            self._ratios.append(near_peak / far_peak)
        double_talk = near_peak > c.threshold * far_peak
        self._hits.append(double_talk and prob >= c.vad_threshold)
        if sum(self._hits) < self._needed:
            return None
        self._hits.clear()
        return BargeIn(a + self._window_s, near_peak / far_peak if far_peak > 0 else math.inf)

    def _forget_far_before(self, t: float) -> None:
        keep = self._far_t + FAR_BIN_S >= t
        if not keep.all():
            self._far_t, self._far_peak = self._far_t[keep], self._far_peak[keep]


@dataclass(frozen=True)
class Heard:
    """What one microphone chunk came to: a barge-in, nothing, or why it was not judged."""

    event: BargeIn | None = None
    skipped: str = ""  # not judged: bad audio, or stamped on another clock ("" = judged or not speaking)


class VoiceBargeIn:
    """Barge-in by voice as tts_node runs it: `speaker()` for every block it plays, `microphone()`
    for every chunk the microphone publishes.

    The microphone is judged only while the robot is speaking; each new stretch of speech starts
    with the detector's microphone side forgotten. A chunk stamped more than `clock_tolerance_s`
    ahead of this machine's clock, or more than half of `FAR_HISTORY_S` behind it, comes from a
    microphone on another clock: compared with no speaker audio at all, the robot's own echo would
    look like a second talker, so it is skipped and counted (`off_clock_chunks`).
    """

    def __init__(self, config: DoubleTalkConfig | None = None) -> None:
        self.detector = BargeInDetector(config)
        self.off_clock_chunks = 0
        self._armed = False  # the detector has been reset for the speech going on now

    def speaker(self, t0: float, samples: np.ndarray, sample_rate: int) -> None:
        """The speaker plays `samples` from wall time `t0` on (BargeInDetector.far)."""
        self.detector.far(t0, samples, sample_rate)

    def microphone(self, speaking: bool, now: float, stamp: float, samples, sample_rate: int) -> Heard:
        """A microphone chunk captured from wall time `stamp` on, heard at wall time `now`."""
        if not speaking:
            self._armed = False
            return Heard()
        if not self._armed:  # a new stretch of speech: forget the microphone side of the last one
            self.detector.reset()
            self._armed = True
        try:
            audio = normalize(np.asarray(samples, dtype=np.float32), sample_rate)
        except AudioError as exc:
            return Heard(skipped=f"barge-in detector skipped a microphone chunk: {exc}")
        lag = now - stamp
        if not -self.detector.config.clock_tolerance_s <= lag <= FAR_HISTORY_S / 2:
            self.off_clock_chunks += 1
            return Heard(skipped=f"microphone chunk stamped {-lag:+.2f} s from this node's clock: barge-in "
                                 "by voice needs the microphone on this machine's clock; chunk skipped")
        return Heard(self.detector.near(stamp, audio.samples))
