"""assistant_node's skill calls (real rclpy, real SmolLM2): a Command per utterance, the spoken
confirmation, the stop fast path while the LLM is busy and its queue full, bad skills at start-up."""
from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from rclpy.parameter import Parameter

from conftest import wait_for
from tinyalign_ros.core.commands import SkillCall, SkillsError, default_skills_file
from tinyalign_ros.msg import Command, Response, Utterance
from tinyalign_ros.nodes.assistant_node import AssistantNode
from tinyalign_ros.nodes.common import EVENT_QOS, to_time_msg


def _node(ros, **params):
    overrides = [Parameter("llm.max_new_tokens", value=8), Parameter("llm.threads", value=1)] + [Parameter(k, value=v) for k, v in params.items()]
    return ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=overrides))


def _probe(ros, node):
    probe = ros.node("probe")
    commands: list[Command] = []
    responses: list[Response] = []
    probe.create_subscription(Command, "command", commands.append, EVENT_QOS)
    probe.create_subscription(Response, "response", responses.append, EVENT_QOS)
    pub = probe.create_publisher(Utterance, "utterance", EVENT_QOS)
    wait_for(lambda: pub.get_subscription_count() > 0 and node.command_pub.get_subscription_count() > 0
             and node.response_pub.get_subscription_count() > 0, what="discovery")
    return pub, commands, responses


def _utt(uid: str, text: str) -> Utterance:
    return Utterance(id=uid, speaker="alice", transcript=text, confidence=0.9, end=to_time_msg(time.time()))


def test_each_utterance_gets_one_command_and_the_answer_confirms_or_asks_back(ros):
    node = _node(ros)
    pub, commands, responses = _probe(ros, node)
    pub.publish(_utt("u1", "Please turn on the lights in the kitchen."))
    pub.publish(_utt("u2", "Who wrote the play about Romeo and Juliet?"))
    wait_for(lambda: len(responses) == 2 and len(commands) == 2, timeout=120, what="two commands and answers")
    by_id = {c.utterance_id: c for c in commands}
    answers = {r.utterance_id: r.text for r in responses}
    for uid, cmd in by_id.items():
        assert cmd.speaker == "alice" and cmd.mode == "cascade" and 0 <= cmd.confidence <= 1
        args = json.loads(cmd.arguments)
        node.skills.check({"skill": cmd.skill, "arguments": args})  # a valid call of the shipped skills
        if cmd.skill != "none":
            call = SkillCall(cmd.skill, args)
            expected = node.skills.confirmation(call) if cmd.sure else node.skills.ask_back(call)
            assert answers[uid] == expected
        else:
            assert answers[uid]  # a chat answer
        assert 0 <= cmd.latency_s < 120
    assert by_id["u1"].text == "Please turn on the lights in the kitchen."
    # the request names a skill's cue: the LLM and the skill probe chose; the question names none:
    # the probe alone decided it asks for no skill
    assert (by_id["u1"].via, by_id["u2"].via, by_id["u2"].skill) == ("llm", "probe", "none")
    assert node.probe_file.endswith("skill_probe.safetensors")  # the shipped probe fits the shipped skills


@pytest.mark.parametrize("text", ["transcript", "aligned"])
def test_aligned_mode_maps_the_transcript_before_the_aligned_llm_runs(ros, text):
    """commands.text transcript (the default): in aligned mode a request's Command comes from
    asr_node's transcript and the aligned LLM never runs for it; `aligned` waits for its transcript."""
    node = _node(ros, **{"mode": "aligned", "commands.text": text})
    ran = []
    stream = node.aligned.stream
    node.aligned.stream = lambda *a, **k: (ran.append(a), stream(*a, **k))[1]
    pub, commands, responses = _probe(ros, node)
    import numpy as np

    cfg = node.aligned.projector.cfg
    utt = _utt("a1", "Please turn on the lights in the kitchen.")
    frames = 40  # noise features: the hybrid prompt's anchor keeps the transcript as the aligned one
    utt.features = np.random.default_rng(0).standard_normal(frames * cfg.in_dim).astype(np.float32)
    utt.feature_frames, utt.feature_dim, utt.feature_layer = frames, cfg.in_dim, cfg.encoder_layer
    pub.publish(utt)
    wait_for(lambda: len(commands) == 1 and len(responses) == 1, timeout=120, what="a command and an answer")
    cmd = commands[0]
    assert (cmd.skill, json.loads(cmd.arguments), cmd.mode) == ("lights", {"room": "kitchen", "state": "on"}, "aligned")
    call = SkillCall(cmd.skill, json.loads(cmd.arguments))
    assert responses[0].text == (node.skills.confirmation(call) if cmd.sure else node.skills.ask_back(call))
    assert len(ran) == (0 if text == "transcript" else 1)


