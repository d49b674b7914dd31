"""Tiny-Align projectors: Whisper encoder frames → the frozen LLM's input-embedding space.

The encoder emits 50 frames per second (d_model 384 for tiny.en); an LLM token costs the same
whatever it carries, so frames are first *stacked* (k consecutive frames concatenated into one
vector, k=4 → 12.5 tokens per second) or *mean-pooled*, then mapped to the LLM hidden size
(576 for SmolLM2-135M). Three projectors, as compared in Tiny-Align (arXiv 2411.13766):

- `LinearProjector`: one Linear layer;
- `MLPProjector`: Linear → GELU → Linear;
- `BridgeFormer`: an input MLP, a few `nn.TransformerEncoder` layers with **no positional
  encoding** (the encoder frames already carry Whisper's sinusoidal positions; the layers only
  mix context, so they are permutation-equivariant), and an output projection.

A projector file is safetensors with metadata naming what it fits (encoder layer and width,
LLM id and hidden size) and a SHA-256 over its tensors, written atomically; any corrupt,
truncated or mismatched file is refused with `ProjectorLoadError` saying why.

Features that arrive over ROS (Utterance messages from another process) are checked against a
projector's config by `check_features` before any model sees them: nodes stay thin, and the
assistant and the personalizer refuse the same things for the same reasons.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from .encoder import EncoderConfig
from .files import atomic_write_bytes, read_safetensors

PROJECTOR_FORMAT = "tinyalign-projector/1"
KINDS = ("linear", "mlp", "bridgeformer")
POOLING = ("stack", "mean")
# Whisper's encoder has 1500 positions (30 s of audio): longer features cannot come from an utterance,
# and a forged frame count must not reach the LLM (attention memory grows with its square).
MAX_FEATURE_FRAMES = EncoderConfig.n_ctx


class ProjectorLoadError(RuntimeError):
    """A projector file that cannot be used: missing, corrupt, or made for another encoder/LLM."""


class FeatureMismatch(ValueError):
    """Features a projector cannot take (wrong shape, layer or values); the message says why."""


class LayerMismatch(FeatureMismatch):
    """Well-formed features of another encoder layer: asr_node exited early (core.early_exit), a
    normal event, unlike the malformed features FeatureMismatch otherwise means."""


@dataclass(frozen=True)
class ProjectorConfig:
    kind: str = "mlp"
    in_dim: int = 384  # encoder width (Whisper tiny: 384)
    out_dim: int = 576  # LLM hidden size (SmolLM2-135M: 576)
    stack: int = 4  # encoder frames per LLM token
    pooling: str = "stack"  # stack: concatenate k frames; mean: average them
    hidden: int = 1024  # MLP hidden width / BridgeFormer model width
    layers: int = 2  # BridgeFormer transformer layers
    heads: int = 4  # BridgeFormer attention heads
    dropout: float = 0.0
    encoder_layer: int = 4  # the encoder layer whose (ln_post-normalized) output it reads
    llm: str = "SmolLM2-135M-Instruct"  # the LLM it was aligned to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projector kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
        if min(self.in_dim, self.out_dim, self.stack, self.hidden) < 1:
            raise ValueError("projector dimensions and stack must be >= 1")
        if self.kind == "bridgeformer" and (self.layers < 1 or self.hidden % self.heads):
            raise ValueError("a BridgeFormer needs >= 1 layer and hidden divisible by heads")

    @property
    def pooled_dim(self) -> int:
        return self.in_dim * self.stack if self.pooling == "stack" else self.in_dim


def check_features(cfg: ProjectorConfig, values: Sequence[float] | np.ndarray, frames: int, dim: int, layer: int) -> np.ndarray:
    """`values` (row-major frames x dim, as an Utterance carries them) as a float32 (frames, dim) array
    that a projector of config `cfg` can take, else FeatureMismatch saying why.

    The declared shape is checked before the values are touched, so a forged frame count allocates
    nothing; NaN or infinity is refused because it turns every audio embedding into NaN.
    """
    if layer < 0 or frames == 0:
        raise FeatureMismatch("carries no encoder features (is asr_node's encoder enabled?)")
    if dim != cfg.in_dim:
        raise FeatureMismatch(f"has {dim}-dim features, the projector takes {cfg.in_dim}")
    if layer != cfg.encoder_layer:
        raise LayerMismatch(f"has features of encoder layer {layer}, the projector was trained on layer "
                              f"{cfg.encoder_layer} (set asr_node's exit policy so it runs to that layer)")
    if frames > MAX_FEATURE_FRAMES:
        raise FeatureMismatch(f"has {frames} frames, more than the encoder's {MAX_FEATURE_FRAMES} (30 s of audio)")
    if len(values) != frames * dim:
        raise FeatureMismatch(f"has {len(values)} feature values, not {frames} x {dim}")
    features = np.asarray(values, dtype=np.float32).reshape(frames, dim)
    if not np.isfinite(features).all():
        raise FeatureMismatch("has NaN or infinite feature values")
    return features


def pooled_lengths(lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens per utterance after pooling `lengths` frames by k (a partial last group counts)."""
    return torch.div(lengths + k - 1, k, rounding_mode="floor")


