"""What people watch: the rviz config and rqt perspective name topics the nodes really publish,
and the nodes publish the markers and numeric metrics those views draw."""
from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy
from std_msgs.msg import Float32
from visualization_msgs.msg import Marker

from conftest import REPO, wait_for
# the tiny random LLM (and a projector for it) of the personalization tests: nodes load in a second
from test_personalize import SPEAKER, fill, tiny_model_dir, tiny_projector_file  # noqa: F401
from tinyalign_ros.core.samples import SampleStore
from tinyalign_ros.msg import AudioChunk, Response, Utterance
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS, LATCHED_QOS, to_time_msg
from tinyalign_ros.srv import Personalize

RVIZ = REPO / "config" / "tinyalign.rviz"
PERSPECTIVE = REPO / "config" / "tinyalign.perspective"
RVIZ_QOS = {"Transient Local": DurabilityPolicy.TRANSIENT_LOCAL, "Volatile": DurabilityPolicy.VOLATILE,
            "Reliable": ReliabilityPolicy.RELIABLE, "Best Effort": ReliabilityPolicy.BEST_EFFORT}


def assistant(ros, tiny_model_dir: Path, **params):
    from tinyalign_ros.nodes.assistant_node import AssistantNode

    overrides = {"llm.model": str(tiny_model_dir), "llm.max_new_tokens": 4, **params}
    return ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in overrides.items()]))


def personalizer(ros, tmp_path: Path, tiny_model_dir: Path, tiny_projector_file: Path, **params):
    from tinyalign_ros.nodes.personalizer_node import PersonalizerNode

    overrides = {"llm.model": str(tiny_model_dir), "projector.file": str(tiny_projector_file),
                 "samples.dir": str(tmp_path / "samples"), "adapters.dir": str(tmp_path / "adapters"),
                 "checkpoint_dir": str(tmp_path / "work"), "consent.speakers": [SPEAKER], "idle_s": 3600.0,
                 "train.min_samples": 4, "train.nice": 0, "train.threads": 0, "train.kind": "lora", **params}
    return ros.add(PersonalizerNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in overrides.items()]))


def rviz_markers() -> tuple[dict, list[dict]]:
    config = yaml.safe_load(RVIZ.read_text())
    manager = config["Visualization Manager"]
    markers = [d for d in manager["Displays"] if d["Class"] == "rviz_default_plugins/Marker"]
    return manager["Global Options"], markers


def perspective_plots() -> tuple[dict, dict[str, list[str]]]:
    """The running plugins of the perspective and the topic fields of each rqt_plot instance,
    decoded the way qt_gui's PerspectiveManager imports them (every value a Python repr)."""
    manager = json.loads(PERSPECTIVE.read_text())["groups"]["pluginmanager"]
    running = ast.literal_eval(manager["keys"]["running-plugins"]["repr"])
    plots = {}
    for group, body in manager["groups"].items():
        keys = body["groups"].get("plugin", {}).get("keys", {})
        for value in keys.values():
            assert value["type"] == "repr", group
            ast.literal_eval(value["repr"])
        if group.startswith("plugin__rqt_plot__Plot__"):
            plots[group] = ast.literal_eval(keys["topics"]["repr"])
    return running, plots


def test_rviz_and_rqt_views_name_only_topics_the_nodes_publish(ros, tmp_path, tiny_model_dir, tiny_projector_file):
    from tinyalign_ros.nodes.asr_node import AsrNode
    from tinyalign_ros.nodes.tts_node import TtsNode

    nodes = [ros.add(AsrNode(namespace="tinyalign", context=ros.context)), assistant(ros, tiny_model_dir),
             personalizer(ros, tmp_path, tiny_model_dir, tiny_projector_file),
             ros.add(TtsNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
                 Parameter("engine", value="espeak-ng"), Parameter("play", value=False)]))]
    published = {pub.topic_name: pub for node in nodes for pub in node.publishers}

    options, markers = rviz_markers()
    assert options["Fixed Frame"] == "base_link" == nodes[0].marker_frame == nodes[1].marker_frame
    assert sorted(m["Topic"]["Value"] for m in markers) == ["/tinyalign/response_marker",
                                                             "/tinyalign/transcript_marker"]
    for marker in markers:
        topic = marker["Topic"]
        pub = published[topic["Value"]]
        assert pub.msg_type is Marker and marker["Enabled"] is True
        # latched on both ends: rviz started after the last utterance still shows its text
        assert pub.qos_profile.durability == RVIZ_QOS[topic["Durability Policy"]] == DurabilityPolicy.TRANSIENT_LOCAL
        assert pub.qos_profile.reliability == RVIZ_QOS[topic["Reliability Policy"]]

    running, plots = perspective_plots()
    assert running == {"rqt_robot_monitor/RobotMonitor": [1], "rqt_plot/Plot": [1, 2, 3]}
    assert sorted(plots) == [f"plugin__rqt_plot__Plot__{i}" for i in (1, 2, 3)]
    fields = [f for topics in plots.values() for f in topics]
    assert len(fields) == 7
    for field in fields:  # rqt_plot names "<topic>/<field>"
        topic, name = field.rsplit("/", 1)
        assert topic in published, f"{field}: no node publishes {topic}"
        assert isinstance(getattr(published[topic].msg_type(), name), float), field


