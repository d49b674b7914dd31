"""The hint link between booster_node and asr_node: message conversions and the robot's side.

booster_node publishes `tinyalign_ros/Hint`s on `hints`: encoder hints (one per audio chunk) and/or
text hints (its transcript of the utterance heard so far, heartbeats in silence); asr_node's
`RobotBoost` subscribes, hands the hints to core/boost.py's `BoostFuser` (all the alignment, fusion
and choice of the forced words lives there, ROS-free) and reports the link on /diagnostics. This
module only converts messages, declares the `boost.*` parameters and logs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from tinyalign_ros.core.boost import (MAX_DELAY_CHUNKS, BoostFuser, FusedUtterance, Hint, HintRejected,
                                      TextHint, TextPrefix, load_boost)
from tinyalign_ros.core.models import shipped_model
from tinyalign_ros.msg import Hint as HintMsg

from .common import from_time_msg
from .diagnostics import OK, WARN, Status

FUSION_FILE = "boost_fusion.safetensors"
# Hints are only useful while fresh: keep a few, reliably, and never block the booster on them.
HINT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=20, reliability=ReliabilityPolicy.RELIABLE)


def hint_to_msg(hint: Hint | TextHint, stamp) -> HintMsg:
    """A Hint message for `hint`; `stamp` (builtin_interfaces/Time) is the audio chunk's stamp."""
    msg = HintMsg()
    msg.header.stamp, msg.header.frame_id = stamp, "mic"
    if isinstance(hint, TextHint):
        msg.offset, msg.n_samples, msg.text = hint.offset, hint.n_samples, hint.text
        return msg
    msg.offset, msg.n_samples, msg.frames, msg.dim = hint.offset, hint.n_samples, hint.frames, hint.dim
    msg.data = np.ascontiguousarray(hint.data, dtype=np.float32).reshape(-1)
    return msg


@dataclass(frozen=True)
class ReceivedHint:
    hint: Hint | TextHint
    stamp_s: float  # wall-clock stamp of the audio chunk the hint belongs to (the mic machine's clock)


def hint_from_msg(msg: HintMsg) -> ReceivedHint:
    """Decode a Hint message; ValueError when its shape fields do not match its data."""
    if msg.frames == 0 and msg.dim == 0 and len(msg.data) == 0 and msg.n_samples > 0:  # a text hint
        return ReceivedHint(TextHint(int(msg.offset), int(msg.n_samples), str(msg.text)),
                            from_time_msg(msg.header.stamp))
    if msg.text:
        raise ValueError("hint carries both numbers and text")
    if msg.frames == 0 or msg.dim == 0 or msg.frames * msg.dim != len(msg.data):
        raise ValueError(f"hint says {msg.frames}x{msg.dim} values, carries {len(msg.data)}")
    data = np.asarray(msg.data, dtype=np.float32)
    return ReceivedHint(Hint(int(msg.offset), int(msg.n_samples), data.reshape(msg.frames, msg.dim)),
                        from_time_msg(msg.header.stamp))


