"""Streaming voice-activity segmentation with the silero VAD model that faster-whisper ships.

asr_node receives audio in chunks of whatever size the microphone driver or a file source
chooses, and must hand Whisper one utterance at a time as soon as it ends, so the offline
``faster_whisper.vad.get_speech_timestamps`` (which needs the whole recording) cannot be used.
This module runs the same model and the same decision rules (threshold with hysteresis,
minimum silence, minimum speech, padding, a maximum length that prefers to cut at a pause) one
512-sample window at a time, carrying the model's state across chunks.

Model reuse: we load the model through faster-whisper's ``get_vad_model()`` (cached, one ONNX
session per process, one intra-op thread) but do not call ``SileroVADModel.__call__``: it
resets the LSTM state (h, c) and the 64-sample context to zero on every call, so calling it per
chunk would make every chunk look like the start of a recording. We feed its ONNX session
ourselves with the state carried over. The model's batch axis is the time axis (the LSTM runs
over the windows of one call in order), so one call per pushed chunk is bit-identical to one
call per window or to the offline run: segmentation does not depend on chunk size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from faster_whisper.vad import get_vad_model

SAMPLE_RATE = 16000
WINDOW = 512  # samples per silero decision at 16 kHz
CONTEXT = 64  # samples of the previous window silero v5+ expects in front of each window
# A pause at least this long inside an utterance is a good place to cut an over-long one
# (the value silero and faster-whisper use): cutting there avoids splitting a word.
CUT_PAUSE_MS = 98


class SileroStream:
    """Speech probability of each 512-sample window of one continuous 16 kHz stream.

    The model state (LSTM h, c and the 64-sample context) is carried from call to call, which
    ``SileroVADModel.__call__`` does not do (see the module docstring). Shared by the
    segmenter and by tts_node's barge-in detector (core/echo.py). Not thread-safe.
    """

    def __init__(self) -> None:
        self._session = get_vad_model().session
        self.reset()

    def reset(self) -> None:
        """The next window starts a new stream."""
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Probabilities (n,) of the (n, 512) float32 windows that follow the previous call's."""
        context = np.vstack([self._context[None], windows[:-1, -CONTEXT:]])
        probs, self._h, self._c = self._session.run(
            None, {"input": np.hstack([context, windows]), "h": self._h, "c": self._c})
        self._context = windows[-1, -CONTEXT:].copy()
        return np.asarray(probs).reshape(-1)


@dataclass(frozen=True)
class Segment:
    """One utterance, ready for the recognizer."""

    start_s: float  # seconds on the stream's clock (stamp of the first sample pushed + offset)
    end_s: float
    samples: np.ndarray  # float32 16 kHz, including padding
    truncated: bool  # cut because it hit max_utterance_s


@dataclass
class VadConfig:
    """Segmentation parameters (the asr_node ``vad.*`` parameters)."""

    threshold: float = 0.5  # speech probability that starts/continues speech
    min_silence_ms: int = 500  # silence that ends an utterance
    min_speech_ms: int = 250  # shorter bursts are dropped
    speech_pad_ms: int = 200  # audio kept before/after speech
    max_utterance_s: float = 20.0  # longer speech is cut and emitted (truncated=True), then continues
    # A pushed stamp this far from the running sample clock is a gap (or a restart) in the
    # stream; closer ones are driver jitter and are ignored so they never split an utterance.
    stamp_tolerance_ms: int = 100

    def __post_init__(self) -> None:
        # Checked here so a bad ROS parameter fails at node start, not on the first chunk.
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        for name in ("min_silence_ms", "min_speech_ms", "speech_pad_ms", "stamp_tolerance_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.max_utterance_s, (int, float)) and math.isfinite(self.max_utterance_s)
                and self.max_utterance_s > 0):
            raise ValueError(f"max_utterance_s must be a finite number > 0, got {self.max_utterance_s!r}")

    @property
    def neg_threshold(self) -> float:
        """Below this probability a window counts as silence (silero's hysteresis): values
        between the two thresholds neither start nor end speech, so a dip mid-word does not
        start the silence timer."""
        return max(self.threshold - 0.15, 0.01)


