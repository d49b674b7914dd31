"""A speaker's adapter inside the ASR: LoRA in Whisper's top encoder layers and its decoder.

Where the voice is heard is where it is learned (docs/design.md §5): a projector behind a frozen Whisper
cannot change what Whisper misheard, so the speaker adapter of `kind: asr` is a low-rank delta
(LoRA, peft's `inject_adapter_in_model` on a plain module, as core/personalize.py does for the
projector) on

- the top `encoder_layers` blocks of the Whisper encoder (attention q/k/v + output, MLP), and
- optionally every decoder block (self-attention, cross-attention query/output, MLP; the
  cross-attention K/V projection stays frozen). The Personalizer's default leaves the decoder to the
  base (`train.asr.decoder: false`): a decoder LoRA learns the enrollment sentences' words too, and
  on a mild voice it wrote them into questions it had never heard (bench personalize, models/asr_adapter.md),

trained with the decoder's teacher-forced cross-entropy on the speaker's labelled utterances
(Tomanek et al. 2021: residual adapters / LoRA in the ASR for atypical speech).

Cheap on a CPU because every frozen part runs once per sample: the log-mel (30 s window, as the
decoder needs it: unpadded encoder output makes it loop, docs/design.md §4) and the lower encoder layers
are computed when the data is prepared and kept as fp16 (1500 x 384 per sample, 1.2 MB), so a
training step runs only the adapted top layers and the decoder. Regularized as the field does
for small data: time masking of the cached states inside the speech (SpecAugment-like), a small
learning rate with warm-up, weight decay on the LoRA matrices, gradient clipping, and a fixed
short schedule; the gate (core/personalize.py) keeps the candidate only if the speaker's held-out
WER of the final transcript drops.

At inference `SpeakerAsr.transcribe` runs the adapted encoder (padded) and decodes greedily, with the
length guard of core/decoder.py: an encoder-only adapter (the default) hands the adapted encoder output
to CTranslate2's int8 decoder, the one faster-whisper runs for everyone else (`fast`, from `AsrBase`;
faster than our fp32 decoder); an adapter with a decoder LoRA needs our PyTorch decoder. The gate
judges candidates through the same `transcribe_states`, so it judges what the speaker will get.
Unknown speakers never reach this module: they keep faster-whisper, unchanged.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .audio import SAMPLE_RATE
from .decoder import (EOT, NO_TIMESTAMPS, SOT, WhisperDecoder, ct2_greedy, decode_text, encode_text,
                      looks_looped, max_tokens_for)
from .encoder import WhisperEncoder, log_mel, speech_frames

ASR_KIND = "asr"
# Tiny-Align end to end (core/personalize.py): this LoRA plus a LoRA on the aligned assistant's projector, trained
# together through the decoder's and the LLM's losses; its tensors are stored as "asr.*" and "projector.*"
E2E_KIND = "e2e"
AUDIO_KINDS = (ASR_KIND, E2E_KIND)  # kinds trained on the speaker's audio, used by asr_node for the transcript
ASR_PREFIX, PROJECTOR_PREFIX = "asr.", "projector."


def asr_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Whisper LoRA tensors of an adapter of kind "asr" (all of them) or "e2e" (its "asr.*" ones)."""
    if kind == ASR_KIND:
        return tensors
    return {k[len(ASR_PREFIX):]: v for k, v in tensors.items() if k.startswith(ASR_PREFIX)}


