"""WER normalization and benchmark records."""
from __future__ import annotations

import json

import pytest

from tinyalign_ros.core.metrics import normalize_text, wer, write_result


def test_normalization_spells_numbers_and_drops_punctuation():
    assert normalize_text("Move 2 meters, NOW!") == "move two meters now"
    assert normalize_text("It's 25%.") == "its twenty five percent"
    assert normalize_text("  ") == ""


def test_wer_counts_real_errors_only():
    assert wer(["move two meters"], ["Move 2 meters."]) == 0.0
    assert wer(["turn left now"], ["turn right now"]) == pytest.approx(1 / 3)
    assert wer(["a b", "c d"], ["a b", ""]) == pytest.approx(0.5)


def test_wer_refuses_mismatched_or_empty_references():
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        wer([""], ["x"])


def test_result_carries_provenance(tmp_path):
    path = write_result(tmp_path, "encoder", {"exits": [{"layer": 1}]})
    record = json.loads(path.read_text())
    assert {"command", "git_commit", "machine", "date", "exits"} <= set(record)
    assert record["machine"]["cpus"] >= 1


def test_result_stores_paths_that_mean_the_same_on_any_machine(tmp_path, monkeypatch):
    from pathlib import Path

    from tinyalign_ros.core.metrics import REPO, portable_path

    home = tmp_path / "tinyalign_home"
    monkeypatch.setenv("TINYALIGN_HOME", str(home))
    monkeypatch.setattr("sys.argv", ["tinyalign", "bench", "x", f"--corpus={REPO / 'build' / 'corpus'}",
                                     "--out", str(Path.home() / "runs" / "out")])
    path = write_result(tmp_path / "out", "x", {
        "projector": str(REPO / "models" / "projector.safetensors"),
        "nested": [{"adapter": str(home / "adapters" / "alice" / "v000001.safetensors")}],
        "scratch": str(Path.home() / "scratch" / "clips.csv"),
        "real_source": "/usr/share/pocketsphinx/test/data",
        "topic": "/tinyalign/asr_node",
        "text": "kept as it is: /not a path",
        "n": 3,
    })
    record = json.loads(path.read_text())
    assert record["command"] == "tinyalign bench x --corpus=build/corpus --out out"
    assert record["projector"] == "models/projector.safetensors"
    assert record["nested"] == [{"adapter": "$TINYALIGN_HOME/adapters/alice/v000001.safetensors"}]
    assert record["scratch"] == "clips.csv"
    assert record["real_source"] == "/usr/share/pocketsphinx/test/data"
    assert record["topic"] == "/tinyalign/asr_node"
    assert record["text"] == "kept as it is: /not a path" and record["n"] == 3
    assert portable_path(REPO) == "." and portable_path("models/x") == "models/x"
