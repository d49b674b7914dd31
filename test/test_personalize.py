"""On-idle personalization: the gate, preemption, resume after a stop or a kill, the node's
services and topics, and the assistant's hot-swap of a new adapter."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tinyalign_ros.core.adapters import AdapterStore
from tinyalign_ros.core.align import AlignedLLM, AlignPrompt
from tinyalign_ros.core.models import default_llm_dir
from tinyalign_ros.core.personalize import (PersonalizeConfig, Personalizer, Progress, adapter_tensors,
                                            apply_adapter, trainable_module)
from tinyalign_ros.core.projector import build_projector
from tinyalign_ros.core.samples import SampleStore

SPEAKER = "alice"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_llm_dir())


@pytest.fixture(scope="module")
def tiny_llm(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


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
    samples = SampleStore(tmp_path / "samples")
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