@dataclass(frozen=True)
class AsrAdaptConfig:
    rank: int = 16
    alpha: float = 32.0
    encoder_layers: int = 2  # top encoder blocks with LoRA (0 = decoder only)
    decoder: bool = True  # LoRA in the decoder blocks
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    batch: int = 8
    time_mask: float = 0.1  # fraction of the speech frames masked per sample in training (0 = off)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.encoder_layers < 0 or self.batch < 1:
            raise ValueError("rank and batch must be >= 1, encoder_layers >= 0")
        if not self.decoder and self.encoder_layers == 0:
            raise ValueError("an ASR adapter needs encoder_layers > 0 or decoder: true")
        if not 0.0 <= self.time_mask < 0.5:
            raise ValueError(f"time_mask must be in [0, 0.5), got {self.time_mask}")

    def metadata(self) -> dict:
        return {"kind": ASR_KIND, "lora_rank": self.rank, "lora_alpha": self.alpha,
                "encoder_layers": self.encoder_layers, "decoder_lora": self.decoder}

    @classmethod
    def from_metadata(cls, extra: dict) -> "AsrAdaptConfig":
        return cls(rank=int(extra["lora_rank"]), alpha=float(extra["lora_alpha"]),
                   encoder_layers=int(extra["encoder_layers"]), decoder=bool(extra["decoder_lora"]))


def lora_targets(encoder: WhisperEncoder, decoder: WhisperDecoder, cfg: AsrAdaptConfig) -> list[str]:
    names = [f"encoder.blocks.{i}.{m}" for i in range(encoder.n_layers - cfg.encoder_layers, encoder.n_layers)
             for m in ("attn.qkv", "attn.out", "mlp.0", "mlp.2")]
    if cfg.decoder:
        names += [f"decoder.blocks.{i}.{m}" for i in range(decoder.config.n_layers)
                  for m in ("attn.qkv", "attn.out", "cross.q", "cross.out", "mlp.0", "mlp.2")]
    return names


def time_mask(h: torch.Tensor, speech: int, fraction: float, rng: random.Random) -> None:
    """Zero one span of `fraction` of the first `speech` frames of `h` (frames, d), in place
    (SpecAugment-like time masking of cached states; nothing when the span is empty)."""
    width = int(speech * fraction)
    if width > 0:
        start = rng.randrange(0, speech - width + 1)
        h[start:start + width] = 0.0


@dataclass
class Prepared:
    """What training reads per sample: the frozen lower encoder states and the label tokens."""
    states: list[torch.Tensor]  # (1500, d) fp16, output of block (n_layers - encoder_layers)
    speech_frames: list[int]  # how many of those frames hold speech (the rest is the 30 s padding)
    tokens: list[list[int]]  # [SOT, NO_TIMESTAMPS, text..., EOT]
    seconds: list[float]
    texts: list[str]
    # the same blocks' output for the unpadded log-mel (speech frames only), fp16: what `features_from`
    # turns into the projector's input (end-to-end rounds only; empty otherwise)
    unpadded: list[torch.Tensor] = field(default_factory=list)


