"""Early exits for the Whisper encoder: CTC heads on chosen layers and the policy that picks one.

Why characters, not the Whisper tokenizer: a head is LayerNorm + Linear(d_model, vocabulary)
(or a small conv head, see ExitHeads).
Over Whisper's 51,864 BPE tokens that Linear alone has 20M parameters per exit for tiny
(more than half of the whole model), its 52k-way softmax dominates the head's cost, and our
synthesized corpus of a few thousand sentences would never show most tokens to it. Over 29
characters a head has ~12k parameters, costs nothing next to a transformer block, has no
out-of-vocabulary words, and CTC has room for it: the encoder emits 50 frames per second while
speech carries ~15 characters per second. Text is normalized to lower-case letters, space and
apostrophe; the corpus generator spells out numbers.

The policy has two modes, switchable at run time (a ROS parameter callback assigns its fields):
- "confidence": go layer by layer and exit at the first head confident enough, else at the
  deepest head: easy speech exits early, hard speech pays for depth;
- "budget": exit at the deepest head at or below `max_layer`: a fixed compute cap for a busy CPU.
Either way the blocks after the exit are never computed.
"""
from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import nn

from .encoder import WeightLoadError, WhisperEncoder
from .files import atomic_write_bytes, read_safetensors

BLANK = 0
CHARACTERS: tuple[str, ...] = ("<blank>", " ", "'", *string.ascii_lowercase)
HEADS_FORMAT = "tinyalign-exit-heads/1"


class CharVocab:
    """CTC vocabulary: index 0 is the blank, then one symbol per character."""

    def __init__(self, symbols: Sequence[str] = CHARACTERS) -> None:
        if not symbols or symbols[BLANK] != "<blank>" or len(set(symbols)) != len(symbols):
            raise ValueError("a CTC vocabulary starts with '<blank>' and has no duplicate symbols")
        self.symbols = tuple(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols) if i != BLANK}

    def __len__(self) -> int:
        return len(self.symbols)

    def normalize(self, text: str) -> str:
        """Lower-case, keep only known characters, collapse runs of spaces (the CTC targets)."""
        kept = "".join(c for c in text.lower().replace("\u2019", "'") if c in self._index)
        return " ".join(kept.split())

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in self.normalize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != BLANK)


class ConvHead(nn.Module):
    """LayerNorm -> Conv1d over time (kernel frames) -> GELU -> Linear: a little context per frame.

    A block's single frame at the early layers does not yet say which character it holds; a few
    neighbouring frames (20 ms each) and one non-linearity do, for a fraction of a block's cost.
    """

    def __init__(self, d_model: int, hidden: int, kernel: int, n_symbols: int) -> None:
        super().__init__()
        if hidden < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"a conv head needs hidden >= 1 and an odd kernel, got {hidden}, {kernel}")
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, hidden, kernel, padding=kernel // 2)
        self.out = nn.Linear(hidden, n_symbols)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.norm(hidden).transpose(1, 2)).transpose(1, 2)
        return self.out(F.gelu(x))


class ExitHeads(nn.Module):
    """One light CTC head per exit layer, on the raw block output.

    `hidden=0` (the default): LayerNorm + Linear. `hidden>0`: a `ConvHead` (LayerNorm, Conv1d of
    `kernel` frames to `hidden` channels, GELU, Linear), which the trained heads use because a
    linear read-out of the early layers is too weak (see models/exit_heads.md for the numbers).
    The head has its own LayerNorm because intermediate Whisper layers are not normalized
    (only the last one goes through the encoder's final LayerNorm).
    """

    def __init__(self, layers: Sequence[int], d_model: int, vocab: CharVocab | None = None,
                 hidden: int = 0, kernel: int = 1) -> None:
        super().__init__()
        if not layers or sorted(set(layers)) != list(layers) or layers[0] < 1:
            raise ValueError(f"exit layers must be increasing layer numbers >= 1, got {list(layers)}")
        if hidden == 0 and kernel != 1:
            raise ValueError("a linear head (hidden=0) has kernel 1")
        self.layers = tuple(layers)
        self.d_model = d_model
        self.hidden, self.kernel = int(hidden), int(kernel)
        self.vocab = vocab or CharVocab()
        n = len(self.vocab)
        self.heads = nn.ModuleDict({
            str(layer): (nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n)) if not hidden
                         else ConvHead(d_model, hidden, kernel, n))
            for layer in layers
        })

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """CTC logits (B, T', vocabulary) of the head on `layer`."""
        return self.heads[str(layer)](hidden)

    def macs_per_frame(self) -> int:
        """Multiply-accumulates one head spends per encoder frame (for compute accounting)."""
        n = len(self.vocab)
        if not self.hidden:
            return self.d_model * n
        return self.d_model * self.hidden * self.kernel + self.hidden * n


