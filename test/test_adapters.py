"""Adapter store: atomic versioned safetensors, checksums, rollback, speaker-id validation."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyalign_ros.core.adapters import (
    AdapterStore,
    AdapterStoreError,
    CorruptAdapterError,
    InvalidSpeakerId,
    atomic_write_bytes,
    validate_speaker_id,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def tensors(value: float, n: int = 16) -> dict[str, torch.Tensor]:
    return {"proj.0.weight": torch.full((n, 8), value), "proj.0.bias": torch.full((n,), value),
            "scale": torch.tensor([value], dtype=torch.float16)}


def test_save_load_versions_and_metadata(store):
    a = store.save("alice", tensors(1.0), data_count=12, base_hashes={"encoder": "ab12", "llm": "cd34"},
                   metrics={"wer": 0.31})
    b = store.save("alice", tensors(2.0), data_count=25, metrics={"wer": 0.2})
    assert (a.version, b.version) == (1, 2)
    assert store.list_versions("alice") == [1, 2]
    latest = store.load_latest("alice")
    assert latest.info.version == 2 and latest.info.data_count == 25 and latest.info.metrics == {"wer": 0.2}
    assert torch.equal(latest.tensors["proj.0.weight"], torch.full((16, 8), 2.0))
    assert latest.tensors["scale"].dtype == torch.float16
    old = store.load("alice", 1)
    assert old.info.base_hashes == {"encoder": "ab12", "llm": "cd34"} and old.info.created
    assert store.speakers() == ["alice"]
    assert store.load_latest("bob") is None


def test_files_are_safetensors_not_pickle(store):
    info = store.save("alice", tensors(1.0))
    from safetensors import safe_open

    with safe_open(info.path, framework="pt") as f:
        assert set(f.keys()) == {"proj.0.weight", "proj.0.bias", "scale"}
        assert f.metadata()["format"] == "tinyalign-adapter/1"


@pytest.mark.parametrize("damage", ["flip_tensor_byte", "truncate", "garbage", "empty"])
def test_corrupt_file_refused_and_latest_falls_back(store, caplog, damage):
    store.save("alice", tensors(1.0))
    bad = store.save("alice", tensors(2.0)).path
    data = bytearray(bad.read_bytes())
    if damage == "flip_tensor_byte":
        data[-3] ^= 0xFF  # inside the last tensor's bytes: header parses, checksum must catch it
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptAdapterError, match="v000002"):
        store.load("alice", 2)
    with caplog.at_level(logging.WARNING, logger="tinyalign_ros.core.adapters"):
        latest = store.load_latest("alice")
    assert latest.info.version == 1 and torch.equal(latest.tensors["scale"], torch.tensor([1.0], dtype=torch.float16))
    assert "corrupt" in caplog.text
    # the next save does not reuse the bad file's number
    assert store.save("alice", tensors(3.0)).version == 3


def test_misplaced_file_refused(store):
    good = store.save("alice", tensors(1.0)).path
    target = store.path("bob", 1)
    target.parent.mkdir()
    target.write_bytes(good.read_bytes())  # a valid adapter, but of someone else
    with pytest.raises(CorruptAdapterError, match="misplaced"):
        store.load("bob", 1)


def test_rollback(store):
    for v in (1.0, 2.0, 3.0):
        store.save("alice", tensors(v))
    assert store.rollback("alice") == 2
    assert store.list_versions("alice") == [1, 2]
    assert store.load_latest("alice").info.version == 2
    assert store.save("alice", tensors(4.0)).version == 4  # a retired number is never reused
    assert store.rollback("alice") == 2 and store.rollback("alice") == 1 and store.rollback("alice") is None
    assert store.load_latest("alice") is None
    with pytest.raises(AdapterStoreError, match="no adapter to roll back"):
        store.rollback("alice")


def test_delete_speaker(store):
    store.save("alice", tensors(1.0))
    store.save("bob", tensors(1.0))
    assert store.delete_speaker("alice") is True
    assert not (store.root / "alice").exists()
    assert store.load_latest("alice") is None and store.list_versions("alice") == []
    assert store.speakers() == ["bob"]
    assert store.delete_speaker("alice") is False


BAD_IDS = ["", ".", "..", "../etc", "a/b", "/abs", "alice/../../x", "Alice", "-lead", "_lead", "a b",
           "a.b", "a\\b", "alice\n", "a\x00b", "ａｌｉｃｅ", "alic\u0435", "a\u200bb", "a" * 65, "\u2215etc"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_speaker_ids_refused(store, tmp_path, bad):
    with pytest.raises(InvalidSpeakerId, match="invalid speaker id"):
        store.save(bad, tensors(1.0))
    for call in (store.load_latest, store.list_versions, store.rollback, store.delete_speaker):
        with pytest.raises(InvalidSpeakerId):
            call(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]  # nothing escaped the store


def test_valid_speaker_ids():
    for good in ("alice", "0", "op-1", "robot_operator_2", "a" * 64):
        assert validate_speaker_id(good) == good
    with pytest.raises(InvalidSpeakerId, match="must be a string"):
        validate_speaker_id(None)


def test_atomic_write_leaves_no_temp(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


_WRITER = """
import sys, torch
from tinyalign_ros.core.adapters import AdapterStore
store = AdapterStore(sys.argv[1])
big = {"w": torch.randn(4096, 1024)}  # 16 MB: each save takes long enough to be killed mid-write
print("ready", flush=True)
while True:
    store.save("alice", big, data_count=1)
"""


def test_kill_9_mid_save_keeps_last_good_adapter(store):
    good = store.save("alice", tensors(7.0), data_count=3, metrics={"wer": 0.1})
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store.root)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        folder = store.root / "alice"
        deadline = time.monotonic() + 15
        # kill while a temp file exists, i.e. in the middle of writing a version
        while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # every visible version loads whole; the pre-existing good one is untouched
    for version in store.list_versions("alice"):
        store.load("alice", version)
    assert store.load("alice", 1).info.metrics == {"wer": 0.1}
    assert torch.equal(store.load("alice", 1).tensors["scale"], tensors(7.0)["scale"])
    latest = store.load_latest("alice")
    assert latest is not None and latest.info.version >= good.version
    # only whole versions are visible; what a killed writer left is a hidden temp file
    assert all(p.name.startswith(".") or p.name.endswith(".safetensors") for p in folder.iterdir())


def test_stale_temp_files_swept_fresh_ones_kept(store):
    store.save("alice", tensors(1.0))
    folder = store.root / "alice"
    stale, fresh = folder / ".v000002.safetensors.dead.tmp", folder / ".v000002.safetensors.live.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert store.list_versions("alice") == [1]  # temp files are never versions
    store.save("alice", tensors(2.0))
    assert not stale.exists() and fresh.exists()  # a live writer's temp file is left alone
    assert store.list_versions("alice") == [1, 2]
