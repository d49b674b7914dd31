"""The frozen small LLM: SmolLM2-135M-Instruct through transformers, with token streaming.

Cascade mode feeds it the transcript as a chat message; the aligned mode (Tiny-Align) will
feed `inputs_embeds` instead. The model folder is a parameter so a robot with a bigger local
model can swap it in.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList,
                          TextIteratorStreamer)
from transformers.utils import logging as hf_logging

from .latency import StageTimer
from .models import default_llm_dir, smollm2_gguf

log = logging.getLogger(__name__)

# Naming what the robot can do keeps the 135M model from refusing ordinary commands
# (compared by hand on the demo sentences against a generic "voice assistant" prompt).
DEFAULT_SYSTEM_PROMPT = (
    "You are Tiny, a helpful home robot. You can drive around the house, fetch small objects, and switch "
    "lights on and off. When the operator asks you to do something, say briefly that you will do it. "
    "Answer questions in one short sentence."
)
# 30 s of speech (the encoder's window) is well under 1000 characters: a longer "transcript" is
# malformed input, and refusing it keeps the prompt's attention cost (quadratic in its length) bounded.
MAX_USER_CHARS = 2000


# Repetition control: greedy SmolLM2-135M loops ("I'm sorry, I'm not a superlative." six times until
# the token cap). Chosen on 40 prompts (the 26 of the first 60 data/questions.txt lines and 20
# data/commands.tsv ones that looped or hit the 48-token cap, plus 14 that did not; robot system
# prompt, greedy, 48 new tokens). Answers repeating a clause of 2+ words / hitting the cap:
#   none 8 / 26;  n-gram 4: 4 / 19;  n-gram 3: 1 / 21;  penalty 1.2: 0 / 18;  n-gram 4 + penalty 1.1: 0 / 15.
# The last is the default: the n-gram rule guarantees no sentence of 4+ tokens twice, the mild
# penalty ends the short stutters it lets through ("I'm sorry, I'm sorry, sorry."); the short
# factual answers (capital, Shakespeare, moon) were unchanged except one figure.
DEFAULT_NO_REPEAT_NGRAM = 4
DEFAULT_REPETITION_PENALTY = 1.1


class RepetitionGuard(LogitsProcessor):
    """No n-gram twice in the *answer*, and an optional penalty on tokens the answer already used.

    transformers' own `no_repeat_ngram_size` and `repetition_penalty` also count the prompt's tokens
    (system prompt and the operator's words), which would forbid the robot from repeating the
    command it confirms ("turn on the lights in the living room"); this looks only at the tokens
    after `prompt_len` (0 with `inputs_embeds`, where generate's ids are the answer alone). With
    `ngram_size` n, no sentence of n tokens or more can come twice in an answer.
    """

    def __init__(self, prompt_len: int, ngram_size: int = DEFAULT_NO_REPEAT_NGRAM,
                 penalty: float = DEFAULT_REPETITION_PENALTY) -> None:
        if ngram_size < 0 or penalty < 1.0:
            raise ValueError(f"no-repeat n-gram size must be >= 0 (0 = off) and repetition penalty >= 1 (1 = off), "
                             f"got {ngram_size} and {penalty}")
        self.prompt_len, self.ngram_size, self.penalty = prompt_len, ngram_size, penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_len:]
        if answer.shape[1] == 0:
            return scores
        if self.penalty != 1.0:  # as transformers' RepetitionPenaltyLogitsProcessor, on the answer's tokens
            used = torch.gather(scores, 1, answer)
            used = torch.where(used < 0, used * self.penalty, used / self.penalty)
            scores = scores.scatter(1, answer, used)
        n = self.ngram_size
        if n and answer.shape[1] >= n:
            scores = scores.clone() if self.penalty == 1.0 else scores
            for row in range(answer.shape[0]):
                tokens = answer[row].tolist()
                prefix = tokens[len(tokens) - n + 1:]  # the next token would complete the n-gram prefix + it
                banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i:i + n - 1] == prefix}
                if banned:
                    scores[row, list(banned)] = -float("inf")
        return scores


def repetition_guard(prompt_len: int, ngram_size: int, penalty: float) -> LogitsProcessorList:
    """The `logits_processor` argument of generate (empty when both controls are off)."""
    if not ngram_size and penalty == 1.0:
        return LogitsProcessorList()
    return LogitsProcessorList([RepetitionGuard(prompt_len, ngram_size, penalty)])


class _FirstCall(LogitsProcessor):
    """Notes when generate first asks for the next token's scores: the end of the prompt pass."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


# Weights' dtype for the chat LLM (`llm.dtype`): bfloat16 halves the weights' memory traffic and uses the
# CPU's bf16 units (AVX512-BF16 / AMX) where it has them; it changes the arithmetic, so answers can differ.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PromptTooLong(ValueError):
    """User text longer than MAX_USER_CHARS."""


def check_user_text(text: str) -> str:
    """`text` unchanged, or PromptTooLong: every prompt built from an operator's words goes through here."""
    if len(text) > MAX_USER_CHARS:
        raise PromptTooLong(f"the text has {len(text)} characters, more than the {MAX_USER_CHARS} a prompt takes")
    return text


def convert_gguf(gguf: Path | None = None, out_dir: Path | None = None) -> Path:
    """Dequantize the packaged GGUF once into an fp32 transformers folder.

    Written to a temporary sibling folder and renamed, so an interrupted conversion never
    leaves a half model that a node would later fail to load.
    """
    gguf = gguf or smollm2_gguf()
    out_dir = out_dir or default_llm_dir()
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to fp32 in %s (once)", gguf.name, out_dir)
    kwargs = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class ChatLLM:
    """A frozen chat model that streams its answer text piece by piece."""

    def __init__(
        self,
        model_dir: Path | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_new_tokens: int = 64,
        threads: int = 0,
        no_repeat_ngram: int = DEFAULT_NO_REPEAT_NGRAM,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        cache_system_prompt: bool = True,
        dtype: str = "float32",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        model_dir = Path(model_dir) if model_dir else default_llm_dir()
        if not (model_dir / "config.json").is_file():
            if model_dir == default_llm_dir():
                convert_gguf(out_dir=model_dir)
            else:
                raise FileNotFoundError(f"no transformers model in {model_dir}")
        if threads > 0:
            torch.set_num_threads(threads)
        hf_logging.disable_progress_bar()  # a node logs through its logger, not tqdm bars on stderr
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
        self.model.requires_grad_(False)
        self.dtype = dtype
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        repetition_guard(0, no_repeat_ngram, repetition_penalty)  # validated now, not at the first answer
        self.no_repeat_ngram, self.repetition_penalty = no_repeat_ngram, repetition_penalty
        # Every prompt starts with the same system turn: its keys and values are computed once (here)
        # and each answer only runs the operator's turn through the model (a copy of the cache, so
        # answers never see each other). Same greedy answers, a third of the prompt pass (56 of ~75 tokens).
        self._system_ids, self._system_cache = None, None
        if cache_system_prompt:
            self._system_ids = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": self.system_prompt}], tokenize=True, return_tensors="pt",
                return_dict=True)["input_ids"]
            with torch.inference_mode():
                self._system_cache = self.model(input_ids=self._system_ids, use_cache=True).past_key_values
        # where the time goes (core/latency.py): the prompt pass and the first text piece of the
        # calling thread's answer, for assistant_node's `metrics/stages`
        self.stages = StageTimer()

    def _cache_for(self, ids: torch.Tensor):
        """A private copy of the system turn's cache when `ids` starts with that turn, else None."""
        n = self._system_ids.shape[1] if self._system_ids is not None else 0
        if not n or ids.shape[1] <= n or not torch.equal(ids[0, :n], self._system_ids[0]):
            return None
        return copy.deepcopy(self._system_cache)

    def prompt_ids(self, user_text: str) -> torch.Tensor:
        # An explicit system message: SmolLM2's template inserts its own default one otherwise.
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": check_user_text(user_text)}]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the answer as text pieces while greedy generation runs in a worker thread."""
        ids = self.prompt_ids(user_text)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        self.stages.mark("llm_start")
        started, prefilled = time.perf_counter(), _FirstCall()
        processors = repetition_guard(ids.shape[1], self.no_repeat_ngram, self.repetition_penalty)
        processors.append(prefilled)

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        past_key_values=self._cache_for(ids),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        streamer=streamer,
                        pad_token_id=self.tokenizer.eos_token_id,
                        logits_processor=processors,
                    )
            except BaseException as exc:  # surfaced to the caller below, never lost in the thread
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name="llm-generate", daemon=True)
        worker.start()
        first = True
        for piece in streamer:
            if piece:
                if first and prefilled.at is not None:
                    self.stages.add("llm_prefill_s", prefilled.at - started)
                    self.stages.add("llm_first_text_s", time.perf_counter() - prefilled.at)
                first = False
                yield piece
        worker.join()
        if errors:
            raise errors[0]

    def answer(self, user_text: str) -> str:
        return "".join(self.stream(user_text)).strip()
