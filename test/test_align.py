"""Aligned LLM: embeds layout, label masking, padding, generation; a tiny random LLM for the
logic, the real SmolLM2 + Whisper encoder for "a few steps lower the loss"."""
from __future__ import annotations

import pytest
import torch

from conftest import espeak
from tinyalign_ros.core.align import (
    IGNORE, AlignedLLM, AlignPrompt, FeatureSet, TrainConfig, build_embeds, encode_file, prompt_segments,
    train_projector)
from tinyalign_ros.core.projector import build_projector, load_projector


@pytest.fixture
def aligned(tiny_llm, tokenizer):
    torch.manual_seed(1)
    proj = build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32)
    return AlignedLLM(tiny_llm, tokenizer, proj, max_new_tokens=6)


def test_prompt_segments_follow_the_chat_template(tokenizer):
    pre, suf = prompt_segments(tokenizer, AlignPrompt(system="SYS", instruction="Listen:", prompt="Repeat it."))
    pre_t, suf_t = tokenizer.decode(pre), tokenizer.decode(suf)
    assert pre_t.startswith("<|im_start|>system\nSYS<|im_end|>") and pre_t.endswith("user\nListen:\n")
    assert suf_t == "\nRepeat it.<|im_end|>\n<|im_start|>assistant\n"
    pre2, _ = prompt_segments(tokenizer, AlignPrompt(system="SYS", instruction="Listen:", inject=False))
    assert "Listen:" not in tokenizer.decode(pre2) and tokenizer.decode(pre2).endswith("user\n")


def test_embeds_layout_equals_the_token_sequence_and_labels_cover_only_the_target(tiny_llm):
    """Audio 'embeddings' that are token embeddings must give exactly the logits of those tokens."""
    embed = tiny_llm.get_input_embeddings()
    prefix, suffix = [1, 10, 11], [12, 13]
    audio_ids = torch.tensor([[20, 21, 22, 23], [30, 31, 0, 0]])
    targets = [[40, 41, 2], [50, 2]]
    b = build_embeds(embed, prefix, suffix, embed(audio_ids), torch.tensor([4, 2]), targets, "right", pad_id=2)
    rows = [prefix + [20, 21, 22, 23] + suffix + targets[0], prefix + [30, 31] + suffix + targets[1]]
    assert b.attention_mask.sum(1).tolist() == [len(r) for r in rows]
    assert b.audio_spans == [(3, 7), (3, 5)]
    for i, row in enumerate(rows):
        n = len(row)
        assert torch.equal(b.inputs_embeds[i, :n], embed(torch.tensor(row)))
        labels = b.labels[i].tolist()
        start = n - len(targets[i])
        assert labels[:start] == [IGNORE] * start and labels[start:n] == targets[i]  # eos (=pad) is kept
        assert labels[n:] == [IGNORE] * (b.labels.shape[1] - n)
        ref = tiny_llm(input_ids=torch.tensor([row])).logits[0]
        got = tiny_llm(inputs_embeds=b.inputs_embeds[i:i + 1], attention_mask=b.attention_mask[i:i + 1],
                       position_ids=b.position_ids[i:i + 1]).logits[0, :n]
        assert torch.allclose(ref, got, atol=1e-4)


def test_left_padding_keeps_positions_of_real_tokens(tiny_llm):
    embed = tiny_llm.get_input_embeddings()
    audio = torch.randn(2, 3, 64)
    b = build_embeds(embed, [1, 2], [3], audio, torch.tensor([3, 1]), None, "left", pad_id=2)
    assert b.labels is None
    assert b.attention_mask.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert b.position_ids[1, 2:].tolist() == [0, 1, 2, 3]
    assert b.audio_spans == [(2, 5), (4, 5)]
    assert torch.equal(b.inputs_embeds[1, 4], audio[1, 0])


