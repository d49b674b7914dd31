"""The skill probe: which skill a request asks for (or none), read off the frozen LLM's hidden
states by a linear softmax trained on labelled requests.

Why: the 135M LLM's own preference between skills is weak (core/commands.py: 28-42% exact when it
alone chooses), so the parser leaned on cue words, and the cue gate capped recall on requests that
say none ("I want you in the bedroom", "pass me my glasses") while cue words said in another sense
("I can't stop laughing") still needed rules. The LLM's hidden states know more than its next-token
scores show: a probe on them, fit on the dev splits' requests and chatter (text and Whisper tiny's
transcripts of them in 4 voices), named the skill of a split it had not seen far more often than
the cue rules did (numbers in models/skill_probe.md).

Features: the mean over the request's own tokens of the hidden state after `layer` (of the
parser's prompt: system prompt, few-shot turns, then the request, so the probe reads the request
as the parser's LLM pass does; `CommandParser` gets them from the same forward pass that scores
the skill names, at no extra cost). Standardized, then one linear layer to the skills + "none".

Home-made on purpose: a multinomial logistic regression on a few hundred 576-number vectors, fit by
torch's L-BFGS in a second (`fit`); scikit-learn is not installed and would add ~40 MB for this one
fit. `tinyalign train skills` fits and writes the shipped file; a file fit for other skill names or
another LLM is refused (`SkillProbeError`), so a robot whose skills.yaml changed runs without it
(the cue rules alone) until it is retrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import atomic_write_bytes, read_safetensors
from .models import shipped_model

FILE_FORMAT = "tinyalign-skill-probe-1"
DEFAULT_LAYER = 14
DEFAULT_WEIGHT_DECAY = 1e-3


class SkillProbeError(ValueError):
    """The probe file is missing, unreadable, or was fit for other skills or another LLM."""


def llm_fingerprint(model) -> str:
    """Which LLM a probe was fit on: its layer count, width, vocabulary and a hash of the first 256
    rows of its input embeddings (cheap, and differs between checkpoints of one architecture)."""
    import hashlib

    emb = model.get_input_embeddings().weight
    digest = hashlib.sha256(emb[:256].detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]
    cfg = model.config
    return f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-v{emb.shape[0]}-{digest}"


def request_features(hidden_states, layer: int, n_request: int) -> torch.Tensor:
    """Mean hidden state after `layer` over the first `n_request` positions (the request's own
    tokens) of a forward pass's `hidden_states` (a tuple: embeddings, then one per layer)."""
    h = hidden_states[layer][0]
    n = max(1, min(n_request, h.shape[0]))
    return h[:n].float().mean(0)


def probe_path(setting: str) -> str:
    """The skill probe file a `commands.probe_file` parameter or `--probe` option names: "" is the
    shipped models/skill_probe.safetensors, "off" (no probe) and any other path stay as they are."""
    return setting or str(shipped_model("skill_probe.safetensors"))


class SkillProbe:
    def __init__(self, labels: list[str], layer: int, weight: torch.Tensor, bias: torch.Tensor,
                 mean: torch.Tensor, scale: torch.Tensor, llm: str, meta: dict | None = None) -> None:
        if weight.shape != (len(labels), mean.shape[0]) or bias.shape != (len(labels),) or scale.shape != mean.shape:
            raise SkillProbeError(f"skill probe: inconsistent shapes {tuple(weight.shape)}, {tuple(bias.shape)}, "
                                  f"{tuple(mean.shape)}, {tuple(scale.shape)} for {len(labels)} labels")
        self.labels, self.layer, self.llm = list(labels), int(layer), llm
        self.weight, self.bias, self.mean, self.scale = weight.float(), bias.float(), mean.float(), scale.float()
        self.meta = dict(meta or {})

    @classmethod
    def fit(cls, features: torch.Tensor, labels: list[str], names: list[str], layer: int, llm: str,
            weight_decay: float = DEFAULT_WEIGHT_DECAY, max_iter: int = 300, meta: dict | None = None) -> "SkillProbe":
        """Multinomial logistic regression of `labels` (each one of `names`) on `features` [n, d],
        standardized, L2 penalty `weight_decay` on the weights."""
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise SkillProbeError(f"skill probe: labels {unknown} are not among {names}")
        x = features.float()
        mean, scale = x.mean(0), x.std(0) + 1e-4
        x = (x - mean) / scale
        y = torch.tensor([names.index(label) for label in labels])
        weight = torch.zeros(len(names), x.shape[1], requires_grad=True)
        bias = torch.zeros(len(names), requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + weight_decay * (weight ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(names, layer, weight.detach(), bias.detach(), mean, scale, llm, meta)

    def probs(self, features: torch.Tensor) -> dict[str, float]:
        """{label: probability} for one request's features [d]."""
        p = torch.softmax(((features.float() - self.mean) / self.scale) @ self.weight.T + self.bias, -1)
        return dict(zip(self.labels, p.tolist()))

    def check(self, names: list[str], llm: str) -> None:
        """Raise SkillProbeError unless the probe was fit for exactly these skill names and this LLM."""
        if sorted(names) != sorted(self.labels):
            raise SkillProbeError(f"skill probe was fit for skills {sorted(self.labels)}, the skill set has "
                                  f"{sorted(names)}: retrain it (`tinyalign train skills`)")
        if llm != self.llm:
            raise SkillProbeError(f"skill probe was fit on LLM {self.llm!r}, the parser runs {llm!r}: retrain it")

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        meta = {"format": FILE_FORMAT, "labels": json.dumps(self.labels), "layer": str(self.layer), "llm": self.llm,
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in self.meta.items()}}
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "SkillProbe":
        meta, t = read_safetensors(path, FILE_FORMAT, "skill-probe", SkillProbeError)
        try:
            labels, layer, llm = json.loads(meta["labels"]), int(meta["layer"]), meta["llm"]
            rest = {k: v for k, v in meta.items() if k not in ("format", "labels", "layer", "llm")}
            return cls(labels, layer, t["weight"], t["bias"], t["mean"], t["scale"], llm, rest)
        except (KeyError, ValueError) as e:
            raise SkillProbeError(f"{path}: not a complete skill probe ({e})") from e
