"""Per-speaker adapter store: versioned safetensors files that a crash can never tear.

Layout under the store root (by default `$TINYALIGN_HOME/adapters`):

    <speaker>/v000001.safetensors   tensors + metadata (format, version, speaker, base model
    <speaker>/v000002.safetensors   hashes, data count, metrics, created time, sha256 of the tensors)

- Safetensors only: loading an adapter never executes code (no pickle).
- Atomic: each version is written to a hidden temp file in the same folder, fsynced, renamed with
  os.replace and the folder fsynced, so after a crash (kill -9, power loss) a version either
  exists whole or not at all. Temp files start with "." and never match the version pattern;
  leftovers of killed writers are swept when the store writes next.
- Checked: the metadata carries a sha256 over the tensors (names, dtypes, shapes, bytes), verified
  on every load; a bad file raises CorruptAdapterError, and `load_latest` falls back to the
  newest good version with a warning, so one bad write never leaves a speaker without an adapter.
- Versions only grow: a rollback renames the newest version to `vNNNNNN.rolled-back.safetensors`
  (kept for inspection, never loaded) so the previous one becomes current, and a number is
  never reused for different weights.
- One writer per store (the personalizer node); any number of readers.
- Speaker ids are validated against a strict pattern before they ever touch a path.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from .files import _fsync_dir, atomic_write_bytes  # noqa: F401 (samples, speaker import them here)
from .models import data_home

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "tinyalign-adapter/1"
SPEAKER_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_VERSION_FILE = re.compile(r"v(\d{6})\.safetensors")
_ROLLED_BACK_FILE = re.compile(r"v(\d{6})\.rolled-back\.safetensors")
TEMP_MAX_AGE_S = 300.0  # a writer's temp file older than this belongs to a killed writer


class InvalidSpeakerId(ValueError):
    """A speaker id that could escape the store or collide with another (the message says why)."""


class AdapterStoreError(RuntimeError):
    """The adapter store cannot do what was asked (nothing stored, unknown version, ...)."""


class CorruptAdapterError(AdapterStoreError):
    """An adapter file exists but is damaged or not an adapter: refused, never half-loaded."""


def validate_speaker_id(speaker: object) -> str:
    """`speaker` if it matches ^[a-z0-9][a-z0-9_-]{0,63}$ (ASCII only), else InvalidSpeakerId.

    This refuses path traversal ("..", "a/b", "/etc"), hidden names, empty ids, upper case (no
    two ids differ only by case on a case-insensitive file system) and any non-ASCII character
    (homoglyphs, full-width slashes, zero-width spaces). `re.fullmatch` with an explicit class
    also refuses a trailing newline, which `$` alone would let through.
    """
    if not isinstance(speaker, str):
        raise InvalidSpeakerId(f"speaker id must be a string, got {type(speaker).__name__}")
    if not speaker.isascii() or SPEAKER_ID.fullmatch(speaker) is None:
        raise InvalidSpeakerId(
            f"invalid speaker id {speaker!r}: use 1-64 characters a-z, 0-9, '_' or '-', "
            "starting with a letter or digit")
    return speaker


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (for the base-model hashes recorded with each adapter)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterInfo:
    speaker: str
    version: int
    path: Path
    created: str
    data_count: int
    base_hashes: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""


@dataclass(frozen=True)
class Adapter:
    tensors: dict[str, torch.Tensor]
    info: AdapterInfo


class AdapterStore:
    """Versioned adapters per speaker under `root` (default `$TINYALIGN_HOME/adapters`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_home() / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- paths

    def _dir(self, speaker: str) -> Path:
        return self.root / validate_speaker_id(speaker)

    def _versions(self, speaker: str) -> list[int]:
        folder = self._dir(speaker)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_FILE.fullmatch(p.name)))

    def path(self, speaker: str, version: int) -> Path:
        return self._dir(speaker) / f"v{version:06d}.safetensors"

    # ---------------------------------------------------------------- write

    def save(self, speaker: str, tensors: Mapping[str, torch.Tensor], *, data_count: int = 0,
             base_hashes: Mapping[str, str] | None = None, metrics: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None) -> AdapterInfo:
        """Store `tensors` as the speaker's next version and return its info."""
        folder = self._dir(speaker)
        if not tensors:
            raise AdapterStoreError("an adapter needs at least one tensor")
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"adapter tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        folder.mkdir(parents=True, exist_ok=True)
        self._sweep_temp(folder)
        used = [int(m.group(1)) for p in folder.iterdir()
                if (m := _VERSION_FILE.fullmatch(p.name) or _ROLLED_BACK_FILE.fullmatch(p.name))]
        version = max(used, default=0) + 1
        clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        info = AdapterInfo(
            speaker=speaker, version=version, path=self.path(speaker, version),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            data_count=int(data_count), base_hashes=dict(base_hashes or {}), metrics=dict(metrics or {}),
            extra=dict(extra or {}), sha256=tensors_sha256(clean))
        metadata = {
            "format": ADAPTER_FORMAT, "speaker": speaker, "version": str(version), "created": info.created,
            "data_count": str(info.data_count), "base_hashes": json.dumps(info.base_hashes),
            "metrics": json.dumps(info.metrics), "extra": json.dumps(info.extra), "sha256": info.sha256,
        }
        try:
            data = save_safetensors(clean, metadata=metadata)
        except (ValueError, TypeError) as exc:  # e.g. tensors sharing memory, bad metadata
            raise AdapterStoreError(f"cannot serialize the adapter of {speaker!r}: {exc}") from exc
        atomic_write_bytes(info.path, data)
        return info

    @staticmethod
    def _sweep_temp(folder: Path) -> None:
        """Remove temp files of writers that were killed mid-save (never visible as versions)."""
        now = time.time()
        for p in folder.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > TEMP_MAX_AGE_S:
                    p.unlink()
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- read

    def load(self, speaker: str, version: int) -> Adapter:
        """One version, verified; CorruptAdapterError if it is damaged, AdapterStoreError if absent."""
        path = self.path(speaker, version)
        if not path.is_file():
            raise AdapterStoreError(f"speaker {speaker!r} has no adapter version {version}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CorruptAdapterError(f"adapter {path} is unreadable (corrupt or truncated): {exc}") from exc
        if meta.get("format") != ADAPTER_FORMAT:
            raise CorruptAdapterError(f"adapter {path} has format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
        try:
            info = AdapterInfo(
                speaker=meta["speaker"], version=int(meta["version"]), path=path, created=meta["created"],
                data_count=int(meta["data_count"]), base_hashes=json.loads(meta["base_hashes"]),
                metrics=json.loads(meta["metrics"]), extra=json.loads(meta.get("extra", "{}")),
                sha256=meta["sha256"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptAdapterError(f"adapter {path} has unusable metadata: {exc}") from exc
        if info.speaker != speaker or info.version != version:
            raise CorruptAdapterError(f"adapter {path} says it is {info.speaker!r} v{info.version}: "
                                      "a misplaced file")
        actual = tensors_sha256(tensors)
        if actual != info.sha256:
            raise CorruptAdapterError(f"adapter {path} fails its checksum (sha256 {actual[:12]}..., "
                                      f"recorded {info.sha256[:12]}...): the file is corrupt")
        return Adapter(tensors, info)

    def load_latest(self, speaker: str) -> Adapter | None:
        """The newest version that verifies, or None if the speaker has no good adapter.

        A corrupt newer version is skipped with a warning (it stays on disk for inspection;
        `rollback` or the next save moves past it).
        """
        for version in reversed(self._versions(speaker)):
            try:
                return self.load(speaker, version)
            except CorruptAdapterError as exc:
                log.warning("skipping corrupt adapter, falling back to an older version: %s", exc)
        return None

    def info(self, speaker: str, version: int) -> AdapterInfo:
        return self.load(speaker, version).info

    def list_versions(self, speaker: str) -> list[int]:
        """Version numbers present on disk for `speaker` (oldest first; not verified)."""
        return self._versions(speaker)

    def speakers(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and SPEAKER_ID.fullmatch(p.name) and self._versions(p.name))

    # ---------------------------------------------------------------- undo

    def rollback(self, speaker: str) -> int | None:
        """Retire the newest version; the previous one becomes current. Returns the now-current
        version (None if nothing is left). Refuses when there is nothing to roll back."""
        versions = self._versions(speaker)
        if not versions:
            raise AdapterStoreError(f"speaker {speaker!r} has no adapter to roll back")
        newest = self.path(speaker, versions[-1])
        os.replace(newest, newest.with_name(f"v{versions[-1]:06d}.rolled-back.safetensors"))
        _fsync_dir(self._dir(speaker))
        return versions[-2] if len(versions) > 1 else None

    def delete_speaker(self, speaker: str) -> bool:
        """Remove every adapter of `speaker`; True if there was anything to remove."""
        folder = self._dir(speaker)
        if not folder.exists():
            return False
        shutil.rmtree(folder)
        _fsync_dir(self.root)
        return True
