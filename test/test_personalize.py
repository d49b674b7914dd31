"""On-idle personalization: the gate, preemption, resume after a stop or a kill, the node's
services and topics, and the assistant's hot-swap of a new adapter."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conftest import Probe, wait_for

from tinyalign_ros.core.adapters import AdapterStore
from tinyalign_ros.core.align import AlignedLLM, AlignPrompt
from tinyalign_ros.core.personalize import (PersonalizeConfig, Personalizer, PersonalizeResult, Progress,
                                            adapter_tensors, apply_adapter, paired_improvement, trainable_module)
from tinyalign_ros.core.projector import build_projector
from tinyalign_ros.core.samples import SampleStore

SPEAKER = "alice"


@pytest.fixture
def aligned(tiny_llm, tokenizer):
    torch.manual_seed(1)
    return AlignedLLM(tiny_llm, tokenizer, build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32),
                      max_new_tokens=4)


def fill(samples: SampleStore, n: int, text: str = "yes", speaker: str = SPEAKER, dim: int = 16) -> None:
    samples.grant_consent(speaker)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        samples.add(speaker, torch.randn(8, dim, generator=g), text, "correction", utterance_id=f"u{i}",
                    asr_transcript=f"heard {i}")


@pytest.fixture
def stores(tmp_path):
    samples = SampleStore(tmp_path / "samples")
    fill(samples, 10)
    return samples, AdapterStore(tmp_path / "adapters"), tmp_path / "work"


def personalizer(aligned, stores, **cfg) -> Personalizer:
    samples, adapters, work = stores
    return Personalizer(aligned, samples, adapters, work, "base-sha",
                        PersonalizeConfig(**{"min_samples": 4, "max_new_tokens": 3, "nice": 0, "threads": 0, **cfg}))


# --------------------------------------------------------------------------- core


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_an_adapter_applied_to_the_base_equals_the_module_it_was_trained_as(aligned, kind):
    base = aligned.projector
    module = trainable_module(base, kind, rank=4, alpha=8.0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    from tinyalign_ros.core.adapters import Adapter, AdapterInfo

    info = AdapterInfo(SPEAKER, 1, None, "", 0, extra={"kind": kind, "lora_rank": 4, "lora_alpha": 8.0})
    merged = apply_adapter(base, Adapter(adapter_tensors(module, kind), info))
    x = torch.randn(2, 12, 16)
    assert torch.allclose(merged(x)[0], module.eval()(x)[0], atol=1e-5)
    assert not torch.allclose(merged(x)[0], base(x)[0])  # the base itself is untouched
    if kind == "lora":
        assert sum(t.numel() for t in adapter_tensors(module, kind).values()) < base.n_params() / 4


def test_gate_keeps_the_old_adapter_when_wer_does_not_improve(aligned, stores):
    samples, adapters, _ = stores
    old = adapters.save(SPEAKER, adapter_tensors(trainable_module(aligned.projector, "full"), "full"),
                        base_hashes={"projector": "base-sha"}, extra={"kind": "full"})
    # no step: the candidate is the current adapter itself, whose WER cannot be lower than its own
    result = personalizer(aligned, stores, kind="full", max_steps=0).run(SPEAKER)
    assert result.status == "rejected" and result.val_wer_after == result.val_wer_before
    assert adapters.list_versions(SPEAKER) == [old.version]
    assert adapters.load_latest(SPEAKER).info.sha256 == old.sha256
    assert not list((stores[2] / SPEAKER).glob("*.ckpt.*"))  # a finished round leaves no checkpoint


def test_paired_improvement_trusts_a_gain_spread_over_utterances_not_one_lucky_sentence():
    assert paired_improvement([2, 1, 3, 2, 1, 2], [0, 0, 1, 1, 0, 1]) == 1.0  # better on every sentence
    lucky = paired_improvement([0, 0, 0, 0, 0, 5], [1, 0, 1, 0, 0, 0])  # one sentence fixed, two broken
    assert 0.3 < lucky < 0.95
    assert paired_improvement([1, 1], [1, 1]) == 0.0 and paired_improvement([], []) == 0.0
    assert paired_improvement([3, 0, 2], [1, 0, 4], seed=1) == paired_improvement([3, 0, 2], [1, 0, 4], seed=1)


def test_gate_rejects_a_lower_wer_that_could_be_luck(aligned, stores):
    """Three held-out sentences: one fixed (3 errors fewer), two broken (1 more each): a lower WER,
    but in only ~70% of resamples (the default gate wants 75%)."""
    p = personalizer(aligned, stores, kind="lora", max_steps=0)
    refs = ["go to the kitchen", "turn on the lights", "bring me water"]
    state = {"val_wer_before": 3 / 11, "val_hyps_before": ["go", refs[1], refs[2]], "step": 0, "elapsed_s": 0.0}
    examples = list(zip(refs, [refs[0], "turn the lights", "bring me"]))
    result = p._gate(SPEAKER, PersonalizeResult(SPEAKER, "lora", "?"), state, 2 / 11, examples, {}, {}, {}, 4, 3)
    assert result.status == "rejected" and "luck" in result.message and 0.6 < result.p_better < 0.75
    assert stores[1].list_versions(SPEAKER) == [] and result.candidate is not None  # judged, not stored
    fixed = [(ref, ref) for ref in refs]
    result = p._gate(SPEAKER, PersonalizeResult(SPEAKER, "lora", "?"), state, 0.0, fixed, {}, {}, {}, 4, 3, min_words=12)
    assert result.status == "rejected" and "11 held-out words" in result.message  # better, but too little to judge
    assert p._gate(SPEAKER, PersonalizeResult(SPEAKER, "lora", "?"), state, 0.0, fixed, {}, {}, {}, 4,
                   3).status == "rejected"  # one sentence fixed, none broken: still 70%, could be that one
    state["val_hyps_before"] = ["go", "turn on", "bring"]  # every sentence misheard before
    result = p._gate(SPEAKER, PersonalizeResult(SPEAKER, "lora", "?"), state, 0.0, fixed, {"w": torch.zeros(2)},
                     {"projector": "base-sha"}, {"kind": "lora"}, 4, 3)
    assert result.status == "saved" and result.p_better == 1.0
    assert stores[1].load_latest(SPEAKER).info.metrics["p_better"] == 1.0


def test_a_resumed_round_measures_the_held_out_set_again_when_it_changed(stores):
    _, val = stores[0].split(SPEAKER, 0.2, 2)
    state = {"val_hyps_before": ["yes"] * len(val), "val_ids": [i.id for i in val]}
    assert not Personalizer._measure_before(state, val)  # the checkpoint's figures still fit
    fill(stores[0], 12)  # samples arrived meanwhile: the gate must pair its transcripts with the new set
    _, grown = stores[0].split(SPEAKER, 0.2, 2)
    assert grown != val and Personalizer._measure_before(state, grown)
    assert Personalizer._measure_before({"val_hyps_before": None, "val_ids": None}, val)


def test_an_asr_round_counts_only_samples_that_kept_their_audio(aligned, stores):
    samples = stores[0]
    for i in range(3):
        samples.add(SPEAKER, torch.zeros(8, 16), "yes", "correction", utterance_id=f"a{i}",
                    audio=np.full(8000, 0.1, dtype=np.float32))
    assert personalizer(aligned, stores, kind="lora").trainable_count(SPEAKER) == 13
    asr = personalizer(aligned, stores, kind="asr", min_samples=4)
    assert asr.trainable_count(SPEAKER) == 3
    result = asr.run(SPEAKER)  # 3 samples with audio, 4 needed: no round (and no Whisper loaded)
    assert result.status == "too_few_samples" and "3 samples with audio" in result.message


def test_too_few_samples_is_no_round(aligned, stores):
    result = personalizer(aligned, stores, min_samples=50).run(SPEAKER)
    assert result.status == "too_few_samples" and "50" in result.message


def test_hybrid_prompt_trains_and_validates_with_the_stored_asr_transcripts(aligned, stores, monkeypatch):
    aligned.set_prompt(AlignPrompt(transcript=True))
    seen = {"loss": [], "transcribe": []}
    loss, transcribe = aligned.loss, aligned.transcribe
    monkeypatch.setattr(aligned, "loss", lambda *a, transcripts=None: seen["loss"].append(transcripts) or loss(
        *a, transcripts=transcripts))
    monkeypatch.setattr(aligned, "transcribe", lambda f, n, t=None: seen["transcribe"].append(t) or transcribe(f, n, t))
    personalizer(aligned, stores, max_steps=2).run(SPEAKER)
    assert seen["loss"] and all(t and all(x.startswith("heard ") for x in t) for t in seen["loss"])
    assert seen["transcribe"] and all(t and all(x.startswith("heard ") for x in t) for t in seen["transcribe"])


def test_stop_preempts_within_a_second_and_the_next_round_resumes(aligned, stores):
    p = personalizer(aligned, stores, max_steps=100000, budget_s=600, ckpt_every_s=600)
    steps: list[int] = []
    done: list = []
    p.start(SPEAKER, on_progress=lambda pr: steps.append(pr.step), on_done=done.append)
    deadline = time.monotonic() + 60
    while (not steps or steps[-1] < 5) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.busy and steps[-1] >= 5
    t0 = time.monotonic()
    assert p.stop(timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    stopped = done[0]
    assert stopped.status == "preempted" and stopped.steps >= 5
    ckpt = json.loads((stores[2] / SPEAKER / "lora.ckpt.json").read_text())
    assert ckpt["step"] == stopped.steps

    resumed = personalizer(aligned, stores, max_steps=stopped.steps + 3).run(SPEAKER)
    assert resumed.resumed_from_step == stopped.steps and resumed.steps == stopped.steps + 3
    assert resumed.val_wer_before == stopped.val_wer_before  # measured once, kept in the checkpoint


def test_a_stop_inside_a_long_step_is_honoured_by_the_llm_hooks(aligned, stores):
    """The stop event is checked inside the frozen LLM, not only between steps."""
    p = personalizer(aligned, stores, max_steps=100000)
    layer = aligned.model.model.layers[1]
    handle = layer.register_forward_hook(lambda *a: p._stop.set())  # "speech arrives" mid-forward
    try:
        result = p.run(SPEAKER)
    finally:
        handle.remove()
    assert result.status == "preempted" and result.steps == 0


def test_a_killed_round_loses_nothing(aligned, stores):
    samples, adapters, work = stores
    old = adapters.save(SPEAKER, adapter_tensors(trainable_module(aligned.projector, "lora", rank=8), "lora"),
                        base_hashes={"projector": "base-sha"},
                        extra={"kind": "lora", "lora_rank": 8, "lora_alpha": 16.0})

    class Killed(BaseException):
        """Stands for kill -9: no except clause of the trainer runs."""

    def die_at_4(pr: Progress) -> None:
        if pr.step == 4:
            raise Killed()

    with pytest.raises(Killed):
        personalizer(aligned, stores, max_steps=50, ckpt_every_s=0).run(SPEAKER, on_progress=die_at_4)
    assert adapters.load_latest(SPEAKER).info.sha256 == old.sha256 and samples.count(SPEAKER) == 10
    again = personalizer(aligned, stores, max_steps=6, ckpt_every_s=0).run(SPEAKER)  # a new process
    assert again.resumed_from_step == 3 and again.steps == 6
    assert again.status in ("saved", "rejected")


def test_gate_saves_an_improving_adapter_with_its_metadata(tmp_path):
    """The real SmolLM2: a few LoRA steps teach it to say "yes" for this speaker's audio."""
    from tinyalign_ros.core.llm import ChatLLM

    torch.manual_seed(0)
    aligned = AlignedLLM.from_chat(ChatLLM(threads=2), build_projector("mlp", in_dim=16, out_dim=576, stack=4,
                                                                      hidden=32), max_new_tokens=4)
    samples = SampleStore(tmp_path / "samples", clock=lambda: 1.8e9)  # the same sample ids, so the same split
    fill(samples, 8)
    adapters = AdapterStore(tmp_path / "adapters")
    result = Personalizer(aligned, samples, adapters, tmp_path / "work", "base-sha",
                          PersonalizeConfig(kind="lora", lr=3e-2, max_steps=15, min_samples=4, max_new_tokens=4,
                                            nice=0, threads=0)).run(SPEAKER)
    assert result.status == "saved", result.message
    assert result.val_wer_after < result.val_wer_before
    info = adapters.load_latest(SPEAKER).info
    assert info.version == result.adapter.version == 1
    assert info.base_hashes == {"projector": "base-sha"} and info.data_count == result.n_train
    assert info.metrics["val_wer_after"] == result.val_wer_after and info.extra["kind"] == "lora"


