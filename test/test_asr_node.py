"""asr_node with real rclpy, silero VAD and faster-whisper: utterances out, bad chunks survived."""
from __future__ import annotations

import numpy as np
import pytest
import soxr
from visualization_msgs.msg import Marker

from conftest import Probe, wait_for
from tinyalign_ros.msg import AudioChunk, Utterance
from tinyalign_ros.nodes.asr_node import AsrNode
from tinyalign_ros.nodes.common import AUDIO_QOS, LATCHED_QOS


def test_bad_chunks_are_rejected_and_speech_still_transcribed(asr, speech_16k):
    node, send, utterances, _ = asr
    silence = np.zeros(8000, np.float32)
    send(np.full(1600, np.nan, np.float32))
    send(np.full(1600, np.inf, np.float32))
    send(np.zeros(0, np.float32))
    send(np.concatenate([silence, speech_16k, silence, silence]), end=True)
    wait_for(lambda: node.stream_ended.is_set() and node.idle and utterances, timeout=60, what="an utterance")
    assert node.rejected_chunks == 3
    assert len(utterances) == 1
    u = utterances[0]
    assert "left" in u.transcript.lower()
    assert 0.0 < u.confidence <= 1.0
    assert u.stream_start_s < u.stream_end_s
    assert u.id.startswith("asr_node-")
    markers: list[Marker] = []
    # latched: a late rviz still gets the last transcript
    node.create_subscription(Marker, "transcript_marker", markers.append, LATCHED_QOS)
    wait_for(lambda: markers, what="the latched transcript marker")
    assert markers[-1].type == Marker.TEXT_VIEW_FACING and "left" in markers[-1].text.lower()


def test_other_sample_rates_are_resampled(asr, speech_16k):
    node, send, utterances, _ = asr
    speech_8k = soxr.resample(speech_16k, 16000, 8000).astype(np.float32)
    send(np.concatenate([np.zeros(4000, np.float32), speech_8k, np.zeros(8000, np.float32)]), rate=8000,
         end=True, chunk=800)
    wait_for(lambda: node.stream_ended.is_set() and node.idle and utterances, timeout=60, what="an utterance")
    assert "left" in utterances[0].transcript.lower()
    assert node.rejected_chunks == 0


@pytest.fixture
def random_heads_file(tmp_path):
    """Untrained heads on every tiny.en layer: the policy logic does not care about their quality."""
    import torch

    from tinyalign_ros.core.early_exit import ExitHeads, save_heads

    torch.manual_seed(0)
    path = tmp_path / "heads.safetensors"
    save_heads(ExitHeads([1, 2, 3, 4], 384), path)
    return path


def test_exit_layer_follows_its_parameter_at_run_time(ros, random_heads_file, speech_16k, tmp_path):
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    node = ros.add(AsrNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("exit.heads_file", value=str(random_heads_file)), Parameter("speaker_id.dir", value=str(tmp_path / "speakers")),
        Parameter("exit.mode", value="budget"), Parameter("exit.max_layer", value=4)]))
    probe = Probe(ros)
    utterances: list[Utterance] = probe.collect(Utterance, "utterance")
    pub = probe.publisher(AudioChunk, "audio", AUDIO_QOS)
    enroll = probe.publisher(String, "enroll")
    probe.connected(pub, node.utterance_pub, enroll)
    offset = 0

    def say() -> Utterance:
        nonlocal offset
        n = len(utterances)
        audio = np.concatenate([np.zeros(8000, np.float32), speech_16k, np.zeros(16000, np.float32)])
        for i in range(0, len(audio), 1600):
            msg = AudioChunk(sample_rate=16000, offset=offset, samples=audio[i:i + 1600])
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            offset += 1600
        wait_for(lambda: len(utterances) > n, timeout=60, what="an utterance")
        return utterances[-1]

    first = say()
    assert first.feature_layer == 4 and first.feature_dim == 384
    assert len(first.features) == first.feature_frames * first.feature_dim
    assert abs(first.feature_frames - len(speech_16k) / 320) < 60  # 50 frames/s, plus VAD padding

    assert node.set_parameters([Parameter("exit.max_layer", value=2)])[0].successful
    assert say().feature_layer == 2
    # an enrollment sample trains the projector, which reads the last layer: full depth for it only
    enroll.publish(String(data='{"speaker": "alice", "text": "hello"}'))
    wait_for(lambda: node.speaker_id.pending == "alice", what="the enrollment request")
    enrolled = say()
    assert (enrolled.speaker, enrolled.feature_layer) == ("alice", 4)
    assert say().feature_layer == 2
    refused = node.set_parameters([Parameter("exit.mode", value="sometimes")])[0]
    assert not refused.successful and "mode" in refused.reason
    assert node.policy.mode == "budget"  # a refused change leaves the policy as it was
    # confidence mode, every head sure (threshold 0): alice, now known, still gets the full depth
    # (her utterances may become personalization samples) unless that is switched off
    assert node.set_parameters([Parameter("exit.mode", value="confidence"), Parameter("exit.threshold", value=0.0)])[0].successful
    known = say()
    assert (known.speaker, known.feature_layer) == ("alice", 4)
    assert node.set_parameters([Parameter("exit.full_depth_for_known_speakers", value=False)])[0].successful
    assert say().feature_layer == 1


def test_voiceprints_of_the_older_backend_stay_in_use(ros, tmp_path):
    """A robot enrolled before ge2e became the default keeps its whisper voiceprints (warned), not a
    node that refuses to start."""
    import torch
    from rclpy.parameter import Parameter

    from tinyalign_ros.core.speaker import Background, SpeakerRegistry

    SpeakerRegistry(tmp_path / "speakers", backend="whisper", background=Background(torch.zeros(768), torch.ones(768)))
    node = ros.add(AsrNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("speaker_id.dir", value=str(tmp_path / "speakers")), Parameter("speaker_id.backend", value="ge2e")]))
    assert node.speaker_id is not None and node.speaker_id.embedder.backend == "whisper"
    assert node.speaker_id.registry is not None and node.speaker_id.registry.backend == "whisper"


def test_named_but_corrupt_heads_file_is_refused(ros, tmp_path):
    from rclpy.parameter import Parameter

    from tinyalign_ros.core.encoder import WeightLoadError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(WeightLoadError):
        AsrNode(namespace="tinyalign", context=ros.context,
                parameter_overrides=[Parameter("exit.heads_file", value=str(bad))])
