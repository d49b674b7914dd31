"""Command-line clients of a running graph: `ros2 service call` for machines without ros2cli.

`tinyalign personalize SPEAKER` and `tinyalign forget SPEAKER` call personalizer_node's services
exactly as `ros2 service call /tinyalign/personalize tinyalign_ros/srv/Personalize ...` would, from
another process on the same ROS 2 domain (the pip-wheel install has no `ros2` command);
`tinyalign enroll SPEAKER` prompts the speaker sentence by sentence over the `enroll` topic. With
`--wait`, personalize follows the round on `personalize/progress` and ends with its outcome from
`personalize/result`, so a script can tell "saved" from "rejected by the gate".
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import String

from .common import EVENT_QOS

NAMESPACE = "tinyalign"
# outcomes of a round (core.personalize.PersonalizeResult.status) that end `--wait`
FINAL_STATUSES = ("saved", "rejected", "preempted", "too_few_samples", "failed")


class ServiceUnavailable(RuntimeError):
    """No node offers the service on this ROS 2 domain (graph not running, other ROS_DOMAIN_ID)."""


class _Client:
    """A private rclpy context + node, so a client never disturbs a graph in the same process."""

    def __init__(self, name: str) -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node(name, namespace=NAMESPACE, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def call(self, srv_type, service: str, request, timeout: float):
        client = self.node.create_client(srv_type, service)
        if not client.wait_for_service(timeout_sec=timeout):
            raise ServiceUnavailable(
                f"no /{NAMESPACE}/{service} service after {timeout:.0f} s: is the graph running "
                "(tinyalign run / ros2 launch) on this ROS_DOMAIN_ID, with personalizer_node?")
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        if not future.done():
            raise ServiceUnavailable(f"/{NAMESPACE}/{service} did not answer within {timeout:.0f} s")
        return future.result()

    def spin_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.1)
        return done()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def personalize(speaker: str, budget_s: float = 0.0, wait: bool = False, timeout: float = 10.0,
                wait_timeout: float = 3600.0, emit: Callable[[str], None] = print) -> int:
    """Ask for a round now; with `wait`, follow it to its end. Exit code: 0 saved/accepted, 1 otherwise."""
    from tinyalign_ros.srv import Personalize

    client = _Client("personalize_client")
    try:
        outcome: dict = {}  # callbacks run in spin_until, on this thread: no lock needed
        if wait:  # subscribe before the call, so the first progress message is not missed
            def on_progress(msg: String) -> None:
                p = json.loads(msg.data)
                if p.get("speaker") == speaker:
                    loss = p.get("loss")
                    emit(f"{p.get('phase')}: step {p.get('step')}/{p.get('max_steps')}"
                         + (f", loss {loss:.3f}" if isinstance(loss, (int, float)) else "")
                         + (f", ETA {p['eta_s']:.0f} s" if isinstance(p.get("eta_s"), (int, float)) else ""))

            def on_result(msg: String) -> None:
                r = json.loads(msg.data)
                if r.get("speaker") == speaker and r.get("status") in FINAL_STATUSES:
                    outcome.update(r)

            client.node.create_subscription(String, "personalize/progress", on_progress, EVENT_QOS)
            client.node.create_subscription(String, "personalize/result", on_result, EVENT_QOS)
        response = client.call(Personalize, "personalize", Personalize.Request(speaker=speaker, budget_s=budget_s),
                               timeout)
        emit(f"{'accepted' if response.accepted else 'refused'}: {response.message}")
        if not response.accepted:
            return 1
        if not wait:
            return 0
        if not client.spin_until(lambda: bool(outcome), wait_timeout):
            emit(f"no result after {wait_timeout:.0f} s (the round may still be running)")
            return 1
        before, after = outcome.get("val_wer_before"), outcome.get("val_wer_after")
        emit(f"{outcome['status']}: {outcome.get('message', '')}"
             + (f" (validation WER {before:.3f} -> {after:.3f})" if before is not None and after is not None else ""))
        return 0 if outcome["status"] == "saved" else 1
    finally:
        client.close()


def forget(speaker: str, timeout: float = 10.0, emit: Callable[[str], None] = print) -> int:
    """Delete every sample, consent record and adapter of `speaker`. Exit code 0 on success."""
    from tinyalign_ros.srv import Forget

    client = _Client("forget_client")
    try:
        response = client.call(Forget, "forget", Forget.Request(speaker=speaker), timeout)
        emit(response.message)
        return 0 if response.success else 1
    finally:
        client.close()


def enroll(speaker: str, sentences: list[str], timeout: float = 10.0, utterance_timeout: float = 60.0,
           emit: Callable[[str], None] = print) -> int:
    """Prompted enrollment: ask the speaker to read each sentence, one utterance each.

    Each prompt goes out on `enroll` (asr_node attributes the next utterance to the speaker and
    adds it to their voiceprint; personalizer_node records consent and labels it with the
    sentence), then this waits for that utterance on `utterance` before the next prompt.
    Exit code 0 when every sentence was heard.
    """
    from tinyalign_ros.core.adapters import validate_speaker_id
    from tinyalign_ros.msg import Utterance

    validate_speaker_id(speaker)
    client = _Client("enroll_client")
    try:
        heard: list[Utterance] = []
        pub = client.node.create_publisher(String, "enroll", EVENT_QOS)
        client.node.create_subscription(
            Utterance, "utterance", lambda u: heard.append(u) if u.speaker == speaker else None, EVENT_QOS)
        if not client.spin_until(lambda: pub.get_subscription_count() > 0, timeout):
            raise ServiceUnavailable(f"nobody listens on /{NAMESPACE}/enroll after {timeout:.0f} s: is the graph "
                                     "running (tinyalign run / ros2 launch) on this ROS_DOMAIN_ID?")
        missed = 0
        for i, sentence in enumerate(sentences, 1):
            before = len(heard)
            pub.publish(String(data=json.dumps({"speaker": speaker, "text": sentence})))
            emit(f"[{i}/{len(sentences)}] please say: {sentence}")
            if client.spin_until(lambda: len(heard) > before, utterance_timeout):
                emit(f"          heard: {heard[-1].transcript}")
            else:
                missed += 1
                emit(f"          nothing heard within {utterance_timeout:.0f} s")
        emit(f"{speaker}: {len(sentences) - missed} of {len(sentences)} enrollment utterances recorded")
        return 0 if not missed else 1
    finally:
        client.close()
