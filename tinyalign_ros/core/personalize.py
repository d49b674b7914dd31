"""On-idle personalization: train one speaker's adapter from that speaker's samples.

`Personalizer.run(speaker)` does one round:

1. split the speaker's consented samples (`SampleStore.split`: stable per sample, so a held-out
   sample never trains in a later round);
2. start from the speaker's current adapter when it is of the same kind and made for the same
   base projector, else from the base projector;
3. measure the validation WER of what the assistant uses *now* (current adapter or base) with
   greedy decoding, train for a step/time budget, measure the candidate's validation WER;
4. **gate**: a candidate is saved as the speaker's next adapter version only when its validation
   WER is strictly lower *and* a paired bootstrap over the held-out utterances (`paired_improvement`)
   finds it better in at least `gate_confidence` of the resamples (metadata: base sha256, sample
   counts, WER before/after, that probability); otherwise the current adapter stays and nothing is
   announced. A lower WER on five or ten utterances is often luck: in `bench personalize` two
   adapters that lowered the validation WER of a mild voice raised its test WER.

Adapter kinds, measured side by side by `tinyalign bench personalize`. Inside Whisper, where the
voice is heard (docs/design.md §5):

- `asr` (the default): LoRA in Whisper's top encoder blocks (core/asr_adapt.py), trained with the
  decoder's cross-entropy; asr_node transcribes the speaker with it (`_run_asr`).
- `e2e`: Tiny-Align end to end: the same Whisper LoRA *and* a LoRA on the aligned assistant's
  projector, trained together by the decoder's loss plus the frozen LLM's loss of the label text
  given the projected adapted features; one adapter file holds both ("asr.*", "projector.*"):
  asr_node transcribes with the first half and publishes the adapted features, assistant_node
  reads them through the second. Judged on the aligned assistant's text (`_run_asr`).

On the projector alone (the first kinds; the transcript never changes, so they barely help):

- `full`: every projector weight is fine-tuned; the adapter is a whole projector state dict.
- `lora`: a low-rank delta (LoRA, via peft's `inject_adapter_in_model`, which works on a plain
  `nn.Module`: no PeftModel wrapper, so `projector.cfg` and `forward(features, lengths)` stay as
  they are) on the projector's Linear layers; the adapter holds only the A/B matrices (~1-2% of
  the projector) and is merged into a copy of the base projector for inference, so answering
  costs nothing extra. Linear layers inside `nn.MultiheadAttention` are skipped: attention calls
  their weights functionally, so a LoRA wrapper there would never run.

Preemptible: `stop()` sets a `threading.Event` that is checked at every step *and* inside the
frozen LLM (a forward hook on each decoder layer, plus a gradient hook on its output), so a
round stops within a fraction of a training step (well under a second) even when one step takes
several seconds on a busy CPU. A stopped round writes its checkpoint (trainable tensors + AdamW
moments as safetensors, position and figures as JSON, both atomic) and the next `run` of the same
speaker, kind and starting adapter continues from it; a checkpoint is also written every
`ckpt_every_s` of training, so a killed process loses at most that much work. The data is
re-read from the store at every (re)start: samples that arrived meanwhile join the round.

`start()` runs a round in its own thread with a lowered priority (`os.nice`) and its own thread
budget (`torch.set_num_threads`): on Linux both are per thread (nice values of NPTL threads,
OpenMP's nthreads ICV), so the rest of the process (an assistant answering in the same embedded
graph) keeps its priority and its threads.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from .adapters import Adapter, AdapterInfo, AdapterStore, atomic_write_bytes, validate_speaker_id
from .asr_adapt import (ASR_KIND, ASR_PREFIX, AUDIO_KINDS, E2E_KIND, PROJECTOR_PREFIX, AsrAdaptConfig, AsrBase,
                        asr_tensors, make_optimizer, time_mask, train_step)
from .metrics import wer, word_errors
from .projector import Projector
from .samples import SampleInfo, SampleStore

log = logging.getLogger(__name__)

ADAPTER_KINDS = ("full", "lora", ASR_KIND, E2E_KIND)
CHECKPOINT_FORMAT = "tinyalign-personalize-ckpt/1"


class Preempted(Exception):
    """Raised inside a training round when its stop event is set (caught by `run`)."""


@dataclass(frozen=True)
class PersonalizeConfig:
    kind: str = "lora"
    lr: float = 0.0  # 0 = the kind's default (full: 3e-4, lora: 2e-3, asr: 1e-3)
    batch: int = 4
    max_steps: int = 200
    budget_s: float = 300.0  # training seconds per round (evaluation not counted)
    min_samples: int = 8  # fewer consented samples than this: no round
    held_out_fraction: float = 0.2
    min_held_out: int = 2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ckpt_every_s: float = 30.0  # training seconds between checkpoints (0 = every step)
    threads: int = 1  # torch threads of the training thread started by `start` (0 = leave)
    nice: int = 10  # niceness added to the training thread started by `start` (0 = leave)
    seed: int = 0
    max_new_tokens: int = 40  # greedy decoding length for the validation WER
    eval_batch: int = 8
    # kind "asr" (core/asr_adapt.py): LoRA in Whisper's top encoder layers and decoder
    asr_rank: int = 16
    asr_encoder_layers: int = 2
    # LoRA in the decoder too; false (the default): the adapter changes what is heard, not the text prior (a
    # decoder LoRA wrote the enrollment sentences' words into a mild voice's questions, bench personalize)
    asr_decoder: bool = False
    asr_batch: int = 8
    asr_time_mask: float = 0.1
    # kind "asr": the gate judges only with at least this many held-out reference words; fewer (a
    # store of ~10 utterances) cannot tell a better adapter from luck, so nothing is swapped in
    gate_min_words: int = 20
    # every kind: the share of bootstrap resamples of the held-out utterances in which the candidate
    # must make fewer word errors than what the speaker gets now (`paired_improvement`; 0 = a lower
    # validation WER suffices)
    gate_confidence: float = 0.75
    # kind "asr": a fixed short schedule of this many passes over the training samples (at most
    # max_steps): more over-trains a small store (held-out WER up again after ~6 passes)
    asr_epochs: float = 6.0
    # kind "e2e" (Tiny-Align end to end): the LLM's loss through the projector is added to the decoder's with this
    # weight, back-propagated this many utterances at a time (the LLM's activations bound a round's memory)
    e2e_llm_weight: float = 1.0
    e2e_llm_chunk: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.batch < 1 or self.max_steps < 0 or self.lora_rank < 1 or self.min_samples < 2:
            raise ValueError("batch and lora_rank must be >= 1, max_steps >= 0, min_samples >= 2")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")
        if not 0.0 <= self.gate_confidence < 1.0:
            raise ValueError(f"gate_confidence must be in [0, 1), got {self.gate_confidence}")
        if self.e2e_llm_weight < 0 or self.e2e_llm_chunk < 1:
            raise ValueError("e2e_llm_weight must be >= 0 and e2e_llm_chunk >= 1")
        if self.kind in AUDIO_KINDS:
            try:
                self.asr()  # AsrAdaptConfig's own checks, at start-up (a rank, layers and decoder it can train)
            except ValueError as exc:
                raise ValueError(f"train.asr: {exc}") from exc

    @property
    def learning_rate(self) -> float:
        return self.lr or {"full": 3e-4, "lora": 2e-3, ASR_KIND: 1e-3, E2E_KIND: 1e-3}[self.kind]

    def asr(self) -> AsrAdaptConfig:
        return AsrAdaptConfig(rank=self.asr_rank, alpha=2.0 * self.asr_rank, encoder_layers=self.asr_encoder_layers,
                              decoder=self.asr_decoder,
                              lr=self.learning_rate, batch=self.asr_batch, time_mask=self.asr_time_mask,
                              grad_clip=self.grad_clip)


@dataclass(frozen=True)
class Progress:
    speaker: str
    kind: str
    phase: str  # "validating-before", "training", "validating-after"
    step: int
    max_steps: int
    loss: float  # exponential moving average of the training loss (nan before the first step)
    elapsed_s: float  # training seconds so far (this round, resumed parts included)
    eta_s: float  # training seconds left by the step and time budgets


@dataclass
class PersonalizeResult:
    speaker: str
    kind: str
    status: str  # saved | rejected | preempted | too_few_samples | failed
    message: str = ""
    steps: int = 0
    train_s: float = 0.0
    n_train: int = 0
    n_val: int = 0
    val_wer_before: float | None = None
    val_wer_after: float | None = None
    p_better: float | None = None  # the gate's paired-bootstrap probability that the candidate is better
    val_words: int = 0  # reference words of the held-out utterances the gate judged on
    # a finished round's candidate (tensors and the metadata it would be saved with), kept or not: what a
    # benchmark needs to judge the gate's decisions (never stored by the round itself)
    candidate: Adapter | None = None
    resumed_from_step: int = 0
    adapter: AdapterInfo | None = None
    examples: list[tuple[str, str]] = field(default_factory=list)  # (reference, hypothesis) after
    # kind e2e: the held-out transcripts' WER (before, after); the gate judged the aligned assistant's text
    val_transcript_wer: tuple[float, float] | None = None


def paired_improvement(errors_before: Sequence[int], errors_after: Sequence[int], resamples: int = 4000,
                       seed: int = 0) -> float:
    """Share of bootstrap resamples of the held-out utterances in which the candidate makes fewer
    word errors than the current model (paired: both are counted on the same draw).

    With a handful of utterances a lower WER is often one lucky sentence; this asks how often the
    gain survives drawing the utterances again. Ten lines of numpy, seeded, so the same round is
    always judged the same; `scipy.stats.bootstrap` (not installed) computes intervals of a
    statistic, not this probability, and warns on the degenerate draws that small stores give.
    """
    diff = np.asarray(errors_after, dtype=np.int64) - np.asarray(errors_before, dtype=np.int64)
    if diff.size == 0:
        return 0.0
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    return float(np.mean(diff[idx].sum(axis=1) < 0))


# --------------------------------------------------------------------------- adapters <-> projectors


def lora_targets(projector: nn.Module) -> list[str]:
    """Names of the Linear layers a LoRA delta can wrap (not those inside MultiheadAttention)."""
    inside_mha = {f"{name}.{child}" if name else child
                  for name, m in projector.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for child, _ in m.named_modules() if child}
    return [n for n, m in projector.named_modules() if isinstance(m, nn.Linear) and n not in inside_mha]


def _inject_lora(projector: Projector, rank: int, alpha: float) -> Projector:
    """A copy of `projector` with trainable LoRA A/B on its Linear layers (the rest frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(projector)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(projector))
    return inject_adapter_in_model(config, model)  # only lora_* parameters require grad


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _merge_lora(model: nn.Module) -> Projector:
    """Fold every LoRA delta into its base Linear (W + alpha/r * B A) and drop the wrappers."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def _lora_projector(base: Projector, rank: int, alpha: float, tensors: dict[str, torch.Tensor] | None) -> Projector:
    """A copy of `base` with LoRA of this shape, holding `tensors` (None: fresh, a zero delta)."""
    model = _inject_lora(base, rank, alpha)
    if tensors is not None:
        from peft import set_peft_model_state_dict

        missing = set(_lora_state(model)) ^ set(tensors)
        if missing:
            raise ValueError(f"LoRA tensors {sorted(missing)[:3]} do not match the projector")
        set_peft_model_state_dict(model, {k: v.float() for k, v in tensors.items()})
    return model


def projector_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector LoRA tensors of an "e2e" adapter (its "projector.*" ones, prefix dropped)."""
    return {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}


