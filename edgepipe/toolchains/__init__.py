"""Isolated converter environments, one venv per toolchain, installed on request.

Some converters pin their whole dependency stack and cannot share edgepipe's environment: onnx2tf 1.29
pins tensorflow 2.19, onnx 1.19, onnxruntime 1.23 and numpy 1.26 exactly. ``edgepipe toolchain install
tflite`` creates a venv for it under ``$EDGEPIPE_TOOLCHAINS_DIR`` (default ``~/.cache/edgepipe/toolchains``),
pip-installs its requirements under a constraints file that pins every package, verifies the result
(``pip check`` and imports) and writes ``toolchain.json`` last. A directory without that marker is a
half-finished install and is never used; installing again replaces it. Backends call the toolchain's
Python as a subprocess with a small driver script that edgepipe ships.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepipe._fs import write_text_atomic
from edgepipe._hashing import sha256_json
from edgepipe.errors import BackendUnavailable, ConfigError

HERE = Path(__file__).resolve().parent
MARKER = "toolchain.json"


@dataclass(frozen=True)
class ToolchainSpec:
    """What one toolchain installs and how it is checked."""

    name: str
    description: str
    requirements: tuple[str, ...]
    constraints: str  # a file beside this module pinning every package of the stack
    imports: tuple[str, ...]  # modules that must import once installed
    versions_of: tuple[str, ...]  # distributions whose versions the marker records
    python: tuple[tuple[int, int], tuple[int, int]]  # supported interpreter range, inclusive
    size_hint: str = ""

    @property
    def sha256(self) -> str:
        """Hash of the spec and its constraints: an install made for another spec is not used."""
        pins = (HERE / self.constraints).read_text()
        return sha256_json({"requirements": self.requirements, "constraints": pins})


SPECS: dict[str, ToolchainSpec] = {
    "tflite": ToolchainSpec(
        name="tflite",
        description="ONNX -> TFLite converter (onnx2tf on tensorflow), used by the tflite backend",
        requirements=("onnx2tf==1.29.24",),
        constraints="tflite-constraints.txt",
        imports=("onnx2tf", "tensorflow"),
        versions_of=("onnx2tf", "tensorflow", "onnx", "onnxruntime", "numpy", "ai-edge-litert"),
        python=((3, 10), (3, 12)),
        size_hint="about 2.6 GB, under a minute on a fast link",
    ),
}


def root() -> Path:
    """Where toolchains live: ``$EDGEPIPE_TOOLCHAINS_DIR``, else ``<user cache>/edgepipe/toolchains``."""
    env = os.environ.get("EDGEPIPE_TOOLCHAINS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edgepipe" / "toolchains"


def spec(name: str) -> ToolchainSpec:
    if name not in SPECS:
        raise ConfigError(f"unknown toolchain {name!r}; known toolchains: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def install_hint(name: str) -> str:
    return f"edgepipe toolchain install {name}"


@dataclass(frozen=True)
class ToolchainStatus:
    """Whether a toolchain is installed and usable, where, and with which versions."""

    name: str
    path: Path
    installed: bool
    python: Path | None
    versions: dict[str, str]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["python"] = str(self.path), str(self.python) if self.python else None
        return d


def _venv_python(path: Path) -> Path:
    return path / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def status(name: str) -> ToolchainStatus:
    """The toolchain's state, read from its marker file (nothing is imported or run)."""
    s = spec(name)
    path = root() / name
    py = _venv_python(path)
    marker = path / MARKER
    hint = install_hint(name)
    if not marker.is_file():
        why = "half-installed (no marker)" if path.exists() else "not installed"
        return ToolchainStatus(name, path, False, None, {}, f"{why} in {path}: run `{hint}`")
    try:
        rec = json.loads(marker.read_text())
    except (OSError, ValueError):
        return ToolchainStatus(name, path, False, None, {}, f"{marker} is unreadable: run `{hint} --force`")
    if rec.get("spec_sha256") != s.sha256:
        return ToolchainStatus(name, path, False, None, rec.get("versions", {}),
                               f"installed for another edgepipe version's pins: run `{hint} --force`")
    if not py.is_file():
        return ToolchainStatus(name, path, False, None, {}, f"{py} is missing: run `{hint} --force`")
    return ToolchainStatus(name, path, True, py, rec.get("versions", {}))