def pad_frames(clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of frames (T_i, ...) zero-padded into one (B, max T, ...) batch, and their lengths."""
    return torch.nn.utils.rnn.pad_sequence(list(clips), batch_first=True), torch.tensor([len(c) for c in clips])


def ctc_targets(vocab: CharVocab, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The texts as CTC targets: their character ids concatenated (long) and each text's length."""
    targets = [vocab.encode(text) for text in texts]
    return torch.tensor(sum(targets, []), dtype=torch.long), torch.tensor([len(t) for t in targets])


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC loss of (B, T, n_symbols) head logits against `ctc_targets`: mean per target character
    over the batch, blank = BLANK, impossible alignments (a text longer than its clip) count 0."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=BLANK, reduction="mean", zero_infinity=True)


def ctc_confidence(logits: torch.Tensor) -> float:
    """1 - mean normalized entropy over the frames whose best symbol is not blank; 0..1.

    Blank frames are left out because CTC spends most frames on a confident blank, which would
    make any output look confident. No non-blank frame means nothing was recognized: 0, so the
    confidence policy goes deeper rather than exiting with an empty transcript.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    speech = log_p.argmax(-1) != BLANK
    if not speech.any():
        return 0.0
    entropy = -(log_p.exp() * log_p).sum(-1)[speech]
    return float(1.0 - entropy.mean() / math.log(logits.shape[-1]))


def greedy_ctc(logits: torch.Tensor, vocab: CharVocab) -> str:
    """Best path of one utterance's logits (T', vocabulary): merge repeats, then drop blanks.

    Spaces are tidied like the training targets (no leading, trailing or doubled ones).
    """
    best = logits.argmax(-1).tolist()
    text = vocab.decode([s for i, s in enumerate(best) if i == 0 or s != best[i - 1]])
    return " ".join(text.split())


MODES = ("confidence", "budget")
# the shipped heads' threshold, chosen by `tinyalign bench encoder` on the calibration speakers
# (the most encoder compute saved at <= 10 % relative WER loss); other heads need their own
DEFAULT_THRESHOLD = 0.84


@dataclass
class ExitPolicy:
    """How deep to run the encoder; fields can be reassigned while the node runs (validated).

    `threshold` applies in "confidence" mode, `max_layer` (None = no cap) in "budget" mode.
    `full_depth_for_known_speakers`: see `for_utterance`.
    """

    mode: str = "confidence"
    threshold: float = DEFAULT_THRESHOLD
    max_layer: int | None = None
    full_depth_for_known_speakers: bool = True

    def for_utterance(self, known_speaker: bool) -> ExitPolicy:
        """The policy for one utterance. A known speaker's utterance may become a personalization
        sample, and the projector learns from the last layer only: in confidence mode it runs the
        full depth (unless `full_depth_for_known_speakers` is off), so early exits save compute on
        unknown speakers and never cost the personalizer a sample. A budget still caps it: that is
        the operator's explicit limit for a busy robot."""
        if known_speaker and self.full_depth_for_known_speakers and self.mode == "confidence":
            return FULL_DEPTH
        return self

    def __setattr__(self, name: str, value) -> None:
        if name == "mode" and value not in MODES:
            raise ValueError(f"exit policy mode must be one of {MODES}, got {value!r}")
        if name == "threshold" and not 0.0 <= value <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {value}")
        if name == "max_layer" and value is not None and value < 1:
            raise ValueError(f"max_layer must be >= 1 or None, got {value}")
        if name == "full_depth_for_known_speakers" and not isinstance(value, bool):
            raise ValueError(f"full_depth_for_known_speakers must be a bool, got {value!r}")
        super().__setattr__(name, value)


FULL_DEPTH = ExitPolicy(mode="budget", max_layer=None)  # the last exit head, whatever a node's parameters say


@dataclass(frozen=True)
class ExitResult:
    layer: int  # the encoder layer we exited at (1-based)
    features: torch.Tensor  # encoder.ln_post of that layer, (1, T', d): what the projector gets
    logits: torch.Tensor  # that exit head's CTC logits, (1, T', vocabulary)
    confidence: float
    text: str


