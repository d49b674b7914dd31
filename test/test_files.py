"""core.files: the one atomic write and the one checked safetensors read."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as save_safetensors

from tinyalign_ros.core.files import atomic_write_bytes, read_safetensors


class CustomLoadError(Exception):
    pass


def test_read_safetensors_returns_metadata_and_tensors_of_its_format(tmp_path):
    path = tmp_path / "m.safetensors"
    atomic_write_bytes(path, save_safetensors({"w": torch.arange(3.0)}, metadata={"format": "x/1", "k": "v"}))
    metadata, tensors = read_safetensors(path, "x/1", "x", CustomLoadError)
    assert metadata == {"format": "x/1", "k": "v"} and torch.equal(tensors["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_read_safetensors_raises_the_callers_error_saying_what_is_wrong(tmp_path):
    with pytest.raises(CustomLoadError, match="exit-heads file not found"):
        read_safetensors(tmp_path / "missing.safetensors", "x/1", "exit-heads", CustomLoadError)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(CustomLoadError, match="not a valid safetensors file"):
        read_safetensors(junk, "x/1", "projector", CustomLoadError)
    other = tmp_path / "other.safetensors"
    other.write_bytes(save_safetensors({"w": torch.zeros(1)}, metadata={"format": "y/1"}))
    with pytest.raises(CustomLoadError, match=r"is not an exit-heads file \(format 'y/1', expected 'x/1'\)"):
        read_safetensors(other, "x/1", "exit-heads", CustomLoadError)


def test_atomic_write_needs_the_folder_and_leaves_the_old_file_on_failure(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "gone" / "f.bin", b"x")
    assert not (tmp_path / "gone").exists()  # a deleted store is not brought back by a late write
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):  # the write fails half-way: the temp file goes, the old file stays
        atomic_write_bytes(path, "new, but not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
