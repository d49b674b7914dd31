"""Files a crash cannot tear, and safetensors files read with their checks: one way everywhere.

- `atomic_write_bytes`: temp file in the same folder → fsync → os.replace → fsync of the folder.
  Every model, checkpoint, cache, sample, adapter and result we write goes through it, so a
  reader (another node, a resumed run) sees the old file or the new one, never half of one.
- `read_safetensors`: open a safetensors file we wrote, check the `format` in its metadata and
  return (metadata, tensors), or raise the caller's load error saying what is wrong (missing,
  not safetensors, another kind of file). Safetensors only: loading never runs code.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one.

    Temp file in the same folder (same file system, so the rename is atomic) -> fsync -> os.replace
    -> fsync of the folder (so the rename itself survives a power loss). The folder must exist:
    a store that was just deleted (a forgotten speaker) must not come back because a write raced it.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def read_safetensors(path: str | Path, file_format: str, kind: str,
                     error: type[Exception]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata says `format: file_format`.

    `kind` names the file in messages ("exit-heads", "projector"); `error` is the exception the
    caller's users expect (WeightLoadError, ProjectorLoadError): raised when the file is missing,
    unreadable as safetensors, or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise error(f"{path} is not a valid safetensors file: {exc}") from exc
    if metadata.get("format") != file_format:
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise error(f"{path} is not {article} {kind} file (format {metadata.get('format')!r}, "
                    f"expected {file_format!r})")
    return metadata, tensors
