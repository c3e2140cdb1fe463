"""The Backend protocol: compile an ONNX model for a target, and load the result as a Runner.

A backend owns its layout quirks (NHWC, int8 input/output, engine profiles): the pipeline feeds arrays by the
ONNX model's input names, in the ONNX layout and dtype (float32 images NCHW, int64 token ids as they are), and
gets every output back, in the ONNX model's output order and layout. Heavy imports (openvino, tensorflow,
tensorrt) stay inside the methods so that importing this package is cheap.
"""

from __future__ import annotations

import abc
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgepipe.config import Target
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Runner, Signature, StandIn, TensorSpec

if TYPE_CHECKING:
    import numpy as np


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
    run_modules: tuple[str, ...] | None = None  # the ones running an artifact needs (None: all of ``modules``)
    needs_gpu: bool = False
    artifact_suffixes: tuple[str, ...] = ()  # how `edgepipe bench FILE` recognises its artifacts
    platforms: tuple[str, ...] = ()  # what the artifact runs on, for `edgepipe targets`


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
        caps = self.capabilities
        missing = [m for m in caps.modules if importlib.util.find_spec(m) is None]
        if missing:
            how = f"pip install 'edgepipe[{caps.extra}]'" if caps.extra else "install it"
            reason = f"{', '.join(missing)} not installed: {how}"
            run = caps.run_modules is not None and not set(missing) & set(caps.run_modules)
            return Availability(False, run, reason)  # a runtime-only machine (an image, a board) still runs
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
        """The target's ``[options]``: typed when the target was loaded (``edgepipe.config.options``)."""
        if not isinstance(target.options, self.Options):
            raise ConfigError(f"target {target.name!r}: its options are {type(target.options).__name__}, "
                              f"not backend {self.name!r}'s {self.Options.__name__}")
        return target.options

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

    def check_signature(self, signature: Signature, target: Target) -> None:
        """Refuse, before any work, a model whose inputs or outputs this backend cannot compile for ``target``
        (raises ``ConfigError`` or ``CompileError`` naming the input). Default: every signature is accepted."""
        return None

    def compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        """Compile ``onnx`` for ``target`` into ``workdir``; returns the artifact."""
        self.validate(target)
        self.check_signature(signature_of(onnx), target)
        self.require("compile")
        workdir.mkdir(parents=True, exist_ok=True)
        if target.precision == "int8" and len(calibration) == 0:
            raise CompileError(f"target {target.name!r}: the calibration set is empty; int8 needs samples")
        return self._compile(onnx, target, calibration, workdir)

    @abc.abstractmethod
    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact: ...

    def stand_in(self, artifact: Artifact) -> StandIn | None:
        """When this machine cannot run ``artifact``: what to evaluate instead. Default: nothing."""
        return None

    @abc.abstractmethod
    def load(self, artifact: Artifact, threads: int | None = None) -> Runner:
        """Load an artifact for inference: arrays by ONNX input name in, every output (ONNX order) out."""


def signature_of(onnx: OnnxModel) -> Signature:
    """The model's full signature: the one it carries, else read from its file (every input and output)."""
    if onnx.signature is not None and onnx.signature.outputs:
        return onnx.signature
    from edgepipe.export import onnx_model

    return onnx_model(onnx.path).signature or Signature(onnx.inputs)


def check_feeds(inputs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """``ValueError`` unless ``feeds`` holds exactly one array per input of the model, by name."""
    want = [t.name for t in inputs]
    if set(feeds) != set(want):
        raise ValueError(f"the model's inputs are {', '.join(want)}; got feeds for {', '.join(sorted(feeds)) or 'none'}"
                         " (give one array per input, by name)")


def calibration_feeds(specs: tuple[TensorSpec, ...], calibration: CalibrationSet) -> dict[str, np.ndarray]:
    """The calibration samples of the inputs ``specs``, by name, each in its input's dtype: float inputs as
    float, integer inputs (token ids, indices) exactly as given: never scaled, never normalized."""
    import numpy as np

    feeds = calibration.feeds([t.name for t in specs])
    out = {}
    for t in specs:
        x = np.asarray(feeds[t.name])
        if t.is_float:
            x = np.asarray(x, dtype=t.dtype if t.dtype in ("float32", "float16", "float64") else np.float32)
        elif not t.dtype.startswith("onnx:"):
            if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
                raise CompileError(f"input {t.name!r} takes {t.dtype} (ids, indices) but its calibration samples are "
                                   f"{x.dtype} with fractions: give them as integers, exactly as the model takes them")
            x = x.astype(t.dtype, copy=False)
        out[t.name] = x
    return out
