"""edgepipe: a trained PyTorch model to fast, small, verified release artifacts for edge hardware.

The public functions live in :mod:`edgepipe.api` and are re-exported here lazily, so that
``import edgepipe`` (and ``edgepipe --help``) stays cheap: torch and the backends load only when used.
"""

from __future__ import annotations

from typing import Any

from edgepipe import _telemetry, _threads

__version__ = "0.1.0"

_telemetry.apply()  # before anything imports onnxruntime: vendor telemetry off (see edgepipe._telemetry)
_threads.apply()  # before torch starts its thread pool: $EDGEPIPE_THREADS (see edgepipe._threads)

# ``export`` is left out on purpose: ``edgepipe.export`` is the export module; the checked
# export-with-parity function is ``edgepipe.api.export``.
_API = ("build", "release", "compile", "bench", "targets", "resolve_artifact")

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from edgepipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgepipe' has no attribute {name!r}")