# --------------------------------------------------------------------------- personalizer_node


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llm, tokenizer, tmp_path_factory):
    """The tiny random LLM as a model folder, so a node loads it through its `llm.model` parameter."""
    d = tmp_path_factory.mktemp("tiny-llm")
    tiny_llm.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_projector_file(tmp_path_factory):
    from tinyalign_ros.core.projector import save_projector

    torch.manual_seed(1)
    return save_projector(build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32, encoder_layer=4),
                          tmp_path_factory.mktemp("proj") / "projector.safetensors")


def utterance(uid: str, speaker: str = SPEAKER, text: str = "yes", confidence: float = 0.95, dim: int = 16):
    import zlib

    import numpy as np

    from tinyalign_ros.msg import Utterance

    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), and so would the features
    feats = np.random.default_rng(zlib.crc32(uid.encode())).standard_normal((8, dim)).astype(np.float32)
    return Utterance(id=uid, speaker=speaker, transcript=text, confidence=confidence, features=feats.reshape(-1),
                     feature_frames=8, feature_dim=dim, feature_layer=4)


@pytest.fixture
def pnode(ros, tmp_path, tiny_model_dir, tiny_projector_file):
    from rclpy.parameter import Parameter

    from tinyalign_ros.nodes.personalizer_node import PersonalizerNode

    def make(**params):
        defaults = {"llm.model": str(tiny_model_dir), "projector.file": str(tiny_projector_file),
                    "samples.dir": str(tmp_path / "samples"), "adapters.dir": str(tmp_path / "adapters"),
                    "checkpoint_dir": str(tmp_path / "work"), "consent.speakers": [SPEAKER], "idle_s": 3600.0,
                    "train.min_samples": 4, "train.nice": 0, "train.threads": 0,
                    "train.kind": "lora"}  # the node's plumbing, on the tiny LLM's projector (ASR rounds: test_asr_*)
        overrides = [Parameter(k, value=v) for k, v in {**defaults, **params}.items()]
        return ros.add(PersonalizerNode(namespace="tinyalign", context=ros.context, parameter_overrides=overrides))
    return make


