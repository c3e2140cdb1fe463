"""Tool versions for the manifest and the cache keys, read from package metadata (no imports)."""

from __future__ import annotations

import platform
from importlib import metadata

DISTRIBUTIONS = (
    "edgepipe", "torch", "onnx", "onnxscript", "onnxruntime", "numpy", "scikit-learn", "openvino", "nncf",
    "ai-edge-litert", "tflite-runtime", "torch-pruning", "tensorrt", "polygraphy",
    "nvidia-modelopt", "cuda-python",
)


def tool_versions() -> dict[str, str]:
    """Installed versions of python and every distribution edgepipe may use (absent ones left out)."""
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
