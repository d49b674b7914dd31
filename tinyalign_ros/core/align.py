"""Tiny-Align: a trainable projector between the frozen Whisper encoder and the frozen LLM.

Input layout (one chat turn, SmolLM2's template around it):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{instruction}\\n
    [projected audio tokens]
    \\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n  {target}<|im_end|>

`instruction` is Tiny-Align's *instruction injection* (a task instruction placed before the
audio tokens); `inject=False` drops it, leaving only the prompt after the audio.

The **hybrid** prompt (`AlignPrompt(transcript=True)`) also puts the cascade ASR's transcript of
the same utterance after the audio tokens (`Transcript: ...`). Why: a projector trained on
synthesized voices alone does not transfer to real speech (docs/design.md §5), while Whisper's text
does; anchored on the transcript, the audio tokens only have to carry what text loses (ASR
errors on an unusual voice, which per-operator personalization then learns). Labels are
-100 everywhere except the target tokens and the closing <|im_end|>, masked **by position**
(SmolLM2's pad token equals its eos token, so a pad-id mask would hide the eos it must learn).
Training batches are right-padded; generation batches are left-padded with explicit position ids.

`AlignedLLM` shares the frozen model of a `ChatLLM` (the LLM is loaded once per process) and
streams its answer like `ChatLLM.stream`, with the KV cache of `generate`.

Training (`train_projector`): encoder features are computed once and cached on disk per split;
only the projector trains (AdamW, warmup + cosine over the step or time budget, seeded),
checkpoints (safetensors + JSON state) let a killed run resume, and validation WER is measured
by greedy generation every `val_every_s`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from transformers import TextIteratorStreamer

from .llm import DEFAULT_NO_REPEAT_NGRAM, DEFAULT_REPETITION_PENALTY, check_user_text, repetition_guard
from .files import atomic_write_bytes
from .projector import Projector, ProjectorLoadError, save_projector

log = logging.getLogger(__name__)

AUDIO_MARK = "<<AUDIO>>"
# Short on purpose: every prompt token is paid for in each training step's forward and backward.
REPEAT_SYSTEM = "You transcribe speech."
REPEAT_INSTRUCTION = "Speech:"
REPEAT_PROMPT = "Repeat exactly what was said."
TRANSCRIPT_LABEL = "Transcript:"
IGNORE = -100


@dataclass(frozen=True)
class AlignPrompt:
    system: str = REPEAT_SYSTEM
    instruction: str = REPEAT_INSTRUCTION  # instruction injection: placed before the audio tokens
    prompt: str = REPEAT_PROMPT  # after the audio tokens
    inject: bool = True
    transcript: bool = False  # hybrid: the ASR transcript follows the audio tokens

    def user_text(self, transcript: str = "") -> str:
        before = f"{self.instruction}\n" if self.inject and self.instruction else ""
        heard = f"\n{TRANSCRIPT_LABEL} {' '.join(check_user_text(transcript).split())}" if self.transcript else ""
        after = f"\n{self.prompt}" if self.prompt else ""
        return f"{before}{AUDIO_MARK}{heard}{after}"


def prompt_segments(tokenizer, prompt: AlignPrompt, transcript: str = "") -> tuple[list[int], list[int]]:
    """Token ids before and after the audio tokens, from the model's own chat template."""
    messages = [{"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user_text(transcript)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, sep, after = text.partition(AUDIO_MARK)
    if not sep:
        raise ValueError("the chat template dropped the audio placeholder")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after)


@dataclass
class EmbedsBatch:
    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), IGNORE outside the targets
    audio_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of the audio per row


