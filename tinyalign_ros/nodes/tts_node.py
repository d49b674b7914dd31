"""tts_node: /tinyalign/response_tokens (or /tinyalign/response) → speech, /tinyalign/speaking.

Outputs, any combination: a sounddevice output (`play`, `device`), `speech_audio` (AudioChunk,
published in `chunk_s` blocks as they are played), a WAV file (`speak_to_file`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from rclpy.node import Node
from std_msgs.msg import Bool, Empty, Float32, String

from tinyalign_ros.core.audio import find_device
from tinyalign_ros.core.corpus import SynthesisError
from tinyalign_ros.core.echo import BargeIn, BargeInDetector, DoubleTalkConfig, VoiceBargeIn
from tinyalign_ros.core.latency import STAGES_TOPIC, stage_record
from tinyalign_ros.core.tts import ENGINES, AnswerLatency, AnswerStreams, Sentence, Synthesizer
from tinyalign_ros.msg import AudioChunk, Response, ResponseToken

from .common import (AUDIO_QOS, DROPPED_TOPIC, EVENT_QOS, LATCHED_QOS, Worker, drop_record, from_time_msg,
                     plausible_latency, run_node)
from .diagnostics import ERROR, OK, WARN, Status, Updater


@dataclass
class _Audio:
    generation: int
    utterance_id: str
    text: str
    samples: np.ndarray  # at the node's output rate


class TtsNode(Node):
    """Speaks the assistant's answers sentence by sentence and says when the robot is speaking.

    Two worker threads form a pipeline: one synthesizes sentences as the token stream completes
    them (core/tts.py `AnswerStreams` says which sentences of which answers to speak), the other
    plays them (while the next is synthesized), so speech starts after the first sentence, not
    the last token. Without a sound device (or with `play: false`) the audio is
    still paced at real time (`realtime`), so `speaking` and `speech_audio` tell the truth about
    when a robot's own audio stack would be sounding it.

    `speaking` (latched Bool) is True from the first sample of a sentence until `tail_s` after
    the last sample of the queue (room echo), False otherwise. A barge-in (`barge_in` topic, when
    the `barge_in` parameter is true) stops playback within one `chunk_s` block, drops every
    queued sentence and the rest of the interrupted answers' tokens, and sets `speaking` False at
    once, without the tail: the operator is talking and the microphone must hear them.

    Barge-in by voice (`barge_in_on_speech`): this node also listens to the microphone
    (`audio`) while it speaks and stops the same way when the operator talks over it, but not
    when the microphone only hears the robot: a Geigel double-talk detector compares the
    microphone with exactly what this node played, aligned by wall time (core/echo.py
    `VoiceBargeIn`, which also says what it cannot do without an echo canceller).

    `speak_to_file`: one WAV for the node's lifetime (truncated at start); every sentence is
    appended as it finishes playing, exactly as spoken (cut short by a barge-in too), and the
    file is a valid WAV after each append.

    Latency: `first_token_to_audio_s` (this node's share: the answer's first token → its first
    audio sample) and `end_of_speech_to_audio_s` (the operator's end of speech, known from the
    Response's `latency_last_token_s`, → the first audio sample), both logged and published
    (`metrics/first_token_to_audio_s`, `metrics/end_of_speech_to_audio_s`, Float32) per answer,
    and in /diagnostics (core/tts.py `AnswerLatency`).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("tts_node", **kwargs)
        self._stream = None  # set first: destroy_node runs even if __init__ fails
        self._file = None
        p = self.declare_parameter
        engine = p("engine", "piper").value
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got '{engine}'")
        self.stream_tokens = bool(p("stream_tokens", True).value)
        self.play = bool(p("play", True).value)
        self.device = str(p("device", "").value)
        self.publish_audio = bool(p("publish_audio", True).value)
        self.output_rate = int(p("sample_rate", 0).value)
        self.chunk_s = float(p("chunk_s", 0.05).value)
        self.tail_s = float(p("tail_s", 0.3).value)
        self.barge_in_enabled = bool(p("barge_in", True).value)
        self.barge_in_on_speech = bool(p("barge_in_on_speech", False).value)
        double_talk = DoubleTalkConfig(  # validated even when off: a bad value is an error either way
            threshold=float(p("double_talk.threshold", 0.5).value),
            echo_window_s=float(p("double_talk.echo_window_s", 0.25).value),
            clock_tolerance_s=float(p("double_talk.clock_tolerance_s", 0.15).value),
            min_speech_ms=int(p("double_talk.min_speech_ms", 150).value),
            vad_threshold=float(p("double_talk.vad_threshold", 0.5).value),
        )
        self.voice = VoiceBargeIn(double_talk) if self.barge_in_on_speech else None
        self.speak_to_file = str(p("speak_to_file", "").value)
        self.realtime = bool(p("realtime", True).value)
        self.max_queued = int(p("max_queued_sentences", 32).value)
        self.max_sentence_chars = int(p("max_sentence_chars", 200).value)
        self.first_clause_chars = int(p("first_clause_chars", 4).value)
        if not 0.005 <= self.chunk_s <= 1.0:
            raise ValueError(f"chunk_s must be in [0.005, 1], got {self.chunk_s}")
        if self.tail_s < 0:
            raise ValueError(f"tail_s must be >= 0, got {self.tail_s}")
        self.synth = Synthesizer(engine, voice=p("voice", "").value, espeak_voice=p("espeak_voice", "en-us").value,
                                 rate=float(p("rate", 1.0).value), volume=float(p("volume", 1.0).value),
                                 logger=self.get_logger())
        self.output_rate = self.output_rate or self.synth.sample_rate
        started = time.monotonic()
        self.synth.synthesize("Ready.")  # the first onnxruntime call is slow: pay it now, not in an answer
        self.get_logger().info(f"voice: {self.synth.description} at {self.synth.sample_rate} Hz "
                               f"(warm-up {time.monotonic() - started:.2f} s)")

        self._lock = threading.RLock()  # guards answers, latency and the speaking state
        self.answers = AnswerStreams(self.max_sentence_chars, self.stream_tokens, logger=self.get_logger(),
                                     first_clause_chars=self.first_clause_chars)
        self.latency = AnswerLatency()
        self._speaking = False
        self._playing = False
        self._last_sample_end = 0.0       # monotonic time the last played sample leaves the speaker
        self._stopping = threading.Event()
        self.offset = 0
        self.sentences_spoken = 0
        self.sentences_interrupted = 0
        self.barge_ins = 0
        self.voice_barge_ins = 0
        self.last_voice_barge_in: BargeIn | None = None  # when (microphone time) and how loud
        self.dropped_sentences = 0
        self.synthesis_errors = 0
        self.last_synthesis_s = 0.0
        self.last_synthesis_rtf = 0.0
        self.last_first_token_to_audio_s = float("nan")
        self.last_end_of_speech_to_audio_s = float("nan")
        self.audio_seconds = 0.0

        self.device_error = ""
        self.device_name = ""
        self.device_latency_s = 0.0
        if self.play:
            self._open_device()
        if self.speak_to_file:
            self._open_file()

        self.speaking_pub = self.create_publisher(Bool, "speaking", LATCHED_QOS)
        self.speaking_pub.publish(Bool(data=False))
        self.audio_pub = self.create_publisher(AudioChunk, "speech_audio", AUDIO_QOS) if self.publish_audio else None
        # per answer, for rqt_plot and `tinyalign bench latency`: when the robot's voice started
        self.latency_pubs = {name: self.create_publisher(Float32, f"metrics/{name}", EVENT_QOS)
                             for name in ("first_token_to_audio_s", "end_of_speech_to_audio_s")}
        self.stages_pub = self.create_publisher(String, STAGES_TOPIC, EVENT_QOS)  # bench latency's breakdown
        # a sentence a full queue drops is announced (common.drop_record): the answer was not all spoken
        self.dropped_pub = self.create_publisher(String, DROPPED_TOPIC, EVENT_QOS)
        self.player: Worker[_Audio] = Worker("tts-play", self._play, 4 * self.max_queued,
                                             self._on_drop, self._on_error)
        self.synth_worker: Worker[Sentence] = Worker("tts-synth", self._synthesize, self.max_queued,
                                                      self._on_drop, self._on_error)
        if self.stream_tokens:
            self.create_subscription(ResponseToken, "response_tokens", self._on_token, EVENT_QOS)
        # Subscribed in both modes: in token mode it brings the end of speech (latency) and speaks
        # answers whose tokens never came (an assistant that does not stream).
        self.create_subscription(Response, "response", self._on_response, EVENT_QOS)
        self.create_subscription(Empty, "barge_in", self._on_barge_in, EVENT_QOS)
        if self.voice is not None:
            self.create_subscription(AudioChunk, "audio", self._on_mic, AUDIO_QOS)
        self.create_timer(0.05, self._update_speaking)  # tail resolution
        Updater(self).add("speech output", self._diagnose)
        outputs = [o for o, on in (("device", self._stream is not None), ("speech_audio", self.publish_audio),
                                   (f"file {self.speak_to_file}", bool(self._file))) if on]
        self.get_logger().info(f"ready: {'token stream' if self.stream_tokens else 'whole responses'} → "
                               f"{', '.join(outputs) or 'nothing (no output enabled)'}")

    # -- outputs ---------------------------------------------------------------------------------
    def _open_device(self) -> None:
        """Open the sound card; on failure say why (and what exists) and carry on without it."""
        try:
            import sounddevice as sd

            index = find_device(self.device, "output")
            info = sd.query_devices(index, "output")
            stream = sd.OutputStream(device=index, channels=1, samplerate=int(info["default_samplerate"]),
                                     dtype="float32")
            stream.start()
        except Exception as exc:  # no PortAudio, no device, device busy, unsupported format, ...
            self.device_error = f"{exc}".strip() or repr(exc)
            self.get_logger().error(f"cannot play on audio device '{self.device or 'default'}': {self.device_error}; "
                                    f"{self._without_device()}")
            return
        self._stream = stream
        self.device_name = info["name"]
        self.device_latency_s = float(stream.latency)
        self.get_logger().info(f"playing on {self.device_name} at {int(stream.samplerate)} Hz")

    def _close_device(self, reason: str) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self.device_error = reason
            self.get_logger().error(f"audio device '{self.device_name}' failed: {reason}; {self._without_device()}")
            try:
                stream.abort()
                stream.close()
            except Exception:
                pass

    def _without_device(self) -> str:
        others = [o for o, on in (("the speech_audio topic", self.publish_audio),
                                  (f"file {self.speak_to_file}", bool(self.speak_to_file))) if on]
        return (f"speaking continues without it, to {' and '.join(others)}" if others
                else "nothing will be heard (publish_audio is false and speak_to_file is empty)")

    def _open_file(self) -> None:
        path = Path(self.speak_to_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.SoundFile(str(path), "w", samplerate=self.output_rate, channels=1, format="WAV", subtype="PCM_16").close()
        self._file = path
        self.get_logger().info(f"writing spoken answers to {path}")

    def _append_to_file(self, samples: np.ndarray) -> None:
        if self._file is None or samples.size == 0:
            return
        try:
            with sf.SoundFile(str(self._file), "r+") as f:  # closing rewrites the header: valid after each append
                f.seek(0, sf.SEEK_END)
                f.write(samples)
        except Exception as exc:
            self.get_logger().error(f"cannot append to {self._file}: {exc!r}", throttle_duration_sec=10.0)

    # -- input callbacks -------------------------------------------------------------------------
    def _on_token(self, msg: ResponseToken) -> None:
        with self._lock:
            sentences = self.answers.token(msg.utterance_id, msg.index, msg.text, msg.final)
            if sentences is None:
                return
            self.latency.token(msg.utterance_id, from_time_msg(msg.header.stamp))
        for sentence in sentences:
            self.synth_worker.put(sentence)

    def _on_response(self, msg: Response) -> None:
        with self._lock:
            self.latency.response(msg.utterance_id, from_time_msg(msg.header.stamp), msg.latency_first_token_s,
                                  msg.latency_last_token_s)
            sentences = self.answers.response(msg.utterance_id, msg.text)
        self._report_latency(msg.utterance_id)
        for sentence in sentences:
            self.synth_worker.put(sentence)

    def _on_barge_in(self, _msg: Empty) -> None:
        if not self.barge_in_enabled:
            self.get_logger().info("barge-in ignored (parameter barge_in is false)", throttle_duration_sec=10.0)
            return
        self._interrupt("barge-in")

    def _on_mic(self, msg: AudioChunk) -> None:
        """Barge-in by voice: run the double-talk detector on the microphone while speaking."""
        heard = self.voice.microphone(self._speaking, self.get_clock().now().nanoseconds * 1e-9,
                                      from_time_msg(msg.header.stamp), msg.samples, msg.sample_rate)
        if heard.skipped:
            self.get_logger().warning(heard.skipped, throttle_duration_sec=10.0)
            return
        event = heard.event
        if event is not None and self._interrupt(
                f"barge-in by voice (microphone at {event.ratio:.2f} x the robot's recent peak, "
                f"threshold {self.detector.config.threshold:g})"):
            self.voice_barge_ins += 1
            self.last_voice_barge_in = event

    def _interrupt(self, reason: str) -> bool:
        """Stop speaking now and drop everything queued; True if there was something to stop."""
        with self._lock:
            busy = self._playing or not self.synth_worker.idle or not self.player.idle
            busy = self.answers.interrupt() or busy
            was_speaking = self._speaking
            self._set_speaking(False)
        if busy or was_speaking:
            self.barge_ins += 1
            self.get_logger().info(f"{reason}: speech stopped, queued sentences dropped")
        return busy or was_speaking

    # -- worker threads --------------------------------------------------------------------------
    def _synthesize(self, item: Sentence) -> None:
        if not self.answers.current(item.generation):
            return
        started = time.monotonic()
        try:
            samples, rate = self.synth.synthesize(item.text)
        except (SynthesisError, OSError) as exc:
            self.synthesis_errors += 1
            self.get_logger().error(f"{item.utterance_id}: cannot synthesize {item.text[:60]!r}: {exc}")
            return
        elapsed = time.monotonic() - started
        if samples.size == 0:
            return
        self.last_synthesis_s = elapsed
        self.last_synthesis_rtf = elapsed / (samples.size / rate)
        self.get_logger().debug(f"{item.utterance_id}: synthesized {samples.size / rate:.2f} s in {elapsed:.2f} s")
        if rate != self.output_rate:
            samples = soxr.resample(samples, rate, self.output_rate).astype(np.float32, copy=False)
        # back-pressure: wait while the player has enough queued (never drop a sentence mid-answer)
        while (self.player.depth >= self.max_queued and self.answers.current(item.generation)
               and not self._stopping.wait(0.02)):
            pass
        with self._lock:
            if not self.answers.start(item):
                return
        self.player.put(_Audio(item.generation, item.utterance_id, item.text, samples))

    def _play(self, item: _Audio) -> None:
        with self._lock:
            if not self.answers.current(item.generation):
                return
            self._playing = True
            self._set_speaking(True)
        block = max(1, int(round(self.chunk_s * self.output_rate)))
        played = 0
        device_audio, ratio = self._device_audio(item.samples)
        t0 = time.monotonic()
        try:
            for start in range(0, item.samples.size, block):
                if not self.answers.current(item.generation) or self._stopping.is_set():
                    self._flush_device()
                    break
                samples = item.samples[start:start + block]
                if start == 0:
                    self._first_audio(item.utterance_id)
                if self.voice is not None:  # the far end, when it reaches the speaker
                    self.voice.speaker(self.get_clock().now().nanoseconds * 1e-9
                                      + (self.device_latency_s if self._stream else 0.0), samples, self.output_rate)
                self._publish_chunk(samples)
                if self._stream is not None:
                    self._write_device(device_audio[round(start * ratio):round((start + samples.size) * ratio)])
                if self._stream is None and self.realtime:  # pace at real time (also after a device failure)
                    end = t0 + (start + samples.size) / self.output_rate
                    while (self.answers.current(item.generation) and not self._stopping.is_set()
                           and (delay := end - time.monotonic()) > 0):
                        time.sleep(min(delay, 0.01))
                played = start + samples.size
        finally:
            with self._lock:
                self._playing = False
                self._last_sample_end = time.monotonic() + (self.device_latency_s if self._stream else 0.0)
                if not self.answers.current(item.generation):
                    self.sentences_interrupted += 1
                else:
                    self.sentences_spoken += 1
            self.audio_seconds += played / self.output_rate
            self._append_to_file(item.samples[:played])

    def _device_audio(self, samples: np.ndarray) -> tuple[np.ndarray, float]:
        """The sentence at the sound card's rate (resampled whole: per-block resampling clicks)."""
        stream = self._stream
        if stream is None or int(stream.samplerate) == self.output_rate:
            return samples, 1.0
        ratio = int(stream.samplerate) / self.output_rate
        return soxr.resample(samples, self.output_rate, int(stream.samplerate)).astype(np.float32, copy=False), ratio

    def _write_device(self, samples: np.ndarray) -> None:
        try:
            self._stream.write(samples.reshape(-1, 1))
        except Exception as exc:
            self._close_device(f"{exc}".strip() or repr(exc))

    def _flush_device(self) -> None:
        """Barge-in: drop what the sound card still has buffered, at once."""
        stream = self._stream
        if stream is None:
            return
        try:
            stream.abort()
            stream.start()
        except Exception as exc:
            self._close_device(f"{exc}".strip() or repr(exc))

    def _publish_chunk(self, samples: np.ndarray) -> None:
        if self.audio_pub is None:
            return
        msg = AudioChunk()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "speaker"
        msg.sample_rate = self.output_rate
        msg.offset = self.offset
        msg.end_of_stream = False
        msg.samples = samples
        self.offset += samples.size
        self.audio_pub.publish(msg)

    # -- speaking state --------------------------------------------------------------------------
    def _set_speaking(self, speaking: bool) -> None:
        with self._lock:
            if speaking != self._speaking:
                self._speaking = speaking
                self.speaking_pub.publish(Bool(data=speaking))

    def _update_speaking(self) -> None:
        with self._lock:
            if (self._speaking and not self._playing and self.player.idle
                    and time.monotonic() >= self._last_sample_end + self.tail_s):
                self._set_speaking(False)
                if self.synth_worker.idle:
                    self.answers.quiet()

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def detector(self) -> BargeInDetector | None:
        """The double-talk detector (None without `barge_in_on_speech`)."""
        return self.voice.detector if self.voice is not None else None

    @property
    def off_clock_mic_chunks(self) -> int:
        return self.voice.off_clock_chunks if self.voice is not None else 0

    @property
    def idle(self) -> bool:
        """Nothing to synthesize, nothing to play, not speaking (tail included)."""
        return self.synth_worker.idle and self.player.idle and not self._speaking

    # -- latency ---------------------------------------------------------------------------------
    def _first_audio(self, uid: str) -> None:
        with self._lock:
            if not self.latency.first_audio(uid, self.get_clock().now().nanoseconds * 1e-9):
                return
        self._report_latency(uid)

    def _report_latency(self, uid: str) -> None:
        """Log and publish (metrics/NAME) each figure once per answer, as soon as both of its ends
        are known."""
        with self._lock:
            figures = self.latency.due(uid)
            self.last_first_token_to_audio_s = figures.get("first_token_to_audio_s",
                                                           self.last_first_token_to_audio_s)
            self.last_end_of_speech_to_audio_s = figures.get("end_of_speech_to_audio_s",
                                                             self.last_end_of_speech_to_audio_s)
        for name, value in list(figures.items()):
            if not plausible_latency(value):
                self.get_logger().warning(f"{uid}: {name} = {value:.1f} s is not a latency (bad stamp upstream): "
                                          "not published", throttle_duration_sec=5.0)
                del figures[name]
                continue
            self.latency_pubs[name].publish(Float32(data=float(value)))
            if name == "first_token_to_audio_s":
                self.stages_pub.publish(String(data=stage_record(uid, self.get_name(), {"tts_first_audio_s": value})))
        if figures:
            self.get_logger().info(f"{uid}: first audio sample: "
                                   f"{' '.join(f'{k}={v:.3f}' for k, v in figures.items())}")

    # -- diagnostics -----------------------------------------------------------------------------
    def _diagnose(self, status: Status) -> None:
        status.add("engine", self.synth.description)
        status.add("fallback_reason", self.synth.fallback_reason)
        status.add("device", self.device_name or ("off" if not self.play else f"unavailable: {self.device_error}"))
        status.add("publish_audio", self.publish_audio)
        status.add("speak_to_file", self.speak_to_file)
        status.add("speaking", self._speaking)
        status.add("queued_sentences", self.synth_worker.depth + self.player.depth)
        status.add("sentences_spoken", self.sentences_spoken)
        status.add("sentences_interrupted", self.sentences_interrupted)
        status.add("audio_seconds", self.audio_seconds)
        status.add("barge_ins", self.barge_ins)
        status.add("barge_in_on_speech", self.barge_in_on_speech)
        if self.detector is not None:
            status.add("voice_barge_ins", self.voice_barge_ins)
            status.add("off_clock_mic_chunks", self.off_clock_mic_chunks)
            ratios = self.detector.echo_ratios()  # with the robot talking alone: its echo gain
            status.add("echo_ratio_p50", ratios[0] if ratios else float("nan"))
            status.add("echo_ratio_p95", ratios[1] if ratios else float("nan"))
        status.add("dropped_sentences", self.dropped_sentences)
        status.add("synthesis_errors", self.synthesis_errors)
        status.add("last_synthesis_s", self.last_synthesis_s)
        status.add("last_synthesis_rtf", self.last_synthesis_rtf)
        status.add("first_token_to_audio_s", self.last_first_token_to_audio_s)
        status.add("end_of_speech_to_audio_s", self.last_end_of_speech_to_audio_s)
        has_output = self._stream is not None or self.publish_audio or self._file is not None
        if not has_output:
            status.summary(ERROR, f"no audio output: device unavailable ({self.device_error})" if self.play
                           else "no audio output enabled")
        elif self.play and self._stream is None:
            status.summary(WARN, f"audio device unavailable ({self.device_error}); publishing only")
        elif self.synth.fallback_reason:
            status.summary(WARN, f"piper unavailable, speaking with espeak-ng: {self.synth.fallback_reason}")
        elif self.synthesis_errors or self.dropped_sentences:
            status.summary(WARN, f"{self.synthesis_errors} synthesis errors, {self.dropped_sentences} sentences dropped")
        else:
            status.summary(OK, "speaking" if self._speaking else "quiet")

    def _on_drop(self, item) -> None:
        self.dropped_sentences += 1
        self.get_logger().warning(f"{item.utterance_id}: speech queue full, dropped {item.text[:60]!r}",
                                  throttle_duration_sec=5.0)  # one huge answer is thousands of sentences
        self.dropped_pub.publish(String(data=drop_record(self.get_name(), "speech queue full", item.utterance_id,
                                                         text=item.text)))

    def _on_error(self, item, exc: BaseException) -> None:
        self.get_logger().error(f"{item.utterance_id}: speaking {item.text[:60]!r} failed: {exc!r}")

    def destroy_node(self) -> None:
        self._stopping.set()
        for name in ("synth_worker", "player"):
            if hasattr(self, name):  # absent when the constructor failed
                getattr(self, name).stop()
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except Exception:
                pass
            self._stream = None
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(TtsNode, args, startup_errors=(SynthesisError, ValueError, OSError))


if __name__ == "__main__":
    main()