def pool_frames(x: torch.Tensor, k: int, mode: str = "stack", lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) frames → (B, ceil(T/k), k·D) stacked or (B, ceil(T/k), D) averaged.

    Frames at or past `lengths` (padding) are zeroed first, so a padded batch pools exactly like
    each utterance alone; a partial last group is zero-filled (stack) or averaged over the frames
    it has (mean).
    """
    if x.dim() != 3:
        raise ValueError(f"pool_frames expects (batch, frames, dim), got shape {tuple(x.shape)}")
    b, t, d = x.shape
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
    valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    x = x * valid[..., None].to(x.dtype)
    pad = (-t) % k
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad))
    groups = x.shape[1] // k
    if mode == "stack":
        return x.reshape(b, groups, k * d)
    if mode == "mean":
        counts = valid.reshape(b, groups, k).sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
        return x.reshape(b, groups, k, d).sum(2) / counts
    raise ValueError(f"pooling must be one of {POOLING}, got {mode!r}")


class LinearProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.pooled_dim, cfg.out_dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.pooled_dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.out_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class BridgeFormer(nn.Module):
    """Input MLP → TransformerEncoder (no positional encoding) → output projection."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(cfg.pooled_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.hidden))
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, dim_feedforward=2 * cfg.hidden, dropout=cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor would change results with padding masks between train and eval
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.out_dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`pad_mask` (B, T') is True at padding tokens, which no real token attends to."""
        h = self.blocks(self.inp(x), src_key_padding_mask=pad_mask)
        return self.out(self.norm(h))


_MODULES = {"linear": LinearProjector, "mlp": MLPProjector, "bridgeformer": BridgeFormer}


class Projector(nn.Module):
    """Pooling + one of the projector bodies; `forward(features, lengths)` → (embeds, token counts)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.body = _MODULES[cfg.kind](cfg)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        if features.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"projector expects {self.cfg.in_dim}-dim features, got {features.shape[-1]}")
        b, t, _ = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        pooled = pool_frames(features, self.cfg.stack, self.cfg.pooling, lengths)
        n_tokens = pooled_lengths(lengths, self.cfg.stack)
        pad_mask = torch.arange(pooled.shape[1], device=features.device)[None, :] >= n_tokens[:, None]
        return self.body(pooled, pad_mask), n_tokens

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_projector(kind: str = "mlp", **kwargs) -> Projector:
    """A freshly initialized projector, e.g. `build_projector("bridgeformer", layers=2)`."""
    return Projector(ProjectorConfig(kind=kind, **kwargs))


# --------------------------------------------------------------------------- files


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_projector(projector: Projector, path: str | Path, extra: dict[str, str] | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write `projector` as safetensors (tmp + fsync + rename). `dtype` float16 halves the file;
    loading always returns float32. `extra` goes into the metadata (e.g. training figures)."""
    path = Path(path)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in projector.state_dict().items()}
    metadata = {
        "format": PROJECTOR_FORMAT,
        "config": json.dumps(asdict(projector.cfg), sort_keys=True),
        "sha256": tensors_sha256(tensors),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))
    return path


def read_projector_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(Path(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ProjectorLoadError(f"{path} is not a readable safetensors file: {exc}") from exc


def _config_of(path: str | Path, metadata: dict[str, str]) -> ProjectorConfig:
    try:
        raw = json.loads(metadata["config"])
        known = {f.name for f in fields(ProjectorConfig)}
        return ProjectorConfig(**{k: v for k, v in raw.items() if k in known})
    except (KeyError, ValueError, TypeError) as exc:
        raise ProjectorLoadError(f"{path} has unusable projector metadata: {exc}") from exc


def read_projector_config(path: str | Path) -> ProjectorConfig:
    """The config of a projector file from its metadata alone (no tensors read): what a node that
    loads the projector later needs now, to refuse features that will not fit it."""
    metadata = read_projector_metadata(path)
    if metadata.get("format") != PROJECTOR_FORMAT:
        raise ProjectorLoadError(
            f"{path} is not a projector file (format {metadata.get('format')!r}, expected {PROJECTOR_FORMAT!r})")
    return _config_of(path, metadata)


def load_projector(path: str | Path, *, in_dim: int | None = None, out_dim: int | None = None,
                   encoder_layer: int | None = None, device: str | torch.device = "cpu") -> Projector:
    """A projector saved by `save_projector`, checked against what the caller will feed it.

    Raises ProjectorLoadError when the file is missing, not safetensors, not a projector, its
    tensors do not match its SHA-256 or its config, or it was made for another encoder width,
    encoder layer or LLM hidden size than the ones given.
    """
    metadata, tensors = read_safetensors(path, PROJECTOR_FORMAT, "projector", ProjectorLoadError)
    if tensors_sha256(tensors) != metadata.get("sha256"):
        raise ProjectorLoadError(f"{path} is corrupt: its tensors do not match the SHA-256 in its metadata")
    cfg = _config_of(path, metadata)
    projector = Projector(cfg)
    for what, want, have in (("encoder width", in_dim, cfg.in_dim), ("LLM hidden size", out_dim, cfg.out_dim),
                             ("encoder layer", encoder_layer, cfg.encoder_layer)):
        if want is not None and want != have:
            raise ProjectorLoadError(f"{path} was trained for {what} {have}, but {want} is in use")
    expected = projector.state_dict()
    if sorted(tensors) != sorted(expected):
        raise ProjectorLoadError(f"{path}: tensors {sorted(set(tensors) ^ set(expected))} do not match a "
                                 f"{cfg.kind} projector")
    for name, param in expected.items():
        if tensors[name].shape != param.shape:
            raise ProjectorLoadError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, "
                                     f"expected {list(param.shape)}")
    projector.load_state_dict({k: v.float() for k, v in tensors.items()})
    return projector.to(device).eval()
