"""The Docker engine, through its own CLI: build an image from a context (buildx where it exists, else the
classic builder), run it, and read what it printed.

Builds and runs use ``--network none``: a context holds everything (wheels included), and a runtime image
measures a release without talking to anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import DockerError
from edgepipe.ship.wheels import PLATFORMS

ARCH = {"linux/amd64": "amd64", "linux/arm64": "arm64"}
INSTALL_HINT = ("install Docker (Debian/Ubuntu: apt-get install docker.io; elsewhere docs.docker.com/engine/install) "
                "and start its daemon (systemctl start docker, or dockerd &)")


def host_arch() -> str:
    """This machine's architecture in Docker's words (amd64, arm64)."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


@dataclass(frozen=True)
class Built:
    tag: str
    image_id: str
    platform: str
    builder: str  # "buildx" or "classic"
    seconds: float
    size_bytes: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Docker:
    """The ``docker`` client on PATH, talking to the engine ``DOCKER_HOST`` (or the default socket) names."""

    def __init__(self, client: str | None = None, timeout_s: float = 1800.0) -> None:
        exe = client or shutil.which("docker")
        if exe is None:
            raise DockerError(f"no Docker client (`docker`) on PATH: {INSTALL_HINT}")
        self.exe = exe
        self.timeout_s = timeout_s
        r = self._run(["version", "--format", "{{.Server.Version}}"], check=False, timeout=30)
        if r.returncode != 0:
            where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            tail = (r.stderr.strip().splitlines() or ["no answer"])[-1]
            raise DockerError(f"no Docker engine answers at {where} ({tail}): {INSTALL_HINT}; or point DOCKER_HOST "
                              "at a running one")
        self.server_version = r.stdout.strip()
        self.buildx = self._run(["buildx", "version"], check=False, timeout=30).returncode == 0

    def _run(self, args: list[str], *, check: bool = True, timeout: float | None = None,
             env: dict[str, str] | None = None, what: str = "") -> subprocess.CompletedProcess[str]:
        try:
            r = subprocess.run([self.exe, *args], capture_output=True, text=True, timeout=timeout or self.timeout_s,
                               env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired as e:
            raise DockerError(f"docker {what or args[0]} ran past {timeout or self.timeout_s:.0f} s") from e
        if check and r.returncode != 0:
            raise DockerError(f"docker {what or args[0]} failed: {_last_line(r)}")
        return r

    def image_arch(self, ref: str) -> str | None:
        r = self._run(["image", "inspect", "--format", "{{.Architecture}}", ref], check=False, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None

    def build(self, context: Path, tag: str, platform: str, base_image: str | None = None,
              no_cache: bool = False) -> Built:
        """Build ``context`` into ``tag`` for ``platform``.

        With buildx: ``buildx build --platform --load`` (a base of another platform is emulated with
        QEMU/binfmt). Without it, the classic builder, whose image has its base image's platform: the
        base must be of ``platform`` (checked before and after).
        """
        if platform not in PLATFORMS:
            raise DockerError(f"platform {platform!r}: give one of {', '.join(PLATFORMS)}")
        args = ["--network", "none", "-t", tag, *(["--no-cache"] if no_cache else [])]
        if base_image:
            args += ["--build-arg", f"BASE_IMAGE={base_image}"]
        t0 = time.perf_counter()
        note = ""
        if self.buildx:
            self._run(["buildx", "build", "--platform", platform, "--load", *args, str(context)], what="buildx build")
            builder = "buildx"
        else:
            base = base_image or _dockerfile_base(Path(context) / "Dockerfile")
            arch = self.image_arch(base)
            if arch is not None and arch != ARCH[platform]:
                raise DockerError(f"the base image {base} is linux/{arch}, not {platform}, and without buildx the "
                                  f"classic builder cannot cross-build: give a {platform} base (edgepipe docker base "
                                  f"--platform {platform}) or install the buildx plugin")
            note = f"no buildx here: the classic builder built it from the {platform} base {base}"
            r = self._run(["build", *args, str(context)], env={"DOCKER_BUILDKIT": "0"}, check=False, what="build")
            if r.returncode != 0:
                last = _last_line(r)
                if arch is None and any(k in last for k in ("registry", "pull", "no such host", "manifest", "denied",
                                                            "dial tcp", "not found")):
                    raise DockerError(
                        f"the base image {base} is not in this engine and pulling it failed ({last}); where no "
                        f"registry answers, make one: edgepipe docker base --platform {platform}, then pass "
                        f"--base-image local/debian-{ARCH[platform]}:bookworm")
                raise DockerError(f"docker build of {context} failed: {last}")
            builder = "classic"
        seconds = time.perf_counter() - t0
        insp = json.loads(self._run(["image", "inspect", tag], timeout=60).stdout)[0]
        if insp.get("Architecture") != ARCH[platform]:
            raise DockerError(f"built {tag} for linux/{insp.get('Architecture')}, not {platform}")
        return Built(tag, insp["Id"], platform, builder, round(seconds, 1), int(insp.get("Size", 0)), note)

    def emulated(self, ref: str) -> bool:
        """Whether image ``ref`` is of another architecture than this host (it runs under QEMU)."""
        arch = self.image_arch(ref)
        return arch is not None and arch != host_arch()

    def run(self, tag: str, args: list[str], timeout: float | None = None) -> str:
        """``docker run --rm --network none TAG ARGS``: its standard output.

        An arm64 image on an x86 host runs with the host's CPU sysfs hidden (see
        :mod:`edgepipe.ship.emulation`). A container still running at ``timeout`` is killed.
        """
        import uuid

        from edgepipe.ship.emulation import DOCKER_ARGS

        if self.image_arch(tag) is None:
            raise DockerError(f"no image {tag} in this engine: build it with `edgepipe docker build RELEASE --platform "
                              f"... --tag {tag}` (or docker pull it)")
        name = f"edgepipe-run-{uuid.uuid4().hex[:12]}"
        extra = list(DOCKER_ARGS) if self.emulated(tag) else []
        try:
            r = self._run(["run", "--rm", "--name", name, "--network", "none", *extra, tag, *args], check=False,
                          timeout=timeout, what="run")
        finally:
            self._run(["rm", "-f", name], check=False, timeout=60)
        if r.returncode != 0 and not r.stdout.strip():
            tail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise DockerError(f"docker run {tag} failed: {tail}")
        return r.stdout

    def copy_out(self, tag: str, paths: dict[str, Path]) -> None:
        """Copy files or directories out of image ``tag`` (image path -> local path) without running it."""
        cid = self._run(["create", tag], timeout=60, what="create").stdout.strip()
        try:
            for src, dest in paths.items():
                self._run(["cp", f"{cid}:{src}", str(dest)], timeout=300, what="cp")
        finally:
            self._run(["rm", "-f", cid], check=False, timeout=60)

    def load(self, archive: Path) -> None:
        self._run(["load", "-i", str(archive)], what="load")


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    """The last line of a failed docker command's output that says something (not the legacy-builder notice)."""
    skip = ("DEPRECATED", "BuildKit is", "environment-variable", "Install the buildx", "Run 'docker", "See 'docker")
    for text in (r.stderr, r.stdout):  # the daemon's error is on stderr; the build steps on stdout
        lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith(skip)]
        if lines:
            return lines[-1]
    return f"exit status {r.returncode}"


def _dockerfile_base(dockerfile: Path) -> str:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ARG BASE_IMAGE="):
            return line.split("=", 1)[1].strip()
    raise DockerError(f"{dockerfile}: no ARG BASE_IMAGE")


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edgepipe-docker-")
