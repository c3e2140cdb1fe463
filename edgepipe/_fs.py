"""Atomic file and directory writes: a failed stage leaves nothing that looks finished.

A directory is replaced whole by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
``renamex_np(RENAME_SWAP)``): at every instant ``dest`` is either the old version or the new one, even if
the process is killed. Where neither call exists, two renames are used and the next write restores an
old version a kill left hidden. Writers of one directory take a lock on a sibling lock file
(``.NAME.lock``, removed when released), so two runs never interleave their renames, and the next
writer removes the temporary directories (``.NAME.tmp-*``) and hidden old versions (``.NAME.old-*``)
killed runs left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgepipe.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refused with a ``ConfigError`` naming ``what`` when it holds more than ``limit``."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {str(path)!r} is larger than {limit:,} bytes, more than such a file ever "
                          "holds: is it the right file?")
    return data


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: Path, text: str) -> None:
    write_bytes_atomic(dest, text.encode())


# ---------------------------------------------------------------------------------------------------------
# locks


class Busy(ConfigError):
    """Another process holds the lock of an output directory."""


def lock_path(dest: Path) -> Path:
    dest = Path(dest)
    return dest.parent / f".{dest.name}.lock"


@contextlib.contextmanager
def dir_lock(dest: Path, *, wait: bool = True, what: str = "") -> Iterator[None]:
    """Hold the lock of directory ``dest`` (an ``flock`` on the sibling file ``.NAME.lock``).

    Args:
        dest: the directory (it need not exist; its parent is created).
        wait: block until the lock is free; otherwise raise :class:`Busy` at once.
        what: how the error names ``dest`` (e.g. ``"--out 'dist'"``).

    The lock file is removed on release; a waiter that locked a file already removed retries on the new
    one, so the lock stays exclusive.
    """
    path = lock_path(dest)
    name = what or f"directory {str(dest)!r}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{name} cannot be created: {e.strerror or e} ({e.filename or path.parent})") from e
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        try:  # never through a link: a planted `.NAME.lock -> file` would have that file truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"lock file {str(path)!r} is a symbolic link, which edgepipe never writes through; "
                                  "remove it (someone with write access to that directory planted it)") from None
            raise ConfigError(f"{name} is not writable: {e.strerror or e} ({path.parent})") from e
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:  # its holder released (removed) it after we opened it
            os.close(fd)
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise ConfigError(f"lock file {str(path)!r} is not a plain file of its own (a hard link or a device); "
                              "remove it (someone with write access to that directory planted it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise Busy(f"{name} is being written by another edgepipe run (pid {holder}); wait for it to "
                       "finish, or write somewhere else") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file after we opened it: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# atomic exchange of two paths


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}
_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:  # pragma: no cover
            return None
    return _libc


def exchange(a: Path, b: Path) -> bool:
    """Swap paths ``a`` and ``b`` atomically (both must exist). False where the system cannot."""
    libc = _c()
    if libc is None:
        return False
    fa, fb = os.fsencode(str(a)), os.fsencode(str(b))
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(fa), ctypes.c_int(_AT_FDCWD),
                            ctypes.c_char_p(fb), ctypes.c_uint(_RENAME_EXCHANGE))
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover
        rc = libc.renamex_np(ctypes.c_char_p(fa), ctypes.c_char_p(fb), ctypes.c_uint(_RENAME_SWAP))
    else:  # pragma: no cover
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _debris(dest: Path) -> list[Path]:
    """What killed writers of ``dest`` left beside it: temporary directories and hidden old versions."""
    name = re.escape(dest.name)
    pattern = re.compile(rf"\.{name}\.(tmp-[A-Za-z0-9_]+|[A-Za-z0-9_]{{8}}\.tmp|old-\d+)")
    try:
        return sorted(p for p in dest.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


def clean_debris(dest: Path) -> None:
    """Restore an old version a killed two-rename swap left hidden, then remove the rest of the debris.

    Call it only while holding :func:`dir_lock` of ``dest``: nothing else is writing it then.
    """
    dest = Path(dest)
    found = _debris(dest)
    if not dest.exists():
        olds = [p for p in found if ".old-" in p.name and p.is_dir()]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            os.replace(newest, dest)
            found.remove(newest)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _swap_in(tmp: Path, dest: Path) -> Path | None:
    """Put ``tmp`` at ``dest``; returns where the old version went (to be removed), if there was one."""
    if not dest.exists():
        os.replace(tmp, dest)
        return None
    if exchange(tmp, dest):
        return tmp
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")  # no exchange here: two renames
    os.replace(dest, old)
    os.replace(tmp, dest)
    return old


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest`` whole.

    An existing ``dest`` is kept until the new one is complete, then exchanged with it atomically and
    removed. The block runs under ``dest``'s lock; debris of killed writers is cleaned first.
    """
    dest = Path(dest)
    with dir_lock(dest):
        clean_debris(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            old = _swap_in(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def scratch_dir(kind: str) -> Iterator[Path]:
    """A private scratch directory ``edgepipe-<kind>-<pid>-*`` in the temp dir, removed afterwards.

    The pid in the name lets the next run remove what a killed run left behind: scratch directories of
    processes that no longer exist are deleted first.
    """
    root = Path(tempfile.gettempdir())
    for old in root.glob("edgepipe-*-p*-*"):
        pid = old.name.split("-p", 1)[1].split("-", 1)[0] if "-p" in old.name else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"edgepipe-{kind}-p{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def existing_dir_above(path: Path, cannot: str) -> Path:
    """The nearest existing ancestor of ``path`` (where it would be created); ``ConfigError`` when that is a
    file, with ``cannot`` leading the message."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{cannot}: {str(parent)!r} is a file, not a directory")
    return parent


def check_file_out(out: str | Path, what: str = "--out") -> Path:
    """``out`` as a file path that can be written (not a directory, no file where a directory must be)."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{what} {str(out)!r} is a directory; give the path of the file to write")
    existing_dir_above(out, f"{what} {str(out)!r} cannot be written")
    return out


def check_dir_out(out: Path, what: str = "--out") -> Path:
    """``out`` as a directory this process can create or write into; :class:`ConfigError` naming it and why
    not (a file, a file above it, no write permission) before any work."""
    name = f"{what} {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{name} is a file, not a directory; give a directory (it is created if missing)")
    parent = existing_dir_above(out, f"{name} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK | os.X_OK)):
        raise ConfigError(f"{name} is not writable: no write permission on {str(out if out.is_dir() else parent)!r}")
    return out