class SpeakerAsr(nn.Module):
    """Whisper encoder + decoder with a speaker's LoRA injected.

    The LoRA wrappers replace Linear modules in place, so the model takes the given modules over:
    pass ones nobody else uses (AsrBase.model loads fresh ones, so there is one Whisper in memory
    per model, not two)."""

    def __init__(self, encoder: WhisperEncoder, decoder: WhisperDecoder, cfg: AsrAdaptConfig) -> None:
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        self.cfg = cfg
        self.encoder, self.decoder = encoder, decoder
        self.requires_grad_(False)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                          target_modules=lora_targets(self.encoder, self.decoder, cfg))
        inject_adapter_in_model(lora, self)  # only the lora_* parameters require grad
        self.split = self.encoder.n_layers - cfg.encoder_layers  # blocks below run frozen, once
        self.fast = None  # a ctranslate2 Whisper: decodes an encoder-only adapter's output (AsrBase.model sets it)
        self.eval()

    # -- adapter tensors ------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(self).items()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        expected = set(self.adapter_state())
        if set(tensors) != expected:
            missing, unknown = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ValueError(f"ASR adapter tensors do not fit this model (missing {missing}, unknown {unknown})")
        set_peft_model_state_dict(self, {k: v.float() for k, v in tensors.items()})

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- the two halves of the encoder ----------------------------------------------------
    @torch.no_grad()
    def lower(self, mel: torch.Tensor) -> torch.Tensor:
        """Output of the frozen blocks below the adapted ones (stem + positions when none)."""
        for i, h in enumerate(self.encoder.layers(mel)):
            if i == self.split:
                return h
        raise AssertionError("unreachable: split <= n_layers")

    def upper(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.encoder.blocks[self.split:]:
            h = block(h)
        return self.encoder.ln_post(h)

    # -- training -------------------------------------------------------------------------
    def prepare(self, items: Sequence[tuple[np.ndarray, str]], unpadded: bool = False) -> Prepared:
        """Run every frozen part once: (16 kHz samples, label text) -> cached states and tokens
        (`unpadded`: also the states of the unpadded input, for `features_from`)."""
        out = Prepared([], [], [], [], [])
        for samples, text in items:
            mel = log_mel(samples, pad_to_30s=True)
            frames = speech_frames(samples.size)
            out.states.append(self.lower(mel)[0].to(torch.float16))
            if unpadded:
                out.unpadded.append(self.lower(log_mel(samples, pad_to_30s=False))[0, :frames].to(torch.float16))
            out.speech_frames.append(min(self.encoder.config.n_ctx, frames))
            out.tokens.append([SOT, NO_TIMESTAMPS] + encode_text(text) + [EOT])
            out.seconds.append(samples.size / SAMPLE_RATE)
            out.texts.append(text)
        return out

    def loss(self, data: Prepared, idx: Sequence[int], rng: random.Random | None = None) -> torch.Tensor:
        """Teacher-forced cross-entropy of the label tokens (after the prompt) for samples `idx`."""
        h = torch.stack([data.states[i] for i in idx]).float()
        if rng is not None:
            for row, i in enumerate(idx):
                time_mask(h[row], data.speech_frames[i], self.cfg.time_mask, rng)
        xa = self.upper(h)
        length = max(len(data.tokens[i]) for i in idx) - 1
        inp = torch.full((len(idx), length), EOT, dtype=torch.long)
        tgt = torch.full((len(idx), length), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            seq = torch.tensor(data.tokens[i])
            inp[row, : len(seq) - 1] = seq[:-1]
            tgt[row, 1: len(seq) - 1] = seq[2:]  # position 0 predicts NO_TIMESTAMPS: the prompt, not learned
        logits, _ = self.decoder(inp, xa)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100)

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def transcribe_states(self, state: torch.Tensor, seconds: float) -> tuple[str, float]:
        xa = self.upper(state.float().unsqueeze(0))
        if self.fast is not None and not self.cfg.decoder:
            tokens, logprob = ct2_greedy(self.fast, xa, max_tokens_for(seconds))
        else:
            tokens, logprob = self.decoder.greedy(xa, max_tokens_for(seconds))
        text = decode_text(tokens)
        if looks_looped(text):
            return "", 0.0  # a looped decode is no transcript (the gate counts it as all deletions)
        return text, float(math.exp(min(logprob, 0.0)))

    def features_from(self, state: torch.Tensor) -> torch.Tensor:
        """The adapted final-layer features (after ln_post) of one utterance from its *unpadded* lower
        states (`lower` of `log_mel(pad_to_30s=False)`): what asr_node publishes for the aligned
        assistant's projector (models/projector.md: layer 4, unpadded); equal to the base encoder's
        output while the LoRA is zero."""
        return self.upper(state.float().unsqueeze(0))[0]

    @torch.no_grad()
    def features(self, samples: np.ndarray) -> torch.Tensor:
        """(frames, d) adapted features of one utterance (16 kHz mono), one frame per 20 ms."""
        frames = speech_frames(samples.size)
        return self.features_from(self.lower(log_mel(samples, pad_to_30s=False))[0])[:frames]

    @torch.no_grad()
    def transcribe(self, samples: np.ndarray) -> tuple[str, float]:
        """(text, confidence) of one utterance (16 kHz mono, <= 30 s) with this speaker's adapter."""
        state = self.lower(log_mel(samples, pad_to_30s=True))[0]
        return self.transcribe_states(state, samples.size / SAMPLE_RATE)


def make_optimizer(model: SpeakerAsr, extra: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """AdamW over the model's LoRA (and `extra` parameters trained with it: an end-to-end round's projector LoRA)."""
    cfg = model.cfg
    return torch.optim.AdamW(model.trainable() + list(extra), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model: SpeakerAsr, opt: torch.optim.Optimizer, data: Prepared, idx: Sequence[int], step: int,
               rng: random.Random, extra: Callable[[Sequence[int]], float] | None = None) -> float:
    """One AdamW step (linear warm-up of the learning rate); returns the loss.

    `extra(idx)`: more losses of the same samples, each back-propagated by `extra` itself (so a
    large one can go in chunks), returning their value; the step applies their gradients with the
    decoder's (the end-to-end round's LLM loss through the projector)."""
    model.train()
    for group in opt.param_groups:
        group["lr"] = model.cfg.lr * min(1.0, (step + 1) / max(model.cfg.warmup_steps, 1))
    opt.zero_grad(set_to_none=True)
    loss = model.loss(data, idx, rng)
    loss.backward()
    value = float(loss.detach())
    if extra is not None:
        value += extra(idx)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], model.cfg.grad_clip)
    opt.step()
    model.eval()
    return value


