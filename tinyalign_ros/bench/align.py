"""`tinyalign bench align`: Tiny-Align's training-efficiency claim, measured side by side.

    tinyalign bench align --corpus build/corpus --out bench/results --minutes 4

Three ways to align speech into the LLM, on the same data order, batch, prompt and target:
- `projector` (ours, Tiny-Align): only the projector trains; encoder features are cached; LLM frozen;
- `lora`: LoRA (peft, rank 8 on every linear layer of the LLM) + the projector; features cached;
- `e2e` (the conventional alignment): encoder, projector and LLM all train, so the encoder runs
  on the log-mel of every clip at every step;
- `ctc` (ours, less LLM backward): like `projector`, but the first `--ctc-fraction` of the budget
  trains with `core.align.EmbeddingCTC` (CTC against the frozen LLM's input-embedding table, no
  LLM pass at all), the rest with the LLM loss; its time counts in full.
Each mode runs in its own process, one after the other (two torch processes on two cores slow
each other several times), for the same wall-clock budget, from the same random projector.
Validation is the teacher-forced loss on fixed validation clips, measured every --val-every-s and
not counted as training time. The common target is the best validation loss that the *worst*
mode reached; each mode's time to target is the training time at which it first got there.
Quality (WER of the aligned path vs the cascade, with and without instruction injection, on
synthetic and real speech) comes from the shipped projector's metrics file
(`tinyalign train align --eval-only` writes it) and is copied into the result as `quality`/`real`.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinyalign_ros.core.metrics import write_result

MODES = ("projector", "lora", "e2e", "ctc")
# the result's names for them (docs/design.md section 6 fixes `projector`, `lora`, `end_to_end`)
RESULT_NAMES = {"projector": "projector", "lora": "lora", "e2e": "end_to_end", "ctc": "projector_ctc"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tinyalign bench align", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"), help="folder with manifest.csv")
    ap.add_argument("--out", type=Path, required=True, help="folder for align.json and align.png")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per mode")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    ap.add_argument("--llm-lr", type=float, default=5e-5, help="learning rate of LLM/encoder/LoRA weights")
    ap.add_argument("--ctc-fraction", type=float, default=0.5,
                    help="ctc mode: share of the budget spent on the embedding-CTC phase")
    ap.add_argument("--val-n", type=int, default=16, help="validation clips")
    ap.add_argument("--val-every-s", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", type=Path, default=None,
                    help="quality figures to include (default: the shipped projector's metrics.json)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Mode:
    """One alignment setup: which weights train and where each batch's features come from."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        from tinyalign_ros.core.align import AlignedLLM, AlignPrompt, load_corpus_features
        from tinyalign_ros.core.encoder import load_whisper_encoder
        from tinyalign_ros.core.llm import ChatLLM
        from tinyalign_ros.core.models import resolve_llm
        from tinyalign_ros.core.projector import build_projector

        self.name, self.corpus = name, args.corpus
        self.encoder = load_whisper_encoder()
        self.layer = self.encoder.n_layers
        data = load_corpus_features(args.corpus, args.corpus / "features", self.encoder, self.layer, ("train", "val"))
        self.train, self.val = data["train"], data["val"]
        chat = ChatLLM(resolve_llm(""), threads=args.threads)
        torch.manual_seed(args.seed)
        projector = build_projector("mlp", in_dim=self.encoder.d_model, out_dim=chat.model.config.hidden_size,
                                    stack=4, hidden=1024, encoder_layer=self.layer)
        self.aligned = AlignedLLM.from_chat(chat, projector, AlignPrompt())
        model = chat.model
        groups = [{"params": list(projector.parameters()), "lr": args.lr}]
        self.ctc = None
        if name == "ctc":
            from tinyalign_ros.core.align import EmbeddingCTC

            # docs/design.md §4 suspects denormals slowed this softmax backward over time
            torch.set_flush_denormal(True)
            vocab = {i for text in self.train.texts for i in self.aligned.target_ids(text)[:-1]}
            self.ctc = EmbeddingCTC(model.get_input_embeddings().weight, vocab)
            groups.append({"params": list(self.ctc.parameters()), "lr": args.lr})
        if name == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            # injected in place (no PeftModel wrapper), so AlignedLLM keeps calling the same model
            inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS), model)
            lora = [p for n, p in model.named_parameters() if "lora_" in n]
            for p in lora:
                p.requires_grad_(True)
            groups.append({"params": lora, "lr": args.llm_lr * 20})  # LoRA's usual higher rate
        elif name == "e2e":
            model.requires_grad_(True)
            self.encoder.requires_grad_(True).train()
            groups.append({"params": list(model.parameters()) + list(self.encoder.parameters()), "lr": args.llm_lr})
        self.params = [p for g in groups for p in g["params"]]
        self.trainable = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(groups, weight_decay=0.01)

    def features(self, split, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached features, or (e2e) the encoder run now on each clip's log-mel, with gradients."""
        if self.name != "e2e":
            return split.collate(idx)
        from tinyalign_ros.core.align import encode_samples
        from tinyalign_ros.core.audio import load_audio

        feats = [encode_samples(self.encoder, load_audio(self.corpus / split.rows[i]["path"]), self.layer,
                                grad=torch.is_grad_enabled())
                 for i in idx]
        return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor([f.shape[0] for f in feats])

    def loss(self, split, idx: list[int], ctc_phase: bool = False) -> torch.Tensor:
        feats, lengths = self.features(split, idx)
        targets = [self.aligned.target_ids(split.texts[i]) for i in idx]
        if ctc_phase:
            tokens, n_tokens = self.aligned.projector(feats, lengths)
            return self.ctc(tokens, n_tokens, [t[:-1] for t in targets])  # the words, not <|im_end|>
        return self.aligned.loss(feats, lengths, targets)

    def val_loss(self, idx: list[int], batch: int) -> float:
        with torch.no_grad():
            losses = [self.loss(self.val, idx[s:s + batch]).item() for s in range(0, len(idx), batch)]
        return sum(losses) / len(losses)


def run_mode(name: str, args: argparse.Namespace) -> dict:
    """Train one mode for the budget; the curve of validation loss against training time."""
    torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    mode = Mode(name, args)
    setup_s = time.perf_counter() - t_setup
    order = list(range(len(mode.train)))
    random.Random(args.seed).shuffle(order)
    val_idx = sorted(random.Random(args.seed + 1).sample(range(len(mode.val)), min(args.val_n, len(mode.val))))
    curve = [{"train_s": 0.0, "step": 0, "val_loss": mode.val_loss(val_idx, args.batch)}]
    trained = last_val = 0.0
    step_times: list[float] = []  # LLM-loss steps (all of them but the ctc mode's first phase)
    ctc_times: list[float] = []
    step = pos = 0
    logging.info("%s: %.1fM trainable parameters, val loss %.3f", name, mode.trainable / 1e6, curve[0]["val_loss"])
    while trained < args.minutes * 60:
        if pos + args.batch > len(order):
            pos = 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        t0 = time.perf_counter()
        ctc_phase = mode.ctc is not None and trained < args.ctc_fraction * args.minutes * 60
        loss = mode.loss(mode.train, idx, ctc_phase)
        mode.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mode.params, 1.0)
        mode.opt.step()
        dt = time.perf_counter() - t0
        (ctc_times if ctc_phase else step_times).append(dt)
        trained += dt
        step += 1
        if trained - last_val >= args.val_every_s:
            curve.append({"train_s": round(trained, 1), "step": step, "val_loss": mode.val_loss(val_idx, args.batch),
                          "train_loss": round(loss.item(), 4)})
            logging.info("%s step %d (%.0f s): val loss %.3f", name, step, trained, curve[-1]["val_loss"])
            last_val = trained
    curve.append({"train_s": round(trained, 1), "step": step, "val_loss": mode.val_loss(val_idx, args.batch)})
    step_times.sort()
    median = step_times[len(step_times) // 2] if step_times else 0.0
    extra = {}
    if ctc_times:
        ctc_times.sort()
        extra = {"ctc_steps": len(ctc_times), "ctc_median_step_s": ctc_times[len(ctc_times) // 2],
                 "ctc_fraction": args.ctc_fraction}
    return {"mode": name, "trainable_params": mode.trainable, "steps": step, "train_s": trained, **extra,
            "median_step_s": median, "epoch_s": median * len(mode.train) / args.batch,
            "n_train": len(mode.train), "setup_s": setup_s,
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "curve": curve}


def time_to(curve: list[dict], target: float) -> float | None:
    return next((c["train_s"] for c in curve if c["val_loss"] <= target), None)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in result["modes"].items():
        ax.plot([c["train_s"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker="o", ms=3,
                label=f"{name} ({r['trainable_params'] / 1e6:.1f}M trainable)")
    ax.axhline(result["target_val_loss"], color="grey", ls="--", lw=1, label="common target")
    ax.set(xlabel="training time (s, 2 CPU threads)", ylabel="validation loss", title="Alignment: loss vs wall time")
    ax.legend()
    names = list(result["modes"])
    bx.bar(names, [result["modes"][n]["median_step_s"] for n in names], color="tab:blue")
    bx.set(ylabel="median step time (s)", title="Cost per step (bars) and peak memory")
    for i, n in enumerate(names):
        bx.annotate(f"{result['modes'][n]['peak_mem_mb'] / 1024:.1f} GB", (i, result["modes"][n]["median_step_s"]),
                    ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.child:
        args.result.write_text(json.dumps(run_mode(args.child, args)))
        return 0
    from tinyalign_ros.core.models import shipped_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        sys.exit(f"--modes takes a subset of {MODES}, got {args.modes!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in modes:
        child = args.out / f".align-{name}.json"
        cmd = [sys.executable, "-m", "tinyalign_ros.bench.align", *(argv if argv is not None else sys.argv[1:]),
               "--child", name, "--result", str(child)]
        logging.info("mode %s: %s", name, " ".join(cmd[2:]))
        subprocess.run(cmd, check=True)
        results[RESULT_NAMES[name]] = json.loads(child.read_text())
        child.unlink()
    target = max(min(c["val_loss"] for c in r["curve"]) for r in results.values())
    for r in results.values():
        r["time_to_target_s"] = time_to(r["curve"], target)
    result = {"budget_min_per_mode": args.minutes, "batch": args.batch, "target_val_loss": target, "modes": results}
    base = results.get("projector", {}).get("time_to_target_s")
    for name, r in results.items():
        if base and r["time_to_target_s"]:
            r["time_to_target_vs_projector"] = r["time_to_target_s"] / base
    metrics = args.metrics or shipped_model("projector.metrics.json")
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        result["quality"] = {k: m.get(k) for k in ("test_wer", "cascade_test_wer", "instruction_injection", "n_test",
                                                   "intent")}
        result["quality"]["projector"] = str(metrics).replace(".metrics.json", ".safetensors")
        result["quality"]["prompt"] = "hybrid" if (m.get("config") or {}).get("hybrid") else "audio"
        result["real"] = {k: (m.get("real") or {}).get(k) for k in ("aligned_wer", "cascade_wer", "n_words", "n_clips")}
    write_result(args.out, "align", result)
    plot(result, args.out / "align.png")
    print(json.dumps({n: {k: r.get(k) for k in ("median_step_s", "peak_mem_mb", "time_to_target_s", "trainable_params")}
                      for n, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