def build_embeds(embed: torch.nn.Module, prefix: Sequence[int], suffix: Sequence[int] | Sequence[Sequence[int]],
                 audio: torch.Tensor, n_audio: torch.Tensor, targets: Sequence[Sequence[int]] | None = None,
                 padding: str = "right", pad_id: int = 0) -> EmbedsBatch:
    """[prefix ; audio[i, :n_audio[i]] ; suffix[i] ; targets[i]] per row, padded to one length.

    `embed` is the LLM's input-embedding module; `audio` (B, T', H) the projected audio;
    `suffix` one token list for all rows, or one per row (the hybrid prompt's transcripts). Padding
    positions get the pad token's embedding, attention 0, label IGNORE; position ids count only
    real tokens (so left padding does not shift positions).
    """
    if padding not in ("right", "left"):
        raise ValueError("padding is 'right' (training) or 'left' (generation)")
    b = audio.shape[0]
    dev = audio.device
    suffixes = [list(s) for s in suffix] if suffix and not isinstance(suffix[0], int) else [list(suffix)] * b
    if len(suffixes) != b:
        raise ValueError(f"{len(suffixes)} suffixes for {b} rows")
    pre = embed(torch.tensor(list(prefix), dtype=torch.long, device=dev))
    pad_vec = embed(torch.tensor([pad_id], device=dev))[0]
    rows, label_rows, spans = [], [], []
    for i in range(b):
        n = int(n_audio[i])
        tgt = list(targets[i]) if targets is not None else []
        parts = [pre, audio[i, :n].to(pre.dtype), embed(torch.tensor(suffixes[i] + tgt, dtype=torch.long, device=dev))]
        rows.append(torch.cat(parts, 0))
        label_rows.append([IGNORE] * (len(prefix) + n + len(suffixes[i])) + tgt)
        spans.append((len(prefix), len(prefix) + n))
    length = max(r.shape[0] for r in rows)
    h = pre.shape[-1]
    embeds = pad_vec.expand(b, length, h).clone()
    mask = torch.zeros(b, length, dtype=torch.long, device=dev)
    labels = torch.full((b, length), IGNORE, dtype=torch.long, device=dev)
    for i, row in enumerate(rows):
        n = row.shape[0]
        sl = slice(0, n) if padding == "right" else slice(length - n, length)
        embeds[i, sl] = row
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(label_rows[i], dtype=torch.long, device=dev)
        if padding == "left":
            spans[i] = (spans[i][0] + length - n, spans[i][1] + length - n)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return EmbedsBatch(embeds, mask, position_ids, labels if targets is not None else None, spans)


