"""The Backend protocol: compile an ONNX model for a target, and load the result as a Runner.

A backend owns its layout quirks (NHWC, int8 input/output, engine profiles): the pipeline always feeds
NCHW float32 arrays and gets float logits back. Heavy imports (openvino, tensorflow, tensorrt) stay
inside the methods so that importing this package is cheap.
"""

from __future__ import annotations

import abc
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from edgepipe._hashing import sha256_arrays
from edgepipe._schema import from_dict
from edgepipe.config import Target
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


@dataclass(frozen=True)
class Availability:
    """Whether this machine can compile and run a backend's artifacts, and why not."""

    compile: bool
    run: bool
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do and what it needs, checked before any work starts."""

    precisions: tuple[str, ...]
    calibration_methods: tuple[str, ...] = ()
    extra: str | None = None  # pip extra that installs what it needs: edgepipe[<extra>]
    modules: tuple[str, ...] = ()  # Python modules it imports to compile and run
    needs_gpu: bool = False
    artifact_suffixes: tuple[str, ...] = ()  # how `edgepipe bench FILE` recognises its artifacts
    platforms: tuple[str, ...] = ()  # what the artifact runs on, for `edgepipe targets`


@dataclass(frozen=True)
class OnnxModel:
    """An exported float ONNX model on disk (single file, weights inside)."""

    path: Path
    input_name: str
    input_shape: tuple[int | str | None, ...]
    sha256: str


@dataclass(frozen=True)
class CalibrationSet:
    """NCHW float32 samples from the calibration split, and the target's method.

    ``validation_x``/``validation_y`` (optional) are labelled samples for backends that check accuracy
    while compiling (OpenVINO's accuracy-controlled int8); ``edgepipe build`` passes the evaluation split.
    """

    x: np.ndarray
    method: str = "minmax"
    source: str = ""
    validation_x: np.ndarray | None = None
    validation_y: np.ndarray | None = None
    validation_source: str = ""

    @property
    def sha256(self) -> str:
        return sha256_arrays(self.x)

    @property
    def validation_sha256(self) -> str | None:
        if self.validation_x is None or self.validation_y is None:
            return None
        return sha256_arrays(self.validation_x, self.validation_y)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "method": self.method, "samples": len(self.x), "sha256": self.sha256}


@dataclass
class Artifact:
    """A compiled model: its main file, every file that belongs with it, and what compile recorded."""

    backend: str
    precision: str
    path: Path
    files: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.files:
            self.files = [self.path]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.is_file())


@dataclass(frozen=True)
class StandIn:
    """What a machine that cannot run an artifact evaluates in its place: a model of another backend that
    computes the same function (e.g. a TensorRT bundle's Q/DQ ONNX on onnxruntime), and what that means."""

    artifact: Artifact
    evaluates: str  # what the accuracy measured on the stand-in stands for
    bench: str  # why it is not benchmarked, and where the artifact itself gets timed


class Runner(Protocol):
    inputs: list[TensorSpec]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class NoOptions:
    """This backend takes no [options]."""


class Backend(abc.ABC):
    """Base of every backend: ``compile`` checks availability and precision, then calls ``_compile``."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type] = NoOptions

    def check(self) -> Availability:
        """Can this machine compile and run this backend? Default: are its modules importable."""
        missing = [m for m in self.capabilities.modules if importlib.util.find_spec(m) is None]
        if missing:
            how = f"pip install 'edgepipe[{self.capabilities.extra}]'" if self.capabilities.extra else "install it"
            reason = f"{', '.join(missing)} not installed: {how}"
            return Availability(False, False, reason)
        return Availability(True, True)

    def check_target(self, target: Target) -> Availability:
        """Like ``check``, for one target: some targets need more than the backend (a GPU delegate)."""
        return self.check()

    def require(self, what: str = "compile") -> None:
        avail = self.check()
        ok = avail.compile if what == "compile" else avail.run
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} cannot {what} here: {avail.reason}")

    def describe(self) -> dict[str, str]:
        """What this machine's runtime reports about the device it runs on (for ``edgepipe targets``).

        Default: nothing. Backends with a device to query (CPU name, supported precisions) override it,
        and return nothing when their runtime is missing here.
        """
        return {}

    def options(self, target: Target) -> Any:
        """The target's ``[options]`` table parsed into this backend's ``Options`` dataclass."""
        try:
            return from_dict(self.Options, target.options, "options")
        except ConfigError as e:
            raise ConfigError(f"target {target.name!r} (backend {self.name}): {e}") from None

    def validate(self, target: Target) -> None:
        """Check a target against this backend's capabilities; raises ``ConfigError``."""
        caps = self.capabilities
        if target.precision not in caps.precisions:
            raise ConfigError(
                f"target {target.name!r}: backend {self.name!r} does not support precision "
                f"{target.precision!r}; supported: {', '.join(caps.precisions)}"
            )
        if target.precision == "int8" and caps.calibration_methods and \
                target.calibration.method not in caps.calibration_methods:
            raise ConfigError(
                f"target {target.name!r}: backend {self.name!r} does not support calibration method "
                f"{target.calibration.method!r}; supported: {', '.join(caps.calibration_methods)}"
            )
        self.options(target)

    def compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        """Compile ``onnx`` for ``target`` into ``workdir``; returns the artifact."""
        self.validate(target)
        self.require("compile")
        workdir.mkdir(parents=True, exist_ok=True)
        if target.precision == "int8" and len(calibration.x) == 0:
            raise CompileError(f"target {target.name!r}: the calibration set is empty; int8 needs samples")
        return self._compile(onnx, target, calibration, workdir)

    @abc.abstractmethod
    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact: ...

    def stand_in(self, artifact: Artifact) -> StandIn | None:
        """When this machine cannot run ``artifact``: what to evaluate instead. Default: nothing."""
        return None

    @abc.abstractmethod
    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        """Load an artifact for inference (NCHW float32 in, float logits out)."""