class RobotBoost:
    """asr_node's knowledge boosting: `boost.*` parameters, the `hints` subscription, diagnostics.

    asr_node calls `on_audio(msg)` for every AudioChunk (before any gating, so the audio clock
    keeps running while the robot speaks), `fuse(...)` once per encoded utterance and `prefix(...)`
    just before Whisper decodes it; none waits for hints. Without a booster, `fuse` returns the
    features unchanged and `prefix` forces nothing.
    """

    def __init__(self, node: Node, student_layer: int | None, student_dim: int | None, padded: bool,
                 boosts_transcript: bool) -> None:
        """`student_layer`/`student_dim`: the full depth and width of asr_node's encoder (None
        when it runs without one: then there is nothing to fuse into); `padded`: it encodes 30 s
        windows (the fusion was trained on unpadded features). `boosts_transcript`: the
        transcript comes from a CTC head (`transcriber: exit_head`) that the boost head can replace.
        Text hints need neither: without an encoder only the encoder-hint fusion is off."""
        self.node = node
        p = node.declare_parameter
        enabled = bool(p("boost.enabled", True).value)
        fusion_file = p("boost.fusion_file", "").value
        budget = int(p("boost.max_delay_chunks", MAX_DELAY_CHUNKS).value)
        timeout_s = float(p("boost.link_timeout_s", 2.0).value)
        self.text_hints = bool(p("boost.text_hints", True).value)
        self.boosts_transcript = boosts_transcript
        self.fuser: BoostFuser | None = None
        self.stamp_latency_s = 0.0
        self.malformed = 0  # messages whose frames x dim do not match their data
        self._last_rejection = ""
        self.off_reason = "boost.enabled is false"  # read by diagnose() while self.fuser is None
        if not enabled:
            return
        model = None
        self.fusion_off = ""
        if student_layer is None:
            self.fusion_off = "encoder.enabled is false: no features to fuse encoder hints into"
        elif padded:
            self.fusion_off = "encoder.pad_to_30s: the fusion was trained on unpadded features"
        else:
            path = fusion_file or str(shipped_model(FUSION_FILE))
            model = load_boost(path)  # a missing or corrupt file is a startup error, like the exit heads
            if model.config["student_dim"] != student_dim:
                raise ValueError(f"{path} fuses {model.config['student_dim']}-d features, the encoder gives "
                                 f"{student_dim}-d")
        if self.fusion_off:
            node.get_logger().warning(f"encoder-hint fusion off: {self.fusion_off}")
        # train/boost.py trains the fusion on the student's full-depth features
        self.fuser = BoostFuser(model, student_layer, budget, timeout_s)
        node.add_on_set_parameters_callback(self._on_set_parameters)
        node.create_subscription(HintMsg, "hints", self._on_hint, HINT_QOS)
        where = ["the exit-head transcript (encoder hints)" if boosts_transcript and model is not None else ""]
        where.append("faster-whisper's transcript (text hints: the teacher's words forced)"
                     if self.text_hints and not boosts_transcript else "")
        node.get_logger().info(f"knowledge boosting: hints on `hints`, delay budget {budget} chunks; boosts "
                               f"{' and '.join(w for w in where if w) or 'nothing'}")

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "boost.max_delay_chunks":
                try:
                    self.fuser.set_delay_budget(int(param.value))
                except (TypeError, ValueError) as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
                self.node.get_logger().info(f"boost delay budget now {param.value} chunks")
            elif param.name == "boost.text_hints":
                self.text_hints = bool(param.value)
            elif param.name in ("boost.enabled", "boost.fusion_file", "boost.link_timeout_s"):
                return SetParametersResult(successful=False, reason=f"{param.name} is read at startup only")
        return SetParametersResult(successful=True)

    def on_audio(self, offset: int, n_samples: int, sample_rate: int) -> None:
        """An audio chunk arrived: advance the robot's audio clock (16 kHz, as the booster counts)."""
        if self.fuser is not None and sample_rate > 0:
            self.fuser.on_audio(int(round((offset + n_samples) * 16000 / sample_rate)))

    def _on_hint(self, msg: HintMsg) -> None:
        try:
            received = hint_from_msg(msg)
        except ValueError as exc:
            self.malformed += 1
            self._refused(msg, exc)
            return
        try:
            if isinstance(received.hint, TextHint):
                self.fuser.on_text_hint(received.hint)
            else:
                self.fuser.on_hint(received.hint)
        except HintRejected as exc:  # counted by the fuser
            self._refused(msg, exc)
            return
        # wall-clock age of the hint's audio: only meaningful if the mic and robot clocks agree
        self.stamp_latency_s = self.node.get_clock().now().nanoseconds * 1e-9 - received.stamp_s

    def _refused(self, msg: HintMsg, exc: Exception) -> None:
        self._last_rejection = str(exc)
        self.node.get_logger().warning(f"refused a hint at offset {msg.offset}: {exc}", throttle_duration_sec=5.0)

    def fuse(self, features, layer: int, start_s: float, end_s: float) -> FusedUtterance | None:
        """Fuse the hints for the utterance [start_s, end_s) (stream seconds) into its features;
        None when boosting is off."""
        if self.fuser is None:
            return None
        return self.fuser.fuse(features, layer, int(round(start_s * 16000)), int(round(end_s * 16000)))

    def prefix(self, start_s: float, end_s: float) -> TextPrefix | None:
        """The teacher's words to force at the start of the utterance [start_s, end_s)'s Whisper
        transcript (what has arrived now); None when text hints are off."""
        if self.fuser is None or not self.text_hints:
            return None
        return self.fuser.prefix(int(round(start_s * 16000)), int(round(end_s * 16000)))

    def diagnose(self, status: Status) -> None:
        if self.fuser is None:
            status.summary(OK, f"boosting off: {self.off_reason}")
            return
        link = self.fuser.link_state()
        last = self.fuser.last
        status.add("hints_received", link.hints_received)
        status.add("hints_rejected", link.hints_rejected)
        status.add("malformed_hint_messages", self.malformed)
        status.add("hints_per_s", link.hints_per_s)
        status.add("last_hint_age_s", -1.0 if link.last_hint_age_s is None else link.last_hint_age_s)
        status.add("hint_lag_chunks", -1.0 if link.lag_chunks is None else link.lag_chunks)
        status.add("hint_stamp_latency_s", self.stamp_latency_s)
        status.add("delay_budget_chunks", self.fuser.delay_budget_chunks)
        stats = self.fuser.buffer.stats
        status.add("duplicate_frames", stats["duplicate_frames"])
        status.add("reordered_hints", stats["reordered"])
        status.add("stale_hints", stats["stale"])
        status.add("last_utterance_boosted_fraction", last.coverage if last else 0.0)
        status.add("last_utterance_unboosted_because", last.reason if last else "")
        status.add("last_rejection", self._last_rejection)
        words = self.fuser.last_prefix
        status.add("text_hints", self.fuser.text.stats["added"])
        status.add("last_utterance_forced_words", len(words.text.split()) if words else 0)
        status.add("last_utterance_text_hint", words.reason or "used" if words else "")
        boosts = [("exit-head transcript" if self.boosts_transcript and self.fuser.model is not None else ""),
                  ("whisper transcript (text hints)" if self.text_hints and not self.boosts_transcript else "")]
        status.add("boosts", ", ".join(b for b in boosts if b) or "nothing")
        if self.fusion_off:
            status.add("encoder_fusion_off", self.fusion_off)
        status.summary(WARN if link.warn else OK, link.message)
