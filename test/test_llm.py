"""The frozen chat LLM with the real SmolLM2-135M (loads in ~1 s once converted)."""
from __future__ import annotations

import re

import pytest
import torch

from tinyalign_ros.core.llm import (DEFAULT_NO_REPEAT_NGRAM, DEFAULT_REPETITION_PENALTY, DEFAULT_SYSTEM_PROMPT,
                                    MAX_USER_CHARS, ChatLLM, PromptTooLong, RepetitionGuard, repetition_guard)
from tinyalign_ros.core.models import ModelNotFoundError, resolve_llm


@pytest.fixture(scope="module")
def llm() -> ChatLLM:
    return ChatLLM(system_prompt="You are a robot. Answer in one short sentence.", max_new_tokens=24, threads=2)


def test_prompt_carries_our_system_prompt_not_the_default(llm):
    text = llm.tokenizer.decode(llm.prompt_ids("hello")[0])
    assert "You are a robot." in text
    assert "SmolLM" not in text  # the template's default system prompt would name the model
    assert text.rstrip().endswith("assistant")


def test_stream_yields_pieces_that_form_the_answer(llm):
    pieces = list(llm.stream("What is your name?"))
    assert len(pieces) >= 2
    answer = "".join(pieces).strip()
    assert answer and len(llm.tokenizer(answer)["input_ids"]) <= 24 + 2


def test_greedy_answers_are_deterministic(llm):
    assert llm.answer("Turn left please.") == llm.answer("Turn left please.")


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a folder"):
        resolve_llm(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no transformers model"):
        ChatLLM(tmp_path)


def test_an_over_long_prompt_is_refused_before_tokenizing(llm):
    assert llm.prompt_ids("x" * MAX_USER_CHARS).shape[1] > 0  # the limit itself is fine
    with pytest.raises(PromptTooLong, match=f"more than the {MAX_USER_CHARS}"):
        llm.prompt_ids("x" * (MAX_USER_CHARS + 1))


def test_repetition_guard_bans_only_what_would_repeat_an_answer_ngram():
    # prompt 5 6 7 8 | answer 1 2 3 9 1 2: next "3" would repeat the answer's 3-gram "1 2 3"
    ids = torch.tensor([[5, 6, 7, 8, 1, 2, 3, 9, 1, 2]])
    scores = torch.zeros(1, 12)
    out = RepetitionGuard(prompt_len=4, ngram_size=3)(ids, scores.clone())
    assert out[0, 3] == -float("inf") and torch.isfinite(out[0, [i for i in range(12) if i != 3]]).all()
    # the prompt's n-grams stay allowed: the robot may repeat the operator's words ("5 6 7" again)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6]])
    assert torch.isfinite(RepetitionGuard(prompt_len=4, ngram_size=3)(ids, scores.clone())).all()
    # a penalty lowers the answer's own tokens only (positive logits divided, negative multiplied)
    scores = torch.tensor([[2.0, -2.0, 2.0, 2.0]])
    out = RepetitionGuard(prompt_len=1, ngram_size=0, penalty=2.0)(torch.tensor([[2, 0, 1]]), scores.clone())
    assert out.tolist() == [[1.0, -4.0, 2.0, 2.0]]
    assert len(repetition_guard(0, 0, 1.0)) == 0  # both off: nothing added to generate
    with pytest.raises(ValueError, match="repetition penalty"):
        repetition_guard(0, 4, 0.5)


def sentences(text: str) -> list[str]:
    """Sentences and clauses of 2+ words, normalized: "I'm sorry, I'm sorry, ..." is a loop too."""
    parts = (" ".join(re.sub(r"[^a-z0-9' ]", " ", p.lower()).split()) for p in re.split(r"[.,;:!?\n]", text))
    return [p for p in parts if len(p.split()) >= 2]


# prompts on which greedy SmolLM2-135M looped without repetition control (the robot's system prompt,
# 48 new tokens; from data/questions.txt and data/commands.tsv): "I'm sorry I lost you." six times,
# "They are purring to relieve their own stress and to relax." three, "I'm sorry," twelve
LOOPING_PROMPTS = ("come back to me", "Why do cats purr?", "go back the way you came")


@pytest.fixture(scope="module")
def robot_llm() -> ChatLLM:
    return ChatLLM(system_prompt=DEFAULT_SYSTEM_PROMPT, max_new_tokens=48, threads=2)


def test_an_answer_never_repeats_the_same_sentence(robot_llm):
    for prompt in LOOPING_PROMPTS:
        answer = robot_llm.answer(prompt)
        said = sentences(answer)
        assert answer and len(said) == len(set(said)), (prompt, answer)


def test_without_repetition_control_those_prompts_loop(robot_llm):
    """The prompts above are the ones that matter: with the guard off, the same model loops on them."""
    robot_llm.no_repeat_ngram, robot_llm.repetition_penalty = 0, 1.0
    try:
        answers = {p: robot_llm.answer(p) for p in LOOPING_PROMPTS}
    finally:
        robot_llm.no_repeat_ngram, robot_llm.repetition_penalty = DEFAULT_NO_REPEAT_NGRAM, DEFAULT_REPETITION_PENALTY
    looped = [p for p, a in answers.items() if len(set(sentences(a))) < len(sentences(a))]
    assert len(looped) >= 2, answers


def test_the_cached_system_turn_gives_the_same_answers_as_the_whole_prompt(llm):
    """Only the operator's turn is run per answer (the system turn's cache is copied): the same greedy
    answers as running the whole prompt, and the shared cache is never extended by an answer."""
    uncached = ChatLLM(system_prompt=llm.system_prompt, max_new_tokens=24, threads=2, cache_system_prompt=False)
    n = llm._system_ids.shape[1]
    assert torch.equal(llm.prompt_ids("hi")[0, :n], llm._system_ids[0])  # the system turn is a prefix
    for text in ("What is your name?", "Turn on the lights in the living room.", "What time is it right now?"):
        assert llm.answer(text) == uncached.answer(text)
    assert llm._system_cache.get_seq_length() == n
    assert uncached._cache_for(uncached.prompt_ids("hi")) is None


def test_stream_reports_its_prompt_pass_and_first_piece_to_the_calling_thread(llm):
    llm.stages.begin()
    list(llm.stream("Hello there."))
    assert llm.stages.marked("llm_start") is not None
    stages = llm.stages.take()
    assert set(stages) == {"llm_prefill_s", "llm_first_text_s"} and all(v >= 0 for v in stages.values())
    list(llm.stream("Hello there."))  # no record begun: nothing kept, nothing raised
    assert llm.stages.take() == {}


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        ChatLLM(dtype="float16")
