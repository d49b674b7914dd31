"""A node killed mid-stream and restarted: the rest of the graph carries on and recovers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np

from conftest import REPO, wait_for
from tinyalign_ros.msg import AudioChunk, Utterance
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS
from tinyalign_ros.nodes.graph import default_config


def start_asr_process() -> subprocess.Popen:
    """asr_node as its own process, the way `ros2 launch` starts it (namespace + params file)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tinyalign_ros.nodes.asr_node", "--ros-args", "-r", "__ns:=/tinyalign",
         "--params-file", str(default_config())],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_asr_process_killed_and_restarted_recovers(ros, speech_16k):
    probe = ros.node("recovery_probe")
    utterances: list[Utterance] = []
    probe.create_subscription(Utterance, "utterance", utterances.append, EVENT_QOS)
    pub = probe.create_publisher(AudioChunk, "audio", AUDIO_QOS)
    stop = threading.Event()

    def stream() -> None:  # a microphone that never stops: speech, silence, speech, ...
        audio = np.concatenate([speech_16k, np.zeros(12000, np.float32)])
        offset, clock = 0, probe.get_clock()
        while not stop.is_set():
            for i in range(0, len(audio), 1600):
                msg = AudioChunk(sample_rate=16000, offset=offset, samples=audio[i:i + 1600])
                msg.header.stamp = clock.now().to_msg()
                pub.publish(msg)
                offset += 1600
                if stop.wait(0.1):
                    return

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    proc = start_asr_process()
    try:
        wait_for(lambda: utterances, timeout=90, what="an utterance from the first asr process")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: pub.get_subscription_count() == 0, timeout=30, what="the killed subscriber to vanish")
        before = len(utterances)
        proc = start_asr_process()
        # the new process joins the stream wherever it is, so its first utterance may be the tail
        # of one (a fragment, even an empty transcript); the next whole one must be right
        wait_for(lambda: any("left" in u.transcript.lower() for u in utterances[before:]), timeout=120,
                 what="a whole utterance from the restarted process",
                 state=lambda: [u.transcript for u in utterances[before:]])
    finally:
        stop.set()
        proc.kill()
        proc.wait(timeout=10)
