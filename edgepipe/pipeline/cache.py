"""The verified, content-addressed stage cache.

A stage's output lives in ``<root>/stages/<kind>/<key>/`` with ``record.json`` beside its files; the key
hashes everything that went into the stage. An entry is written whole (temporary directory, then
rename) and verified on read: every file's sha256 must match what the record says, so a killed run or a
tampered file is a miss that is recomputed, never a wrong output.

Concurrent writers of one key (two cluster workers, two releases sharing a cache): the first entry
written is kept and :meth:`Cache.put` returns it to the others, so every run that asked for the key uses
the same output (a measurement, say) and a later run that reads the cache agrees with them.

Trust: whoever can write the cache directory is not trusted by that alone. Every record is signed with an
HMAC-SHA256 over (kind, key, record, file digests) by a secret key kept outside the cache
(``$EDGEPIPE_CACHE_KEY_FILE``, default ``~/.config/edgepipe/cache.key``, created 0600 on first use). An
entry whose signature does not verify under this user's key is a miss: a forged figure, a swapped model or
a cached ``.pt2`` that would run code on load is never used, only recomputed. Nodes that share a cache on
purpose (NFS for a cluster) share the key file too; nodes with different keys simply do not share entries.
A cache root edgepipe creates is private (0700); one that exists is left as its owner made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file
from edgepipe.errors import ConfigError


def cache_dir() -> Path:
    """``$EDGEPIPE_CACHE_DIR``, or ``~/.cache/edgepipe``."""
    return Path(os.environ.get("EDGEPIPE_CACHE_DIR") or Path.home() / ".cache" / "edgepipe")


def key_file() -> Path:
    """``$EDGEPIPE_CACHE_KEY_FILE``, or ``~/.config/edgepipe/cache.key``: the secret that signs cache records."""
    return Path(os.environ.get("EDGEPIPE_CACHE_KEY_FILE") or Path.home() / ".config" / "edgepipe" / "cache.key")


_KEYS: dict[str, bytes] = {}


def signing_key() -> bytes:
    """This user's cache key (made, 32 random bytes in hex, mode 0600, the first time it is needed).

    A key file that is a link, not a regular file, or writable by anyone but its owner is refused: whoever
    can change the key can forge every cache entry."""
    path = key_file()
    if str(path) in _KEYS:
        return _KEYS[str(path)]
    fd = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            break
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # another process made it first: read theirs
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(new, "w") as f:
                    f.write(secrets.token_hex(32) + "\n")
        except OSError as e:
            raise ConfigError(f"cache key {str(path)!r} cannot be read ({e.strerror or e}); it must be a regular file "
                              "(not a link) readable by you: remove it to have a new one made") from None
    if fd is None:
        raise ConfigError(f"cache key {str(path)!r} cannot be created; set EDGEPIPE_CACHE_KEY_FILE to a writable path")
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise ConfigError(f"cache key {str(path)!r} must be a regular file of yours that no one else can write "
                              f"(it is mode {stat.filemode(st.st_mode)}): `chmod 600` it, or remove it to have a new one "
                              "made")
        key = f.read(4096).strip()
    if len(key) < 32:
        raise ConfigError(f"cache key {str(path)!r} holds {len(key)} bytes; it needs at least 32: remove it to have a "
                          "new one made")
    _KEYS[str(path)] = key
    return key


def _signature(kind: str, key: str, record: Any, files: dict[str, str]) -> str:
    body = json.dumps({"kind": kind, "key": key, "record": record, "files": files}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hmac.new(signing_key(), body.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: its directory and the record the stage stored."""

    path: Path
    record: dict[str, Any]
    #: ``put`` stored the caller's own output (False: another writer's, which the caller should use instead)
    mine: bool = False
    #: each file's sha256, as signed
    files: dict[str, str] | None = None

    def file(self, name: str) -> Path:
        return self.path / name

    def copy(self, name: str, dest: Path) -> Path:
        """Copy the entry's file ``name`` to ``dest`` and check the copy against the signed digest, so a file
        swapped in the cache after :meth:`Cache.get` verified it is never used."""
        shutil.copyfile(self.path / name, dest)
        if self.files is not None and sha256_file(dest) != self.files.get(name):
            dest.unlink()
            raise ConfigError(f"cache entry {str(self.path)!r} changed while it was read (file {name!r}); someone "
                              "else writes this cache: run again, or give a private EDGEPIPE_CACHE_DIR")
        return dest


class _Stored(Exception):
    """Another writer stored the key first (carries its entry)."""


class Cache:
    """Directories of stage outputs, keyed by the hash of everything that went into them."""

    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.base = root or cache_dir()
        self.root = self.base / "stages"
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
            files, sig = rec.pop("_files", {}), rec.pop("_sig", "")
            if (isinstance(files, dict) and isinstance(sig, str)
                    and hmac.compare_digest(sig, _signature(kind, key, rec, files))
                    and all(_plain(name) and (d / name).is_file() and not (d / name).is_symlink()
                            and sha256_file(d / name) == digest for name, digest in files.items())):
                return Entry(d, rec, files=files)
        except (OSError, ValueError, RecursionError):
            pass
        shutil.rmtree(d, ignore_errors=True)  # damaged, or not signed by this user's key: recomputed
        return None

    def put(self, kind: str, key: str, files: list[Path], record: dict[str, Any]) -> Entry | None:
        """Store ``files`` (by name) and ``record`` under ``key``; returns the stored entry: this one, or the
        intact entry another writer stored first (whose record and files the caller should use)."""
        if not self.enabled:
            return None
        if not self.base.exists():  # made private; a root that exists is left as its owner shared it
            self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            stored = json.loads(json.dumps(record, default=str))  # signed as it will be read back
            (tmp / "record.json").write_text(json.dumps(
                {**stored, "_files": digests, "_sig": _signature(kind, key, stored, digests)}, indent=1))
        return Entry(dest, record, mine=True, files=digests)


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
