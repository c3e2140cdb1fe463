"""Each backend's ``[options]`` table as a typed dataclass, registered by backend name.

A target's options are parsed once, when the target is loaded (``Target.options`` is one of these), so
a wrong key or value fails at load with the file and field named, and no backend re-parses a dict.
They live here, below ``backends/``, so that loading a target never imports a backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from edgepipe.config._schema import from_dict
from edgepipe.errors import ConfigError

GPU_DELEGATE = "libtensorflowlite_gpu_delegate.so"

T = TypeVar("T", bound=type)
_OPTIONS: dict[str, type] = {}


def backend_options(name: str) -> Callable[[T], T]:
    """Class decorator: ``cls`` is the ``[options]`` of backend ``name``."""

    def deco(cls: T) -> T:
        _OPTIONS[name] = cls
        return cls

    return deco


def backend_names() -> list[str]:
    """Every backend a target may name."""
    return sorted(_OPTIONS)


def options_class(backend: str) -> type:
    if backend not in _OPTIONS:
        raise ConfigError(f"unknown backend {backend!r}; known backends: {', '.join(backend_names())}")
    return _OPTIONS[backend]


def parse_options(backend: str, raw: Any) -> Any:
    """``raw`` (a dict from TOML, or already the typed object) as backend ``backend``'s options."""
    cls = options_class(backend)
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"options: expected a table for backend {backend!r}, got {type(raw).__name__}")
    try:
        return from_dict(cls, raw, "options")
    except ConfigError as e:
        raise ConfigError(f"backend {backend}: {e}") from None


@backend_options("onnxruntime")
@dataclass(frozen=True)
class OrtOptions:
    """An onnxruntime target's ``[options]``: ``activation_type`` uint8/int8 (int8 kernels), or uint16/int16
    (16-bit Q/DQ activations: onnxruntime computes those layers in float between them, so they keep accuracy
    int8 cannot, at about fp32's speed); which operators are quantized (``op_types``); minmax ranges as the
    mean of per-sample ranges (``mean_ranges``); int8 weights, per channel or not; ``reduce_range`` (7-bit weights,
    for CPUs without VNNI); the calibrator's batch."""

    activation_type: Literal["uint8", "int8", "uint16", "int16"] = "uint8"
    #: which operators get Q/DQ: "all" (onnxruntime's default: every operator it can quantize, Add, Mul,
    #: Concat, ... included) or "weighted" (only Conv, ConvTranspose, Gemm, MatMul: their inputs and weights,
    #: as NNCF quantizes; the elementwise arithmetic between them stays float). PP-OCRv4's recognizer: exact
    #: match 45 % -> 58 % (fp32 88 %); 84.5 % with mean_ranges (fp32 92.5 % on 200 lines)
    op_types: Literal["all", "weighted"] = "all"
    #: minmax ranges as the mean over the calibration samples of each sample's min and max (the statistic
    #: NNCF's default takes), instead of the extremes over all of them: one outlier sample no longer sets
    #: a tensor's range
    mean_ranges: bool = False
    per_channel: bool = True
    reduce_range: bool = False
    calibration_batch: int = 32


@backend_options("openvino")
@dataclass(frozen=True)
class OpenVinoOptions:
    """The ``[options]`` of an openvino target.

    Attributes:
        preset: NNCF quantization preset: ``performance`` (symmetric activations) or ``mixed``
            (asymmetric activations, for activations that are far from zero-centred).
        ignored_scope: OpenVINO operation names kept in float by int8 (the manifest lists the
            quantized ones under ``quantization.quantized_layers``).
        ignored_patterns: regular expressions over the same names, for the same purpose.
        performance_hint: OpenVINO's ``PERFORMANCE_HINT`` for loading: ``latency`` or ``throughput``.
        accuracy_control: int8 only: if plain int8 misses ``budgets.max_accuracy_drop`` on the
            evaluation data, revert the layers that cost most accuracy to float until it does not
            (``nncf.quantize_with_accuracy_control``).
    """

    preset: Literal["performance", "mixed"] = "performance"
    ignored_scope: tuple[str, ...] = ()
    ignored_patterns: tuple[str, ...] = ()
    performance_hint: Literal["latency", "throughput"] = "latency"
    accuracy_control: bool = False

    def __post_init__(self) -> None:
        for p in self.ignored_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"options.ignored_patterns: {p!r} is not a regular expression ({e})") from None


@backend_options("tflite")
@dataclass(frozen=True)
class TFLiteOptions:
    """A tflite target's ``[options]``: what the board runs, and how int8 is quantized."""

    runtime: Literal["litert", "tflite_runtime"] = "litert"  # the Python runtime on the board
    delegate: Literal["xnnpack", "gpu", "none"] = "xnnpack"  # none: the builtin kernels only
    delegate_library: str = GPU_DELEGATE  # the GPU delegate's shared library (delegate = "gpu")
    quant_type: Literal["per-channel", "per-tensor"] = "per-channel"  # int8 weights
    io_dtype: Literal["int8", "uint8"] = "int8"  # int8 input and output tensors
    #: int8: every tensor 8-bit. int16: TFLite's 16x8 mode, int8 weights and 16-bit activations (float input
    #: and output), for ranges int8 cannot hold; accuracy first: its kernels are not XNNPACK's int8 ones
    activations: Literal["int8", "int16"] = "int8"


@backend_options("tensorrt")
@dataclass(frozen=True)
class TrtOptions:
    """The target's ``[options]`` for TensorRT."""

    workspace_mb: int = 1024  # builder workspace pool limit
    min_batch: int = 1  # optimization profile (dynamic-batch models)
    opt_batch: int | None = None  # None: the target's runtime.batch
    max_batch: int = 32
    dla_core: int | None = None  # Jetson AGX/NX: run on this DLA core
    gpu_fallback: bool = True  # layers DLA cannot run go to the GPU
    typing: Literal["strong", "weak"] = "strong"  # weak: TensorRT 10.x builder precision flags
    high_precision: Literal["fp16", "fp32"] = "fp16"  # int8: type of the layers left unquantized
    optimization_level: int = 3  # builderOptimizationLevel, 0..5

    def __post_init__(self) -> None:
        if self.workspace_mb < 1:
            raise ConfigError(f"options.workspace_mb = {self.workspace_mb}: must be >= 1 (MiB)")
        if not 1 <= self.min_batch <= self.max_batch:
            raise ConfigError(f"options: min_batch = {self.min_batch}, max_batch = {self.max_batch}: need "
                              "1 <= min_batch <= max_batch")
        if self.opt_batch is not None and not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"options.opt_batch = {self.opt_batch}: must lie in [min_batch, max_batch] = "
                              f"[{self.min_batch}, {self.max_batch}]")
        if self.dla_core is not None and self.dla_core < 0:
            raise ConfigError(f"options.dla_core = {self.dla_core}: DLA cores are numbered from 0")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"options.optimization_level = {self.optimization_level}: TensorRT takes 0 to 5")