def test_assistant_publishes_a_latched_response_marker_and_latency_metrics(ros, tiny_model_dir):
    node = assistant(ros, tiny_model_dir, marker_frame="head")
    probe = ros.node("probe")
    responses: list[Response] = []
    metrics: dict[str, list[float]] = {"first": [], "last": []}
    probe.create_subscription(Response, "response", responses.append, EVENT_QOS)
    probe.create_subscription(Float32, "metrics/latency_first_token_s", lambda m: metrics["first"].append(m.data),
                              EVENT_QOS)
    probe.create_subscription(Float32, "metrics/latency_last_token_s", lambda m: metrics["last"].append(m.data),
                              EVENT_QOS)
    pub = probe.create_publisher(Utterance, "utterance", EVENT_QOS)
    wait_for(lambda: pub.get_subscription_count() and node.first_token_pub.get_subscription_count()
             and node.last_token_pub.get_subscription_count() and node.response_pub.get_subscription_count(),
             what="discovery")
    pub.publish(Utterance(id="u1", transcript="Turn on the lights.", confidence=0.9, end=to_time_msg(time.time())))
    pub.publish(Utterance(id="u2", transcript="", end=to_time_msg(time.time())))  # nothing to answer
    wait_for(lambda: len(responses) == 2 and metrics["first"], timeout=60, what="two responses, one with metrics")
    answered = next(r for r in responses if r.utterance_id == "u1")
    assert answered.text
    # one sample per answer (none for the empty one), equal to the Response's figures
    assert metrics["first"] == [pytest.approx(answered.latency_first_token_s)]
    assert metrics["last"] == [pytest.approx(answered.latency_last_token_s)]

    markers: list[Marker] = []
    probe.create_subscription(Marker, "response_marker", markers.append, LATCHED_QOS)  # a late rviz
    wait_for(lambda: markers, what="the latched response marker")
    (marker,) = markers  # depth 1: only the last answer, the empty one
    assert marker.type == Marker.TEXT_VIEW_FACING and marker.header.frame_id == "head"
    assert marker.text == "robot: (no answer)" and marker.ns == "response"


def test_assistant_node_declares_exactly_its_yaml_section(ros, tiny_model_dir):
    """The cheap half of test_e2e's YAML check, for this node alone (marker_frame included)."""
    from tinyalign_ros.nodes.graph import NAMESPACE, default_config

    def flatten(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    section = yaml.safe_load(default_config().read_text())[f"/{NAMESPACE}/assistant_node"]["ros__parameters"]
    node = assistant(ros, tiny_model_dir)
    assert set(node._parameters) - {"use_sim_time", "start_type_description_service"} == flatten(section)


def test_asr_node_publishes_rtf_and_exit_layer_per_utterance(ros, speech_16k):
    from tinyalign_ros.nodes.asr_node import AsrNode

    node = ros.add(AsrNode(namespace="tinyalign", context=ros.context))
    probe = ros.node("probe")
    utterances: list[Utterance] = []
    rtf: list[float] = []
    layers: list[float] = []
    probe.create_subscription(Utterance, "utterance", utterances.append, EVENT_QOS)
    probe.create_subscription(Float32, "metrics/rtf", lambda m: rtf.append(m.data), EVENT_QOS)
    probe.create_subscription(Float32, "metrics/exit_layer", lambda m: layers.append(m.data), EVENT_QOS)
    pub = probe.create_publisher(AudioChunk, "audio", AUDIO_QOS)
    wait_for(lambda: pub.get_subscription_count() and node.rtf_pub.get_subscription_count()
             and node.exit_layer_pub.get_subscription_count(), what="discovery")
    audio = np.concatenate([np.zeros(8000, np.float32), speech_16k, np.zeros(16000, np.float32)])
    for i in range(0, len(audio), 1600):
        pub.publish(AudioChunk(sample_rate=16000, offset=i, samples=audio[i:i + 1600],
                               end_of_stream=i + 1600 >= len(audio)))
    wait_for(lambda: utterances and rtf and layers, timeout=60, what="an utterance and its metrics")
    assert len(utterances) == len(rtf) == len(layers) == 1
    assert 0 < rtf[0] == pytest.approx(node.last_rtf) and rtf[0] < 5
    assert layers[0] == utterances[0].feature_layer >= 1


def test_personalizer_publishes_the_validation_wer_of_each_round(ros, tmp_path, tiny_model_dir,
                                                                 tiny_projector_file):
    fill(SampleStore(tmp_path / "samples"), 6)
    node = personalizer(ros, tmp_path, tiny_model_dir, tiny_projector_file, **{"train.max_steps": 2})
    # before, after: every held-out sentence misheard, then every one right, so the gate saves the
    # candidate (plumbing, not learning)
    scores = iter([(0.75, "misheard"), (0.5, None)])

    def evaluate(projector, data):
        score, heard = next(scores)
        return score, [(i.text, heard or i.text) for i in data.infos]

    node.personalizer.evaluate = evaluate
    probe = ros.node("probe")
    wers: list[float] = []
    probe.create_subscription(Float32, "personalize/val_wer", lambda m: wers.append(m.data), EVENT_QOS)
    client = probe.create_client(Personalize, "personalize")
    wait_for(lambda: node.val_wer_pub.get_subscription_count() and client.service_is_ready(), what="discovery")
    future = client.call_async(Personalize.Request(speaker=SPEAKER, budget_s=60.0))
    wait_for(future.done, what="the personalize service")
    assert future.result().accepted, future.result().message
    wait_for(lambda: wers, timeout=60, what="the round's validation WER")
    assert node.last_result.status == "saved", node.last_result.message
    assert wers == [0.5]  # the candidate's WER, the figure the gate decided on
