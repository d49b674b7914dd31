"""mic_node: microphone or file audio → /tinyalign/audio (AudioChunk, 16 kHz mono float32)."""
from __future__ import annotations

import threading
import time

import numpy as np
from rclpy.node import Node

from tinyalign_ros.core.audio import SAMPLE_RATE, AudioError, chunks, load_audio, normalize
from tinyalign_ros.msg import AudioChunk

from .common import AUDIO_QOS, run_node
from .diagnostics import OK, WARN, RateMeter, Status, Updater


def find_input_device(device: str) -> int:
    """A sounddevice input index from a name fragment or an index; the error lists what exists."""
    import sounddevice as sd  # imported lazily: a file-source robot needs no PortAudio

    devices = [(i, d) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]
    listing = "; ".join(f"{i}: {d['name']}" for i, d in devices) or "none"
    if device.strip().lstrip("-").isdigit():
        index = int(device)
        if any(i == index for i, _ in devices):
            return index
    else:
        matches = [i for i, d in devices if device.lower() in d["name"].lower()]
        if matches:
            return matches[0]
    raise AudioError(f"no input audio device '{device}'; available input devices: {listing}")


class MicNode(Node):
    """Publishes fixed-size chunks from a sounddevice input or from a WAV/FLAC file.

    A file is played at `playback_rate` x real time (0 = as fast as the subscribers take it),
    which makes demos and tests replay exactly what a microphone would have delivered.
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
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        self.pub = self.create_publisher(AudioChunk, "audio", AUDIO_QOS)
        self.offset = 0
        self.chunk_rate = RateMeter()
        self.overflows = 0
        Updater(self).add("audio source", self._diagnose)
        self.finished = threading.Event()
        self._stop = threading.Event()
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

    def _diagnose(self, status: Status) -> None:
        status.add("source", self.input_file or f"device '{self.device or 'default'}'")
        status.add("chunks_per_s", self.chunk_rate.rate())
        status.add("seconds_published", self.offset / SAMPLE_RATE)
        status.add("input_overflows", self.overflows)
        status.add("subscribers", self.pub.get_subscription_count())
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
                self.publish_chunk(chunk, end_of_stream=not self.loop and i == len(self._chunks) - 1)
                n += 1
            if not self.loop:
                break
        self.get_logger().info("end of file")
        self.finished.set()

    def _open_device(self):
        import sounddevice as sd

        index = find_input_device(self.device) if self.device else None
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