def test_loss_is_finite_and_reaches_only_the_projector(aligned):
    feats = torch.randn(2, 24, 16)
    targets = [aligned.target_ids("hello there"), aligned.target_ids("hi")]
    loss = aligned.loss(feats, torch.tensor([24, 13]), targets)
    loss.backward()
    with torch.no_grad():  # the LM head on target positions only = the usual shifted CE over all logits
        b = aligned.batch(feats, torch.tensor([24, 13]), targets)
        logits = aligned.model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                               position_ids=b.position_ids).logits
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE)
    assert torch.allclose(loss, full, atol=1e-5)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in aligned.projector.parameters())
    assert all(p.grad is None for p in aligned.model.parameters())


def test_embedding_ctc_trains_the_projector_toward_the_words_without_the_llm(aligned):
    """The cheap phase: gradients reach the projector, blank and scale but never the frozen
    table; a few steps lower the CTC loss; and greedy decoding of the CTC logits then reads the
    target word pieces, i.e. the audio tokens point at the transcript's own input embeddings."""
    from tinyalign_ros.core.align import EmbeddingCTC

    table = aligned.model.get_input_embeddings().weight
    ctc = EmbeddingCTC(table)
    feats, lengths = torch.randn(2, 24, 16), torch.tensor([24, 16])
    targets = [aligned.target_ids("turn left")[:-1], aligned.target_ids("stop")[:-1]]
    params = list(aligned.projector.parameters()) + list(ctc.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(60):
        tokens, n = aligned.projector(feats, lengths)
        loss = ctc(tokens, n, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert table.grad is None and not ctc.table.requires_grad
    assert all(p.grad is not None for p in params)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    with torch.no_grad():
        tokens, n = aligned.projector(feats, lengths)
        words = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
        best = torch.cat([ctc.blank(tokens), ctc.log_scale.exp() * words], -1).argmax(-1)
    for row, k, target in zip(best, n, targets):  # greedy CTC: collapse repeats, drop blanks (class 0)
        ids = [int(i) - 1 for j, i in enumerate(row[:k]) if i != 0 and (j == 0 or i != row[j - 1])]
        assert ids == target


def test_embedding_ctc_over_a_vocab_subset_scores_only_those_pieces(aligned):
    from tinyalign_ros.core.align import EmbeddingCTC

    table = aligned.model.get_input_embeddings().weight
    left, stop = aligned.target_ids("turn left")[:-1], aligned.target_ids("stop")[:-1]
    full, sub = EmbeddingCTC(table), EmbeddingCTC(table, vocab=left + stop)
    assert sub.table.shape[0] == len(set(left + stop))
    tokens, n = aligned.projector(torch.randn(1, 24, 16), torch.tensor([24]))
    assert torch.isfinite(sub(tokens, n, [left])) and sub(tokens, n, [left]) < full(tokens, n, [left])
    with pytest.raises(ValueError, match="outside the objective's vocab"):
        sub(tokens, n, [aligned.target_ids("bring me tea")[:-1]])


def test_batched_generation_equals_one_by_one_and_stream_matches(aligned):
    feats = [torch.randn(30, 16), torch.randn(9, 16), torch.randn(17, 16)]
    batched = aligned.transcribe(feats)
    assert batched == [aligned.transcribe([f])[0] for f in feats]
    assert "".join(aligned.stream(feats[1])).strip() == batched[1]


def test_hybrid_prompt_puts_each_rows_transcript_after_its_audio(tokenizer, tiny_llm):
    prompt = AlignPrompt(system="SYS", instruction="Speech:", prompt="Repeat it.", transcript=True)
    pre, suf = prompt_segments(tokenizer, prompt, "  turn   left ")
    assert tokenizer.decode(suf) == "\nTranscript: turn left\nRepeat it.<|im_end|>\n<|im_start|>assistant\n"
    assert pre == prompt_segments(tokenizer, prompt, "something else")[0]  # the prefix never depends on it
    torch.manual_seed(1)
    aligned = AlignedLLM(tiny_llm, tokenizer, build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32),
                         prompt, max_new_tokens=6)
    feats, lengths = torch.randn(2, 8, 16), torch.tensor([8, 4])
    heard = ["turn left", "bring me a cup of tea please"]
    b = aligned.batch(feats, lengths, None, "left", transcripts=heard)
    embed = tiny_llm.get_input_embeddings()
    for i, text in enumerate(heard):  # the tokens after the audio are this row's transcript
        _, suffix = prompt_segments(tokenizer, prompt, text)
        assert torch.equal(b.inputs_embeds[i, b.audio_spans[i][1]:], embed(torch.tensor(suffix)))
    targets = [aligned.target_ids("turn left"), aligned.target_ids("bring me tea")]
    assert torch.isfinite(aligned.loss(feats, lengths, targets, heard))
    batched = aligned.transcribe([feats[0], feats[1, :4]], transcripts=heard)
    assert batched[1] == aligned.transcribe([feats[1, :4]], transcripts=heard[1:])[0]
    assert "".join(aligned.stream(feats[1, :4], transcript=heard[1])).strip() == batched[1]


def test_build_embeds_refuses_a_suffix_count_that_is_not_the_batch(tiny_llm):
    with pytest.raises(ValueError, match="3 suffixes for 2 rows"):
        build_embeds(tiny_llm.get_input_embeddings(), [1], [[2], [3], [4]], torch.randn(2, 3, 64),
                     torch.tensor([3, 3]))


def test_feature_set_keeps_only_clips_with_a_transcript():
    frames = torch.arange(10, dtype=torch.float16).unsqueeze(1)
    fs = FeatureSet(frames, torch.tensor([0, 3, 7, 10]), ["a", "b", "c"],
                    [{"path": "x"}, {"path": "y"}, {"path": "z"}], 4)
    sub = fs.with_transcripts({"z": ("see", 0.9), "x": ("ay", 0.5)})
    assert sub.texts == ["a", "c"] and sub.transcripts == ["ay", "see"]
    assert sub.get(1).squeeze(1).tolist() == [7.0, 8.0, 9.0]


def test_projector_for_another_llm_is_refused(tiny_llm, tokenizer):
    with pytest.raises(Exception, match="hidden size is 64"):
        AlignedLLM(tiny_llm, tokenizer, build_projector("linear", in_dim=16, out_dim=576))


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def real_features(tmp_path_factory):
    from tinyalign_ros.core.encoder import load_whisper_encoder

    d = tmp_path_factory.mktemp("speech")
    encoder = load_whisper_encoder()
    texts = ["Turn on the kitchen light.", "Bring me a cup of tea."]
    feats = [encode_file(encoder, espeak(t, d / f"{i}.wav")) for i, t in enumerate(texts)]
    offsets = torch.tensor([0, feats[0].shape[0], feats[0].shape[0] + feats[1].shape[0]])
    return FeatureSet(torch.cat(feats).half(), offsets, texts, [{} for _ in texts], encoder.n_layers)


@pytest.fixture(scope="module")
def smollm2():
    from tinyalign_ros.core.llm import ChatLLM

    return ChatLLM(threads=2)


def test_a_few_real_training_steps_lower_the_loss(smollm2, real_features, tmp_path):
    torch.manual_seed(0)
    proj = build_projector("mlp", in_dim=384, out_dim=576, stack=4, hidden=256)
    aligned = AlignedLLM.from_chat(smollm2, proj, max_new_tokens=8)
    feats, lengths = real_features.collate([0, 1])
    targets = [aligned.target_ids(t) for t in real_features.texts]
    with torch.no_grad():
        before = aligned.loss(feats, lengths, targets).item()
    cfg = TrainConfig(hidden=256, batch=2, lr=2e-3, warmup=1, max_steps=6, minutes=5, val_every_s=1e9,
                      ckpt_every_s=1e9, val_n=2)
    out = tmp_path / "p.safetensors"
    state = train_projector(aligned, {"train": real_features, "val": real_features}, cfg, out, progress=False)
    with torch.no_grad():
        after = aligned.loss(feats, lengths, targets).item()
    assert state["step"] == 6 and after < before - 0.5, (before, after)
    assert out.is_file() and load_projector(out, in_dim=384, out_dim=576, encoder_layer=4)
    assert (tmp_path / "p.ckpt.json").is_file() and state["val"]  # checkpoint and a validation WER
    # resuming continues from the checkpoint instead of starting over
    cfg2 = TrainConfig(**{**cfg.__dict__, "max_steps": 7})
    assert train_projector(aligned, {"train": real_features}, cfg2, out, progress=False)["step"] == 7


def test_generation_from_embeds_streams_text_with_the_real_llm(smollm2, real_features):
    torch.manual_seed(0)
    aligned = AlignedLLM.from_chat(smollm2, build_projector("mlp", in_dim=384, out_dim=576, hidden=64),
                                   max_new_tokens=6)
    pieces = list(aligned.stream(real_features.get(0)))
    assert pieces and "".join(pieces).strip()


def test_anchor_keeps_small_corrections_and_falls_back_on_rewrites():
    from tinyalign_ros.core.align import anchor_to_transcript

    heard = "bring me the red cop from the kitchen"
    assert anchor_to_transcript("Bring me the red cup from the kitchen.", heard, 0.2) == (
        "Bring me the red cup from the kitchen.", True)  # 1 of 8 words: a correction
    assert anchor_to_transcript("How do I make a cup of coffee?", heard, 0.2) == (heard, False)  # a rewrite
    assert anchor_to_transcript("", heard, 0.2) == (heard, False)
    assert anchor_to_transcript("Ten of clubs.", "10 of clubs", 0.0) == ("Ten of clubs.", True)  # normalized text
    assert anchor_to_transcript("anything", "", 0.2) == ("anything", True)  # nothing to anchor to


def test_transcribe_anchors_hybrid_outputs_only_when_asked(tokenizer, tiny_llm):
    torch.manual_seed(1)
    proj = build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32)
    feats = [torch.randn(12, 16)]
    heard = ["turn left at the door"]
    raw = AlignedLLM(tiny_llm, tokenizer, proj, AlignPrompt(transcript=True), max_new_tokens=6).transcribe(feats,
                                                                                                       None, heard)
    anchored = AlignedLLM(tiny_llm, tokenizer, proj, AlignPrompt(transcript=True), max_new_tokens=6,
                          max_change=0.2).transcribe(feats, None, heard)
    assert raw[0] != heard[0] and anchored == heard  # a random projector's babble is not a small correction
    audio_only = AlignedLLM(tiny_llm, tokenizer, proj, max_new_tokens=6, max_change=0.2)
    assert audio_only.transcribe(feats) == audio_only.transcribe(feats, None, None)  # nothing to anchor to


