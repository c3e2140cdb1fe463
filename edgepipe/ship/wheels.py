"""A wheelhouse for an image's platform and Python, downloaded on the host, pinned and hashed.

Images install offline from it (``pip install --no-index --require-hashes``): no index, no TLS inside the
build, the same bytes every time. Downloads are kept under ``$EDGEPIPE_CACHE_DIR/wheels/`` by what was
asked for, so a second build of the same release needs no network at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file, sha256_json
from edgepipe.errors import ConfigError

PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
GLIBC_MINOR = 36  # Debian bookworm (the default base image) has glibc 2.36: wheels up to manylinux_2_36


def platform_tags(platform: str) -> list[str]:
    """The wheel platform tags an image of ``platform`` (``linux/amd64``, ``linux/arm64``) can install."""
    if platform not in PLATFORMS:
        raise ConfigError(f"platform {platform!r}: give one of {', '.join(PLATFORMS)}")
    arch = PLATFORMS[platform]
    return [f"manylinux_2_{v}_{arch}" for v in range(GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{arch}"]


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    platform: str
    python: str
    requirements: dict[str, str]  # what was asked for: name -> exact version
    wheels: tuple[Wheel, ...]  # everything installed, dependencies included

    def lock_text(self) -> str:
        """A pip requirements file with every wheel pinned by version and sha256 (``--require-hashes``)."""
        lines = [f"# edgepipe wheelhouse for {self.platform}, CPython {self.python}; install with\n"
                 "#   pip install --no-index --find-links wheels --require-hashes -r requirements.lock\n"]
        lines += [f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in self.wheels]
        return "".join(lines)

    def lock_json(self) -> dict[str, object]:
        return {"platform": self.platform, "python": self.python, "requirements": self.requirements,
                "wheels": [w.__dict__ for w in self.wheels]}


_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _scan(directory: Path) -> tuple[Wheel, ...]:
    out = []
    for f in sorted(directory.glob("*.whl")):
        m = _WHEEL.match(f.name)
        if m is None:
            raise ConfigError(f"{f}: not a wheel file name")
        out.append(Wheel(_canonical(m["name"]), m["version"], f.name, sha256_file(f)))
    return tuple(out)


def _no_wheel(stderr: str, requirements: dict[str, str], platform: str, python: str) -> ConfigError:
    m = re.search(r"(?:satisfies the requirement|No matching distribution found for) ([A-Za-z0-9_.\-]+)", stderr)
    name = _canonical(re.split(r"[<>=!~ ]", m.group(1))[0]) if m else None
    if name:
        pinned = requirements.get(name)
        what = f"{name}=={pinned}" if pinned else f"{name} (a dependency)"
        return ConfigError(f"no wheel of {what} exists for {platform} and CPython {python}: the image cannot "
                           f"install it; pick a platform its project publishes wheels for, or another version")
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return ConfigError(f"downloading wheels for {platform} failed: {tail}")


def wheelhouse(requirements: dict[str, str], platform: str, python: str = "3.11",
               cache: Path | None = None) -> Wheelhouse:
    """Every wheel ``requirements`` (name -> exact version) needs on ``platform`` and CPython ``python``.

    Downloaded with pip for that platform (binary wheels only), or taken from the cache when the same
    set was downloaded before (every file's hash is checked again).
    """
    from edgepipe.pipeline.cache import cache_dir

    reqs = {_canonical(k): v for k, v in sorted(requirements.items())}
    tags = platform_tags(platform)
    if not re.fullmatch(r"3\.\d+", python):
        raise ConfigError(f"python {python!r}: give the image's CPython as major.minor, e.g. 3.11")
    root = (cache or cache_dir() / "wheels") / f"{PLATFORMS[platform]}-cp{python.replace('.', '')}-" \
        f"{sha256_json(reqs)[:16]}"
    lock = root / "wheels.lock.json"
    if lock.is_file():
        recorded = json.loads(lock.read_text())
        have = _scan(root / "wheels")
        if [w.__dict__ for w in have] == recorded["wheels"]:
            return Wheelhouse(root / "wheels", platform, python, reqs, have)
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(root) as tmp:
        d = tmp / "wheels"
        d.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "-q",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", python, "-d", str(d)]
        for t in tags:
            cmd += ["--platform", t]
        cmd += [f"{k}=={v}" for k, v in reqs.items()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise _no_wheel(r.stderr, reqs, platform, python)
        wheels = _scan(d)
        got = {w.name for w in wheels}
        missing = sorted(set(reqs) - got)
        if missing:
            raise ConfigError(f"pip downloaded no wheel of {', '.join(missing)} for {platform}")
        house = Wheelhouse(d, platform, python, reqs, wheels)
        (tmp / "wheels.lock.json").write_text(json.dumps(house.lock_json(), indent=1, sort_keys=True) + "\n")
    return Wheelhouse(root / "wheels", platform, python, reqs, _scan(root / "wheels"))


def copy_into(house: Wheelhouse, dest: Path) -> None:
    """The wheels into ``dest/wheels`` and the lock beside them (``requirements.lock``, ``wheels.lock.json``)."""
    (dest / "wheels").mkdir(parents=True, exist_ok=True)
    for w in house.wheels:
        src = house.directory / w.file
        if hashlib.sha256(src.read_bytes()).hexdigest() != w.sha256:
            raise ConfigError(f"{src}: changed since it was downloaded; delete {house.directory.parent} and retry")
        shutil.copy2(src, dest / "wheels" / w.file)
    (dest / "requirements.lock").write_text(house.lock_text())
    (dest / "wheels.lock.json").write_text(json.dumps(house.lock_json(), indent=1, sort_keys=True) + "\n")