def call(ros, srv_type, name: str, **fields):
    client = ros.node(f"client_{name}_{time.monotonic_ns()}").create_client(srv_type, name)
    wait_for(client.service_is_ready, what=f"service {name}")
    future = client.call_async(srv_type.Request(**fields))
    wait_for(future.done, timeout=30, what=f"{name} answer")
    return future.result()


def test_personalize_service_refusals_and_sample_collection(ros, pnode):
    from tinyalign_ros.msg import Utterance
    from tinyalign_ros.srv import Personalize

    node = pnode(**{"train.max_steps": 100000, "train.budget_s": 600.0})
    assert "no consent" in call(ros, Personalize, "personalize", speaker="bob").message
    assert "invalid speaker id" in call(ros, Personalize, "personalize", speaker="../etc").message
    refused = call(ros, Personalize, "personalize", speaker=SPEAKER)
    assert not refused.accepted and "too few samples" in refused.message

    probe = Probe(ros)
    pub = probe.publisher(Utterance, "utterance")
    probe.connected(pub)
    for i in range(5):
        pub.publish(utterance(f"a{i}"))
    pub.publish(utterance("low", confidence=0.5))  # below min_confidence: no teacher label
    pub.publish(utterance("b0", speaker="bob"))  # no consent: nothing stored
    wait_for(lambda: "b0" in node.recent, what="utterances received")
    assert node.samples.count(SPEAKER) == 5 and not node.samples.has_consent("bob")

    accepted = call(ros, Personalize, "personalize", speaker=SPEAKER, budget_s=600.0)
    assert accepted.accepted, accepted.message
    busy = call(ros, Personalize, "personalize", speaker=SPEAKER)
    assert not busy.accepted and "already training" in busy.message
    t0 = time.monotonic()
    pub.publish(utterance("a5"))  # speech preempts the round
    wait_for(lambda: not node.personalizer.busy, timeout=5, what="preemption")
    assert time.monotonic() - t0 < 2.0  # < 1 s to stop, plus DDS delivery
    assert node.personalizer.has_checkpoint(SPEAKER) and node.last_result.status == "preempted"