def encode_with_exit(
    encoder: WhisperEncoder, heads: ExitHeads, policy: ExitPolicy, mel: torch.Tensor
) -> ExitResult:
    """Run `encoder` on one utterance's mel only as deep as `policy` says."""
    if heads.d_model != encoder.d_model:
        raise ValueError(f"exit heads are for d_model={heads.d_model}, the encoder has {encoder.d_model}")
    if heads.layers[-1] > encoder.n_layers:
        raise ValueError(f"exit head on layer {heads.layers[-1]}, the encoder has {encoder.n_layers} layers")
    if mel.dim() == 3 and mel.shape[0] != 1:
        raise ValueError("the exit decision is per utterance: pass one utterance, not a batch")
    # read once: a parameter change made meanwhile applies from the next utterance
    mode, threshold, max_layer = policy.mode, policy.threshold, policy.max_layer
    if mode == "budget":
        allowed = [layer for layer in heads.layers if max_layer is None or layer <= max_layer]
        if not allowed:
            raise ValueError(f"max_layer={max_layer} is below every exit head (layers {list(heads.layers)})")
        candidates = allowed[-1:]
    else:
        candidates = list(heads.layers)
    blocks = encoder.layers(mel)  # lazy: blocks past the exit are never computed
    hidden, depth = next(blocks), 0
    for layer in candidates:
        while depth < layer:
            hidden, depth = next(blocks), depth + 1
        logits = heads(layer, hidden)
        confidence = ctc_confidence(logits)
        if confidence >= threshold:
            break
    text = greedy_ctc(logits[0], heads.vocab)
    return ExitResult(layer, encoder.ln_post(hidden), logits, confidence, text)


def save_heads(heads: ExitHeads, path: str | Path) -> None:
    """Write the heads as safetensors, atomically: a crash mid-write never leaves a torn file."""
    path = Path(path)
    metadata = {
        "format": HEADS_FORMAT,
        "layers": json.dumps(list(heads.layers)),
        "d_model": str(heads.d_model),
        "vocab": json.dumps(list(heads.vocab.symbols)),
        "head": json.dumps({"hidden": heads.hidden, "kernel": heads.kernel}),
    }
    atomic_write_bytes(path, save_safetensors({k: v.contiguous() for k, v in heads.state_dict().items()},
                                              metadata=metadata))


def load_heads(path: str | Path, device: str | torch.device = "cpu") -> ExitHeads:
    """Heads saved by `save_heads`, or WeightLoadError saying what is wrong with the file."""
    metadata, tensors = read_safetensors(path, HEADS_FORMAT, "exit-heads", WeightLoadError)
    try:
        vocab = CharVocab(json.loads(metadata["vocab"]))
        head = json.loads(metadata.get("head", '{"hidden": 0, "kernel": 1}'))  # older files: linear
        heads = ExitHeads(json.loads(metadata["layers"]), int(metadata["d_model"]), vocab,
                          int(head["hidden"]), int(head["kernel"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightLoadError(f"{path} has unusable exit-heads metadata: {exc}") from exc
    expected = heads.state_dict()
    for name, param in expected.items():
        if name not in tensors:
            raise WeightLoadError(f"{path} lacks tensor {name}")
        if tensors[name].shape != param.shape:
            raise WeightLoadError(
                f"{path}: tensor {name} has shape {list(tensors[name].shape)}, expected {list(param.shape)}"
            )
    if extra := sorted(set(tensors) - set(expected)):
        raise WeightLoadError(f"{path} has unexpected tensors {extra}")
    heads.load_state_dict(tensors)
    return heads.to(device).eval()


@dataclass(frozen=True)
class EncodedUtterance:
    """What asr_node publishes from the encoder for one utterance."""

    layer: int  # 1-based encoder layer the features come from
    features: torch.Tensor  # (frames, d_model), final LayerNorm applied, speech frames only
    exit: ExitResult | None  # None when no exit heads are loaded (full depth)


def encode_utterance(
    encoder: WhisperEncoder, heads: ExitHeads | None, policy: ExitPolicy, samples_16k, pad_to_30s: bool = False
) -> EncodedUtterance:
    """Log-mel → encoder (as deep as the policy says, or full depth without heads).

    Padded input is trimmed back to the frames that hold the utterance (one per 20 ms), so a
    message never carries 30 s of features for a 2 s command.
    """
    from .encoder import log_mel, speech_frames

    mel = log_mel(samples_16k, pad_to_30s=pad_to_30s)
    if mel.dim() == 2:
        mel = mel.unsqueeze(0)
    frames = speech_frames(len(samples_16k))
    with torch.inference_mode():
        if heads is None:
            out = encoder(mel)
            return EncodedUtterance(encoder.n_layers, out.output[0, :frames], None)
        result = encode_with_exit(encoder, heads, policy, mel)
    return EncodedUtterance(result.layer, result.features[0, :frames], result)
