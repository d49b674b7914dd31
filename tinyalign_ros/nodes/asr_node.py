"""asr_node: /tinyalign/audio → VAD segments → /tinyalign/utterance (+ /tinyalign/transcript)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from std_msgs.msg import Bool, Float32, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker

from tinyalign_ros.core.asr import SPEECH_MARGIN_S, WhisperTranscriber
from tinyalign_ros.core.audio import SAMPLE_RATE, AudioError, normalize
from tinyalign_ros.core.asr_adapt import AUDIO_KINDS
from tinyalign_ros.core.early_exit import DEFAULT_THRESHOLD, FULL_DEPTH, ExitHeads, ExitPolicy, load_heads
from tinyalign_ros.core.encoder import load_whisper_encoder
from tinyalign_ros.core.listen import ListenGate, Verdict
from tinyalign_ros.core.models import data_home, shipped_model
from tinyalign_ros.core.recognizer import AdapterMismatch, Recognizer
from tinyalign_ros.core.speaker import (DEFAULT_BACKEND, SpeakerIdentifier, SpeakerRegistryError, make_embedder,
                                        registry_backend)
from tinyalign_ros.core.vad import Segment, StreamingSegmenter, VadConfig
from tinyalign_ros.msg import AudioChunk, Utterance

from .common import (AUDIO_QOS, DROPPED_TOPIC, EVENT_QOS, LATCHED_QOS, Worker, adapter_table, drop_record, run_node,
                     text_marker, to_time_msg)
from .diagnostics import OK, WARN, RateMeter, Status, Updater
from .hints import RobotBoost


@dataclass(frozen=True)
class _Job:
    segment: Segment
    wall_offset: float  # wall time minus stream time, from the chunk that closed the segment
    emitted: float = field(default_factory=time.time)  # wall time the VAD handed it over (metrics/stages)


TRANSCRIBERS = ("whisper", "exit_head")
EXIT_HEADS_FILE = "exit_heads.safetensors"


class AsrNode(Node):
    """Cuts the audio stream into utterances, encodes and transcribes each in a worker thread.

    The audio callback only runs the VAD (a few ms per chunk), so audio is never dropped while
    the models work; finished segments wait in a bounded queue (oldest dropped when full).
    Each utterance goes through our PyTorch Whisper encoder with early exits (its features, of
    the layer it exited at, go to the aligned assistant and the personalizer); the transcript
    comes from the recognized speaker's ASR adapter when the personalizer made one (announced on
    the latched `adapter` table, loaded in the background, swapped in between utterances), else
    from faster-whisper (`transcriber: whisper`; when a booster_node's text hints came in time, it
    starts with the teacher's words, nodes/hints.py) or the exit head (`exit_head`): one
    `core.recognizer.Recognizer` call per utterance, the same one the benches make. The Utterance
    carries the audio too (`utterance_audio`), which the personalizer keeps as a consented
    speaker's training sample. An utterance that answers an enrollment prompt always runs the
    full depth and the base model: it becomes a training sample of its speaker.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("asr_node", **kwargs)
        p = self.declare_parameter
        self.vad_config = VadConfig(
            threshold=float(p("vad.threshold", 0.5).value),
            min_silence_ms=int(p("vad.min_silence_ms", 400).value),
            min_speech_ms=int(p("vad.min_speech_ms", 250).value),
            speech_pad_ms=int(p("vad.speech_pad_ms", 200).value),
            max_utterance_s=float(p("vad.max_utterance_s", 20.0).value),
        )
        self.speaker = p("speaker", "").value
        self.echo_gate = bool(p("echo_gate", True).value)
        self.echo_tail_s = float(p("echo_tail_s", 0.2).value)
        # grace: a segment starts speech_pad_ms before its speech, and mic stamps jitter by ~a chunk
        self.listen = ListenGate(p("listen.mode", "continuous").value, float(p("listen.timeout_s", 5.0).value),
                                 p("listen.wake_phrase", "hey tiny").value,
                                 grace_s=self.vad_config.speech_pad_ms / 1000 + 0.1)
        self.listen_dropped = 0
        self.add_on_set_parameters_callback(self._on_listen_parameters)
        max_pending = int(p("max_pending_utterances", 4).value)
        self.segmenter = StreamingSegmenter(self.vad_config)
        self.transcriber = WhisperTranscriber(
            compute_type=p("whisper.compute_type", "int8").value,
            threads=int(p("whisper.threads", 2).value),
            beam_size=int(p("whisper.beam_size", 1).value),
            window=p("whisper.window", "speech").value,
            margin_s=float(p("whisper.window_margin_s", SPEECH_MARGIN_S).value),
        )
        self.transcriber_name = p("transcriber", "whisper").value
        self.pad_to_30s = bool(p("encoder.pad_to_30s", False).value)
        self.encoder = load_whisper_encoder() if p("encoder.enabled", True).value else None
        self.policy = ExitPolicy()
        self._apply_exit_params(p("exit.mode", "confidence").value, float(p("exit.threshold", DEFAULT_THRESHOLD).value),
                                int(p("exit.max_layer", 0).value))
        self.policy.full_depth_for_known_speakers = bool(p("exit.full_depth_for_known_speakers", True).value)
        self.heads = self._load_heads(p("exit.heads_file", "").value)
        self.speaker_id = self._speaker_identifier(
            bool(p("speaker_id.enabled", True).value), p("speaker_id.backend", DEFAULT_BACKEND).value,
            p("speaker_id.dir", "").value, float(p("speaker_id.threshold", 0.0).value),
            float(p("speaker_id.enroll_timeout_s", 60.0).value))
        if self.transcriber_name not in TRANSCRIBERS:
            raise ValueError(f"transcriber must be one of {TRANSCRIBERS}, got '{self.transcriber_name}'")
        if self.transcriber_name == "exit_head" and self.heads is None:
            raise ValueError("transcriber 'exit_head' needs exit heads (exit.heads_file)")
        self.recognizer = Recognizer(self.transcriber, self.encoder, self.heads,
                                     exit_head_transcripts=self.transcriber_name == "exit_head")
        self.utterance_audio = bool(p("utterance_audio", True).value)
        self.last_source = ""
        self.adapter_errors = 0
        if bool(p("adapters.enabled", True).value):
            self.create_subscription(String, "adapter", self._on_adapter, LATCHED_QOS)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.utterance_pub = self.create_publisher(Utterance, "utterance", EVENT_QOS)
        self.transcript_pub = self.create_publisher(String, "transcript", EVENT_QOS)
        self.marker_frame = p("marker_frame", "base_link").value
        self.marker_pub = self.create_publisher(Marker, "transcript_marker", LATCHED_QOS)
        # per utterance, for rqt_plot: compute cost (RTF) and how deep the encoder went
        self.rtf_pub = self.create_publisher(Float32, "metrics/rtf", EVENT_QOS)
        self.exit_layer_pub = self.create_publisher(Float32, "metrics/exit_layer", EVENT_QOS)
        self.worker: Worker[_Job] = Worker("asr-transcribe", self._timed_transcribe, max_pending,
                                           self._on_drop, self._on_error)
        self._setup_stages()
        self.create_subscription(AudioChunk, "audio", self._on_audio, AUDIO_QOS)
        self.create_subscription(Bool, "speaking", self._on_speaking, LATCHED_QOS)
        self.create_service(Trigger, "listen", self._on_listen)
        self.create_subscription(String, "enroll", self._on_enroll, EVENT_QOS)
        self.create_subscription(String, "speaker_forgotten", self._on_speaker_forgotten, EVENT_QOS)
        self.robot_speaking = False
        self._gate_until = 0.0  # wall time until which audio is still the robot's own echo
        self.gated_chunks = 0
        self._count = 0
        self.published = 0
        self._expected_offset: int | None = None
        self._warned_rate: set[int] = set()
        self.chunks_received = 0
        self.rejected_chunks = 0
        self.dropped_utterances = 0
        self.stream_ended = threading.Event()
        self.chunk_rate = RateMeter()
        self.last_rtf = 0.0
        self.last_layer = -1
        self.last_speaker_score = -1.0
        self.boost = RobotBoost(self, self.encoder.n_layers if self.encoder else None,
                                self.encoder.d_model if self.encoder else None, self.pad_to_30s,
                                boosts_transcript=self.transcriber_name == "exit_head")
        # progress, for a lossless file source (mic_node at playback_rate 0 paces on it; live audio
        # ignores it): latched JSON {"offset": stream samples consumed, "pending": segments queued or
        # being transcribed, "utterances": utterances published}, after each chunk and each transcription
        self._consumed = 0
        self.stream_gaps = 0
        self.consumed_pub = self.create_publisher(String, "audio_consumed", LATCHED_QOS)
        self.dropped_pub = self.create_publisher(String, DROPPED_TOPIC, EVENT_QOS)
        self.worker.on_done = self._report_progress
        self._report_progress()  # latched: a file source started later learns that asr_node is there
        updater = Updater(self)
        updater.add("speech recognition", self._diagnose)
        updater.add("knowledge boosting", self.boost.diagnose)
        self.get_logger().info("ready")

    # -- parameters ---------------------------------------------------------------------------
    def _load_heads(self, path: str) -> ExitHeads | None:
        if self.encoder is None:
            return None
        file = shipped_model(EXIT_HEADS_FILE) if not path else path
        if not path and not file.is_file():
            self.get_logger().warning(f"no trained exit heads ({file}): the encoder always runs to full depth")
            return None
        return load_heads(file)  # a named but corrupt or missing file is an error, not a silent fallback

    def _speaker_identifier(self, enabled: bool, backend: str, folder: str, threshold: float,
                            timeout_s: float) -> SpeakerIdentifier | None:
        if not enabled:
            return None
        root = Path(folder) if folder else data_home() / "speakers"
        stored = registry_backend(root)
        if stored is not None and stored != backend:  # e.g. voiceprints enrolled before ge2e became the default
            self.get_logger().warning(
                f"{root} holds voiceprints of the {stored!r} speaker backend, speaker_id.backend is {backend!r}: using "
                f"{stored!r}, so the enrolled speakers stay known (to move to {backend!r}, set speaker_id.dir to a new "
                "folder and enroll again)")
            backend = stored
        if backend == "whisper" and self.encoder is None:
            return None
        return SpeakerIdentifier(root, make_embedder(backend, self.encoder),
                                 threshold if threshold > 0 else None,
                                 timeout_s)  # a corrupt registry or weights file is a startup error, not a silent reset

    # -- speakers -----------------------------------------------------------------------------
    def _on_enroll(self, msg: String) -> None:
        """`{"speaker": id, "text": sentence}`: the next utterance is that speaker reading it."""
        try:
            speaker = json.loads(msg.data)["speaker"]
            if not isinstance(speaker, str):
                raise TypeError("speaker must be a string")
            if self.speaker_id is None:
                raise ValueError("speaker_id is disabled (or the encoder is)")
            self.speaker_id.request_enrollment(speaker)
        except (ValueError, KeyError, TypeError) as exc:  # InvalidSpeakerId is a ValueError
            self.get_logger().warning(f"enrollment request {msg.data[:200]!r} ignored: {exc}")
            return
        self.get_logger().info(f"enrollment: the next utterance is {speaker}'s")

    def _on_speaker_forgotten(self, msg: String) -> None:
        if self.speaker_id is not None and self.speaker_id.forget(msg.data):
            self.get_logger().info(f"voiceprint of {msg.data} deleted")

    def _speaker_of(self, samples: np.ndarray) -> str:
        """The enrolled speaker of an utterance, else the `speaker` parameter ("" = unknown)."""
        if self.speaker_id is None:
            return self.speaker
        try:
            decision = self.speaker_id.observe(samples)
        except (SpeakerRegistryError, ValueError, OSError) as exc:
            self.get_logger().error(f"speaker recognition failed: {exc}", throttle_duration_sec=10.0)
            return self.speaker
        self.last_speaker_score = decision.score
        if decision.how == "enrollment":
            self.get_logger().info(f"enrolled an utterance of {decision.speaker} "
                                   f"({len(self.speaker_id.speakers)} speakers known)")
        return decision.speaker or self.speaker

    def _on_adapter(self, msg: String) -> None:
        """The personalizer's adapter table: load each new ASR adapter in a thread of its own (building
        the adapted Whisper takes ~1 s: the audio callback must not wait), drop those that are gone."""
        try:
            table = adapter_table(msg.data)
        except ValueError as exc:
            self.get_logger().error(f"{exc}: ignored")
            return
        wanted = {s: e for s, e in table.items() if e.get("kind") in AUDIO_KINDS}
        for speaker in set(self.recognizer.adapted_speakers) - set(wanted):
            self.recognizer.drop_adapter(speaker)
            self.get_logger().info(f"{speaker} has no ASR adapter any more: base Whisper")
        for speaker, entry in wanted.items():
            if self.recognizer.adapted_speakers.get(speaker) != entry.get("version"):
                threading.Thread(target=self._load_adapter, args=(speaker, entry), daemon=True,
                                 name=f"asr-adapter-{speaker}").start()

    def _load_adapter(self, speaker: str, entry: dict) -> None:
        from pathlib import Path

        from tinyalign_ros.core.adapters import AdapterStore, AdapterStoreError

        try:
            path = Path(entry["path"])
            adapter = AdapterStore(path.parents[1]).load(speaker, int(entry["version"]))  # checksum verified
            self.recognizer.set_adapter(speaker, adapter)
        except (AdapterStoreError, AdapterMismatch, KeyError, ValueError, TypeError, OSError) as exc:
            self.adapter_errors += 1
            self.get_logger().error(f"ASR adapter v{entry.get('version')} of {speaker} refused: {exc}")
            return
        self.get_logger().info(f"ASR adapter v{adapter.info.version} of {speaker} in use from the next utterance")

    def _apply_exit_params(self, mode: str, threshold: float, max_layer: int) -> None:
        """Validate all three first (ExitPolicy checks on assignment), then switch atomically."""
        ExitPolicy(mode=mode, threshold=threshold, max_layer=max_layer or None)
        self.policy.mode, self.policy.threshold, self.policy.max_layer = mode, threshold, max_layer or None

    def _on_set_parameters(self, params) -> SetParametersResult:
        new = {p.name: p.value for p in params}
        try:
            self._apply_exit_params(new.get("exit.mode", self.policy.mode),
                                    float(new.get("exit.threshold", self.policy.threshold)),
                                    int(new.get("exit.max_layer", self.policy.max_layer or 0)))
        except (TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if "exit.full_depth_for_known_speakers" in new:
            self.policy.full_depth_for_known_speakers = bool(new["exit.full_depth_for_known_speakers"])
        if any(name.startswith("exit.") for name in new):
            self.get_logger().info(f"exit policy now {self.policy}")
        return SetParametersResult(successful=True)

    def _on_listen(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Push-to-talk: pass on the next utterance whose speech starts within listen.timeout_s."""
        try:
            response.message = self.listen.open(self.get_clock().now().nanoseconds * 1e-9)
            response.success = True
        except ValueError as exc:  # continuous mode: nothing to open
            response.message = str(exc)
        self.get_logger().info(f"listen call: {response.message}")
        return response

    def _on_listen_parameters(self, params) -> SetParametersResult:
        """listen.* can change at run time (say, push_to_talk in a noisy room): the new gate is
        built, and so validated, before it replaces the old one (an open window is forgotten)."""
        new = {p.name: p.value for p in params if p.name.startswith("listen.")}
        if not new:
            return SetParametersResult(successful=True)
        try:
            gate = ListenGate(new.get("listen.mode", self.listen.mode),
                              float(new.get("listen.timeout_s", self.listen.timeout_s)),
                              new.get("listen.wake_phrase", self.listen.wake_phrase), grace_s=self.listen.grace_s)
        except (TypeError, ValueError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        self.listen = gate
        self.get_logger().info(f"listen mode now {gate.mode} (timeout {gate.timeout_s:g} s, "
                               f"wake phrase '{gate.wake_phrase}')")
        return SetParametersResult(successful=True)

    # -- audio callback: cheap, never blocks on the model --------------------------------------
    def _on_speaking(self, msg: Bool) -> None:
        """Self-echo gate: while the robot speaks, the microphone hears the robot, not the operator.

        Callbacks of one node are serialized (default callback group), so no lock is needed with
        _on_audio. Speech that started just before the robot did is discarded with the gate.
        """
        if msg.data and not self.robot_speaking and self.echo_gate:
            self.segmenter.reset()
        elif not msg.data and self.robot_speaking:
            self._gate_until = self.get_clock().now().nanoseconds * 1e-9 + self.echo_tail_s
        self.robot_speaking = msg.data

    def _gated(self, msg: AudioChunk) -> bool:
        if not self.echo_gate:
            return False
        stamp = rclpy.time.Time.from_msg(msg.header.stamp).nanoseconds * 1e-9
        return self.robot_speaking or stamp < self._gate_until

    def _on_audio(self, msg: AudioChunk) -> None:
        self.chunk_rate.tick()
        self.chunks_received += 1
        self.boost.on_audio(msg.offset, len(msg.samples), msg.sample_rate)  # the hints' clock runs even when gated
        if self._gated(msg):
            self.gated_chunks += 1
            self._expected_offset = msg.offset + len(msg.samples)
            if msg.end_of_stream:
                self._close_stream(None)
            self._report_progress(msg)
            return
        try:
            audio = normalize(np.asarray(msg.samples, dtype=np.float32), msg.sample_rate)
        except AudioError as exc:
            self.rejected_chunks += 1
            self.get_logger().warning(f"rejected audio chunk at offset {msg.offset}: {exc}", throttle_duration_sec=5.0)
            if msg.end_of_stream:
                self._close_stream(None)
            self._report_progress(msg)
            return
        if audio.resampled_from and audio.resampled_from not in self._warned_rate:
            self._warned_rate.add(audio.resampled_from)
            self.get_logger().warning(f"audio arrives at {audio.resampled_from} Hz; resampling to {SAMPLE_RATE} Hz")
        if audio.clipped:
            self.get_logger().warning(f"{audio.clipped} clipped samples in chunk at offset {msg.offset}",
                                   throttle_duration_sec=5.0)
        stream_s = msg.offset / msg.sample_rate if msg.sample_rate else 0.0
        if self._expected_offset is not None and msg.offset != self._expected_offset:
            self.stream_gaps += 1
            self.get_logger().warning(f"audio stream gap: expected offset {self._expected_offset}, got {msg.offset}",
                                   throttle_duration_sec=5.0)
        self._expected_offset = msg.offset + len(msg.samples)
        wall_offset = rclpy.time.Time.from_msg(msg.header.stamp).nanoseconds * 1e-9 - stream_s
        try:
            segments = self.segmenter.push(audio.samples, stream_s)
        except ValueError as exc:
            self.get_logger().error(f"VAD refused a chunk: {exc}")
            segments = []
        for segment in segments:
            self.worker.put(_Job(segment, wall_offset))
        if msg.end_of_stream:
            self._close_stream(wall_offset)
        self._report_progress(msg)

    def _report_progress(self, msg: AudioChunk | None = None) -> None:
        """`audio_consumed`: this chunk (if any) is through the VAD and its segments are queued."""
        if msg is not None:
            self._consumed = msg.offset + len(msg.samples)
        self.consumed_pub.publish(String(data=json.dumps(
            {"offset": self._consumed, "pending": self.worker.backlog, "utterances": self.published})))

    def _close_stream(self, wall_offset: float | None) -> None:
        if wall_offset is None:
            wall_offset = self.get_clock().now().nanoseconds * 1e-9
        for segment in self.segmenter.flush():
            self.worker.put(_Job(segment, wall_offset))
        self.segmenter.reset()
        self._expected_offset = None
        self.stream_ended.set()

    # -- where the time goes (core/latency.py): one record per published utterance on metrics/stages --
    def _setup_stages(self) -> None:
        from tinyalign_ros.core.latency import STAGES_TOPIC, StageTimer

        self.stages = StageTimer()
        self.stages_pub = self.create_publisher(String, STAGES_TOPIC, EVENT_QOS)
        # the recognizer's whole call (encoder, exits, fusion, transcript) and, inside it, the transcript
        self.recognizer.recognize = self.stages.wrap("recognize_s", self.recognizer.recognize)
        self.transcriber.transcribe = self.stages.wrap("asr_s", self.transcriber.transcribe)

    def _timed_transcribe(self, job: _Job) -> None:
        """`_transcribe`, timed: endpointing, queue, encoder, transcript and the rest of the worker's time."""
        from tinyalign_ros.core.latency import stage_record

        started, published = time.time(), self.published
        self.stages.begin()
        try:
            self._transcribe(job)
        finally:
            stages = self.stages.take()
        if self.published == published:  # not passed on (listen gate): no utterance to report on
            return
        recognize, asr = stages.get("recognize_s", 0.0), stages.get("asr_s", 0.0)
        record = {"endpointing_s": job.emitted - (job.wall_offset + job.segment.end_s),
                  "asr_queue_s": started - job.emitted,
                  "encoder_s": max(recognize - asr, 0.0),  # with a speaker's ASR adapter: its transcript too
                  "asr_s": asr,
                  "asr_other_s": max(time.time() - started - recognize, 0.0)}
        uid = f"{self.get_name()}-{self._count:06d}"  # the id _transcribe gave the Utterance it published
        self.stages_pub.publish(String(data=stage_record(uid, self.get_name(), record)))

    # -- worker thread ------------------------------------------------------------------------
    def _transcribe(self, job: _Job) -> None:
        seg = job.segment
        if not self._listening(seg, self.listen.check_segment(job.wall_offset + seg.start_s)):
            return  # push-to-talk without a listen call: not worth the recognizer's time
        started = time.monotonic()
        enrolling = self.speaker_id is not None and self.speaker_id.pending is not None
        # who spoke decides how deep to encode and whose ASR adapter transcribes; an enrollment's
        # speaker is taken once the utterance has passed the listen checks (taking it consumes the
        # enrollment request), and an enrollment is transcribed by the base model
        speaker = None if enrolling else self._speaker_of(seg.samples)
        policy = FULL_DEPTH if enrolling else self.policy.for_utterance(known_speaker=bool(speaker))
        # the hints that are here now (never waited for); the Utterance keeps the unfused features
        # the projector was trained on, the fused ones only feed the boost head (core/boost.py);
        # the booster's text hints start faster-whisper's transcript with the teacher's words
        heard = self.recognizer.recognize(
            seg.samples, speaker or "", policy, self.pad_to_30s,
            lambda enc: self.boost.fuse(enc.features, enc.layer, seg.start_s, seg.end_s),
            lambda: self.boost.prefix(seg.start_s, seg.end_s))
        encoded, text, confidence = heard.encoded, heard.text, heard.confidence
        self.last_source = heard.source if not heard.adapter_version else f"adapter v{heard.adapter_version}"
        verdict = self.listen.check_transcript(text, job.wall_offset + seg.start_s, job.wall_offset + seg.end_s)
        if not self._listening(seg, verdict, text):
            return
        text = verdict.transcript  # the wake phrase stripped
        self._count += 1
        msg = Utterance()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "mic"
        msg.id = f"{self.get_name()}-{self._count:06d}"
        msg.speaker = self._speaker_of(seg.samples) if speaker is None else speaker
        msg.start = to_time_msg(job.wall_offset + seg.start_s)
        msg.end = to_time_msg(job.wall_offset + seg.end_s)
        msg.stream_start_s = seg.start_s
        msg.stream_end_s = seg.end_s
        msg.transcript = text
        msg.confidence = confidence
        msg.truncated = seg.truncated
        msg.feature_layer = -1
        if self.utterance_audio:
            msg.audio = np.round(np.clip(seg.samples, -1.0, 1.0) * 32767.0).astype(np.int16)
        if encoded is not None:
            features = encoded.features.float().contiguous().numpy()
            msg.features = features.reshape(-1)
            msg.feature_frames, msg.feature_dim = features.shape
            msg.feature_layer = encoded.layer
        self.utterance_pub.publish(msg)
        self.published += 1
        self.last_rtf = (time.monotonic() - started) / max(seg.samples.size / SAMPLE_RATE, 1e-3)
        self.last_layer = msg.feature_layer
        self.rtf_pub.publish(Float32(data=float(self.last_rtf)))
        if encoded is not None:  # without the encoder there is no exit layer to plot (-1 would read as one)
            self.exit_layer_pub.publish(Float32(data=float(msg.feature_layer)))
        self.transcript_pub.publish(String(data=text))
        self.marker_pub.publish(text_marker(f"heard: {text}", msg.header.stamp, self.marker_frame, "transcript", 1.2))
        self.get_logger().info(f"[{seg.start_s:.2f}-{seg.end_s:.2f} s] '{text}' (confidence {confidence:.2f}, "
                               f"encoder layer {msg.feature_layer}, {self.last_source})")

    def _listening(self, seg: Segment, verdict: Verdict, text: str = "") -> bool:
        """Log and count an utterance the listen gate kept from the assistant (not addressed to it)."""
        if not verdict.passed:
            self.listen_dropped += 1
            heard = f" '{text}'" if text else ""
            self.get_logger().info(f"[{seg.start_s:.2f}-{seg.end_s:.2f} s]{heard} not passed on "
                                   f"({self.listen.mode}): {verdict.reason}")
        return verdict.passed

    def _diagnose(self, status: Status) -> None:
        status.add("audio_chunks_per_s", self.chunk_rate.rate())
        status.add("chunks_received", self.chunks_received)
        status.add("rejected_chunks", self.rejected_chunks)
        status.add("robot_speaking", self.robot_speaking)
        status.add("echo_gated_chunks", self.gated_chunks)
        status.add("queue_depth", self.worker.depth)
        status.add("utterances", self.published)
        status.add("dropped_utterances", self.dropped_utterances)
        status.add("stream_gaps", self.stream_gaps)
        status.add("in_speech", self.segmenter.in_speech)
        status.add("last_rtf", self.last_rtf)
        status.add("exit_layer", self.last_layer)
        status.add("exit_policy", f"{self.policy.mode} threshold={self.policy.threshold} max_layer={self.policy.max_layer} "
                                  f"full_depth_for_known_speakers={self.policy.full_depth_for_known_speakers}")
        status.add("transcriber", self.transcriber_name)
        status.add("whisper_window", self.transcriber.window)
        status.add("whisper_speech_windows", self.transcriber.speech_windows)
        status.add("whisper_window_fallbacks", self.transcriber.window_fallbacks)
        status.add("asr_adapters", ", ".join(f"{s} v{v}" for s, v in sorted(self.recognizer.adapted_speakers.items()))
                   or "none")
        status.add("asr_adapter_errors", self.adapter_errors)
        status.add("last_transcript_from", self.last_source)
        status.add("enrolled_speakers", ", ".join(self.speaker_id.speakers) if self.speaker_id else "disabled")
        status.add("last_speaker_score", self.last_speaker_score)
        status.add("listen_mode", self.listen.mode)
        status.add("listen_window_open", self.listen.is_open(self.get_clock().now().nanoseconds * 1e-9))
        status.add("not_addressed_utterances", self.listen_dropped)
        if self.dropped_utterances:
            status.summary(WARN, f"{self.dropped_utterances} utterances dropped (transcription too slow)")
        elif self.rejected_chunks:
            status.summary(WARN, f"{self.rejected_chunks} bad audio chunks rejected")
        else:
            status.summary(OK, "listening")

    def _on_drop(self, job: _Job) -> None:
        self.dropped_utterances += 1
        self.get_logger().warning(f"transcription queue full: dropped the utterance at {job.segment.start_s:.2f} s")
        self.dropped_pub.publish(String(data=drop_record(self.get_name(), "transcription queue full",
                                                         start_s=job.segment.start_s, end_s=job.segment.end_s)))

    def _on_error(self, job: _Job, exc: BaseException) -> None:
        self.get_logger().error(f"transcription failed for the utterance at {job.segment.start_s:.2f} s: {exc!r}")
        self.dropped_pub.publish(String(data=drop_record(self.get_name(), f"transcription failed: {exc!r}"[:200],
                                                         start_s=job.segment.start_s, end_s=job.segment.end_s)))

    @property
    def idle(self) -> bool:
        return self.worker.idle

    def destroy_node(self) -> None:
        if hasattr(self, "worker"):  # absent when the constructor failed
            self.worker.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(AsrNode, args)


if __name__ == "__main__":
    main()
