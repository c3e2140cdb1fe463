"""Base images made from Debian's package mirror, for machines that cannot pull from a registry.

``mmdebstrap`` (or ``debootstrap``, slower) writes a minimal Debian root of the platform with Python and
venv (an arm64 root is configured under QEMU/binfmt emulation: ~2 min with mmdebstrap, ~9 with
debootstrap). The root is kept as a tar under ``$EDGEPIPE_CACHE_DIR/bases/`` and loaded into the engine
as a one-layer image whose config names the right architecture (``docker import`` would label an arm64
root amd64), so later builds from it are classic ``FROM`` builds like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_path
from edgepipe._hashing import sha256_json
from edgepipe.errors import DockerError
from edgepipe.ship.engine import ARCH, Docker, host_arch

DEFAULT_PACKAGES = ("python3", "python3-venv", "libstdc++6", "libgomp1")  # numpy and the runtimes need the C++ runtime
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: left out of a root made with mmdebstrap, as slim images leave them out: documentation, manual pages and
#: translations nothing in an image reads, and the CA certificates (a runtime image never opens a TLS
#: connection: it is built and runs offline). Under QEMU this cut an arm64 root from 160 s to 127 s (the CA
#: bundle alone took 39 s of `update-ca-certificates`) and from 240 MB to 195 MB.
EXCLUDE = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
           "/usr/share/ca-certificates/*")
QEMU_BINFMT = {"arm64": "/proc/sys/fs/binfmt_misc/qemu-aarch64", "amd64": "/proc/sys/fs/binfmt_misc/qemu-x86_64"}


@dataclass(frozen=True)
class Base:
    tag: str
    platform: str
    suite: str
    packages: tuple[str, ...]
    rootfs_tar: Path
    seconds: float  # making the root (0 when it came from the cache)
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rootfs_tar": str(self.rootfs_tar)}


def default_mirror() -> str:
    """This machine's Debian mirror (deb822 sources, else sources.list), else deb.debian.org."""
    if SOURCES.is_file():
        m = re.search(r"^URIs:\s*(\S+)", SOURCES.read_text(), re.M)
        if m:
            return m.group(1)
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main", legacy.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs(platform: str, packages: tuple[str, ...] = DEFAULT_PACKAGES, suite: str = "bookworm",
           mirror: str | None = None, cache: Path | None = None) -> tuple[Path, float, bool]:
    """A Debian root of ``platform`` with ``packages`` as a tar (cached); ``(tar, seconds, cached)``."""
    import time

    from edgepipe.pipeline.cache import cache_dir

    if platform not in ARCH:
        raise DockerError(f"platform {platform!r}: give one of {', '.join(ARCH)}")
    arch = ARCH[platform]
    pkgs = tuple(sorted(set(packages)))
    mirror = mirror or default_mirror()
    key = sha256_json({"arch": arch, "suite": suite, "packages": pkgs, "mirror": mirror, "exclude": EXCLUDE})[:16]
    dest = (cache or cache_dir() / "bases") / f"debian-{suite}-{arch}-{key}.tar"
    if dest.is_file():
        return dest, 0.0, True
    if arch != host_arch() and not Path(QEMU_BINFMT.get(arch, "/nonexistent")).exists():
        raise DockerError(f"making a {platform} root on this {host_arch()} machine needs QEMU's binfmt handler "
                          f"({QEMU_BINFMT.get(arch)} is absent): apt-get install qemu-user-static, then register it "
                          "(update-binfmts --enable, or write /usr/lib/binfmt.d/qemu-aarch64.conf's line into "
                          "/proc/sys/fs/binfmt_misc/register)")
    tool = shutil.which("mmdebstrap") or shutil.which("debootstrap")
    if tool is None:
        raise DockerError("making a base image needs mmdebstrap (or debootstrap): apt-get install mmdebstrap")
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic_path(dest) as tmp:
        if Path(tool).name == "mmdebstrap":
            cmd = [tool, f"--arch={arch}", "--variant=essential", *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDE),
                   f"--include={','.join(pkgs)}", "--format=tar", suite, str(tmp), mirror]
            _run(cmd, "mmdebstrap")
        else:
            root = Path(str(tmp) + ".root")
            try:
                _run([tool, f"--arch={arch}", "--variant=minbase", f"--include={','.join(pkgs)}", suite, str(root),
                      mirror], "debootstrap")
                with tarfile.open(tmp, "w") as t:
                    for p in sorted(root.iterdir()):
                        t.add(p, arcname=p.name)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return dest, time.perf_counter() - t0, False


def _run(cmd: list[str], what: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired as e:
        raise DockerError(f"{what} ran past an hour") from e
    if r.returncode != 0:
        last = next((ln.strip() for ln in reversed(r.stderr.splitlines()) if ln.strip()), f"exit status {r.returncode}")
        hint = " (making a root needs root, or user namespaces for mmdebstrap --mode=unshare)" if os.geteuid() else ""
        raise DockerError(f"{what} failed{hint}: {last}")


def image_archive(root_tar: Path, tag: str, platform: str, dest: Path) -> Path:
    """A ``docker load`` archive of one layer (``root_tar``) whose config says ``platform``."""
    h = hashlib.sha256()
    with open(root_tar, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    layer = h.hexdigest()
    config = {
        "architecture": ARCH[platform], "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer}"]},
        "history": [{"created_by": f"edgepipe docker base: Debian root for {platform} ({root_tar.name})"}],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [tag], "Layers": [f"{layer}/layer.tar"]}]).encode()

    def add_bytes(t: tarfile.TarFile, name: str, data: bytes) -> None:
        import io

        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))

    with atomic_path(dest) as tmp, tarfile.open(tmp, "w") as t:
        add_bytes(t, cfg_name, cfg)
        add_bytes(t, "manifest.json", manifest)
        t.add(root_tar, arcname=f"{layer}/layer.tar")
    return dest


def build_base(platform: str, tag: str, packages: tuple[str, ...] = DEFAULT_PACKAGES, suite: str = "bookworm",
               mirror: str | None = None, docker: Docker | None = None, cache: Path | None = None) -> Base:
    """Make (or take from ``cache``, default ``$EDGEPIPE_CACHE_DIR/bases``) a Debian root of ``platform``
    and load it into the engine as ``tag``."""
    from edgepipe.ship.engine import scratch

    tar, seconds, cached = rootfs(platform, packages, suite, mirror, cache)
    engine = docker or Docker()
    with scratch() as tmp:
        engine.load(image_archive(tar, tag, platform, Path(tmp) / "image.tar"))
    if engine.image_arch(tag) != ARCH[platform]:
        raise DockerError(f"loaded {tag}, but the engine reports it as {engine.image_arch(tag)}, not {platform}")
    return Base(tag, platform, suite, tuple(sorted(set(packages))), tar, round(seconds, 1), cached)