class AlignedLLM:
    """The frozen LLM reading projected audio: loss for training, streamed/batched generation.

    `model`/`tokenizer` are the ones of a ChatLLM (`AlignedLLM.from_chat(chat, projector)`), so
    cascade and aligned modes share one copy of the weights. Generation (streamed answers and
    batched transcripts alike) has the chat model's repetition control (llm.RepetitionGuard: no
    `no_repeat_ngram`-gram twice in the output; None = the chat's, or llm's defaults).
    """

    def __init__(self, model, tokenizer, projector: Projector, prompt: AlignPrompt | None = None,
                 max_new_tokens: int = 48, max_change: float | None = None, no_repeat_ngram: int | None = None,
                 repetition_penalty: float | None = None) -> None:
        hidden = model.get_input_embeddings().embedding_dim
        if projector.cfg.out_dim != hidden:
            raise ProjectorLoadError(f"projector outputs {projector.cfg.out_dim}-dim embeddings, "
                                     f"the LLM's hidden size is {hidden}")
        self.model = model
        self.tokenizer = tokenizer
        self.projector = projector
        self.max_new_tokens = max_new_tokens
        # hybrid prompt: outputs are anchored to the ASR transcripts (`anchor`; None or < 0 = raw outputs)
        self.max_change = max_change if max_change is not None and max_change >= 0 else None
        self.eos_id = tokenizer.eos_token_id
        self.no_repeat_ngram = DEFAULT_NO_REPEAT_NGRAM if no_repeat_ngram is None else no_repeat_ngram
        self.repetition_penalty = DEFAULT_REPETITION_PENALTY if repetition_penalty is None else repetition_penalty
        repetition_guard(0, self.no_repeat_ngram, self.repetition_penalty)  # validated now
        self.set_prompt(prompt or AlignPrompt())

    @classmethod
    def from_chat(cls, chat, projector: Projector, prompt: AlignPrompt | None = None, **kwargs) -> "AlignedLLM":
        kwargs.setdefault("no_repeat_ngram", chat.no_repeat_ngram)
        kwargs.setdefault("repetition_penalty", chat.repetition_penalty)
        return cls(chat.model, chat.tokenizer, projector, prompt, **kwargs)

    def set_prompt(self, prompt: AlignPrompt) -> None:
        self.prompt = prompt
        self.prefix, self.suffix = prompt_segments(self.tokenizer, prompt)

    def target_ids(self, text: str) -> list[int]:
        """Target tokens of a transcript, closed by <|im_end|> (the model's eos)."""
        return self.tokenizer(" ".join(text.split()), add_special_tokens=False)["input_ids"] + [self.eos_id]

    def batch(self, features: torch.Tensor, lengths: torch.Tensor, targets=None, padding: str = "right",
              prompt: AlignPrompt | None = None, transcripts: Sequence[str] | None = None) -> EmbedsBatch:
        """Embeddings of [prompt ; projected audio ; prompt (+ transcript) ; targets] per row.

        With a hybrid prompt, `transcripts` (one per row) are the ASR's text; None reads as empty.
        """
        audio, n_audio = self.projector(features, lengths)
        prompt = prompt or self.prompt
        if prompt.transcript:
            heard = list(transcripts) if transcripts is not None else [""] * audio.shape[0]
            segments = [prompt_segments(self.tokenizer, prompt, t) for t in heard]
            prefix, suffix = segments[0][0], [s for _, s in segments]
        elif prompt is self.prompt:
            prefix, suffix = self.prefix, self.suffix
        else:
            prefix, suffix = prompt_segments(self.tokenizer, prompt)
        return build_embeds(self.model.get_input_embeddings(), prefix, suffix, audio, n_audio, targets,
                            padding, self.eos_id)

    def loss(self, features: torch.Tensor, lengths: torch.Tensor, targets: Sequence[Sequence[int]],
             transcripts: Sequence[str] | None = None) -> torch.Tensor:
        """Mean cross-entropy over the target tokens (right-padded batch)."""
        b = self.batch(features, lengths, targets, "right", transcripts=transcripts)
        # The LM head (576 x 49k) runs only where a target token is predicted: most positions
        # are prompt, audio or padding, and their logits would be computed only to be ignored.
        hidden = self.model.base_model(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask,
                                       position_ids=b.position_ids, use_cache=False).last_hidden_state
        labels = b.labels[:, 1:]
        keep = labels != IGNORE
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), labels[keep])

    def _generate(self, b: EmbedsBatch, max_new_tokens: int, streamer=None) -> torch.Tensor:
        return self.model.generate(
            inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, streamer=streamer, pad_token_id=self.eos_id, eos_token_id=self.eos_id,
            # from inputs_embeds, generate's ids are the output alone: the guard's prompt length is 0
            logits_processor=repetition_guard(0, self.no_repeat_ngram, self.repetition_penalty),
        )

    @torch.inference_mode()
    def transcribe(self, features: Sequence[torch.Tensor], max_new_tokens: int | None = None,
                   transcripts: Sequence[str] | None = None) -> list[str]:
        """Greedy answers for several utterances' features (each (frames, dim)), one left-padded batch."""
        if not features:
            return []
        lengths = torch.tensor([f.shape[0] for f in features])
        padded = torch.nn.utils.rnn.pad_sequence([f.float() for f in features], batch_first=True)
        b = self.batch(padded, lengths, None, "left", transcripts=transcripts)
        out = self._generate(b, max_new_tokens or self.max_new_tokens)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
        if transcripts is not None:
            texts = [self.anchor(t, heard)[0] for t, heard in zip(texts, transcripts)]
        return texts

    def anchor(self, text: str, transcript: str) -> tuple[str, bool]:
        """(text, kept): `anchor_to_transcript` with a hybrid prompt and `max_change` set, else as is."""
        if not self.prompt.transcript or self.max_change is None:
            return text, True
        return anchor_to_transcript(text, transcript, self.max_change)

    def stream(self, features: torch.Tensor, prompt: AlignPrompt | None = None,
               transcript: str = "") -> Iterator[str]:
        """Yield the answer to one utterance's features (frames, dim) piece by piece."""
        with torch.inference_mode():
            b = self.batch(features.float().unsqueeze(0), torch.tensor([features.shape[0]]), None, "left",
                           prompt, [transcript])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self._generate(b, self.max_new_tokens, streamer)
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, name="aligned-generate", daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if errors:
            raise errors[0]