def test_correction_relabels_a_recent_utterance(ros, pnode):
    from tinyalign_ros.msg import Utterance
    from std_msgs.msg import String

    node = pnode()
    probe = Probe(ros)
    pub = probe.publisher(Utterance, "utterance")
    fix = probe.publisher(String, "correction")
    probe.connected(pub, fix)
    pub.publish(utterance("u1", text="bring me the bed cup"))
    wait_for(lambda: node.samples.count(SPEAKER) == 1, what="teacher sample")
    fix.publish(String(data="not json"))
    fix.publish(String(data=json.dumps({"utterance_id": "u1", "text": "bring me the red cup"})))
    wait_for(lambda: [s.source for s in node.samples.list(SPEAKER)] == ["correction"], what="correction")
    (sample,) = node.samples.list(SPEAKER)
    assert sample.text == "bring me the red cup" and sample.asr_transcript == "bring me the bed cup"


def test_idle_round_announces_a_saved_adapter_and_forget_removes_everything(ros, pnode, tmp_path):
    from std_msgs.msg import String

    from tinyalign_ros.nodes.common import LATCHED_QOS
    from tinyalign_ros.srv import Forget

    samples = SampleStore(tmp_path / "samples")
    fill(samples, 6)
    node = pnode(**{"idle_s": 0.0, "train.max_steps": 2})
    # the tiny LLM cannot learn in 2 steps, so let the gate see an improvement: the point here is the
    # node's plumbing (the gate itself is tested above with the real model)
    heard = iter(["wrong words", None])  # before: every held-out sentence misheard; after: all right

    def evaluate(projector, data):
        wrong = next(heard)
        return (1.0 if wrong else 0.0), [(i.text, wrong or i.text) for i in data.infos]

    node.personalizer.evaluate = evaluate
    announced: list[dict] = []
    probe = ros.node("probe")
    probe.create_subscription(String, "adapter", lambda m: announced.append(json.loads(m.data)), LATCHED_QOS)
    wait_for(lambda: any(SPEAKER in a["adapters"] for a in announced), timeout=60, what="adapter announced")
    entry = announced[-1]
    assert entry["speaker"] == SPEAKER and entry["version"] == 1 and entry["adapters"][SPEAKER]["kind"] == "lora"
    assert node.adapters.list_versions(SPEAKER) == [1]

    done = call(ros, Forget, "forget", speaker=SPEAKER)
    assert done.success and "6 samples" in done.message
    assert not node.samples.has_consent(SPEAKER) and node.samples.count(SPEAKER) == 0
    assert node.adapters.list_versions(SPEAKER) == [] and not node.personalizer.has_checkpoint(SPEAKER)
    wait_for(lambda: SPEAKER not in announced[-1]["adapters"], what="forgotten adapter withdrawn")
    assert not (tmp_path / "samples" / SPEAKER).exists() and not (tmp_path / "adapters" / SPEAKER).exists()