def test_aligned_generation_never_repeats_an_ngram_of_its_output(tiny_llm, tokenizer):
    """The aligned path has the chat model's repetition control (this random tiny LLM repeats a 3-gram)."""
    from types import SimpleNamespace

    torch.manual_seed(1)
    proj = build_projector("mlp", in_dim=16, out_dim=64, stack=4, hidden=32)
    feats = torch.randn(2, 12, 16)

    def generated(no_repeat_ngram: int, penalty: float = 1.0) -> list[list[int]]:
        aligned = AlignedLLM(tiny_llm, tokenizer, proj, max_new_tokens=40, no_repeat_ngram=no_repeat_ngram,
                             repetition_penalty=penalty)
        with torch.inference_mode():
            out = aligned._generate(aligned.batch(feats, torch.tensor([12, 9]), None, "left"), 40)
        rows = [row.tolist() for row in out]
        return [row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row for row in rows]

    def repeats_a_3gram(ids: list[int]) -> bool:
        grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
        return len(grams) != len(set(grams))

    assert any(repeats_a_3gram(row) for row in generated(0))  # unguarded (no n-gram ban, no penalty), it repeats itself
    guarded = generated(3, 1.1)
    assert all(len(row) >= 8 for row in guarded) and not any(repeats_a_3gram(row) for row in guarded)
    chat = SimpleNamespace(model=tiny_llm, tokenizer=tokenizer, no_repeat_ngram=3, repetition_penalty=1.1)
    assert (AlignedLLM.from_chat(chat, proj).no_repeat_ngram, AlignedLLM.from_chat(chat, proj).repetition_penalty) \
        == (3, 1.1)  # the assistant's llm.* settings reach its aligned path
