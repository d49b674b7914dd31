"""Malformed messages at the subscribers: the node logs and survives, and keeps working after."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_msgs.msg import Float32, String

from conftest import Probe, wait_for
# the tiny random LLM (and a projector for it) of the personalization tests: nodes load in a second
from test_personalize import SPEAKER, tiny_model_dir, tiny_projector_file  # noqa: F401
from test_personalize import utterance as good_utterance
from tinyalign_ros.core.llm import MAX_USER_CHARS
from tinyalign_ros.core.projector import MAX_FEATURE_FRAMES
from tinyalign_ros.msg import AudioChunk, Response, ResponseToken, Utterance
from tinyalign_ros.nodes.common import AUDIO_QOS, EVENT_QOS, to_time_msg


def nasty_chunks(rng: np.random.Generator) -> list[AudioChunk]:
    def chunk(samples, rate=16000, offset=0, end=False) -> AudioChunk:
        return AudioChunk(sample_rate=rate, offset=offset, end_of_stream=end,
                          samples=np.asarray(samples, dtype=np.float32))

    out = [
        chunk([], 16000), chunk(np.full(1600, np.nan)), chunk(np.full(1600, np.inf)),
        chunk(np.full(1600, -np.inf)), chunk(rng.normal(size=1600), rate=0),
        chunk(rng.normal(size=1600), rate=4_294_967_295), chunk(rng.normal(size=3), rate=1),
        chunk(rng.normal(size=1600) * 1e30), chunk(np.ones(1600) * 3.0),
        chunk(rng.normal(size=1600), offset=2**63), chunk(rng.normal(size=1600), offset=5),
        chunk([], end=True), chunk(rng.normal(size=16000 * 30) * 0.3),  # 30 s in one chunk
        chunk(np.zeros(1), end=True),
    ]
    for _ in range(30):  # random sizes, rates, offsets and values
        n = int(rng.integers(0, 5000))
        values = rng.normal(size=n) * rng.choice([1e-6, 0.1, 1.0, 1e6])
        if n and rng.random() < 0.3:
            values[rng.integers(0, n)] = rng.choice([np.nan, np.inf])
        out.append(chunk(values, rate=int(rng.choice([8000, 16000, 22050, 44100, 48000, 1, 0])),
                         offset=int(rng.integers(0, 2**40)), end=bool(rng.random() < 0.1)))
    return out


def test_asr_node_survives_malformed_audio_and_still_transcribes(asr, speech_16k):
    node, _, utterances, pub = asr
    nasty = nasty_chunks(np.random.default_rng(0))
    for msg in nasty:
        pub.publish(msg)
    wait_for(lambda: node.chunks_received >= len(nasty), timeout=60, what="every malformed chunk handled")
    wait_for(lambda: node.idle, timeout=120, what="the queue of whatever the noise produced to drain")
    before = len(utterances)
    # then a clean stream: the node must still work
    audio = np.concatenate([np.zeros(8000, np.float32), speech_16k, np.zeros(16000, np.float32)])
    for i in range(0, len(audio), 1600):
        pub.publish(AudioChunk(sample_rate=16000, offset=10**6 + i, samples=audio[i:i + 1600],
                               end_of_stream=i + 1600 >= len(audio)))
    wait_for(lambda: len(utterances) > before and node.idle, timeout=60, what="the clean utterance")
    assert "left" in utterances[-1].transcript.lower()
    assert node.rejected_chunks >= 5


# --------------------------------------------------------------------------- Utterance subscribers


def nasty_utterances() -> list[Utterance]:
    """Utterances no asr_node would send: every field of the message wrong in some way."""
    def feats(frames: int, dim: int = 16, fill: float | None = None) -> np.ndarray:
        values = np.random.default_rng(frames).standard_normal(frames * dim).astype(np.float32)
        if fill is not None:
            values[::7] = fill
        return values

    def utt(uid: str, **fields) -> Utterance:
        base = dict(id=uid, speaker=SPEAKER, transcript="yes", confidence=0.95, features=feats(8),
                    feature_frames=8, feature_dim=16, feature_layer=4)
        return Utterance(**{**base, **fields})

    return [
        Utterance(),  # every field empty: no id, no text, no features
        utt("short-values", features=feats(8)[:10]),
        utt("long-values", features=feats(9)),
        utt("nan", features=feats(8, fill=np.nan)),
        utt("inf", features=feats(8, fill=np.inf)),
        utt("-inf", features=feats(8, fill=-np.inf)),
        utt("huge-frames", feature_frames=2**32 - 1),  # a forged count with few values
        utt("too-many-frames", features=feats(MAX_FEATURE_FRAMES + 1), feature_frames=MAX_FEATURE_FRAMES + 1),
        utt("zero-dim", features=np.zeros(0, np.float32), feature_dim=0),  # 8 x 0 = 0 values: "consistent"
        utt("wrong-dim", features=feats(16), feature_dim=8),
        utt("no-layer", feature_layer=-1),
        utt("wrong-layer", feature_layer=2),
        utt("absurd-layer", feature_layer=2**31 - 1),
        utt("negative-layer", feature_layer=-2**31),
        utt("nan-confidence", confidence=float("nan")),
        utt("huge-confidence", confidence=3.4e38),
        utt("huge-transcript", transcript="word " * MAX_USER_CHARS),
        utt("odd-time", end=to_time_msg(-2.0**31), start=to_time_msg(2.0**31 - 1)),
        utt("unknown-speaker", speaker="nobody"),
        utt("traversal", speaker="../x"),
        utt("deep-traversal", speaker="../../../../tmp/evil"),
        utt("slash", speaker="a/b"),
        utt("dot", speaker="."),
        utt("unicode", speaker="🤖", transcript="ça va? 你好 \u202e"),
        utt("", speaker=""),  # no id
    ]


@pytest.mark.parametrize("mode", ["cascade", "aligned"])
def test_assistant_node_survives_malformed_utterances_and_still_answers(ros, mode, tiny_model_dir,
                                                                          tiny_projector_file):
    from tinyalign_ros.nodes.assistant_node import AssistantNode

    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("mode", value=mode), Parameter("projector.file", value=str(tiny_projector_file)),
        Parameter("llm.model", value=str(tiny_model_dir)), Parameter("aligned.task", value="repeat"),
        Parameter("llm.max_new_tokens", value=4), Parameter("max_pending_utterances", value=100)]))
    probe = Probe(ros, "fuzzer")
    responses: list[Response] = probe.collect(Response, "response")
    pub = probe.publisher(Utterance, "utterance")
    latencies: list[float] = []  # an unset end of speech must not become a 1.8e9 s "latency" on rqt_plot
    for name in ("latency_first_token_s", "latency_last_token_s"):
        probe.node.create_subscription(Float32, f"metrics/{name}", lambda m: latencies.append(m.data), EVENT_QOS)
    probe.connected(pub, node.response_pub, node.first_token_pub)

    good = good_utterance("good")

    def ask(uid: str) -> Response:
        before = len(responses)
        good.id = uid
        good.end = to_time_msg(time.time())  # the good ones are stamped; most nasty ones are not
        pub.publish(good)
        wait_for(lambda: len(responses) > before, timeout=60, what=f"the response to {uid}")
        return responses[-1]

    reference = ask("good-before")
    assert reference.text, "the tiny LLM says something for good input (else the check below proves nothing)"
    nasty = nasty_utterances()
    for msg in nasty:
        pub.publish(msg)
    # one Response per utterance, none lost to an exception in the worker
    wait_for(lambda: len(responses) == 1 + len(nasty) and node.idle, timeout=120, what="every malformed utterance")
    assert node.answered == node.handled == 1 + len(nasty)
    by_id = {r.utterance_id: r for r in responses}
    if mode == "cascade":
        assert by_id["huge-transcript"].text == ""  # refused (PromptTooLong), never fed to the LLM
    else:  # features the projector cannot take get an empty answer; another layer's (an early exit) the cascade's
        for uid in ("short-values", "nan", "huge-frames", "too-many-frames", "zero-dim"):
            assert by_id[uid].text == "", uid
        assert [by_id[uid].mode for uid in ("wrong-layer", "absurd-layer")] == ["cascade", "cascade"]
    after = ask("good-after")
    assert after.text == reference.text  # same input, same greedy answer: nothing left broken
    assert math.isnan(by_id["odd-time"].latency_first_token_s)  # its end of speech is 2**31 s in the past
    assert 0 < after.latency_first_token_s < 60
    wait_for(lambda: len(latencies) >= 4, what="the stamped answers' latencies")
    assert all(0 <= x < 600 for x in latencies), latencies


def test_personalizer_node_survives_malformed_utterances_and_corrections(ros, tmp_path, tiny_model_dir,
                                                                       tiny_projector_file):
    from tinyalign_ros.nodes.personalizer_node import PersonalizerNode

    samples_dir = tmp_path / "store" / "samples"
    node = ros.add(PersonalizerNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter(k, value=v) for k, v in {
            "llm.model": str(tiny_model_dir), "projector.file": str(tiny_projector_file),
            "samples.dir": str(samples_dir), "adapters.dir": str(tmp_path / "store" / "adapters"),
            "checkpoint_dir": str(tmp_path / "store" / "work"), "consent.speakers": [SPEAKER],
            "idle_s": 3600.0, "recent_utterances": 200}.items()]))
    probe = Probe(ros, "fuzzer")
    pub = probe.publisher(Utterance, "utterance")
    fix = probe.publisher(String, "correction")
    probe.connected(pub, fix)

    nasty = nasty_utterances()
    for msg in nasty:
        pub.publish(msg)
    pub.publish(good_utterance("good-1"))
    # delivered in order: once the good one is stored, every malformed one before it was handled
    wait_for(lambda: any(s.utterance_id == "good-1" for s in node.samples.list(SPEAKER)), timeout=30,
             what="every malformed utterance")
    # bad features, NaN or impossible confidences, huge text and foreign speakers make no sample; odd
    # timestamps do not matter to a sample
    assert node.samples.speakers() == [SPEAKER]
    assert sorted(s.utterance_id for s in node.samples.list(SPEAKER)) == ["good-1", "odd-time"]

    bad_corrections = [
        "", "not json", "{", "[]", "null", "42", '"a string"', json.dumps({"utterance_id": "good-1"}),
        json.dumps({"text": "hello"}), json.dumps({"utterance_id": None, "text": None}),
        json.dumps({"utterance_id": ["good-1"], "text": {"a": 1}}),
        json.dumps({"utterance_id": "no-such-utterance", "text": "hello"}),
        json.dumps({"utterance_id": "good-1", "text": ""}),  # an empty label
        json.dumps({"utterance_id": "good-1", "text": "x" * 100_000}),  # no utterance says that
        json.dumps({"utterance_id": "nan", "text": "hello"}),  # an utterance whose features were refused
        json.dumps({"utterance_id": "traversal", "text": "hello"}),  # a speaker id like "../x"
        json.dumps({"utterance_id": "unknown-speaker", "text": "hello"}),
        json.dumps({"utterance_id": "good-1", "text": "\ud800"}),  # valid JSON; a lone surrogate, not UTF-8
    ]
    for data in bad_corrections:
        fix.publish(String(data=data))
    fix.publish(String(data=json.dumps({"utterance_id": "good-1", "text": "yes indeed"})))
    # the correction's sample is written before the label it supersedes is removed (never zero
    # copies), so for a moment both are there: wait for the end of the swap too
    wait_for(lambda: {s.utterance_id: (s.text, s.source) for s in node.samples.list(SPEAKER)}.get("good-1")
             == ("yes indeed", "correction") and node.samples.count(SPEAKER) == 2, timeout=30,
             what="the good correction, after every bad one")
    assert sorted(p.name for p in samples_dir.iterdir()) == [SPEAKER]  # "../x" wrote nothing anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    pub.publish(good_utterance("good-2"))  # and it still collects
    wait_for(lambda: node.samples.count(SPEAKER) == 3, what="a sample after the fuzz")


# --------------------------------------------------------------------------- tts_node


def test_tts_node_survives_malformed_tokens_and_responses_and_still_speaks(ros):
    from tinyalign_ros.nodes.tts_node import TtsNode

    node = ros.add(TtsNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("engine", value="espeak-ng"), Parameter("play", value=False), Parameter("realtime", value=False),
        Parameter("tail_s", value=0.0), Parameter("max_queued_sentences", value=4)]))
    probe = Probe(ros, "fuzzer")
    tokens = probe.publisher(ResponseToken, "response_tokens")
    responses = probe.publisher(Response, "response")
    audio: list[AudioChunk] = probe.collect(AudioChunk, "speech_audio", AUDIO_QOS)
    latencies: list[float] = []  # the zero stamps below must not become 1.8e9 s "latencies" on rqt_plot
    for name in ("end_of_speech_to_audio_s", "first_token_to_audio_s"):
        probe.node.create_subscription(Float32, f"metrics/{name}", lambda m: latencies.append(m.data), EVENT_QOS)
    probe.connected(tokens, responses, node.audio_pub)

    huge = "word " * 40_000  # 200 kB without a sentence end: cut into ~1000 pieces, the queue bounded
    bad_tokens = [
        ResponseToken(), ResponseToken(final=True),  # no utterance id at all
        ResponseToken(utterance_id="huge", index=0, text=huge),
        ResponseToken(utterance_id="huge", index=1, text=huge, final=True),
        ResponseToken(utterance_id="order", index=5, text="Five. "),  # out of order, repeated, huge index
        ResponseToken(utterance_id="order", index=2, text="Two. "),
        ResponseToken(utterance_id="order", index=2, text="Two again. "),
        ResponseToken(utterance_id="order", index=2**32 - 1, text="Last.", final=True),
        ResponseToken(utterance_id="order", index=0, text="After the end."),  # a token after final
        ResponseToken(utterance_id="punct", index=0, text="?!... ,;", final=True),  # nothing speakable
        ResponseToken(utterance_id="weird", index=0, text="\u202e ça 你好 🤖 \t\r\n", final=True),
        *[ResponseToken(utterance_id=f"open-{i}", index=0, text="never finished") for i in range(40)],
    ]
    nan = float("nan")
    bad_responses = [
        Response(), Response(utterance_id="empty-text"),
        Response(utterance_id="huge-response", text=huge),
        Response(utterance_id="nan-latency", text="Hi.", latency_first_token_s=nan, latency_last_token_s=nan),
        Response(utterance_id="inf-latency", text="Hi.", latency_first_token_s=float("inf"),
                 latency_last_token_s=-float("inf")),
        Response(utterance_id="order", text="Five. Two. Last."),  # a response for an already streamed answer
        Response(utterance_id="backwards", text="Hi.", latency_first_token_s=5.0, latency_last_token_s=-5.0),
    ]
    for msg in bad_tokens:
        tokens.publish(msg)
    for msg in bad_responses:
        responses.publish(msg)
    # both topics delivered in order: once their last messages are in the node's records, all are
    wait_for(lambda: "open-39" in node.answers._seen_tokens and "backwards" in node.latency._timing and node.idle, timeout=120,
             what="every malformed message handled and the queues drained")
    before, spoken = len(audio), node.sentences_spoken
    for i, word in enumerate(["Hello", " there.", ""]):
        tokens.publish(ResponseToken(utterance_id="good", index=i, text=word, final=not word))
    wait_for(lambda: node.sentences_spoken == spoken + 1 and node.idle, timeout=30, what="the good answer spoken")
    assert len(audio) > before
    assert all(0.0 <= v < 600.0 for v in latencies), latencies