class StreamingSegmenter:
    """Cuts a 16 kHz mono float32 stream, pushed in chunks of any size, into utterances.

    Clock: every sample has a time on the stream's clock, ``origin + index / sample_rate``. The
    first push anchors it (its stamp, or 0.0 without one); later pushes without a stamp continue
    it. A later stamp within ``stamp_tolerance_ms`` of the running clock is ignored (jitter). A
    stamp further away, forward (dropped audio) or backward (the source restarted), means the
    audio on the two sides is not continuous: the utterance in progress is closed at the last
    sample before the jump (as ``flush`` would; not marked truncated, that flag means the length
    limit), the model state is reset, and the clock re-anchors at the new stamp. Gluing audio
    across a gap would hand Whisper a splice, and the LSTM state would describe audio that is
    no longer adjacent.

    Memory: between utterances only ``speech_pad_ms`` of pre-roll is kept; during one, its
    audio (padding included), which is cut at ``max_utterance_s``; plus fewer than 512 samples
    (32 ms) waiting to fill a window. So never more than max_utterance_s + 32 ms, whatever the
    input, and no segment is longer than max_utterance_s.

    End padding is ``speech_pad_ms`` after the last speech window, but an utterance is emitted
    as soon as ``min_silence_ms`` of silence is seen: if the pad is set longer than the silence,
    the end pad is shortened to the silence heard (waiting longer would only add latency).
    Consecutive segments never share samples: a pre-roll never reaches back into the previous
    segment.

    Not thread-safe: one stream, one caller (asr_node calls it from its audio callback).
    """

    def __init__(self, config: VadConfig | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            # faster-whisper's ONNX export has no sample-rate input: it is the 16 kHz model.
            raise ValueError(f"the silero model shipped with faster-whisper needs {SAMPLE_RATE} Hz audio, "
                             f"got sample_rate={sample_rate}; resample first")
        # A private copy: a caller mutating its VadConfig later cannot change a running stream.
        self.config = replace(config) if config is not None else VadConfig()
        self.sample_rate = sample_rate
        ms = sample_rate / 1000
        self._pad = int(self.config.speech_pad_ms * ms)
        self._min_silence = int(self.config.min_silence_ms * ms)
        self._min_speech = int(self.config.min_speech_ms * ms)
        self._cut_pause = int(CUT_PAUSE_MS * ms)
        self._tolerance_s = self.config.stamp_tolerance_ms / 1000
        self._max_len = int(self.config.max_utterance_s * sample_rate)
        # Room for both paddings and a few windows of speech, else every segment would be a cut.
        min_len = 2 * self._pad + 4 * WINDOW
        if self._max_len < min_len:
            raise ValueError(f"max_utterance_s={self.config.max_utterance_s} is too short for "
                             f"speech_pad_ms={self.config.speech_pad_ms}: it must be at least "
                             f"{min_len / sample_rate:.3f} s")
        self._vad = SileroStream()
        self._threshold = self.config.threshold
        self._neg_threshold = self.config.neg_threshold
        # The buffer never holds more than max_len samples (see _step), so allocate it once.
        self._buf = np.zeros(self._max_len, dtype=np.float32)
        self.reset()

    # -- public API ------------------------------------------------------------------------------
    def push(self, samples: np.ndarray, stamp_s: float | None = None) -> list[Segment]:
        """Feed the next chunk; return the utterances it completed (usually none).

        ``stamp_s`` is the stream time of ``samples[0]``; None continues the running clock.
        Raises ValueError for anything but a finite 1-D float32 array (or a non-finite stamp),
        leaving the segmenter unchanged so the caller may skip the chunk and go on.
        """
        samples = self._validate(samples)
        if stamp_s is not None:
            if isinstance(stamp_s, bool) or not isinstance(stamp_s, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(stamp_s):
                raise ValueError(f"stamp_s must be a finite number of seconds or None, got {stamp_s!r}")
            stamp_s = float(stamp_s)
        segments: list[Segment] = []
        if stamp_s is not None:
            if self._pos == 0 and len(self._pending) == 0:
                self._origin_s = stamp_s  # nothing heard in this run yet: anchor the clock here
            elif abs(stamp_s - self._time(self._pos + len(self._pending))) > self._tolerance_s:
                segments += self._end_run()
                self._start_run(stamp_s)
        if len(samples) == 0:
            return segments
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n_windows = len(data) // WINDOW
        self._pending = data[n_windows * WINDOW:].copy()
        if n_windows:
            windows = data[: n_windows * WINDOW].reshape(n_windows, WINDOW)
            for window, prob in zip(windows, self._vad(windows)):
                segments += self._advance(window, float(prob))
        return segments

    def flush(self) -> list[Segment]:
        """End of stream: decide on the last partial window and emit the utterance in progress.

        The model and detection state start afresh afterwards (the next audio is a new
        stream), but the clock keeps running so a following ``push`` without a stamp continues
        after the flushed audio.
        """
        segments = self._end_run()
        self._start_run(self._time(self._pos))
        return segments

    def reset(self) -> None:
        """Forget everything, including the clock: as good as a new segmenter."""
        self._start_run(0.0)

    @property
    def in_speech(self) -> bool:
        """True while an utterance is open (speech heard and not yet ended by silence)."""
        return self._triggered

    @property
    def open_start_s(self) -> float | None:
        """Stream time of the open utterance's first sample (pre-roll included), None between
        utterances (booster_node's text teacher transcribes the utterance while it is spoken)."""
        return self._time(self._seg_start) if self._triggered else None

    @property
    def buffered_samples(self) -> int:
        """Audio samples held right now: the memory bound made observable, for tests and
        diagnostics."""
        return self._buf_len + len(self._pending)

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _validate(samples: np.ndarray) -> np.ndarray:
        if not isinstance(samples, np.ndarray):
            raise ValueError(f"samples must be a numpy array, got {type(samples).__name__}")
        if samples.ndim != 1:
            raise ValueError(f"samples must be 1-D mono audio, got shape {samples.shape}; "
                             "mix channels down first")
        if samples.dtype != np.float32:
            raise ValueError(f"samples must be float32 in [-1, 1], got {samples.dtype}; "
                             "convert (and scale integer PCM) first")
        if not np.isfinite(samples).all():
            bad = int(np.count_nonzero(~np.isfinite(samples)))
            raise ValueError(f"samples contain {bad} NaN/Inf value(s)")
        return samples

    def _start_run(self, origin_s: float) -> None:
        """Begin a continuous run of audio: fresh model state, detector, buffer and clock."""
        self._origin_s = origin_s
        self._pos = 0  # samples that went through the model in this run
        self._pending = np.zeros(0, dtype=np.float32)
        self._vad.reset()
        self._buf_start = 0  # run index of self._buf[0]
        self._buf_len = 0
        self._floor = 0  # no segment may start before this (end of the previous one)
        self._triggered = False
        self._seg_start = 0  # first sample of the open segment (pre-roll included)
        self._speech_start: int | None = None  # first speech window of the open segment
        self._continued = False  # the open segment continues speech cut at max_utterance_s
        self._temp_end: int | None = None  # start of the silence running now inside the segment
        self._cut: int | None = None  # best place to cut if the segment gets too long

    def _time(self, index: int) -> float:
        return self._origin_s + index / self.sample_rate

    def _advance(self, audio: np.ndarray, prob: float) -> list[Segment]:
        """Buffer one window's audio and apply the decision rules to its probability."""
        start = self._pos
        self._buf[self._buf_len:self._buf_len + len(audio)] = audio
        self._buf_len += len(audio)
        self._pos += len(audio)
        return self._step(prob, start, self._pos)

    def _step(self, prob: float, start: int, end: int) -> list[Segment]:
        """The silero/faster-whisper rules for the window [start, end) of the current run."""
        speech = prob >= self._threshold
        if not self._triggered:
            if speech:
                self._triggered = True
                self._seg_start = max(start - self._pad, self._floor, self._buf_start)
                self._speech_start = start
                self._continued = False
                self._temp_end = self._cut = None
                self._drop_before(self._seg_start)
            else:
                self._drop_before(end - self._pad)  # keep only the pre-roll
            return []

        if speech:
            self._temp_end = None
            if self._speech_start is None:
                self._speech_start = start
        elif prob < self._neg_threshold:
            if self._temp_end is None:
                self._temp_end = start
            silence = end - self._temp_end
            if silence >= self._cut_pause:
                # Mid-pause, but no further than the end pad from the speech before it.
                self._cut = self._temp_end + min(self._pad, silence // 2)
            if silence >= self._min_silence:
                return self._close(min(self._temp_end + self._pad, end))

        # Leave room for one more window so the buffer never exceeds max_len (the memory bound).
        if end - self._seg_start + WINDOW > self._max_len:
            return [self._truncate(end)]
        return []

    def _truncate(self, end: int) -> Segment:
        """Emit the open segment because it is too long; the rest goes on as a new segment."""
        cut = self._cut if self._cut is not None and self._cut > self._seg_start else end
        segment = self._emit(self._seg_start, cut, truncated=True)
        self._seg_start = cut
        self._drop_before(cut)
        self._cut = None
        # Cut inside a pause that is still going on: the rest counts once speech comes back.
        self._speech_start = None if self._temp_end is not None else cut
        self._continued = True
        return segment

    def _close(self, end: int) -> list[Segment]:
        """The utterance ended at ``end``: emit it unless it was too short to be speech."""
        speech_end = self._temp_end if self._temp_end is not None else end
        # The tail of an utterance cut at max_utterance_s is real speech however short, not a
        # click: min_speech_ms only judges utterances that started on their own.
        keep = self._speech_start is not None and (
            self._continued or speech_end - self._speech_start >= self._min_speech)
        segments = [self._emit(self._seg_start, end, truncated=False)] if keep else []
        self._floor = end if keep else self._floor
        self._triggered = False
        self._speech_start = self._temp_end = self._cut = None
        self._continued = False
        self._drop_before(self._pos - self._pad)
        return segments

    def _end_run(self) -> list[Segment]:
        """No more audio in this run: judge the partial window, close an open utterance."""
        segments: list[Segment] = []
        if len(self._pending):
            tail = self._pending
            self._pending = np.zeros(0, dtype=np.float32)
            window = np.zeros((1, WINDOW), dtype=np.float32)
            window[0, : len(tail)] = tail  # zero-padded for the model, as faster-whisper does
            segments += self._advance(tail, float(self._vad(window)[0]))
        if self._triggered:
            segments += self._close(self._pos)
        return segments

    def _emit(self, start: int, end: int, truncated: bool) -> Segment:
        samples = self._buf[start - self._buf_start:end - self._buf_start].copy()
        return Segment(self._time(start), self._time(end), samples, truncated)

    def _drop_before(self, index: int) -> None:
        """Forget buffered audio before run index ``index``."""
        n = min(index - self._buf_start, self._buf_len)
        if n <= 0:
            return
        self._buf[: self._buf_len - n] = self._buf[n:self._buf_len]
        self._buf_len -= n
        self._buf_start += n