# --------------------------------------------------------------------------- assistant_node hot-swap


def test_assistant_hot_swaps_a_new_adapter_for_the_next_utterance_of_that_speaker(
        ros, tmp_path, tiny_model_dir, tiny_projector_file, tiny_llm, tokenizer):
    from rclpy.parameter import Parameter
    from std_msgs.msg import String

    from tinyalign_ros.core.adapters import file_sha256
    from tinyalign_ros.core.projector import load_projector
    from tinyalign_ros.msg import Response, Utterance
    from tinyalign_ros.nodes.assistant_node import AssistantNode
    from tinyalign_ros.nodes.common import EVENT_QOS, LATCHED_QOS
    from tinyalign_ros.nodes.diagnostics import Status

    base = load_projector(tiny_projector_file)
    module = trainable_module(base, "full")
    # Seeded: with this tiny LM, 3 of the 7 seeds tried (0-6) leave its 4-token answer unchanged, so an
    # unseeded adapter sometimes answered as the base did (a clean-clone CI failure); seed 1 does not.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    adapters = AdapterStore(tmp_path / "adapters")
    info = adapters.save(SPEAKER, adapter_tensors(module, "full"), base_hashes={"projector": file_sha256(
        tiny_projector_file)}, extra={"kind": "full"})
    foreign = adapters.save("bob", adapter_tensors(module, "full"), base_hashes={"projector": "other"},
                            extra={"kind": "full"})
    msg = utterance("same-audio")
    feats = torch.as_tensor(msg.features).reshape(8, 16)
    expect = {name: AlignedLLM(tiny_llm, tokenizer, proj, max_new_tokens=4).transcribe([feats])[0]
              for name, proj in (("base", base), ("adapted", module.eval()))}
    assert expect["base"] != expect["adapted"]

    node = ros.add(AssistantNode(namespace="tinyalign", context=ros.context, parameter_overrides=[
        Parameter("mode", value="aligned"), Parameter("projector.file", value=str(tiny_projector_file)),
        Parameter("llm.model", value=str(tiny_model_dir)), Parameter("aligned.task", value="repeat"),
        Parameter("llm.max_new_tokens", value=4)]))
    probe = Probe(ros)
    responses: dict[str, Response] = {}
    probe.node.create_subscription(Response, "response", lambda r: responses.__setitem__(r.utterance_id, r),
                                   EVENT_QOS)
    pub = probe.publisher(Utterance, "utterance")
    announce = probe.publisher(String, "adapter", LATCHED_QOS)
    probe.connected(pub, announce, timeout=60)

    def ask(uid: str, speaker: str) -> str:
        m = utterance("same-audio", speaker=speaker)
        m.id = uid
        pub.publish(m)
        wait_for(lambda: uid in responses, timeout=60, what=f"response to {uid}")
        return responses[uid].text

    assert ask("before", SPEAKER) == expect["base"]
    table = {SPEAKER: {"version": info.version, "path": str(info.path), "kind": "full"},
             "bob": {"version": foreign.version, "path": str(foreign.path), "kind": "full"}}
    announce.publish(String(data=json.dumps({"speaker": SPEAKER, "adapters": table})))
    wait_for(lambda: node.adapter_versions.get(SPEAKER) == 1, timeout=60, what="adapter loaded")
    assert "bob" not in node.adapter_versions  # trained on another base projector: refused
    assert ask("after", SPEAKER) == expect["adapted"]
    assert ask("other-speaker", "bob") == expect["base"] and ask("unknown", "") == expect["base"]
    status = Status()
    node._diagnose(status)
    values = {kv.key: kv.value for kv in status.values}
    assert values["adapter_version.alice"] == "1" and values["answered"] == "4" and values["mode"] == "aligned"

    announce.publish(String(data=json.dumps({"speaker": SPEAKER, "adapters": {}})))  # forgotten
    wait_for(lambda: not node.adapter_versions, timeout=60, what="adapter withdrawn")
    assert ask("forgotten", SPEAKER) == expect["base"]


