"""The build context of a runtime image for one release: everything ``docker build`` needs, offline.

``CONTEXT/``: ``Dockerfile``, ``release/`` (a copy of the release), ``wheels/`` + ``requirements.lock`` +
``wheels.lock.json`` (the platform's wheels, pinned by version and sha256), ``edgepipe-worker.pyz`` (the
bench worker: edgepipe's pure-Python modules in one zip), ``eval.npz`` (the release's test split: every input
under its name and every target, for ``--verify``) and ``context.json`` (what it was made from and for). Written atomically: a context
directory is complete or absent.

Trust. The release is data, not instructions for the image: it is copied without following anything
(a symlink, device, FIFO or socket anywhere in it is refused, one line naming it, before anything is
written or downloaded); the software pinned in the image is what edgepipe runs here (this machine's
installed versions, or the NVIDIA base's known ones), never versions a manifest asks for; and the
evaluation data bundled is the data the manifest names only when its sha256 matches the one the manifest
records (or the data the caller passes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe.errors import ConfigError
from edgepipe.ship import verify, wheels

TEMPLATES = Path(__file__).resolve().parent / "dockerfiles"
DEFAULT_BASES = {  # the images users build from; tests here pass a base made by `edgepipe docker base`
    "runtime": {"linux/amd64": "python:3.11-slim-bookworm", "linux/arm64": "python:3.11-slim-bookworm"},
    "tensorrt": {"linux/amd64": "nvcr.io/nvidia/tensorrt:25.10-py3",
                 "linux/arm64": "nvcr.io/nvidia/l4t-jetpack:r36.4.0"},
}
# the NVIDIA images bring TensorRT and CUDA; edgepipe's engine build adds these (versions from this
# machine), with the base's Python and a cuda-python and numpy that fit the base's CUDA and TensorRT
TRT_EXTRA = ("onnx", "click", "rich", "psutil", "tomli-w")
TRT_BASE = {  # tensorrt:25.10-py3: Python 3.12, CUDA 13; JetPack 6.1 (r36.4): Python 3.10, CUDA 12.6, TensorRT 10.3
    "linux/amd64": {"python": "3.12", "cuda-python": "13.0.3"},
    "linux/arm64": {"python": "3.10", "cuda-python": "12.6.2.post1", "numpy": "1.26.4"},
}
DEFAULT_PYTHON = "3.11"  # python:3.11-slim-bookworm, and Debian bookworm's python3


@dataclass(frozen=True)
class Context:
    directory: Path
    target: str
    backend: str
    precision: str
    platform: str
    python: str
    base_image: str
    dockerfile: str  # the template it was made from
    wheels: int
    wheels_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "directory": str(self.directory)}


def requirements(manifest: Any, backend: str, runtime: str | None = None, platform: str = "linux/amd64") -> dict[str, str]:
    """The distributions (exact versions) its image needs: the versions installed here, which edgepipe
    builds, evaluates and compares the image's answers with (and the NVIDIA base's known ones).

    The manifest's ``tools`` are not read: they are what the release says it was built with, free text
    in a file anyone can write, and the image's software is not the release's to choose. A release built
    with other versions than this machine's gets this machine's (``--verify`` compares the two).
    """
    from importlib import metadata

    from edgepipe.versions import tool_versions

    have = tool_versions()

    def pin(dist: str) -> str:
        if dist not in have:
            with contextlib.suppress(metadata.PackageNotFoundError):
                have[dist] = metadata.version(dist)
        if dist not in have:
            raise ConfigError(f"{dist} is not installed here, and the image pins the version this machine runs; "
                              f"install it (pip install {dist}) and build the context again")
        return have[dist]

    dists = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino"],
             "tflite": ["tflite-runtime" if runtime == "tflite_runtime" else "ai-edge-litert"],
             "tensorrt": list(TRT_EXTRA)}.get(backend)
    if dists is None:
        raise ConfigError(f"no runtime image for backend {backend!r}")
    if backend == "tensorrt":
        base = TRT_BASE[platform]
        return {"numpy": base.get("numpy", pin("numpy")), "cuda-python": base["cuda-python"],
                **{d: pin(d) for d in dists}}
    return {"numpy": pin("numpy"), **{d: pin(d) for d in dists}}


def _entry_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def copy_release(release: Path, dest: Path | None = None) -> list[str]:
    """Check (and, given ``dest``, copy into it) every entry of the release directory; the files' relative
    paths. Only directories and regular files are taken, and nothing is followed: a symlink (to ``~/.ssh``,
    say), a device, FIFO or socket anywhere in the release is a :class:`ConfigError` naming it. Entries are
    examined and opened relative to their directory's descriptor (``O_NOFOLLOW``), so a link swapped in
    while copying is refused too, never read through.
    """
    release = Path(release).resolve()  # the directory the caller named, wherever it lives
    out: list[str] = []

    def unreadable(e: OSError) -> None:
        raise ConfigError(f"release {str(release)!r}: {e.filename} cannot be read ({e.strerror or e}); a release "
                          "is copied whole: make it readable, or remove it") from None

    for dirpath, dirnames, filenames, dirfd in os.fwalk(release, follow_symlinks=False, onerror=unreadable):
        rel = Path(dirpath).relative_to(release)
        if dest is not None:
            (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted([*dirnames, *filenames]):
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue
            where = (rel / name).as_posix()
            if not stat.S_ISREG(st.st_mode):
                to = f" to {os.readlink(name, dir_fd=dirfd)!r}" if stat.S_ISLNK(st.st_mode) else ""
                raise ConfigError(f"release {str(release)!r}: {where!r} is {_entry_kind(st.st_mode)}{to}; a release "
                                  "holds only regular files and directories (a link would put what it points at "
                                  "into the image): replace it with the file itself, or remove it")
            out.append(where)
            if dest is None:
                continue
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
            except OSError as e:
                raise ConfigError(f"release {str(release)!r}: {where!r} cannot be read as a regular file "
                                  f"({e.strerror or e}); it changed while being copied: copy again") from None
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                    raise ConfigError(f"release {str(release)!r}: {where!r} changed into something other than a "
                                      "regular file while being copied; copy again")
                with open(dest / rel / name, "xb") as dst:
                    shutil.copyfileobj(src, dst)
            os.utime(dest / rel / name, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.chmod(dest / rel / name, stat.S_IMODE(st.st_mode) & 0o755)
    return out


def write_context(release: Path, out: Path, platform: str, *, base_image: str | None = None,
                  python: str | None = None, data: str | None = None) -> Context:
    """Write the build context for ``release``'s image of ``platform`` into ``out`` (replaced whole).

    ``python``: the base image's CPython (the wheels' tag); default 3.11, or the NVIDIA base's.
    """
    from edgepipe.harness.remote import worker_zip
    from edgepipe.release import MANIFEST, artifact_from_release
    from edgepipe.types import Manifest

    release = Path(release)
    if not release.is_dir():
        raise ConfigError(f"{str(release)!r} is not a release directory (no {MANIFEST} naming an artifact); "
                          "make one with `edgepipe build --target T --out dist/` and give dist/T")
    copy_release(release)  # no link, device or FIFO anywhere in it: checked before anything is read or downloaded
    if artifact_from_release(release) is None:
        raise ConfigError(f"{str(release)!r} is not a release directory (no {MANIFEST} naming an artifact); "
                          "make one with `edgepipe build --target T --out dist/` and give dist/T")
    wheels.platform_tags(platform)  # a bad platform fails before anything is downloaded
    m = Manifest.read(release / MANIFEST)
    backend = m.artifact.backend
    family = "tensorrt" if backend == "tensorrt" else "runtime"
    runtime = getattr(m.target.options, "runtime", None)
    base = base_image or DEFAULT_BASES[family][platform]
    python = python or (TRT_BASE[platform]["python"] if family == "tensorrt" else DEFAULT_PYTHON)
    split = verify.eval_data(release, data)  # bound by hash to the manifest's record
    house = wheels.wheelhouse(requirements(m, backend, runtime, platform), platform, python)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        text = (TEMPLATES / f"{family}.Dockerfile").read_text()
        # the chosen base (the official image unless one is given) becomes the file's default
        text = text.replace(f"ARG BASE_IMAGE={DEFAULT_BASES[family]['linux/amd64']}", f"ARG BASE_IMAGE={base}", 1)
        (tmp / "Dockerfile").write_text(text)
        copy_release(release, tmp / "release")
        wheels.copy_into(house, tmp)
        shutil.copy2(worker_zip(tmp), tmp / "edgepipe-worker.pyz")
        for z in tmp.glob("edgepipe-worker-*.pyz"):
            z.unlink()
        verify.save_eval(tmp / verify.EVAL_FILE, split.x, split.y, split.targets)
        if family == "tensorrt":
            pkg = Path(__file__).resolve().parents[1]
            shutil.copytree(pkg, tmp / "src" / "edgepipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        ctx = Context(out, m.target.name, backend, m.artifact.precision, platform, python,
                      base, f"{family}.Dockerfile", len(house.wheels),
                      sum((tmp / "wheels" / w.file).stat().st_size for w in house.wheels))
        (tmp / "context.json").write_text(json.dumps({**ctx.to_dict(), "directory": None,
                                                      "requirements": house.requirements}, indent=1) + "\n")
    return ctx
