"""Exit-head training (feature cache, CTC steps, checkpoint resume) and the encoder benchmark's
JSON, on a tiny corpus of a few espeak-ng clips."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tinyalign_ros.bench import encoder as bench
from tinyalign_ros.core.corpus import MANIFEST_COLUMNS, Voice, synthesize
from tinyalign_ros.core.early_exit import ExitHeads, load_heads
from tinyalign_ros.train import exits

SENTENCES = {"train": ["turn left", "go to the kitchen", "stop now", "bring me water"],
             "val": ["turn right"], "test": ["open the door", "what time is it"]}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """A hand-split corpus with manifest.csv like `tinyalign synth` writes (7 espeak-ng clips)."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    voice = Voice("t-espeak", "espeak", "en-us")
    rows = []
    for split, texts in SENTENCES.items():
        for i, text in enumerate(texts):
            rel = f"audio/{split}{i}.flac"
            audio = synthesize(text, voice)
            (root / "audio").mkdir(exist_ok=True)
            sf.write(root / rel, audio, 16000, subtype="PCM_16")
            rows.append({"path": rel, "text": text, "intent": "", "speaker": voice.name, "voice": voice.model,
                         "engine": "espeak", "atypical": 0, "split": split,
                         "duration_s": f"{len(audio) / 16000:.3f}"})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def features(tiny_corpus, tmp_path_factory) -> dict[str, exits.FeatureSet]:
    cache = tmp_path_factory.mktemp("cache")
    rows = exits.read_manifest(tiny_corpus)
    return {s: exits.cache_features(tiny_corpus, [r for r in rows if r["split"] == s], s, cache, progress=False)
            for s in SENTENCES}


def small_config(**overrides) -> exits.TrainConfig:
    base = dict(steps=6, batch_size=4, lr=3e-3, warmup=1, eval_every=3, patience=100, seed=0,
                layers=(1, 2, 4), hidden=16, kernel=3, feature_dropout=0.1)
    return exits.TrainConfig(**{**base, **overrides})


