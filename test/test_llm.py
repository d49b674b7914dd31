"""The frozen chat LLM with the real SmolLM2-135M (loads in ~1 s once converted)."""
from __future__ import annotations

import pytest

from tinyalign_ros.core.llm import MAX_USER_CHARS, ChatLLM, PromptTooLong
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