def python(name: str) -> Path:
    """The installed toolchain's interpreter; ``BackendUnavailable`` naming the install command otherwise."""
    st = status(name)
    if not st.installed or st.python is None:
        raise BackendUnavailable(f"the {name} converter toolchain is not usable: {st.reason}")
    return st.python


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, progress: Callable[[str], None] | None, what: str) -> str:
    """Run ``cmd``, appending its output to ``log`` and passing pip's milestones to ``progress``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    lines: list[str] = []
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            lines.append(line.rstrip())
            if progress and line.startswith(("Collecting ", "Installing collected", "Successfully installed")):
                progress(line.strip()[:100])
        rc = proc.wait()
    if rc != 0:
        tail = " | ".join(ln for ln in lines[-4:] if ln.strip())
        raise BackendUnavailable(f"toolchain install failed while {what} (exit {rc}): {tail}; full log: {log}")
    return "\n".join(lines)


_VERIFY = """
import importlib, json, sys
from importlib import metadata
for m in sys.argv[2:]:
    importlib.import_module(m)
out = {}
for d in json.loads(sys.argv[1]):
    try:
        out[d] = metadata.version(d)
    except metadata.PackageNotFoundError:
        pass
out["python"] = "%d.%d.%d" % sys.version_info[:3]
print("VERSIONS " + json.dumps(out))
"""


def install(name: str, *, force: bool = False, python_exe: str | None = None,
            progress: Callable[[str], None] | None = None) -> ToolchainStatus:
    """Create (or keep) the toolchain's venv; idempotent, and atomic in effect (marker written last).

    Args:
        name: the toolchain (``tflite``).
        force: reinstall even when a complete install is present.
        python_exe: the interpreter the venv is made from (default: the one running edgepipe).
        progress: called with one short line per step and per pip milestone.

    Returns:
        The toolchain's status after the install.
    """
    s = spec(name)
    say = progress or (lambda _m: None)
    base = root()
    path = base / name
    with _lock(base / f".{name}.lock"):
        st = status(name)
        if st.installed and not force:
            say(f"{name} toolchain already installed in {path}")
            return st
        py_exe = python_exe or sys.executable
        _check_python(s, py_exe)
        if path.exists():
            say(f"removing the previous install in {path}")
            (path / MARKER).unlink(missing_ok=True)  # first: from here on it never looks installed
            shutil.rmtree(path)
        path.mkdir(parents=True)
        log = base / f"{name}-install.log"
        log.write_text(f"edgepipe toolchain install {name} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        t0 = time.perf_counter()
        try:
            say(f"creating a venv in {path / 'venv'} (from {py_exe})")
            _run([py_exe, "-m", "venv", str(path / "venv")], log, progress, "creating the venv")
            vpy = str(_venv_python(path))
            say(f"installing {', '.join(s.requirements)} and its pinned stack ({s.size_hint})")
            _run([vpy, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                  "--no-input", *s.requirements, "-c", str(HERE / s.constraints)], log, progress, "pip-installing")
            say("verifying: pip check, imports")
            _run([vpy, "-m", "pip", "check"], log, None, "checking dependencies (pip check)")
            out = _run([vpy, "-c", _VERIFY, json.dumps(list(s.versions_of)), *s.imports], log, None,
                       f"importing {', '.join(s.imports)}")
            versions = json.loads(out.rsplit("VERSIONS ", 1)[1].splitlines()[0])
            write_text_atomic(path / MARKER, json.dumps({
                "name": name, "spec_sha256": s.sha256, "requirements": list(s.requirements),
                "versions": versions, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - t0, 1),
            }, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # a failed install leaves nothing that looks installed
            raise
        say(f"{name} toolchain installed in {time.perf_counter() - t0:.0f} s: "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return status(name)


def _check_python(s: ToolchainSpec, py_exe: str) -> None:
    try:
        out = subprocess.run([py_exe, "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BackendUnavailable(f"cannot run {py_exe!r} to create the {s.name} toolchain: {e}") from e
    have = tuple(int(v) for v in out.split())
    lo, hi = s.python
    if not lo <= have <= hi:
        raise BackendUnavailable(
            f"the {s.name} toolchain needs Python {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} (its pinned wheels), "
            f"but {py_exe} is {have[0]}.{have[1]}: pass --python /path/to/python3.{hi[1]}"
        )


def remove(name: str) -> bool:
    """Delete an installed toolchain; returns whether there was one."""
    spec(name)
    path = root() / name
    with _lock(root() / f".{name}.lock"):
        if not path.exists():
            return False
        (path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(path)
    return True


def statuses() -> list[ToolchainStatus]:
    return [status(n) for n in sorted(SPECS)]
