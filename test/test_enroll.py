"""Prompted enrollment over real rclpy: `tinyalign enroll`'s client, asr_node's speaker recognition
and personalizer_node's consent and labels, then forget removing the voiceprint too."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from std_msgs.msg import String

from conftest import Probe, enrollment_graph, wait_for
from tinyalign_ros.core.corpus import Voice, synthesize
from tinyalign_ros.msg import Utterance

ALICE = Voice("alice", "espeak", "en-gb+f2")
STRANGER = Voice("stranger", "festival", "kal_diphone")
PROMPTS = ["Turn on the lights in the living room.", "Please open the door for me."]


@pytest.fixture
def graph(ros, tmp_path):
    return enrollment_graph(ros, tmp_path)


def test_enrollment_labels_consents_and_makes_the_voice_recognizable(graph):
    from tinyalign_ros.nodes.client import enroll, forget

    asr, pers, say, utterances = graph
    clips = [synthesize(t, ALICE) for t in PROMPTS]
    result: list[int] = []
    lines: list[str] = []
    worker = threading.Thread(target=lambda: result.append(enroll("alice", PROMPTS, utterance_timeout=60,
                                                                  emit=lines.append)))
    worker.start()

    def state() -> dict:
        return {"client": lines, "pending": asr.speaker_id.pending, "chunks": asr.chunks_received,
                "in_speech": asr.segmenter.in_speech, "asr_queue": asr.worker.depth, "published": asr.published,
                "dropped": asr.dropped_utterances, "utterances": [(u.transcript, u.speaker) for u in utterances]}

    for i, clip in enumerate(clips, 1):  # alice reads each prompt once the client has shown it
        wait_for(lambda: sum("please say:" in line for line in lines) == i and asr.speaker_id.pending == "alice",
                 30, f"enrollment prompt {i}", state)
        say(clip)
        wait_for(lambda: sum("heard:" in line for line in lines) == i, 60, f"enrollment utterance {i}", state)
    worker.join(timeout=90)
    assert result == [0], lines
    assert sum("please say:" in line for line in lines) == 2 and "2 of 2" in lines[-1]
    assert asr.speaker_id.speakers == ["alice"]
    wait_for(lambda: pers.samples.count("alice") == 2, 10, "the enrollment samples")
    infos = pers.samples.list("alice")
    assert sorted(i.text for i in infos) == sorted(PROMPTS) and {i.source for i in infos} == {"enrollment"}
    assert pers.samples.has_consent("alice")

    n = len(utterances)
    say(clips[0])  # unprompted: recognized by the voiceprint
    say(synthesize(PROMPTS[0], STRANGER))  # another person: never alice
    wait_for(lambda: len(utterances) >= n + 2, 60, "two unprompted utterances")
    assert [u.speaker for u in utterances[n:n + 2]] == ["alice", ""]
    assert pers.samples.count("alice") == 2  # unprompted speech of a consenting speaker is kept only above
    # min_confidence (0.9 by default) as a teacher label, never with the prompt's text

    assert forget("alice", emit=lines.append) == 0
    wait_for(lambda: asr.speaker_id.speakers == [], 10, "the voiceprint deletion")
    assert pers.samples.count("alice") == 0 and not pers.samples.has_consent("alice")


def test_malformed_enrollments_are_ignored(ros, graph):
    asr, pers, _, _ = graph
    pub = Probe(ros, "enroller").publisher(String, "enroll")
    wait_for(lambda: pub.get_subscription_count() >= 2, what="discovery")
    for bad in ("not json", '{"text": "no speaker"}', '{"speaker": "../etc"}', '{"speaker": 3, "text": 4}', "[]"):
        pub.publish(String(data=bad))
    pub.publish(String(data='{"speaker": "bob"}'))  # consent only, no prompt
    # two nodes, each with its own subscription: wait until both have taken it
    wait_for(lambda: "bob" in pers.consented and asr.speaker_id.pending == "bob", 10, "the good enrollment")
    assert pers.consented == {"bob"} and not pers.enrolling


def test_a_prompt_taken_before_the_previous_prompts_utterance_labels_nothing_wrong(ros, graph):
    """`enroll` and `utterance` are separate topics: the client's next prompt can reach
    personalizer_node before the utterance that answered the previous one. Each utterance still
    gets its own prompt's sentence, oldest first."""
    _, pers, _, _ = graph
    probe = Probe(ros, "enroller")
    prompts = probe.publisher(String, "enroll")
    speech = probe.publisher(Utterance, "utterance")
    wait_for(lambda: prompts.get_subscription_count() >= 2 and speech.get_subscription_count() >= 2,
             what="discovery")
    for text in PROMPTS:
        prompts.publish(String(data=json.dumps({"speaker": "carol", "text": text})))
    wait_for(lambda: len(pers.enrolling.get("carol", ())) == 2, 10, "both prompts")
    for i in range(2):
        speech.publish(Utterance(id=f"carol-{i}", speaker="carol", transcript="whatever was heard",
                                 features=np.zeros(20 * 384, np.float32), feature_frames=20, feature_dim=384,
                                 feature_layer=4))
    wait_for(lambda: pers.samples.count("carol") == 2, 10, "the enrollment samples")
    assert {i.utterance_id: i.text for i in pers.samples.list("carol")} == {"carol-0": PROMPTS[0],
                                                                            "carol-1": PROMPTS[1]}
    assert not pers.enrolling
