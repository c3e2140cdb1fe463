"""One exception family. Every message names the input, the cause and what to do."""

from __future__ import annotations

from typing import Any


class EdgepipeError(Exception):
    """Base of every error edgepipe raises on purpose. The CLI prints it as one line."""


class ConfigError(EdgepipeError):
    """A target, recipe or command-line value is wrong."""


class ModelLoadError(EdgepipeError):
    """A model source could not be found, imported or read."""


class DataError(EdgepipeError):
    """A calibration or evaluation dataset is missing, empty or of the wrong shape."""


class ExportError(EdgepipeError):
    """torch -> ONNX export failed or the exported model does not match torch."""


class CompressionError(EdgepipeError):
    """A compression step could not be applied."""


class CompileError(EdgepipeError):
    """A backend could not compile the ONNX model for a target."""


class BackendUnavailable(EdgepipeError):
    """A backend's Python package, toolchain or hardware is not present here."""


class BenchmarkError(EdgepipeError):
    """The measuring harness failed to load or run an artifact.

    Attributes:
        partial: the figures measured before a run stopped part-way (a board that dropped: its phase,
            iterations and latency so far), or ``None``; ``edgepipe bench --json`` prints them.
    """

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class BudgetError(EdgepipeError):
    """A build finished but missed one of the target's budgets (accuracy, latency, memory)."""


class ClusterError(EdgepipeError):
    """The Ray cluster is unreachable, lacks a resource the targets need, or a node's versions differ."""


class DockerError(EdgepipeError):
    """The Docker engine is missing, or building or running an image failed."""