class AsrBase:
    """The frozen Whisper that speakers' ASR adapters are made for, loaded on first use.

    `sha` (of model.bin) is the base hash an adapter records: an adapter made for another Whisper
    is never applied. `cascade` is what an unknown speaker gets (faster-whisper, int8, greedy),
    the yardstick of the personalizer's gate when a speaker has no ASR adapter yet; without its
    temperature fallback, which samples on hard audio: on two held-out clips of a slow, shaking
    voice it gave a WER of 0.125 in one round and 0.706 in the next, a coin the gate must not toss.
    """

    def __init__(self, model_dir=None, transcriber=None, whisper=None, fast_decoding: bool = True) -> None:
        """`whisper`: the `ctranslate2.models.Whisper` that decodes encoder-only adapters' output (asr_node
        passes faster-whisper's, so one int8 model serves both); None = the cascade transcriber's, loaded
        when first needed. `fast_decoding` False decodes every adapter with our PyTorch decoder."""
        import threading

        from .models import whisper_tiny_dir

        self.model_dir = model_dir or whisper_tiny_dir()
        self._transcriber = transcriber
        self._whisper = whisper
        self.fast_decoding = fast_decoding
        self._lock = threading.Lock()
        self._sha: str | None = None

    @property
    def sha(self) -> str:
        if self._sha is None:
            from .adapters import file_sha256

            self._sha = file_sha256(f"{self.model_dir}/model.bin")
        return self._sha

    def parts(self) -> tuple[WhisperEncoder, WhisperDecoder]:
        """A fresh frozen encoder and decoder (read from model.bin: ~0.5 s; nothing is cached, so an
        idle personalizer holds no Whisper between rounds)."""
        from .decoder import load_whisper_decoder
        from .encoder import load_whisper_encoder

        return load_whisper_encoder(self.model_dir), load_whisper_decoder(self.model_dir)

    def model(self, cfg: AsrAdaptConfig, tensors: dict[str, torch.Tensor] | None = None) -> SpeakerAsr:
        model = SpeakerAsr(*self.parts(), cfg)
        if tensors is not None:
            model.load_adapter_state(tensors)
        if self.fast_decoding and not cfg.decoder:
            model.fast = self.whisper()
        return model

    def _greedy(self):
        with self._lock:
            if self._transcriber is None:
                from .asr import WhisperTranscriber

                self._transcriber = WhisperTranscriber(self.model_dir, threads=1, temperature=0.0)
            return self._transcriber

    def whisper(self):
        """The CTranslate2 Whisper that decodes encoder-only adapters (faster-whisper's own model)."""
        if self._whisper is None:
            self._whisper = self._greedy().model.model
        return self._whisper

    def cascade(self, samples: np.ndarray) -> str:
        return self._greedy().transcribe(samples).text
