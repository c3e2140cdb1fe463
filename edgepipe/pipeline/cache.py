"""The verified, content-addressed stage cache.

A stage's output lives in ``<root>/stages/<kind>/<key>/`` with ``record.json`` beside its files; the key
hashes everything that went into the stage. An entry is written whole (temporary directory, then
rename) and verified on read: every file's sha256 must match what the record says, so a killed run or a
tampered file is a miss that is recomputed, never a wrong output.

Concurrent writers of one key (two cluster workers, two releases sharing a cache): the first entry
written is kept and :meth:`Cache.put` returns it to the others, so every run that asked for the key uses
the same output (a measurement, say) and a later run that reads the cache agrees with them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file


def cache_dir() -> Path:
    """``$EDGEPIPE_CACHE_DIR``, or ``~/.cache/edgepipe``."""
    return Path(os.environ.get("EDGEPIPE_CACHE_DIR") or Path.home() / ".cache" / "edgepipe")


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: its directory and the record the stage stored."""

    path: Path
    record: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class _Stored(Exception):
    """Another writer stored the key first (carries its entry)."""


class Cache:
    """Directories of stage outputs, keyed by the hash of everything that went into them."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = (root or cache_dir()) / "stages"
        self.enabled = enabled

    def get(self, kind: str, key: str) -> Entry | None:
        """The entry for ``key`` when present and intact; a damaged entry is removed and missed."""
        if not self.enabled:
            return None
        d = self.root / kind / key
        rec_path = d / "record.json"
        if not rec_path.is_file():
            return None
        try:
            rec = json.loads(rec_path.read_text())
            files = rec.get("_files", {})
            if all((d / name).is_file() and sha256_file(d / name) == digest for name, digest in files.items()):
                return Entry(d, {k: v for k, v in rec.items() if k != "_files"})
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)
        return None

    def put(self, kind: str, key: str, files: list[Path], record: dict[str, Any]) -> Entry | None:
        """Store ``files`` (by name) and ``record`` under ``key``; returns the stored entry: this one, or the
        intact entry another writer stored first (whose record and files the caller should use)."""
        if not self.enabled:
            return None
        dest = self.root / kind / key
        try:
            return self._put(dest, kind, key, files, record)
        except _Stored as e:
            return e.args[0]

    def _put(self, dest: Path, kind: str, key: str, files: list[Path], record: dict[str, Any]) -> Entry:
        with atomic_dir(dest) as tmp:  # holds dest's lock: no other writer between the check and the swap
            existing = self.get(kind, key)
            if existing is not None:
                raise _Stored(existing)
            digests = {}
            for f in files:
                shutil.copy2(f, tmp / f.name)
                digests[f.name] = sha256_file(tmp / f.name)
            (tmp / "record.json").write_text(json.dumps({**record, "_files": digests}, indent=1,
                                                        default=str))
        return Entry(dest, record)