def test_personalizer_node_declares_exactly_its_yaml_section(ros, monkeypatch, tmp_path):
    """The cheap half of test_e2e's YAML check, for this node alone (the default YAML, no model load)."""
    import yaml

    from tinyalign_ros.nodes.graph import NAMESPACE, default_config
    from tinyalign_ros.nodes.personalizer_node import PersonalizerNode

    def flatten(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    monkeypatch.setenv("TINYALIGN_HOME", str(tmp_path))
    section = yaml.safe_load(default_config().read_text())[f"/{NAMESPACE}/personalizer_node"]["ros__parameters"]
    from rclpy.parameter import Parameter

    node = ros.add(PersonalizerNode(namespace=NAMESPACE, context=ros.context, parameter_overrides=[
        Parameter("consent.speakers", value=list(section["consent"]["speakers"]) or [SPEAKER])]))
    declared = set(node._parameters) - {"use_sim_time", "start_type_description_service"}
    assert declared == flatten(section)
    assert node.personalizer._aligned is None  # no consented samples yet: the LLM is not loaded


# --------------------------------------------------------------------------- benchmark


def test_bench_personalize_writes_json_and_png_on_a_tiny_config(tmp_path, monkeypatch, tiny_model_dir):
    """The families side by side: an ASR adapter (real tiny.en, decoder only), a projector one and
    Tiny-Align end to end (both with the tiny LLM and a projector for tiny.en's 384-dim frames)."""
    from conftest import espeak
    from tinyalign_ros.bench import personalize as bench
    from tinyalign_ros.core.audio import load_audio
    from tinyalign_ros.core.projector import save_projector

    torch.manual_seed(1)
    projector_file = save_projector(build_projector("mlp", in_dim=384, out_dim=64, stack=4, hidden=32, encoder_layer=4),
                                    tmp_path / "projector.safetensors")
    g = torch.Generator().manual_seed(0)
    clip = load_audio(espeak("turn left", tmp_path / "turn_left.wav"))
    fake = {"v1": [bench.Item(clip, "turn left", torch.randn(8, 384, generator=g), "turn left") for _ in range(14)]}
    monkeypatch.setattr(bench, "voice_sets", lambda corpus, voices, real: fake)
    methods = ["asr-dec", "lora", "e2e"]
    assert bench.main(["--out", str(tmp_path), "--llm", str(tiny_model_dir), "--projector", str(projector_file),
                       "--n", "4,8", "--test", "4", "--methods", ",".join(methods), "--max-steps", "2",
                       "--threads", "1"]) == 0
    record = json.loads((tmp_path / "personalize.json").read_text())
    assert len(record["voices"]) == 2 * 3 and (tmp_path / "personalize.png").stat().st_size > 0
    assert {r["method"] for r in record["voices"]} == set(methods)
    for run in record["voices"]:
        assert run["gate"] in ("saved", "rejected") and run["steps"] == 2 and run["peak_mem_mb"] > 0
        # docs/design.md §7's names; the cascade's WER on the same test set is the yardstick
        assert {"voice", "real", "atypical", "method", "n_train", "wer_before", "wer_after", "cascade_wer",
                "train_s", "peak_mem_mb", "adapter_mb", "aligned_base_wer", "wer_transcript"} <= set(run)
        assert run["real"] is False and 0.0 <= run["cascade_wer"] <= 1.0
        # what the speaker gets without an adapter: the transcript (asr kinds), the aligned assistant's text
        aligned = run["method"] in ("lora", "e2e")
        assert run["wer_before"] == (run["aligned_base_wer"] if aligned else run["cascade_wer"])
        # e2e is judged on the aligned text, and also reports the transcripts its Whisper half gave
        assert (run["wer_transcript"] is not None) == (run["method"] == "e2e")
    assert "git_commit" in record and record["methods"] == methods