def test_stop_is_published_at_once_while_the_llm_is_busy_and_its_queue_full(ros):
    node = _node(ros, max_pending_utterances=2)
    pub, commands, responses = _probe(ros, node)
    gate, entered = threading.Event(), threading.Event()
    parse = node.command_parser.parse

    def blocked_parse(text):  # the LLM "busy" on the first utterance until the test says so
        entered.set()
        gate.wait(timeout=120)
        return parse(text)

    node.command_parser.parse = blocked_parse
    try:
        pub.publish(_utt("busy", "Tell me a long story about dragons."))
        wait_for(entered.is_set, timeout=60, what="the worker busy on the first utterance")
        for i in range(4):  # more than the queue holds: the oldest are dropped
            pub.publish(_utt(f"chat{i}", f"What is {i} plus {i}?"))
        pub.publish(_utt("stop", "Stop, stop!"))
        pub.publish(_utt("stop2", "Please stop driving toward the kitchen."))  # a stop cue before a go_to cue
        for i in range(3):  # and then the queue overflows past the stop itself
            pub.publish(_utt(f"late{i}", f"Is {i} a prime number?"))
        wait_for(lambda: {"stop", "stop2"} <= {c.utterance_id for c in commands}, timeout=30,
                 what="the stop Command while the worker is still busy",
                 state=lambda: [c.utterance_id for c in commands])
        assert not gate.is_set() and not responses  # nothing else got through meanwhile
        wait_for(lambda: node.dropped >= 5, what="the queue overflowing", state=lambda: node.dropped)
    finally:
        gate.set()
    stop = next(c for c in commands if c.utterance_id == "stop")
    assert (stop.skill, stop.arguments, stop.via, stop.confidence, stop.sure) == ("stop", "{}", "phrase", 1.0, True)
    stop2 = next(c for c in commands if c.utterance_id == "stop2")
    assert (stop2.skill, stop2.arguments, stop2.via, stop2.sure) == ("stop", "{}", "stop_doing", True)
    wait_for(lambda: node.worker.idle and node.handled == 10, timeout=180, what="all utterances handled",
             state=lambda: (node.handled, node.dropped))
    ids = [c.utterance_id for c in commands]
    assert ids.count("stop") == 1 and ids.count("stop2") == 1  # published once, dropped from the queue or not


def test_unknown_skill_in_the_skills_file_stops_the_node_at_start_up(ros, tmp_path):
    data = yaml.safe_load(default_skills_file().read_text())
    data["examples"].append({"text": "do a backflip", "skill": "backflip", "arguments": {}})
    path = tmp_path / "skills.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SkillsError, match=r"examples\[\d+\]: unknown skill 'backflip'"):
        AssistantNode(namespace="tinyalign", context=ros.context,
                      parameter_overrides=[Parameter("commands.skills_file", value=str(path))])


def test_tinyalign_run_prints_the_command_of_each_answer(demo_file):
    """What `make demo` shows: a `command:` line (skill, arguments, confidence) beside every answer."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    path, segments = demo_file
    env = dict(os.environ, ROS_DOMAIN_ID=str((int(os.environ["ROS_DOMAIN_ID"]) + 37) % 100 + 1))
    proc = subprocess.run([sys.executable, "-m", "tinyalign_ros.cli", "run", "--input", str(path), "--no-personalizer"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = re.findall(r"^ +command: (\w+) .*\(confidence (\d\.\d\d)", proc.stdout, re.M)
    answers = re.findall(r"^ +robot: ", proc.stdout, re.M)
    assert len(commands) == len(answers) == len(segments), proc.stdout
    skills = set(yaml.safe_load(default_skills_file().read_text())["skills"]) | {"none"}
    assert all(skill in skills and 0 <= float(conf) <= 1 for skill, conf in commands), proc.stdout
