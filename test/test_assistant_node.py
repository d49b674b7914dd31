"""assistant_node (cascade) with real rclpy and the real SmolLM2: tokens stream, then a Response."""
from __future__ import annotations

import time

import pytest
from rclpy.parameter import Parameter

from conftest import Probe, wait_for
from tinyalign_ros.msg import Response, ResponseToken, Utterance
from tinyalign_ros.nodes.assistant_node import AssistantNode
from tinyalign_ros.nodes.common import to_time_msg


def probe_assistant(ros, node: AssistantNode) -> tuple[list[Response], list[ResponseToken], object]:
    """The assistant's responses and token stream as they arrive, and a publisher of utterances."""
    probe = Probe(ros)
    responses, tokens = probe.collect(Response, "response"), probe.collect(ResponseToken, "response_tokens")
    pub = probe.publisher(Utterance, "utterance")
    probe.connected(pub, node.response_pub, node.token_pub)
    return responses, tokens, pub


def test_cascade_answers_with_streamed_tokens_and_latency(ros):
    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("llm.max_new_tokens", value=16)]))
    responses, tokens, pub = probe_assistant(ros, node)
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


def _features_utterance(uid: str, frames: int, dim: int, layer: int, end: float) -> Utterance:
    import numpy as np

    feats = np.random.default_rng(0).standard_normal((frames, dim)).astype(np.float32)
    return Utterance(id=uid, transcript="turn on the light", confidence=0.9, end=to_time_msg(end),
                     features=feats.reshape(-1), feature_frames=frames, feature_dim=dim, feature_layer=layer)


def test_aligned_mode_answers_from_features_refuses_malformed_ones_and_early_exits_go_cascade(ros, tmp_path):
    import torch

    from tinyalign_ros.core.projector import build_projector, save_projector

    torch.manual_seed(0)  # an untrained projector: the text is meaningless, the plumbing is what is tested
    path = save_projector(build_projector("mlp", in_dim=384, out_dim=576, hidden=64, encoder_layer=4),
                          tmp_path / "p.safetensors")
    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("mode", value="aligned"), Parameter("projector.file", value=str(path)),
        Parameter("aligned.task", value="repeat"), Parameter("llm.max_new_tokens", value=6)]))
    assert node.aligned.model is node.llm.model  # one copy of the LLM for both modes
    responses, tokens, pub = probe_assistant(ros, node)
    end = time.time()
    pub.publish(_features_utterance("good", 60, 384, 4, end))
    pub.publish(_features_utterance("wrong-dim", 60, 512, 4, end))
    pub.publish(_features_utterance("wrong-layer", 60, 384, 2, end))
    pub.publish(Utterance(id="no-features", transcript="hello", feature_layer=-1, end=to_time_msg(end)))
    wait_for(lambda: len(responses) == 4, timeout=60, what="four responses")
    by_id = {r.utterance_id: r for r in responses}
    good = by_id["good"]
    assert good.mode == "aligned" and good.text and good.transcript == good.text  # repeat task
    assert 0 < good.latency_first_token_s <= good.latency_last_token_s < 60
    assert [by_id[k].text for k in ("wrong-dim", "no-features")] == ["", ""]
    early = by_id["wrong-layer"]  # an early exit: answered from its transcript, as the cascade would
    assert (early.mode, early.transcript) == ("cascade", "turn on the light") and early.text
    assert node.early_exits == 1
    wait_for(lambda: sum(t.final for t in tokens) == 4, what="final token messages")
    streamed = [t for t in tokens if t.utterance_id == "good" and not t.final]
    assert "".join(t.text for t in streamed).strip() == good.text
    assert node.handled == 4


@pytest.mark.parametrize("max_change", [0.2, -1.0])
def test_hybrid_projector_output_is_anchored_to_the_asr_transcript(ros, tmp_path, max_change):
    """An untrained hybrid projector's output rewrites the transcript: anchored (the default),
    the ASR transcript stands; with the anchor off (-1) the raw output is the response."""
    import torch

    from tinyalign_ros.core.projector import build_projector, save_projector

    torch.manual_seed(0)
    path = save_projector(build_projector("mlp", in_dim=384, out_dim=576, hidden=64, encoder_layer=4),
                          tmp_path / "p.safetensors", extra={"prompt": "hybrid", "inject": "true"})
    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("mode", value="aligned"), Parameter("projector.file", value=str(path)),
        Parameter("aligned.task", value="repeat"), Parameter("llm.max_new_tokens", value=6),
        Parameter("aligned.max_change", value=max_change)]))
    assert node.aligned.prompt.transcript  # the metadata made it a hybrid
    responses, _, pub = probe_assistant(ros, node)
    pub.publish(_features_utterance("u", 60, 384, 4, time.time()))
    wait_for(lambda: responses, timeout=60, what="the response")
    if max_change >= 0:
        assert responses[0].text == responses[0].transcript == "turn on the light"
    else:
        assert responses[0].text and responses[0].text != "turn on the light"


def test_aligned_mode_with_a_corrupt_projector_fails_clearly(ros, tmp_path):
    import pytest

    from tinyalign_ros.core.projector import ProjectorLoadError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ProjectorLoadError, match="not a valid safetensors"):
        AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
            Parameter("mode", value="aligned"), Parameter("projector.file", value=str(bad))])
