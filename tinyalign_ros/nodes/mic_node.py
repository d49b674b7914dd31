"""mic_node: microphone or file audio → /tinyalign/audio (AudioChunk, 16 kHz mono float32)."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
from rclpy.node import Node
from std_msgs.msg import String

from tinyalign_ros.core.audio import SAMPLE_RATE, AudioError, chunks, find_device, load_audio, normalize
from tinyalign_ros.msg import AudioChunk, Response

from .common import AUDIO_QOS, DROPPED_TOPIC, EVENT_QOS, LATCHED_QOS, run_node
from .diagnostics import OK, WARN, RateMeter, Status, Updater


PIPELINE = "the pipeline (asr_node's audio_consumed, assistant_node's answers)"


class MicNode(Node):
    """Publishes fixed-size chunks from a sounddevice input or from a WAV/FLAC file.

    A file is played at `playback_rate` x real time, which makes demos and tests replay exactly
    what a microphone would have delivered, or with `playback_rate` 0 (`tinyalign run --fast`) as
    fast as the pipeline takes it, losing nothing (`fast.lossless`, the default):

    - **Audio link**: at most `fast.window_chunks` chunks are published beyond the stream offset
      that asr_node reports it has consumed (`audio_consumed`, latched std_msgs/String JSON
      `{"offset", "pending", "utterances"}`, sent after each chunk has been through its VAD and
      after each transcription). Unpaced, a file source outran the subscriber and the reliable
      KEEP_LAST(100) audio link overwrote chunks (a 7-minute file lost all but 2 utterances).
      Why a consumed-offset topic rather than the alternatives: a KEEP_ALL reliable link blocks
      the writer only as deep as the DDS reader cache, not the executor that takes chunks out of
      it, and how far it blocks differs between RMWs; a service call per chunk costs a round trip
      each and a service client per source. An acknowledged offset is one small latched message,
      works across processes (launch) as in one (`tinyalign run`), and leaves the live path as it
      was: a microphone never waits, and asr_node just reports.
    - **Downstream**: bounded queues in asr_node and assistant_node drop their oldest utterance
      when full (right for live speech, wrong for a file being evaluated). So the source also
      waits while `fast.max_unanswered` utterances are in flight: segments asr_node has queued
      or is transcribing (`pending`) plus utterances it published (`utterances`, counted from
      when this file started) minus those answered (a `response`) or given up (a `dropped`
      record from assistant_node). The queues themselves stay as they are: blocking a queue in
      a subscription callback would hold an executor thread, and the utterance link between
      asr_node and assistant_node would then overflow instead. Nothing is dropped as long as
      `fast.max_unanswered` + 1 (a segment the VAD may close from the chunks in the window) stays
      within each node's `max_pending_utterances` (4 by default; the window of 5 chunks, 0.5 s,
      is shorter than the VAD's 0.75 s minimum of speech plus end-pointing silence).
    Without an asr_node the source waits for one (it logs so); `fast.lossless: false` restores
    the old unpaced source (chunks can be lost).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("mic_node", **kwargs)
        self._thread: threading.Thread | None = None  # set first: destroy_node runs even if __init__ fails
        self._stream = None
        self.input_file = self.declare_parameter("input_file", "").value
        self.device = self.declare_parameter("device", "").value
        self.chunk_size = int(self.declare_parameter("chunk_size", 1600).value)
        self.playback_rate = float(self.declare_parameter("playback_rate", 1.0).value)
        self.max_file_s = float(self.declare_parameter("max_file_s", 3600.0).value)
        self.lead_silence_s = float(self.declare_parameter("lead_silence_s", 0.0).value)
        self.tail_silence_s = float(self.declare_parameter("tail_silence_s", 1.0).value)
        self.loop = bool(self.declare_parameter("loop", False).value)
        self.lossless = bool(self.declare_parameter("fast.lossless", True).value)
        self.window_chunks = int(self.declare_parameter("fast.window_chunks", 5).value)
        self.max_unanswered = int(self.declare_parameter("fast.max_unanswered", 2).value)
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.window_chunks < 1 or self.max_unanswered < 0:
            raise ValueError(f"fast.window_chunks must be >= 1 and fast.max_unanswered >= 0, got "
                             f"{self.window_chunks} and {self.max_unanswered}")
        self.pub = self.create_publisher(AudioChunk, "audio", AUDIO_QOS)
        self.offset = 0
        self.chunk_rate = RateMeter()
        self.overflows = 0
        Updater(self).add("audio source", self._diagnose)
        self.finished = threading.Event()
        self._stop = threading.Event()
        self.paced = bool(self.input_file) and self.playback_rate <= 0 and self.lossless
        self._progress = threading.Condition()
        self._asr: dict | None = None  # asr_node's last `audio_consumed` report
        self._answered = 0             # responses + assistant_node's drops seen since this node started
        self._baseline = (0, 0)        # (asr utterances, answered) when the file started
        self.pipeline_wait_s = 0.0     # time the file source spent waiting for the pipeline
        self.waiting_for = ""          # what the file source is blocked on now ("" = not blocked)
        if self.paced:
            self.create_subscription(String, "audio_consumed", self._on_consumed, LATCHED_QOS)
            if self.max_unanswered:
                self._response_sub = self.create_subscription(Response, "response", self._on_answered, EVENT_QOS)
                self.create_subscription(String, DROPPED_TOPIC, self._on_dropped, EVENT_QOS)
        if self.input_file:
            samples = load_audio(self.input_file, self.max_file_s)
            lead = np.zeros(int(self.lead_silence_s * SAMPLE_RATE), np.float32)
            tail = np.zeros(int(self.tail_silence_s * SAMPLE_RATE), np.float32)
            self._chunks = chunks(np.concatenate([lead, samples, tail]), self.chunk_size)
            self.get_logger().info(
                f"playing {self.input_file} ({samples.size / SAMPLE_RATE:.1f} s, {len(self._chunks)} chunks) "
                f"at {'max speed' if self.playback_rate <= 0 else f'{self.playback_rate:g}x real time'}"
            )
            self._thread = threading.Thread(target=self._play_file, name="mic-file", daemon=True)
        else:
            self._stream = self._open_device()
        if self._thread:
            self._thread.start()

    def publish_chunk(self, samples: np.ndarray, end_of_stream: bool = False) -> None:
        msg = AudioChunk()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "mic"
        msg.sample_rate = SAMPLE_RATE
        msg.offset = self.offset
        msg.end_of_stream = end_of_stream
        msg.samples = samples.astype(np.float32, copy=False)
        self.offset += samples.size
        self.pub.publish(msg)
        self.chunk_rate.tick()

    # -- lossless fast file input: pacing on the pipeline's progress -----------------------------
    def _on_consumed(self, msg: String) -> None:
        try:
            report = json.loads(msg.data)
            report = {k: int(report[k]) for k in ("offset", "pending", "utterances")}
        except (ValueError, KeyError, TypeError) as exc:
            self.get_logger().error(f"ignoring a malformed audio_consumed report {msg.data[:100]!r}: {exc}")
            return
        with self._progress:
            self._asr = report
            self._progress.notify_all()

    def _on_answered(self, _msg: Response) -> None:
        with self._progress:
            self._answered += 1
            self._progress.notify_all()

    def _on_dropped(self, msg: String) -> None:
        try:
            stage = json.loads(msg.data).get("stage", "")
        except (ValueError, AttributeError):
            return
        if stage.endswith("assistant_node"):  # asr_node's drops are already out of its `pending`
            self._on_answered(None)

    def unanswered(self) -> int:
        """Utterances of this file in flight between asr_node's queue and assistant_node's answer."""
        with self._progress:
            if self._asr is None:
                return 0
            published = self._asr["utterances"] - self._baseline[0]
            return self._asr["pending"] + published - (self._answered - self._baseline[1])

    def _may_publish(self, size: int) -> bool:
        asr = self._asr
        if asr is None or self.offset + size - asr["offset"] > self.window_chunks * self.chunk_size:
            return False
        return not self.max_unanswered or self.unanswered() < self.max_unanswered

    def _wait(self, ready, what: str) -> bool:
        """Block until `ready()` (checked under the progress lock); False if the node is stopping."""
        started, warned = time.monotonic(), False
        with self._progress:
            while not ready():
                if self._stop.is_set():
                    return False
                if not warned and time.monotonic() - started > 10.0:
                    warned = True
                    self.get_logger().warning(f"fast file input: still waiting for {what}")
                self.waiting_for = what
                self._progress.wait(0.1)
            self.waiting_for = ""
        self.pipeline_wait_s += time.monotonic() - started
        return True

    def _wait_for_consumers(self) -> bool:
        def ready() -> bool:  # asr_node's first (latched) report, and the assistant's answers matched
            return self._asr is not None and (not self.max_unanswered or self._response_sub.get_publisher_count() > 0)

        if not self._wait(ready, "asr_node's audio_consumed report and assistant_node's responses "
                                 "(fast.lossless paces on them; set it false for an unpaced source)"):
            return False
        with self._progress:
            self._baseline = (self._asr["utterances"], self._answered)
        return True

    def _diagnose(self, status: Status) -> None:
        status.add("source", self.input_file or f"device '{self.device or 'default'}'")
        status.add("chunks_per_s", self.chunk_rate.rate())
        status.add("seconds_published", self.offset / SAMPLE_RATE)
        status.add("input_overflows", self.overflows)
        status.add("subscribers", self.pub.get_subscription_count())
        status.add("paced_by_pipeline", self.paced)
        if self.paced:
            status.add("pipeline_wait_s", self.pipeline_wait_s)
            status.add("unanswered", self.unanswered())
            status.add("waiting_for", self.waiting_for)
        if self.finished.is_set():
            status.summary(OK, "end of file")
        elif self.overflows:
            status.summary(WARN, f"{self.overflows} input overflows")
        elif self.chunk_rate.rate() == 0 and self.pub.get_subscription_count():
            status.summary(WARN, "no audio published in the last 5 s")
        else:
            status.summary(OK, "streaming")

    def _play_file(self) -> None:
        # Wait for a listener so the start of the file is not published into the void.
        while self.pub.get_subscription_count() == 0 and not self._stop.wait(0.05):
            pass
        if self.paced and not self._wait_for_consumers():
            return
        period = self.chunk_size / SAMPLE_RATE / self.playback_rate if self.playback_rate > 0 else 0.0
        t0, n = time.monotonic(), 0
        while True:
            for i, chunk in enumerate(self._chunks):
                if self._stop.is_set():
                    return
                if period:
                    delay = t0 + n * period - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                elif self.paced and not self._wait(lambda: self._may_publish(chunk.size), PIPELINE):
                    return
                self.publish_chunk(chunk, end_of_stream=not self.loop and i == len(self._chunks) - 1)
                n += 1
            if not self.loop:
                break
        self.get_logger().info("end of file")
        self.finished.set()

    def _open_device(self):
        import sounddevice as sd

        index = find_device(self.device, "input")
        rate = int(sd.query_devices(index, "input")["default_samplerate"])
        self.get_logger().info(f"capturing from {sd.query_devices(index, 'input')['name']} at {rate} Hz")
        block = int(round(self.chunk_size * rate / SAMPLE_RATE))
        pending: list[np.ndarray] = []
        buffered = 0

        def on_audio(indata: np.ndarray, frames: int, t, status) -> None:
            nonlocal buffered
            if status:
                self.overflows += int(bool(status.input_overflow))
                self.get_logger().warning(f"audio input: {status}", throttle_duration_sec=5.0)
            try:
                pending.append(normalize(indata.copy(), rate).samples)
            except AudioError as exc:
                self.get_logger().warning(f"dropped a capture block: {exc}")
                return
            buffered += pending[-1].size
            while buffered >= self.chunk_size:
                joined = np.concatenate(pending)
                self.publish_chunk(joined[: self.chunk_size])
                rest = joined[self.chunk_size:]
                pending[:] = [rest] if rest.size else []
                buffered = rest.size

        stream = sd.InputStream(device=index, channels=1, samplerate=rate, blocksize=block,
                                dtype="float32", callback=on_audio)
        stream.start()
        return stream

    def destroy_node(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2.0)
        elif self._stream is not None:
            self._stream.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(MicNode, args)


if __name__ == "__main__":
    main()
