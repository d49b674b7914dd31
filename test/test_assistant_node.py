"""assistant_node (cascade) with real rclpy and the real SmolLM2: tokens stream, then a Response."""
from __future__ import annotations

import time

from rclpy.parameter import Parameter

from conftest import wait_for
from tinyalign_ros.msg import Response, ResponseToken, Utterance
from tinyalign_ros.nodes.assistant_node import AssistantNode
from tinyalign_ros.nodes.common import EVENT_QOS, to_time_msg


def test_cascade_answers_with_streamed_tokens_and_latency(ros):
    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("llm.max_new_tokens", value=16)]))
    probe = ros.node("probe")
    responses: list[Response] = []
    tokens: list[ResponseToken] = []
    probe.create_subscription(Response, "response", responses.append, EVENT_QOS)
    probe.create_subscription(ResponseToken, "response_tokens", tokens.append, EVENT_QOS)
    pub = probe.create_publisher(Utterance, "utterance", EVENT_QOS)
    wait_for(lambda: pub.get_subscription_count() > 0 and node.token_pub.get_subscription_count() > 0,
             what="discovery")
    end = time.time()
    pub.publish(Utterance(id="u1", speaker="alice", transcript="Please turn on the lights.", confidence=0.9,
                          end=to_time_msg(end)))
    pub.publish(Utterance(id="u2", transcript="", confidence=0.0, end=to_time_msg(end)))  # nothing to answer
    wait_for(lambda: len(responses) == 2, timeout=60, what="two responses")
    r1, r2 = sorted(responses, key=lambda r: r.utterance_id)
    assert r1.text and r1.speaker == "alice" and r1.mode == "cascade"
    assert 0 < r1.latency_first_token_s <= r1.latency_last_token_s < 60
    assert r2.text == ""
    wait_for(lambda: sum(t.final for t in tokens) == 2, what="final token messages")
    streamed = [t for t in tokens if t.utterance_id == "u1"]
    assert [t.index for t in streamed] == list(range(len(streamed)))
    assert "".join(t.text for t in streamed).strip() == r1.text
    assert node.handled == 2
