"""Backend registry. Adding a backend: one module with a ``@register`` class, and one line in ``_MODULES``."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgepipe.backends.base import Availability, Backend, Capabilities
from edgepipe.errors import ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Runner, StandIn, TensorSpec

_MODULES = (
    "edgepipe.backends.onnxruntime",
    "edgepipe.backends.tensorrt",
    "edgepipe.backends.tflite",
    "edgepipe.backends.openvino",
)
_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend known by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(mod)


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    """The backend called ``name``; ``ConfigError`` listing the known ones otherwise."""
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def for_artifact(path: Path) -> Backend:
    """The backend whose artifacts end like ``path`` (``.onnx``, ``.xml``, ``.tflite``, ...)."""
    _load_all()
    name = path.name
    for cls in _REGISTRY.values():
        if any(name.endswith(s) for s in cls.capabilities.artifact_suffixes):
            return cls()
    known = sorted({s for c in _REGISTRY.values() for s in c.capabilities.artifact_suffixes})
    raise ConfigError(f"{str(path)!r}: no backend runs this kind of file; known artifact types: {', '.join(known)}")


__all__ = [
    "Artifact", "Availability", "Backend", "CalibrationSet", "Capabilities", "OnnxModel", "Runner",
    "StandIn", "TensorSpec", "for_artifact", "get", "names", "register",
]