def trainable_module(base: Projector, kind: str, start: Adapter | None = None, rank: int = 8,
                     alpha: float = 16.0) -> nn.Module:
    """What a round trains: a copy of the base projector (full) or LoRA on it, from `start`."""
    if kind == "full":
        module = apply_adapter(base, start) if start is not None else copy.deepcopy(base)
        return module.train().requires_grad_(True)
    module = _inject_lora(base, rank, alpha)
    if start is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, start.tensors)
    return module.train()


def adapter_tensors(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    if kind == "full":
        return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    return _lora_state(module)


def apply_adapter(base: Projector, adapter: Adapter) -> Projector:
    """The projector that answers for the adapter's speaker: `base` is never modified.

    Raises ValueError when the adapter does not fit `base` (other shapes, unknown kind).
    """
    kind = adapter.info.extra.get("kind")
    try:
        if kind == "full":
            model = copy.deepcopy(base)
            model.load_state_dict({k: v.float() for k, v in adapter.tensors.items()})
            return model.eval()
        if kind == "lora":
            model = _lora_projector(base, int(adapter.info.extra["lora_rank"]), float(adapter.info.extra["lora_alpha"]),
                                    adapter.tensors)
            return _merge_lora(model).eval().requires_grad_(False)
        if kind == E2E_KIND:  # its projector half
            model = _lora_projector(base, int(adapter.info.extra["projector_lora_rank"]),
                                    float(adapter.info.extra["projector_lora_alpha"]), projector_tensors(adapter.tensors))
            return _merge_lora(model).eval().requires_grad_(False)
    except (RuntimeError, KeyError) as exc:  # shape mismatch, missing metadata
        raise ValueError(f"adapter {adapter.info.path} does not fit this projector: {exc}") from exc
    raise ValueError(f"adapter {adapter.info.path} has unknown kind {kind!r}")


# --------------------------------------------------------------------------- preemption


class _PreemptionHooks:
    """Check the stop event inside the frozen LLM: after each decoder layer's forward and when the
    gradient reaches each layer's output, so one long step (or one long greedy decode) cannot
    delay a stop by more than a layer's worth of compute."""

    def __init__(self, modules: Sequence[nn.Module], stop: threading.Event) -> None:
        self.modules, self.stop = modules, stop
        self.handles: list[Any] = []

    def check(self) -> None:
        if self.stop.is_set():
            raise Preempted()

    def _grad_hook(self, grad: torch.Tensor) -> None:
        self.check()

    def _forward_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.check()
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._grad_hook)

    def __enter__(self) -> "_PreemptionHooks":
        self.handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _llm_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    return list(layers) if layers is not None else [model]


