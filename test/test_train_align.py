"""`tinyalign train align --hybrid` and `tinyalign bench align` end to end on a 7-clip corpus,
with the real SmolLM2 and Whisper encoder (a few seconds of training each)."""
from __future__ import annotations

import csv
import json

import pytest

from test_train_exits import tiny_corpus  # noqa: F401  (the 7-clip espeak-ng corpus fixture)
from tinyalign_ros.bench import align as bench
from tinyalign_ros.core.align import ASR_FIELDS, read_asr_transcripts, read_manifest
from tinyalign_ros.core.projector import read_projector_metadata
from tinyalign_ros.train import align as train


@pytest.fixture(scope="module")
def corpus_with_asr(tiny_corpus):  # noqa: F811
    """The corpus plus CORPUS/asr.csv for all clips but one (as if transcription was cut short)."""
    rows = read_manifest(tiny_corpus)
    with (tiny_corpus / "asr.csv").open("w", newline="") as f:
        out = csv.DictWriter(f, ASR_FIELDS)
        out.writeheader()
        for r in rows[1:]:
            out.writerow({"path": r["path"], "transcript": r["text"].replace("the", "a"), "confidence": "0.7"})
    return tiny_corpus


def test_hybrid_training_marks_the_projector_and_skips_clips_without_transcript(corpus_with_asr, tmp_path, caplog):
    out = tmp_path / "p.safetensors"
    assert len(read_asr_transcripts(corpus_with_asr / "asr.csv")) == 6
    rc = train.main(["--corpus", str(corpus_with_asr), "--out", str(out), "--cache", str(tmp_path / "cache"),
                     "--hybrid", "--minutes", "0.05", "--batch", "2", "--hidden", "64", "--val-every-s", "1000",
                     "--val-n", "1", "--no-test"])
    assert rc == 0
    meta = read_projector_metadata(out)
    assert meta["prompt"] == "hybrid" and meta["inject"] == "true"
    assert "train: 1 of 4 clips have no ASR transcript" in caplog.text
    log = [json.loads(line) for line in out.with_name("p.log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and log[0]["loss"] > 0
    with pytest.raises(SystemExit, match="trained with the hybrid prompt: evaluate it with --hybrid"):
        train.main(["--corpus", str(corpus_with_asr), "--out", str(out), "--cache", str(tmp_path / "cache"),
                    "--eval-only", "--hidden", "64"])


def test_bench_align_measures_the_modes_side_by_side(tiny_corpus, tmp_path):  # noqa: F811
    rc = bench.main(["--corpus", str(tiny_corpus), "--out", str(tmp_path), "--minutes", "0.03", "--batch", "2",
                     "--val-n", "1", "--val-every-s", "0.5", "--metrics", str(tmp_path / "none.json")])
    assert rc == 0
    result = json.loads((tmp_path / "align.json").read_text())
    modes = result["modes"]
    assert list(modes) == ["projector", "lora", "end_to_end", "projector_ctc"]
    params = [modes[m]["trainable_params"] for m in ("projector", "lora", "end_to_end")]
    assert params[0] < params[1] < params[2]
    assert params[2] > 130e6  # the whole LLM and encoder train end to end
    for r in modes.values():
        assert r["steps"] >= 1 and r["median_step_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["curve"][0]["train_s"] == 0 and r["curve"][-1]["train_s"] > 0
    ctc = modes["projector_ctc"]  # both phases ran: embedding-CTC steps, then LLM-loss steps
    assert ctc["ctc_steps"] >= 1 and ctc["steps"] > ctc["ctc_steps"] and ctc["ctc_median_step_s"] > 0
    assert ctc["trainable_params"] == params[0] + 577 + 1  # the projector + blank logit (576 + bias) + scale
    worst = max(min(c["val_loss"] for c in r["curve"]) for r in modes.values())
    assert result["target_val_loss"] == worst
    assert any(r["time_to_target_s"] is not None for r in modes.values())
    assert (tmp_path / "align.png").stat().st_size > 0


def test_bench_align_refuses_unknown_modes(tmp_path):
    with pytest.raises(SystemExit, match="subset of"):
        bench.main(["--out", str(tmp_path), "--modes", "projector,full"])