class EmbeddingCTC(torch.nn.Module):
    """An alignment objective with no LLM forward or backward pass: CTC in the LLM's input space.

    The projector's audio tokens are scored against the frozen LLM's own input-embedding table,
    logits = scale * (token . E^T) plus one learned blank logit per token, and trained with CTC
    on the transcript's LLM token ids: an audio token should *be* (close to) the embedding of a
    word piece that was said, in order, with blanks between. That is what the LLM-loss phase
    wants too, at a fraction of the cost (one 576 x 49k matrix product instead of 30 transformer
    layers forward and backward), so a first phase of it gives the LLM-loss phase a projector
    that already points at the right words (docs/design.md section 4: suggestive on one seed).

    The blank logit is computed on its own rather than by appending a row to the table:
    `torch.cat([table, blank])` would make autograd produce a gradient for the whole frozen
    table at every step (measured: 4 s instead of 0.3 s per step). Only `blank` and `log_scale`
    are trained here besides the projector; neither is part of the shipped projector.

    `vocab` (token ids) restricts the softmax to the word pieces the training text uses: the
    table product is most of this objective's cost (49k x 576 per audio token), and the audio
    only has to be told apart from the pieces it could be, not from every piece the LLM knows.
    """

    def __init__(self, table: torch.Tensor, vocab: Sequence[int] | None = None) -> None:
        super().__init__()
        ids = torch.arange(table.shape[0]) if vocab is None else torch.tensor(sorted(set(vocab)), dtype=torch.long)
        self.register_buffer("table", table.detach()[ids], persistent=False)
        # token id -> class index (0 = blank); ids outside `vocab` map to -1 and are refused
        index = torch.full((table.shape[0],), -1, dtype=torch.long)
        index[ids] = torch.arange(1, ids.numel() + 1)
        self.register_buffer("index", index, persistent=False)
        self.blank = torch.nn.Linear(table.shape[1], 1)
        # dot products of unit-scale vectors with a 576-d table are small: start with a sharper softmax
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, tokens: torch.Tensor, n_tokens: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean CTC loss per target token; `tokens` (B, T, d) projector output, `n_tokens` (B,)."""
        scale = self.log_scale.exp()
        table_norm = F.normalize(self.table, dim=-1)
        words = scale * (F.normalize(tokens, dim=-1) @ table_norm.T)  # (B, T, V)
        logits = torch.cat([self.blank(tokens), words], dim=-1)  # blank = class 0
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V + 1)
        target_lengths = torch.tensor([len(t) for t in targets])
        flat = self.index[torch.tensor([i for t in targets for i in t], dtype=torch.long)]
        if (flat < 0).any():
            raise ValueError("a target token is outside the objective's vocab")
        return F.ctc_loss(log_probs, flat, n_tokens.cpu(), target_lengths, blank=0, reduction="mean",
                          zero_infinity=True)


# Measured (build/anchor_eval.py in session 13; hybrid projector of models/projector.md): the
# largest share of words the aligned output may change in the ASR transcript. Chosen on the
# synthetic validation split (60 clips: 31.4% WER vs 32.2% cascade, 40.0% unanchored); on the
# synthetic test split it gave 25.0% (cascade 24.9%, unanchored 30.4%) and on real speech
# 12.0% (cascade 9.8%, unanchored 27.2%).
DEFAULT_MAX_CHANGE = 0.2


def anchor_to_transcript(aligned_text: str, transcript: str, max_change: float = DEFAULT_MAX_CHANGE
                         ) -> tuple[str, bool]:
    """The hybrid path's output, anchored: (text, kept) — the aligned text where it changes at most
    `max_change` of the transcript's words (WER of one against the other), else the transcript.

    Why: the hybrid projector learns to correct the ASR where the audio disagrees, but trained on
    a few hundred synthetic sentences it also "corrects" real speech into its training text's
    style ("ten of clubs" -> "pinch multiple switches"). Small edits are what a personal adapter
    should make (a name, an accent's vowel); rewriting most of the sentence is the projector
    being out of its depth, so the transcript stands. An empty transcript gives nothing to anchor
    to, so the aligned text stands (callers switch the anchor off by not calling this).
    """
    import jiwer

    from .metrics import normalize_text

    ref, hyp = normalize_text(transcript), normalize_text(aligned_text)
    if not ref:
        return aligned_text, True
    change = jiwer.wer(ref, hyp) if hyp else 1.0
    return (aligned_text, True) if change <= max_change else (transcript, False)


# --------------------------------------------------------------------------- feature cache

CACHE_FORMAT = "tinyalign-feature-cache/1"


@dataclass
class FeatureSet:
    """Cached encoder features of one split: frames of all clips concatenated (fp16)."""

    frames: torch.Tensor  # (total_frames, dim)
    offsets: torch.Tensor  # (n + 1,)
    texts: list[str]
    rows: list[dict]
    layer: int
    transcripts: list[str] | None = None  # the cascade ASR's text per clip (hybrid prompt input)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "FeatureSet":
        feats = [self.frames[int(self.offsets[i]):int(self.offsets[i + 1])] for i in idx]
        offsets = torch.tensor([0] + [f.shape[0] for f in feats], dtype=torch.long).cumsum(0)
        frames = torch.cat(feats) if feats else self.frames[:0]
        return FeatureSet(frames, offsets, [self.texts[i] for i in idx], [self.rows[i] for i in idx], self.layer,
                          [self.transcripts[i] for i in idx] if self.transcripts is not None else None)

    def with_transcripts(self, asr: dict[str, tuple[str, float]]) -> "FeatureSet":
        """The clips that have an ASR transcript in `asr` (path -> (text, confidence)), carrying it."""
        keep = [i for i, r in enumerate(self.rows) if r["path"] in asr]
        out = self.subset(keep)
        out.transcripts = [asr[r["path"]][0] for r in out.rows]
        return out

    def get(self, i: int) -> torch.Tensor:
        return self.frames[int(self.offsets[i]):int(self.offsets[i + 1])].float()

    def collate(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [self.get(i) for i in idx]
        return (torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),
                torch.tensor([f.shape[0] for f in feats]))


def read_manifest(corpus: Path) -> list[dict]:
    with (corpus / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def encode_file(encoder, path: Path, layer: int | None = None) -> torch.Tensor:
    """Features of one audio file as asr_node computes them (unpadded, ln_post, speech frames)."""
    from .audio import load_audio

    return encode_samples(encoder, load_audio(path), layer)


def encode_samples(encoder, samples: np.ndarray, layer: int | None = None, grad: bool = False) -> torch.Tensor:
    """`grad=True` keeps the graph (end-to-end alignment trains the encoder too)."""
    from .encoder import log_mel, speech_frames

    layer = layer or encoder.n_layers
    mel = log_mel(samples, pad_to_30s=False).unsqueeze(0)
    frames = speech_frames(len(samples))
    with torch.enable_grad() if grad else torch.inference_mode():
        out = encoder(mel, max_layer=layer)
    return out.output[0, :frames]


def cache_split(corpus: Path, rows: list[dict], cache_file: Path, encoder, layer: int, desc: str = "") -> FeatureSet:
    """Encode `rows` once into `cache_file` (reused when the same rows/layer were cached before)."""
    key = hashlib.sha256(json.dumps([[r["path"], r["text"]] for r in rows] + [layer]).encode()).hexdigest()
    if cache_file.is_file():
        try:
            with safe_open(cache_file, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") == CACHE_FORMAT and meta.get("key") == key:
                    return FeatureSet(f.get_tensor("frames"), f.get_tensor("offsets"), [r["text"] for r in rows],
                                      rows, layer)
        except SafetensorError:
            pass
        log.info("feature cache %s is stale or unreadable: re-encoding", cache_file)
    from tqdm import tqdm

    chunks, offsets = [], [0]
    for r in tqdm(rows, desc=f"encoding {desc}", unit="clip", mininterval=5):
        feats = encode_file(encoder, corpus / r["path"], layer).to(torch.float16)
        chunks.append(feats)
        offsets.append(offsets[-1] + feats.shape[0])
    frames = torch.cat(chunks, 0) if chunks else torch.zeros(0, encoder.d_model, dtype=torch.float16)
    offs = torch.tensor(offsets, dtype=torch.long)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_file, save_safetensors({"frames": frames.contiguous(), "offsets": offs},
                                                    metadata={"format": CACHE_FORMAT, "key": key, "layer": str(layer)}))
    return FeatureSet(frames, offs, [r["text"] for r in rows], rows, layer)


def load_corpus_features(corpus: Path, cache_dir: Path, encoder, layer: int,
                         splits: Sequence[str] = ("train", "val", "test")) -> dict[str, FeatureSet]:
    rows = read_manifest(corpus)
    out = {}
    for split in splits:
        sel = [r for r in rows if r["split"] == split]
        out[split] = cache_split(corpus, sel, cache_dir / f"{split}-L{layer}.safetensors", encoder, layer, split)
    return out


REAL_SPEECH_DIRS = (Path("/usr/share/pocketsphinx/test/data/librivox"), Path("/usr/share/pocketsphinx/test/data/cards"))


def real_speech_clips() -> list[tuple[Path, str]]:
    """Real human recordings with transcripts shipped by Debian's pocketsphinx-testdata."""
    import re

    clips = []
    for d in REAL_SPEECH_DIRS:
        for tf in sorted(d.glob("*transcription")):
            for line in tf.read_text(encoding="utf-8").splitlines():
                m = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*$", line)
                if m and (d / f"{m.group(2)}.wav").is_file():
                    clips.append((d / f"{m.group(2)}.wav", " ".join(m.group(1).split())))
    return clips


ASR_FIELDS = ("path", "transcript", "confidence")


def read_asr_transcripts(file: Path) -> dict[str, tuple[str, float]]:
    """path -> (faster-whisper transcript, confidence) as written by `transcribe_rows`."""
    if not file.is_file():
        return {}
    with file.open(newline="", encoding="utf-8") as f:
        return {r["path"]: (r["transcript"], float(r["confidence"])) for r in csv.DictReader(f)}


def transcribe_rows(corpus: Path, rows: Sequence[dict], file: Path, threads: int = 2,
                    progress: bool = True) -> dict[str, tuple[str, float]]:
    """The cascade's own transcripts of corpus clips: the hybrid prompt's text input.

    Appended to `file` (CSV) row by row and flushed, so a killed run keeps what it did and a
    second run only transcribes what is missing (~0.6 s per clip on 2 threads).
    """
    from tqdm import tqdm

    from .asr import WhisperTranscriber
    from .audio import load_audio

    done = read_asr_transcripts(file)
    todo = [r for r in rows if r["path"] not in done]
    if not todo:
        return done
    whisper = WhisperTranscriber(threads=threads)
    new_file = not file.is_file()
    with file.open("a", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, ASR_FIELDS)
        if new_file:
            out.writeheader()
        for r in tqdm(todo, desc="transcribing (cascade ASR)", unit="clip", mininterval=10, disable=not progress):
            t = whisper.transcribe(load_audio(corpus / r["path"]))
            out.writerow({"path": r["path"], "transcript": t.text, "confidence": f"{t.confidence:.4f}"})
            f.flush()
            done[r["path"]] = (t.text, t.confidence)
    return done


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    kind: str = "mlp"
    stack: int = 4
    pooling: str = "stack"
    hidden: int = 1024
    layers: int = 2
    heads: int = 4
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 30
    max_steps: int = 100000
    minutes: float = 20.0
    seed: int = 0
    val_every_s: float = 300.0
    val_n: int = 48
    ckpt_every_s: float = 120.0
    inject: bool = True
    hybrid: bool = False  # the ASR transcript in the prompt (needs FeatureSet.transcripts)
    grad_clip: float = 1.0
    save_dtype: str = "float16"


def _lr_factor(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = max(step / max(cfg.max_steps, 1), elapsed / max(cfg.minutes * 60, 1e-9))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def evaluate(aligned: AlignedLLM, fs: FeatureSet, idx: Sequence[int] | None = None, batch: int = 8,
             max_new_tokens: int = 40) -> tuple[float, list[tuple[str, str]]]:
    from .metrics import wer

    idx = list(range(len(fs))) if idx is None else list(idx)
    refs, hyps = [], []
    was_training = aligned.projector.training
    aligned.projector.eval()
    for s in range(0, len(idx), batch):
        chunk = idx[s:s + batch]
        heard = [fs.transcripts[i] for i in chunk] if fs.transcripts is not None else None
        hyps += aligned.transcribe([fs.get(i) for i in chunk], max_new_tokens, heard)
        refs += [fs.texts[i] for i in chunk]
    aligned.projector.train(was_training)
    return wer(refs, hyps), list(zip(refs, hyps))


def _save_checkpoint(ckpt: Path, projector: Projector, opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"projector.{k}": v.contiguous() for k, v in projector.state_dict().items()}
    names = dict(projector.named_parameters())
    index = {id(p): n for n, p in names.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"opt.{index[id(p)]}.{k}"] = st[k].contiguous()
            if "step" in st:
                state.setdefault("opt_steps", {})[index[id(p)]] = float(st["step"])
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(ckpt.with_name(ckpt.name + ".safetensors"), save_safetensors(tensors))
    atomic_write_bytes(ckpt.with_name(ckpt.name + ".json"), json.dumps(state, indent=1).encode())


def _load_checkpoint(ckpt: Path, projector: Projector, opt: torch.optim.Optimizer) -> dict:
    state = json.loads(ckpt.with_name(ckpt.name + ".json").read_text())
    with safe_open(ckpt.with_name(ckpt.name + ".safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    for name, p in projector.named_parameters():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(state["opt_steps"][name]),
                            "exp_avg": tensors[f"opt.{name}.exp_avg"],
                            "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"]}
    return state


def train_projector(aligned: AlignedLLM, data: dict[str, FeatureSet], cfg: TrainConfig, out: Path,
                    resume: bool = True, progress: bool = True, extra_meta: dict | None = None) -> dict:
    """Train `aligned.projector` on data["train"]; returns a summary (curve, WERs, times).

    Writes `out` (the projector with the best validation WER so far), `out.ckpt.{safetensors,json}`
    (resumable state) and `out.log.jsonl` (one line per logged step / validation).
    """
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    projector = aligned.projector.train()
    train = data["train"]
    val = data.get("val")
    targets = [aligned.target_ids(t) for t in train.texts]
    opt = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = out.with_name(out.name.replace(".safetensors", "") + ".ckpt")
    log_file = out.with_name(out.name.replace(".safetensors", "") + ".log.jsonl")
    state = {"step": 0, "elapsed_s": 0.0, "epoch": 0, "pos": 0, "best_val_wer": None, "curve": [], "val": [],
             "config": asdict(cfg)}
    if resume and ckpt.with_name(ckpt.name + ".json").is_file():
        state = _load_checkpoint(ckpt, projector, opt)
        log.info("resumed from %s at step %d (%.0f s trained)", ckpt, state["step"], state["elapsed_s"])
    val_idx = list(range(len(val))) if val is not None else []
    random.Random(cfg.seed + 1).shuffle(val_idx)
    val_idx = sorted(val_idx[:cfg.val_n])

    def order(epoch: int) -> list[int]:
        perm = list(range(len(train)))
        random.Random(cfg.seed * 1000003 + epoch).shuffle(perm)
        return perm

    perm = order(state["epoch"])
    budget = cfg.minutes * 60
    t_last = time.perf_counter()
    last_ckpt = last_val = state["elapsed_s"]
    bar = tqdm(total=int(budget), initial=int(state["elapsed_s"]), unit="s", disable=not progress,
               desc="training projector", mininterval=5)
    ema = None

    def validate() -> None:
        nonlocal last_val
        if val is None:
            return
        t0 = time.perf_counter()
        v_wer, pairs = evaluate(aligned, val, val_idx)
        state["val"].append({"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
                             "val_wer": v_wer, "eval_s": round(time.perf_counter() - t0, 1),
                             "examples": pairs[:3]})
        with log_file.open("a") as f:
            f.write(json.dumps({"val": state["val"][-1]}) + "\n")
        log.info("step %d: val WER %.3f", state["step"], v_wer)
        if state["best_val_wer"] is None or v_wer <= state["best_val_wer"]:
            state["best_val_wer"] = v_wer
            state["best_step"] = state["step"]
            save_projector(projector, out, {"step": state["step"], "train_s": round(state["elapsed_s"]),
                                            "val_wer": f"{v_wer:.4f}", **(extra_meta or {})},
                           dtype=getattr(torch, cfg.save_dtype))
        last_val = state["elapsed_s"]

    while state["step"] < cfg.max_steps and state["elapsed_s"] < budget:
        if state["pos"] + cfg.batch > len(perm):
            state["epoch"] += 1
            state["pos"] = 0
            perm = order(state["epoch"])
        idx = perm[state["pos"]:state["pos"] + cfg.batch]
        state["pos"] += cfg.batch
        feats, lengths = train.collate(idx)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(cfg, state["step"], state["elapsed_s"])
        t0 = time.perf_counter()
        heard = [train.transcripts[i] for i in idx] if train.transcripts is not None else None
        loss = aligned.loss(feats, lengths, [targets[i] for i in idx], heard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.grad_clip)
        opt.step()
        now = time.perf_counter()
        step_s = now - t0
        state["elapsed_s"] += now - t_last
        t_last = now
        state["step"] += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.update(int(state["elapsed_s"]) - bar.n)
        bar.set_postfix(loss=f"{ema:.3f}", step=state["step"], step_s=f"{step_s:.2f}")
        if state["step"] % 10 == 0 or state["step"] == 1:
            point = {"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1), "loss": round(loss.item(), 4),
                     "loss_ema": round(ema, 4), "step_s": round(step_s, 3)}
            state["curve"].append(point)
            with log_file.open("a") as f:
                f.write(json.dumps(point) + "\n")
        if state["elapsed_s"] - last_val >= cfg.val_every_s:
            validate()
            t_last = time.perf_counter()  # validation time is not training time
        if state["elapsed_s"] - last_ckpt >= cfg.ckpt_every_s:
            _save_checkpoint(ckpt, projector, opt, state)
            last_ckpt = state["elapsed_s"]
            t_last = time.perf_counter()
    bar.close()
    if not state["val"] or state["val"][-1]["step"] != state["step"]:
        validate()
    _save_checkpoint(ckpt, projector, opt, state)
    if val is None:
        save_projector(projector, out, {"step": state["step"], "train_s": round(state["elapsed_s"]),
                                        **(extra_meta or {})}, dtype=getattr(torch, cfg.save_dtype))
    return state