def lower_priority(nice: int, threads: int) -> None:
    """Make the *calling thread* cheaper for everyone else (see the module docstring)."""
    if nice > 0:
        os.nice(nice)
    if threads > 0:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the trainer


@dataclass
class _Data:
    infos: list[SampleInfo]
    features: list[torch.Tensor]
    targets: list[list[int]]

    def transcripts(self, idx: Sequence[int]) -> list[str]:
        return [self.infos[i].asr_transcript for i in idx]


class Personalizer:
    """Trains speakers' adapters with one frozen `AlignedLLM` (its projector is the base).

    One round at a time; `run` is synchronous, `start` runs it in a low-priority thread.
    `aligned` may be a zero-argument loader instead: it is called by the first round, so a node
    that never trains (no consented speaker) never holds a second copy of the LLM. That one-time
    load (~2 s) is the only part of a round that a stop does not interrupt.
    """

    def __init__(self, aligned, samples: SampleStore, adapters: AdapterStore, work_dir: str | Path,
                 base_sha: str, config: PersonalizeConfig | None = None, asr: AsrBase | None = None) -> None:
        self._loader = aligned if callable(aligned) else None
        self._aligned = None if callable(aligned) else aligned
        self._load_lock = threading.Lock()
        self.samples, self.adapters = samples, adapters
        self.work_dir = Path(work_dir)
        self.base_sha = base_sha
        self.config = config or PersonalizeConfig()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.speaker: str | None = None  # speaker of the running round
        self._base: Projector | None = None
        self.asr = asr if asr is not None else AsrBase()  # loads nothing until an "asr" round runs

    @property
    def aligned(self):
        with self._load_lock:
            if self._aligned is None:
                self._aligned = self._loader()
            return self._aligned

    @property
    def base(self) -> Projector:
        """The base projector: what the aligned LLM holds between training steps."""
        if self._base is None:
            self._base = self.aligned.projector
        return self._base

    # ------------------------------------------------------------ control

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, speaker: str, budget_s: float | None = None,
              on_progress: Callable[[Progress], None] | None = None,
              on_done: Callable[[PersonalizeResult], None] | None = None) -> None:
        """Run a round in a new low-priority thread; RuntimeError if one is running already."""
        validate_speaker_id(speaker)
        with self._lock:
            if self.busy:
                raise RuntimeError(f"already training the adapter of {self.speaker!r}")
            self._stop.clear()
            self.speaker = speaker
            self._thread = threading.Thread(target=self._work, args=(speaker, budget_s, on_progress, on_done),
                                            name=f"personalize-{speaker}", daemon=True)
            self._thread.start()

    def _work(self, speaker: str, budget_s: float | None, on_progress, on_done) -> None:
        lower_priority(self.config.nice, self.config.threads)
        try:
            result = self.run(speaker, budget_s, on_progress)
        except Exception as exc:  # reported to the caller, never a dead silent thread
            log.exception("personalizing %s failed", speaker)
            result = PersonalizeResult(speaker, self.config.kind, "failed", repr(exc))
        if on_done is not None:
            on_done(result)

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Ask the running round to stop (it checkpoints); True when no round runs any more."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return not self.busy

    # ------------------------------------------------------------ checkpoints

    def checkpoint_path(self, speaker: str, kind: str | None = None) -> Path:
        return self.work_dir / validate_speaker_id(speaker) / f"{kind or self.config.kind}.ckpt"

    def has_checkpoint(self, speaker: str) -> bool:
        """An interrupted round of this speaker (configured kind) is waiting to be resumed."""
        path = self.checkpoint_path(speaker)
        return path.with_name(path.name + ".json").is_file()

    def discard_checkpoints(self, speaker: str) -> None:
        for kind in ADAPTER_KINDS:
            for suffix in (".json", ".safetensors"):
                p = self.checkpoint_path(speaker, kind)
                p.with_name(p.name + suffix).unlink(missing_ok=True)

    def _save_checkpoint(self, path: Path, module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
        tensors = {f"param.{n}": p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
        state["opt_steps"] = {}
        for p, st in opt.state.items():
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"opt.{names[id(p)]}.{k}"] = st[k].contiguous()
            state["opt_steps"][names[id(p)]] = float(st["step"])
        # Tensors first, then the JSON that names them: a kill between the two leaves the old
        # JSON, whose step is older than the tensors; `run` checks the pair by its "token".
        token = f"{state['step']}-{time.time_ns()}"
        state["token"] = token
        atomic_write_bytes(path.with_name(path.name + ".safetensors"),
                           save_safetensors(tensors, metadata={"format": CHECKPOINT_FORMAT, "token": token}))
        atomic_write_bytes(path.with_name(path.name + ".json"), json.dumps(state, indent=1).encode())

    @staticmethod
    def _load_checkpoint(path: Path, module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> bool:
        try:
            saved = json.loads(path.with_name(path.name + ".json").read_text())
            with safe_open(path.with_name(path.name + ".safetensors"), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError):
            return False
        if meta.get("token") != saved.get("token") or any(saved.get(k) != state[k] for k in ("start", "base_sha", "kind")):
            log.info("checkpoint %s is stale (other start adapter, base or kind): starting over", path)
            return False
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if sorted(f"param.{n}" for n in params) != sorted(k for k in tensors if k.startswith("param.")):
            return False
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
        for n, p in params.items():
            if f"opt.{n}.exp_avg" in tensors:
                opt.state[p] = {"step": torch.tensor(saved["opt_steps"][n]), "exp_avg": tensors[f"opt.{n}.exp_avg"],
                                "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"]}
        state.update(saved)
        return True

    # ------------------------------------------------------------ one round

    def _load(self, speaker: str, infos: list[SampleInfo]) -> _Data:
        feats = [self.samples.load(speaker, i.id).features.float() for i in infos]
        return _Data(infos, feats, [self.aligned.target_ids(i.text) for i in infos])

    def _hybrid(self) -> bool:
        return bool(getattr(getattr(self.aligned, "prompt", None), "transcript", False))

    def evaluate(self, projector: nn.Module, data: _Data) -> tuple[float, list[tuple[str, str]]]:
        """Validation WER of `projector` on `data` with greedy decoding (as align.evaluate)."""
        hyps = self.aligned_texts(projector, data.features, data.transcripts(range(len(data.infos))))
        refs = [i.text for i in data.infos]
        return wer(refs, hyps), list(zip(refs, hyps))

    def aligned_texts(self, projector: nn.Module, features: Sequence[torch.Tensor], heard: Sequence[str]) -> list[str]:
        """What the aligned assistant makes of each utterance's features with `projector` (greedy
        "repeat what was said"; with a hybrid prompt, anchored to `heard`, the transcripts)."""
        was_training = projector.training
        projector.eval()
        self.aligned.projector = projector
        hyps: list[str] = []
        try:
            for s in range(0, len(features), self.config.eval_batch):
                idx = range(s, min(s + self.config.eval_batch, len(features)))
                hyps += self.aligned.transcribe([features[i] for i in idx], self.config.max_new_tokens,
                                                [heard[i] for i in idx] if self._hybrid() else None)
        finally:
            self.aligned.projector = self.base
            projector.train(was_training)
        return hyps

    # ------------------------------------------------------------ what every round shares

    def _begin(self, speaker: str, base_sha: str, current: Adapter | None, module: nn.Module,
               opt: torch.optim.Optimizer, result: PersonalizeResult) -> tuple[dict[str, Any], Path]:
        """A round's state, resumed from its checkpoint when there is a matching one."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "speaker": speaker, "kind": self.config.kind, "base_sha": base_sha,
            "start": f"v{current.info.version}" if current is not None else "base",
            "step": 0, "elapsed_s": 0.0, "epoch": 0, "pos": 0, "loss_ema": None, "val_wer_before": None,
            "val_hyps_before": None,  # the held-out transcripts the speaker gets now (the gate pairs them)
            "val_heard_before": None,  # kind e2e: ...and the transcripts the assistant's text is anchored to
            "val_ids": None,  # ...of these held-out samples (a resumed round whose held-out set grew measures again)
        }
        ckpt = self.checkpoint_path(speaker)
        if self._load_checkpoint(ckpt, module, opt, state):
            log.info("resuming %s adapter of %s at step %d", self.config.kind, speaker, state["step"])
        result.resumed_from_step = state["step"]
        return state, ckpt

    @staticmethod
    def _measure_before(state: dict[str, Any], val_infos: list[SampleInfo]) -> bool:
        """Whether the held-out transcripts of what the speaker gets now must be (re)measured: a new
        round, or a resumed one whose held-out set changed (samples arrived or expired meanwhile)."""
        return state.get("val_hyps_before") is None or state.get("val_ids") != [i.id for i in val_infos]

    def _reporter(self, speaker: str, state: dict[str, Any], budget: float,
                  on_progress: Callable[[Progress], None] | None, max_steps: int) -> Callable[[str, float], None]:
        cfg = self.config

        def report(phase: str, step_s: float) -> None:
            if on_progress is None:
                return
            left = max(0.0, budget - state["elapsed_s"])
            if step_s > 0:
                left = min(left, (max_steps - state["step"]) * step_s)
            ema = state["loss_ema"]
            on_progress(Progress(speaker, cfg.kind, phase, state["step"], max_steps,
                                 float("nan") if ema is None else ema, state["elapsed_s"], left))
        return report

    def _train_loop(self, state: dict[str, Any], budget: float, n_train: int, batch: int,
                    step: Callable[[list[int]], float], hooks: "_PreemptionHooks", ckpt: Path, module: nn.Module,
                    opt: torch.optim.Optimizer, report: Callable[[str, float], None], max_steps: int) -> None:
        """Steps over seeded per-epoch permutations of the training samples until the step or time
        budget is spent; the position, loss EMA and checkpoints live in `state` (so a resumed round
        continues where it stopped)."""
        cfg = self.config

        def order(epoch: int) -> list[int]:
            perm = list(range(n_train))
            random.Random(cfg.seed * 1000003 + epoch).shuffle(perm)
            return perm

        perm = order(state["epoch"])
        last_ckpt = state["elapsed_s"]
        batch = min(batch, n_train)
        while state["step"] < max_steps and state["elapsed_s"] < budget:
            hooks.check()
            if state["pos"] + batch > len(perm):
                state["epoch"], state["pos"] = state["epoch"] + 1, 0
                perm = order(state["epoch"])
            t0 = time.perf_counter()
            value = step(perm[state["pos"]:state["pos"] + batch])
            step_s = time.perf_counter() - t0
            state["pos"] += batch
            state["step"] += 1
            state["elapsed_s"] += step_s
            state["loss_ema"] = value if state["loss_ema"] is None else 0.9 * state["loss_ema"] + 0.1 * value
            report("training", step_s)
            if state["elapsed_s"] - last_ckpt >= cfg.ckpt_every_s:
                self._save_checkpoint(ckpt, module, opt, state)
                last_ckpt = state["elapsed_s"]

    def _preempted(self, result: PersonalizeResult, ckpt: Path, module: nn.Module, opt: torch.optim.Optimizer,
                   state: dict[str, Any]) -> PersonalizeResult:
        opt.zero_grad(set_to_none=True)
        self._save_checkpoint(ckpt, module, opt, state)
        result.status, result.steps, result.train_s = "preempted", state["step"], state["elapsed_s"]
        result.val_wer_before = state["val_wer_before"]
        result.message = f"stopped at step {state['step']}; the next round resumes from the checkpoint"
        return result

    # ------------------------------------------------------------ one round of an ASR adapter

    def _trainable(self, infos: list[SampleInfo]) -> list[SampleInfo]:
        """The samples a round of this kind can use (kinds "asr", "e2e": those that kept their audio)."""
        return [i for i in infos if i.audio_s > 0] if self.config.kind in AUDIO_KINDS else infos

    def trainable_count(self, speaker: str) -> int:
        return len(self._trainable(self.samples.list(speaker)))

    def fits(self, info: AdapterInfo) -> bool:
        """Whether an adapter was made for our bases: Whisper (kinds asr, e2e), the base projector
        (lora, full, e2e)."""
        kind = info.extra.get("kind")
        whisper = kind not in AUDIO_KINDS or info.base_hashes.get("whisper") == self.asr.sha
        projector = kind == ASR_KIND or info.base_hashes.get("projector") == self.base_sha
        return whisper and projector

    def latest_asr_adapter(self, speaker: str) -> Adapter | None:
        """The speaker's newest adapter of the configured audio kind ("asr", else "e2e") made for our
        bases (other kinds are skipped)."""
        kind = self.config.kind if self.config.kind in AUDIO_KINDS else ASR_KIND
        for version in reversed(self.adapters.list_versions(speaker)):
            try:
                info = self.adapters.info(speaker, version)
                if info.extra.get("kind") == kind and self.fits(info):
                    return self.adapters.load(speaker, version)
            except Exception as exc:  # noqa: BLE001 - a bad version is skipped, as load_latest does
                log.warning("skipping adapter v%d of %s: %s", version, speaker, exc)
        return None

    def _run_asr(self, speaker: str, budget_s: float | None,
                 on_progress: Callable[[Progress], None] | None) -> PersonalizeResult:
        """A round of kind "asr" (LoRA in Whisper trained on the speaker's audio) or "e2e".

        The same round as the projector's (split, resume, preemption, checkpoints, gate), with
        what an ASR adapter needs: only samples that carry audio count; the gate compares the
        held-out WER of the transcript the speaker gets now (their current ASR adapter, else the
        faster-whisper cascade) with the candidate's.

        Kind "e2e" is Tiny-Align end to end: the same Whisper LoRA and a LoRA on the base projector
        train together, the decoder's cross-entropy plus `e2e_llm_weight` x the frozen LLM's
        cross-entropy of the label text given the projected *adapted* encoder features (the
        assistant's hybrid prompt, with the transcript asr_node stored with the sample). It is
        judged on what the aligned assistant makes of the held-out utterances (adapted features,
        adapted projector, anchored to the adapted transcript) against what it makes of them now;
        and a candidate whose transcripts got worse is refused even when the aligned text improved
        (cascade mode and the anchor read the transcript).
        """
        cfg, acfg = self.config, self.config.asr()
        e2e = cfg.kind == E2E_KIND
        budget = float(budget_s) if budget_s and budget_s > 0 else cfg.budget_s
        train_infos, val_infos = self.samples.split(speaker, cfg.held_out_fraction, cfg.min_held_out)
        train_infos, val_infos = self._trainable(train_infos), self._trainable(val_infos)
        result = PersonalizeResult(speaker, cfg.kind, "too_few_samples", n_train=len(train_infos), n_val=len(val_infos))
        if len(train_infos) + len(val_infos) < cfg.min_samples or not val_infos or not train_infos:
            result.message = (f"{len(train_infos) + len(val_infos)} samples with audio, at least {cfg.min_samples} "
                              "needed (with one held out)")
            return result
        current = self.latest_asr_adapter(speaker)
        if current is not None:  # continuing an adapter keeps its shape
            acfg = dataclasses.replace(AsrAdaptConfig.from_metadata(current.info.extra), lr=acfg.lr,
                                       batch=acfg.batch, time_mask=acfg.time_mask, grad_clip=acfg.grad_clip)
        model = self.asr.model(acfg, asr_tensors(cfg.kind, current.tensors) if current is not None else None)
        trained: nn.Module = model
        projector: nn.Module | None = None
        if e2e:
            rank, alpha = cfg.lora_rank, cfg.lora_alpha
            if current is not None:
                rank, alpha = int(current.info.extra["projector_lora_rank"]), float(current.info.extra["projector_lora_alpha"])
            projector = _lora_projector(self.base, rank, alpha,
                                        projector_tensors(current.tensors) if current is not None else None).eval()
            trained = nn.ModuleDict({"asr": model, "projector": projector})
        opt = make_optimizer(model, [p for p in projector.parameters() if p.requires_grad] if e2e else ())
        # a checkpoint is stale when a base it was made for changed
        state, ckpt = self._begin(speaker, f"{self.asr.sha}+{self.base_sha}" if e2e else self.asr.sha, current, trained,
                                  opt, result)
        max_steps = min(cfg.max_steps, math.ceil(cfg.asr_epochs * len(train_infos) / min(acfg.batch, len(train_infos))))
        report = self._reporter(speaker, state, budget, on_progress, max_steps)

        def items(infos: list[SampleInfo]) -> list[tuple]:
            return [(s.audio, s.info.text) for s in (self.samples.load(speaker, i.id) for i in infos)]

        frozen = list(model.encoder.blocks) + list(model.decoder.blocks) + (_llm_layers(self.aligned.model) if e2e else [])
        hooks = _PreemptionHooks(frozen, self._stop)
        rng = random.Random(cfg.seed * 1000003 + state["step"])  # the time masks

        def judge(heard: list[str] | None) -> tuple[list[str], list[str]]:
            """(what the speaker gets, transcripts) for the held-out samples with the model as it is;
            `heard`: the transcripts to use instead of the model's (the cascade's, before a first adapter)."""
            if heard is None:
                heard = [model.transcribe_states(val.states[i], val.seconds[i])[0] for i in range(len(refs))]
            if not e2e:
                return heard, heard
            with torch.no_grad():
                feats = [model.features_from(h) for h in val.unpadded]
            return self.aligned_texts(projector, feats, heard), heard

        try:
            with hooks:
                report("preparing", 0.0)
                train_items, val_items = items(train_infos), items(val_infos)
                val = model.prepare(val_items, unpadded=e2e)
                refs = [text for _, text in val_items]
                if self._measure_before(state, val_infos):
                    report("validating-before", 0.0)
                    cascade = None if current is not None else [self.asr.cascade(audio) for audio, _ in val_items]
                    before_hyps, before_heard = judge(cascade)
                    state["val_wer_before"], state["val_hyps_before"] = wer(refs, before_hyps), before_hyps
                    state["val_heard_before"], state["val_ids"] = before_heard, [i.id for i in val_infos]
                    self._save_checkpoint(ckpt, trained, opt, state)
                train = model.prepare(train_items, unpadded=e2e)
                extra = None
                if e2e:
                    targets = [self.aligned.target_ids(text) for _, text in train_items]
                    heard = [i.asr_transcript for i in train_infos]
                    extra = self._llm_loss(model, projector, train, targets, heard, rng)
                self._train_loop(state, budget, len(train_items), acfg.batch,
                                 lambda idx: train_step(model, opt, train, idx, state["step"], rng, extra),
                                 hooks, ckpt, trained, opt, report, max_steps)
                report("validating-after", 0.0)
                hyps, heard_after = judge(None)
                after, examples = wer(refs, hyps), list(zip(refs, hyps))
        except Preempted:
            return self._preempted(result, ckpt, trained, opt, state)
        meta = {**acfg.metadata(), "start": state["start"]}
        tensors = model.adapter_state()
        hashes = {"whisper": self.asr.sha}
        veto = None
        if e2e:
            meta.update(kind=E2E_KIND, projector_lora_rank=rank, projector_lora_alpha=alpha, hybrid=self._hybrid())
            tensors = {**{ASR_PREFIX + k: v for k, v in tensors.items()},
                       **{PROJECTOR_PREFIX + k: v for k, v in _lora_state(projector).items()}}
            hashes["projector"] = self.base_sha
            heard_before, heard_wer = wer(refs, state["val_heard_before"]), wer(refs, heard_after)
            result.val_transcript_wer = (heard_before, heard_wer)
            if heard_wer > heard_before:
                veto = f"its transcripts got worse ({heard_before:.3f} -> {heard_wer:.3f})"
        return self._gate(speaker, result, state, after, examples, tensors, hashes, meta,
                          len(train_infos), len(val_infos), cfg.gate_min_words, veto)

    def _llm_loss(self, model, projector: nn.Module, train, targets: list[list[int]], heard: list[str],
                  rng: random.Random) -> Callable[[Sequence[int]], float]:
        """The end-to-end round's second loss (`train_step`'s `extra`): the frozen LLM's cross-entropy
        of the label text given the projected adapted features of the unpadded utterance (time-masked
        as the decoder's input is), back-propagated `e2e_llm_chunk` utterances at a time into the
        projector's and the encoder's LoRA."""
        cfg = self.config
        hybrid = self._hybrid()

        def loss(idx: Sequence[int]) -> float:
            total = 0.0
            projector.train()
            try:
                for s in range(0, len(idx), cfg.e2e_llm_chunk):
                    chunk = idx[s:s + cfg.e2e_llm_chunk]
                    feats = []
                    for i in chunk:
                        h = train.unpadded[i].float()
                        time_mask(h, h.shape[0], model.cfg.time_mask, rng)
                        feats.append(model.features_from(h))
                    lengths = torch.tensor([f.shape[0] for f in feats])
                    self.aligned.projector = projector
                    try:
                        value = self.aligned.loss(torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths,
                                                  [targets[i] for i in chunk],
                                                  transcripts=[heard[i] for i in chunk] if hybrid else None)
                    finally:
                        self.aligned.projector = self.base
                    scale = cfg.e2e_llm_weight * len(chunk) / len(idx)  # a chunk's share of the batch's mean
                    (value * scale).backward()
                    total += float(value.detach()) * scale
            finally:
                projector.eval()
            return total
        return loss

    def run(self, speaker: str, budget_s: float | None = None,
            on_progress: Callable[[Progress], None] | None = None) -> PersonalizeResult:
        """One round for `speaker` (see the module docstring); never raises Preempted."""
        if self.config.kind in AUDIO_KINDS:
            return self._run_asr(speaker, budget_s, on_progress)
        cfg = self.config
        budget = float(budget_s) if budget_s and budget_s > 0 else cfg.budget_s
        train_infos, val_infos = self.samples.split(speaker, cfg.held_out_fraction, cfg.min_held_out)
        result = PersonalizeResult(speaker, cfg.kind, "too_few_samples", n_train=len(train_infos), n_val=len(val_infos))
        if len(train_infos) + len(val_infos) < cfg.min_samples or not val_infos or not train_infos:
            result.message = (f"{len(train_infos) + len(val_infos)} samples, at least {cfg.min_samples} needed "
                              "(with one held out)")
            return result

        current = self.adapters.load_latest(speaker)
        if current is not None and current.info.base_hashes.get("projector") != self.base_sha:
            log.warning("ignoring adapter v%d of %s: made for another base projector", current.info.version, speaker)
            current = None
        same_kind = current is not None and current.info.extra.get("kind") == cfg.kind
        rank, alpha = cfg.lora_rank, cfg.lora_alpha
        if same_kind and cfg.kind == "lora":  # continuing an adapter keeps its shape
            rank, alpha = int(current.info.extra["lora_rank"]), float(current.info.extra["lora_alpha"])
        module = trainable_module(self.base, cfg.kind, current if same_kind else None, rank, alpha)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        state, ckpt = self._begin(speaker, self.base_sha, current, module, opt, result)
        train, val = self._load(speaker, train_infos), self._load(speaker, val_infos)
        hybrid = self._hybrid()
        report = self._reporter(speaker, state, budget, on_progress, cfg.max_steps)
        hooks = _PreemptionHooks(_llm_layers(self.aligned.model), self._stop)

        def step(idx: list[int]) -> float:
            feats = [train.features[i] for i in idx]
            lengths = torch.tensor([f.shape[0] for f in feats])
            padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
            self.aligned.projector = module
            try:
                loss = self.aligned.loss(padded, lengths, [train.targets[i] for i in idx],
                                         transcripts=train.transcripts(idx) if hybrid else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            finally:
                self.aligned.projector = self.base
            hooks.check()  # a stop that came during this step: do not apply a half-decided update
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            return float(loss.detach())

        try:
            with hooks:
                if self._measure_before(state, val_infos):
                    report("validating-before", 0.0)
                    now = apply_adapter(self.base, current) if current is not None else self.base
                    state["val_wer_before"], pairs = self.evaluate(now, val)
                    state["val_hyps_before"], state["val_ids"] = [hyp for _, hyp in pairs], [i.id for i in val_infos]
                    self._save_checkpoint(ckpt, module, opt, state)
                self._train_loop(state, budget, len(train.infos), cfg.batch, step, hooks, ckpt, module, opt, report,
                                 cfg.max_steps)
                report("validating-after", 0.0)
                after, examples = self.evaluate(module, val)
        except Preempted:
            return self._preempted(result, ckpt, module, opt, state)

        extra: dict[str, Any] = {"kind": cfg.kind, "start": state["start"], "hybrid": hybrid}
        if cfg.kind == "lora":
            extra.update(lora_rank=rank, lora_alpha=alpha)
        return self._gate(speaker, result, state, after, examples, adapter_tensors(module, cfg.kind),
                          {"projector": self.base_sha}, extra, len(train_infos), len(val_infos))

    def _gate(self, speaker: str, result: PersonalizeResult, state: dict, after: float, examples: list,
              tensors: dict[str, torch.Tensor], base_hashes: dict[str, str], extra: dict[str, Any],
              n_train: int, n_val: int, min_words: int = 0, veto: str | None = None) -> PersonalizeResult:
        """Keep the candidate only if it was judged on at least `min_words` held-out words, its held-out
        WER is strictly lower than what is used now, the gain holds in `gate_confidence` of the
        paired bootstrap resamples of the held-out utterances, and nothing `veto`ed it (the reason)."""
        cfg = self.config
        result.steps, result.train_s = state["step"], state["elapsed_s"]
        result.val_wer_before, result.val_wer_after, result.examples = state["val_wer_before"], after, examples
        refs = [ref for ref, _ in examples]
        result.val_words = sum(len(ref.split()) for ref in refs)
        result.p_better = paired_improvement(word_errors(refs, state["val_hyps_before"]),
                                             word_errors(refs, [hyp for _, hyp in examples]), seed=cfg.seed)
        extra = {**extra, "steps": state["step"], "train_s": round(state["elapsed_s"], 1)}
        metrics = {"val_wer_before": state["val_wer_before"], "val_wer_after": after, "p_better": result.p_better,
                   "n_train": n_train, "n_val": n_val}
        result.candidate = Adapter(tensors, AdapterInfo(speaker, 0, Path(), "", n_train, base_hashes, metrics, extra))
        figures = f"validation WER {state['val_wer_before']:.3f} -> {after:.3f} on {len(refs)} utterances"
        if result.val_words < min_words:
            result.status = "rejected"
            result.message = (f"only {result.val_words} held-out words (at least {min_words} needed to judge): "
                              f"{figures} not trusted, nothing swapped")
        elif veto is not None:
            result.status = "rejected"
            result.message = f"{figures}, but {veto}: the current adapter stays"
        elif after < state["val_wer_before"] and result.p_better >= cfg.gate_confidence:
            result.adapter = self.adapters.save(speaker, tensors, data_count=n_train, base_hashes=base_hashes,
                                                metrics=metrics, extra=extra)
            result.status = "saved"
            result.message = f"{figures} (better in {result.p_better:.0%} of resamples): saved v{result.adapter.version}"
        elif after < state["val_wer_before"]:
            result.status = "rejected"
            result.message = (f"{figures}, but better in only {result.p_better:.0%} of resamples of them "
                              f"({cfg.gate_confidence:.0%} needed): could be luck, the current adapter stays")
        else:
            result.status = "rejected"
            result.message = f"{figures}: no improvement, the current adapter stays"
        self.discard_checkpoints(speaker)
        log.info("%s adapter of %s: %s", self.config.kind, speaker, result.message)
        return result