def test_cache_holds_every_layer_and_is_reused(tiny_corpus, features, tmp_path):
    train = features["train"]
    assert len(train) == 4 and train.hidden.dtype == np.float16
    assert train.hidden.shape[1:] == (4, 384)  # tiny.en: 4 layers of 384
    assert train.offsets[-1] == len(train.hidden)
    rows = [r for r in exits.read_manifest(tiny_corpus) if r["split"] == "val"]
    first = exits.cache_features(tiny_corpus, rows, "val", tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    again = exits.cache_features(tiny_corpus, rows, "val", tmp_path, encoder=object(), progress=False)  # no encoder run
    assert sorted(p.name for p in tmp_path.iterdir()) == files and not any(".tmp" in f for f in files)
    np.testing.assert_array_equal(first.hidden, again.hidden)


def test_training_steps_lower_the_ctc_loss(features):
    config = small_config(steps=40, batch_size=4, lr=1e-2, feature_dropout=0.0)
    torch.manual_seed(0)
    fresh = ExitHeads(config.layers, 384, hidden=config.hidden, kernel=config.kernel)
    batch = exits._batch(features["train"], range(4), fresh.vocab)
    before = exits.exit_losses(fresh, *batch).mean().item()
    heads, state = exits.train(features["train"], features["train"], config, ckpt=None, progress=False,
                               log=lambda m: None)
    with torch.no_grad():
        after = exits.exit_losses(heads, *batch).mean().item()
    assert state["step"] == 40
    assert after < 0.7 * before, (before, after)


def test_checkpoint_resume_continues_from_saved_step(features, tmp_path):
    messages: list[str] = []
    config = small_config()
    straight, _ = exits.train(features["train"], features["val"], config, tmp_path / "a.ckpt", progress=False,
                              log=lambda m: None)
    _, state = exits.train(features["train"], features["val"], config, tmp_path / "b.ckpt", progress=False,
                           log=messages.append, stop_after=3)
    assert state["step"] == 3 and (tmp_path / "b.ckpt").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    resumed, state = exits.train(features["train"], features["val"], config, tmp_path / "b.ckpt", progress=False,
                                 log=messages.append)
    assert any(m.startswith("resumed from") and m.endswith("at step 3") for m in messages)
    assert state["step"] == 6 and [h["step"] for h in state["history"]] == [3, 6]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # same batches, same optimizer state: same heads


def test_checkpoint_for_other_heads_is_refused(features, tmp_path):
    exits.train(features["train"], features["val"], small_config(steps=3), tmp_path / "c.ckpt", progress=False,
                log=lambda m: None)
    with pytest.raises(ValueError, match="other heads"):
        exits.train(features["train"], features["val"], small_config(steps=3, hidden=8), tmp_path / "c.ckpt",
                    progress=False, log=lambda m: None)


def test_main_writes_heads_and_card(tiny_corpus, tmp_path):
    out = tmp_path / "heads.safetensors"
    assert exits.main(["--corpus", str(tiny_corpus), "--out", str(out), "--steps", "4", "--eval-every", "2",
                       "--batch-size", "4", "--hidden", "8", "--cache", str(tmp_path / "cache"),
                       "--ckpt", str(tmp_path / "x.ckpt"), "--quiet"]) == 0
    heads = load_heads(out)
    assert heads.layers == (1, 2, 3, 4) and heads.hidden == 8 and heads.kernel == 3
    card = out.with_suffix(".md").read_text()
    assert "WER per exit" in card and "tinyalign train exits" in card


def test_bench_json_has_the_required_keys(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    heads = ExitHeads((1, 2, 3, 4), 384, hidden=8, kernel=3)
    path = bench.run(tmp_path / "out", tiny_corpus, heads=heads, whisper=True, real_limit=1,
                     thresholds=(0.5, 0.9))
    record = json.loads(path.read_text())
    for key in ("command", "git_commit", "machine", "date", "exits", "policy", "policy_sweep", "whisper"):
        assert key in record
    assert [e["layer"] for e in record["exits"]] == [1, 2, 3, 4]
    for e in record["exits"]:
        assert {"layer", "wer_synth", "wer_real", "rtf", "relative_compute"} <= set(e)
        assert e["rtf"] > 0 and 0 < e["relative_compute"] <= 1
    assert record["exits"][-1]["relative_compute"] == 1.0
    assert [e["relative_compute"] for e in record["exits"]] == sorted(e["relative_compute"] for e in record["exits"])
    assert {"name", "compute_saved", "wer_synth", "wer_real"} <= set(record["policy"])
    assert len(record["policy_sweep"]) == 1
    assert record["data"]["n_synth"] == 2 and record["data"]["n_real"] == 1
    assert "wer_synth" in record["whisper"] and "wer_real" in record["whisper"]
    assert (tmp_path / "out" / "encoder.png").stat().st_size > 1000


def test_policy_replay_matches_the_exit_rule():
    run = bench.ClipRun(["a", "b", "c"], [0.3, 0.8, 0.5], [1.0, 1.0, 1.0, 1.0], [0.1] * 3, [1.0] * 4, 0.5, 0.0, 1.0)
    assert bench.policy_exit(run, 0.7) == 1
    assert bench.policy_exit(run, 0.9) == 2  # nobody confident: the deepest head
    heads = ExitHeads((1, 2, 3), 8)
    assert bench.exit_cost(run, heads, 1, [0, 1]) == (3.0 + 2 * 0.5, 3.0 + 0.2)


def test_threshold_is_chosen_on_calibration_speakers_when_the_corpus_has_them():
    """Two heads; at 0.6 the val clip exits early at no loss, the calibration clip loses words:
    the policy must follow the calibration split (then the val split, then test)."""
    heads = ExitHeads((1, 2), 8)

    def clip(early: str, confidence: float) -> bench.ClipRun:
        return bench.ClipRun([early, "turn left"], [confidence, 0.9], [1.0] * 3, [0.1] * 2, [1.0] * 3, 0.5, 0.0, 1.0)

    texts = {"test": "turn left", "val": "turn left", "calibration": "turn left"}
    runs = {"test": [clip("turn left", 0.7)], "val": [clip("turn left", 0.7)], "calibration": [clip("turn", 0.7)]}
    clips = {name: [bench.Clip(name, text, np.zeros(16000, np.float32))] for name, text in texts.items()}
    chosen = bench.summarize(heads, runs, clips, thresholds=(0.6, 0.95))["policy"]
    assert (chosen["selected_on"], chosen["threshold"]) == ("cal", 0.95)  # nobody exits early
    assert chosen["compute_saved"] < 0  # both heads consulted
    del runs["calibration"], clips["calibration"]
    chosen = bench.summarize(heads, runs, clips, thresholds=(0.6, 0.95))["policy"]
    assert (chosen["selected_on"], chosen["threshold"]) == ("val", 0.6) and chosen["compute_saved"] > 0
    assert chosen["relative_wer_loss_val"] == 0.0 and chosen["compute_saved_val"] == chosen["compute_saved"]
