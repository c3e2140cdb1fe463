"""The build context of a runtime image for one release: everything ``docker build`` needs, offline.

``CONTEXT/``: ``Dockerfile``, ``release/`` (a copy of the release), ``wheels/`` + ``requirements.lock`` +
``wheels.lock.json`` (the platform's wheels, pinned by version and sha256), ``edgepipe-worker.pyz`` (the
bench worker: edgepipe's pure-Python modules in one zip), ``eval.npz`` (the release's test split, for
``--verify``) and ``context.json`` (what it was made from and for). Written atomically: a context
directory is complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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
    """The distributions (exact versions: those the release was built and verified with) its image needs."""
    from edgepipe.versions import tool_versions

    have = {**tool_versions(), **manifest.tools}

    def pin(dist: str) -> str:
        from importlib import metadata

        if dist not in have:
            with contextlib.suppress(metadata.PackageNotFoundError):
                have[dist] = metadata.version(dist)
        if dist not in have:
            raise ConfigError(f"the release's manifest records no version of {dist} and it is not installed "
                              f"here; install it (pip install {dist}) so the image can pin the same version")
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


def write_context(release: Path, out: Path, platform: str, *, base_image: str | None = None,
                  python: str | None = None, data: str | None = None) -> Context:
    """Write the build context for ``release``'s image of ``platform`` into ``out`` (replaced whole).

    ``python``: the base image's CPython (the wheels' tag); default 3.11, or the NVIDIA base's.
    """
    from edgepipe.harness.remote import worker_zip
    from edgepipe.release import MANIFEST, artifact_from_release
    from edgepipe.types import Manifest

    release = Path(release)
    if not release.is_dir() or artifact_from_release(release) is None:
        raise ConfigError(f"{str(release)!r} is not a release directory (no {MANIFEST} naming an artifact); "
                          "make one with `edgepipe build --target T --out dist/` and give dist/T")
    wheels.platform_tags(platform)  # a bad platform fails before anything is downloaded
    m = Manifest.read(release / MANIFEST)
    backend = m.artifact.backend
    family = "tensorrt" if backend == "tensorrt" else "runtime"
    runtime = (m.target.get("options") or {}).get("runtime")
    base = base_image or DEFAULT_BASES[family][platform]
    python = python or (TRT_BASE[platform]["python"] if family == "tensorrt" else DEFAULT_PYTHON)
    house = wheels.wheelhouse(requirements(m, backend, runtime, platform), platform, python)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        text = (TEMPLATES / f"{family}.Dockerfile").read_text()
        # the chosen base (the official image unless one is given) becomes the file's default
        text = text.replace(f"ARG BASE_IMAGE={DEFAULT_BASES[family]['linux/amd64']}", f"ARG BASE_IMAGE={base}", 1)
        (tmp / "Dockerfile").write_text(text)
        shutil.copytree(release, tmp / "release", symlinks=False)
        wheels.copy_into(house, tmp)
        shutil.copy2(worker_zip(tmp), tmp / "edgepipe-worker.pyz")
        for z in tmp.glob("edgepipe-worker-*.pyz"):
            z.unlink()
        verify.write_eval(release, tmp / verify.EVAL_FILE, data)
        if family == "tensorrt":
            pkg = Path(__file__).resolve().parents[1]
            shutil.copytree(pkg, tmp / "src" / "edgepipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        ctx = Context(out, m.target.get("name", release.name), backend, m.artifact.precision, platform, python,
                      base, f"{family}.Dockerfile", len(house.wheels),
                      sum((tmp / "wheels" / w.file).stat().st_size for w in house.wheels))
        (tmp / "context.json").write_text(json.dumps({**ctx.to_dict(), "directory": None,
                                                      "requirements": house.requirements}, indent=1) + "\n")
    return ctx
