"""The diagnostic_updater stand-in: levels merge like the original, nodes publish /diagnostics."""
from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter

from conftest import wait_for, write
from tinyalign_ros.msg import AudioChunk
from tinyalign_ros.nodes.common import AUDIO_QOS
from tinyalign_ros.nodes.diagnostics import ERROR, OK, WARN, RateMeter, Status, Updater
from tinyalign_ros.nodes.mic_node import MicNode


def test_status_keeps_the_worst_level():
    s = Status()
    s.summary(WARN, "slow")
    s.summary(OK, "fine")
    assert (s.level, s.message) == (WARN, "slow")
    s.summary(ERROR, "broken")
    assert (s.level, s.message) == (ERROR, "broken")


def test_rate_meter_counts_events_in_its_window():
    meter = RateMeter(window_s=10.0)
    for _ in range(20):
        meter.tick()
    assert meter.rate() == 2.0


def test_broken_task_is_reported_not_raised(ros):
    node = ros.node("diag_probe")
    got: list[DiagnosticArray] = []
    node.create_subscription(DiagnosticArray, "/diagnostics", got.append, 10)
    updater = Updater(node, period_s=0.1)
    updater.add("bad", lambda status: 1 / 0)
    wait_for(lambda: got, what="/diagnostics")
    assert got[-1].status[0].level == ERROR and "ZeroDivisionError" in got[-1].status[0].message


def test_mic_node_reports_its_state_on_diagnostics(ros, tmp_path):
    path = write(tmp_path / "a.wav", np.zeros(3200, np.float32), 16000)
    got: list[DiagnosticArray] = []
    listener = ros.node("diag_listener")
    listener.create_subscription(DiagnosticArray, "/diagnostics", got.append, 10)
    listener.create_subscription(AudioChunk, "audio", lambda msg: None, AUDIO_QOS)  # the file plays to a listener
    ros.add(MicNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("input_file", value=str(path)), Parameter("playback_rate", value=0.0),
        Parameter("fast.lossless", value=False)]))  # no asr_node here to pace it

    def finished() -> bool:
        return any(s.message == "end of file" for a in got for s in a.status if s.hardware_id == "/tinyalign/mic_node")

    wait_for(finished, timeout=30, what="mic_node diagnostics saying 'end of file'")
    last = [s for a in got for s in a.status if s.hardware_id == "/tinyalign/mic_node"][-1]
    values = {kv.key: kv.value for kv in last.values}
    assert float(values["seconds_published"]) >= 0.2
