"""TFLite / LiteRT for ARM boards: ONNX -> ``.tflite`` with onnx2tf, run on ai-edge-litert.

Compile runs onnx2tf in its own toolchain environment (``edgepipe toolchain install tflite``: it pins
tensorflow 2.19, onnx 1.19 and numpy 1.26, which edgepipe's environment cannot share) as a subprocess
with a small driver, in a scratch directory, offline: the driver refuses and records any socket, the
proxy variables point at a closed local port, and the sample image file onnx2tf would otherwise download
is written beforehand from the target's own calibration set. fp32 and fp16 are onnx2tf's float
variants; int8 is full-integer (int8 input and output, per-channel int8 weights) calibrated on the
target's calibration samples in NHWC.

The produced model takes NHWC input. The Runner owns that: it takes the pipeline's NCHW float32 arrays,
transposes them, quantizes int8 inputs and dequantizes int8 outputs with the model's own scales and zero
points, and resizes the batch dimension as needed. Output: float logits.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe import toolchains
from edgepipe._fs import atomic_path
from edgepipe.backends import register
from edgepipe.backends.base import Availability, Backend, Capabilities
from edgepipe.config import Target
from edgepipe.config.options import GPU_DELEGATE, TFLiteOptions
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, TensorSpec

DRIVER = Path(__file__).with_name("_tflite_driver.py")
TOOLCHAIN = "tflite"
ARTIFACT = "model.tflite"
# onnx2tf's output file suffix for each precision (<stem>_<suffix>.tflite)
VARIANTS = {"fp32": "float32", "fp16": "float16", "int8": "full_integer_quant"}
# onnx2tf downloads this file from the internet unless it is in its working directory (even for float
# conversion of a 3-channel static-batch model): the backend writes it from the calibration set.
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
# Every proxy variable of the converter points here (the discard port: refused), so that anything the
# driver's audit hook cannot see (a child process) cannot reach the internet either. Tests point it at a
# listening socket to check that nothing connects.
OFFLINE_PROXY = "http://127.0.0.1:9"
CONVERT_TIMEOUT_S = 3600
RUNTIMES = {"litert": "ai_edge_litert", "tflite_runtime": "tflite_runtime"}
RUNTIME_DISTS = {"litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}


def _runtime_available(runtime: str) -> bool:
    return importlib.util.find_spec(RUNTIMES[runtime]) is not None


def _runtime_module(preferred: str) -> tuple[str, Any]:
    """The interpreter module of the preferred runtime, else the other one (with a warning)."""
    order = [preferred] + [r for r in RUNTIMES if r != preferred]
    for r in order:
        if _runtime_available(r):
            if r != preferred:
                warnings.warn(f"{RUNTIME_DISTS[preferred]} is not installed here: running on {RUNTIME_DISTS[r]} "
                              "instead (numbers may differ from the board's)", RuntimeWarning, stacklevel=3)
            return r, importlib.import_module(f"{RUNTIMES[r]}.interpreter")
    raise BackendUnavailable("no TFLite runtime is installed: pip install 'edgepipe[tflite]' (ai-edge-litert)")


def gpu_delegate_found(library: str = GPU_DELEGATE) -> bool:
    """Whether the GPU delegate's shared library can be loaded on this machine."""
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _dequantize(a: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    if a.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (a.astype(np.float32) - zero) * np.float32(scale)
    return a.astype(np.float32, copy=False)


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind not in "iu":
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / np.float32(scale)) + zero, info.min, info.max).astype(dtype)


class TFLiteRunner:
    """A LiteRT ``Interpreter`` behind the pipeline's NCHW float32 in, float logits out."""

    def __init__(self, path: Path, threads: int | None = None, runtime: str = "litert",
                 delegate: str = "xnnpack", delegate_library: str = GPU_DELEGATE) -> None:
        self.runtime, mod = _runtime_module(runtime)
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        self.delegate = delegate
        if delegate == "none":
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif delegate == "gpu":
            try:
                if not gpu_delegate_found(delegate_library):  # (load_delegate leaves a broken object behind)
                    raise OSError(f"{delegate_library} not found")
                kwargs["experimental_delegates"] = [mod.load_delegate(delegate_library)]
            except (OSError, ValueError) as e:
                self.delegate = "xnnpack"
                warnings.warn(f"the GPU delegate cannot be loaded here ({e}): running {Path(path).name} on the "
                              "CPU (XNNPACK) instead; accuracy holds, latency is not the board's",
                              RuntimeWarning, stacklevel=3)
        self.interpreter = mod.Interpreter(**kwargs)
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        if len(self._in) != 1 or len(self._in[0]["shape_signature"]) != 4:
            raise ConfigError(f"{Path(path).name}: edgepipe's tflite runner takes one 4-D (NHWC image) input; "
                              f"this model has {[list(d['shape_signature']) for d in self._in]}")
        n, h, w, c = (int(v) for v in self._in[0]["shape_signature"])
        self._static_batch = n if n > 0 else None
        self._batch = int(self._in[0]["shape"][0])
        self.interpreter.allocate_tensors()
        self.inputs = [TensorSpec(self._in[0]["name"], (self._static_batch, c, h, w), "float32")]

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self.interpreter.resize_tensor_input(self._in[0]["index"], [n, *self._in[0]["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
            self._batch = n

    def _invoke(self, x_nhwc: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self._in[0]["index"], _quantize(x_nhwc, self._in[0]))
        self.interpreter.invoke()
        return [_dequantize(self.interpreter.get_tensor(d["index"]), d) for d in self._out]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if len(feeds) != 1:
            raise ValueError(f"this model has one input ({self.inputs[0].name}); got feeds {sorted(feeds)}")
        x = np.asarray(next(iter(feeds.values())), dtype=np.float32)
        want = self.inputs[0].shape[1:]
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"input of shape {list(x.shape)}: this model takes NCHW batches of {list(want)}")
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
        if self._static_batch is None:
            self._resize(len(x))
            return self._invoke(x)
        b, outs = self._static_batch, []
        for i in range(0, len(x), b):  # a fixed-batch model: run in chunks, padding the last
            xb = x[i : i + b]
            pad = b - len(xb)
            if pad:
                xb = np.concatenate([xb, np.repeat(xb[-1:], pad, axis=0)])
            outs.append([o[: b - pad] for o in self._invoke(xb)])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def sample_file(x_nchw: np.ndarray) -> np.ndarray:
    """onnx2tf's sample image array (20 x 128 x 128 x 3, float32), made from our own samples."""
    x = x_nchw.transpose(0, 2, 3, 1)[np.arange(20) % len(x_nchw)]
    _, h, w, c = x.shape
    x = x[:, (np.arange(128) * h) // 128][:, :, (np.arange(128) * w) // 128]
    return np.ascontiguousarray(x[..., np.arange(3) % c], dtype=np.float32)


@register
class TFLiteBackend(Backend):
    name = "tflite"
    capabilities = Capabilities(
        precisions=("fp32", "fp16", "int8"),
        calibration_methods=("minmax",),
        extra="tflite",
        modules=("ai_edge_litert",),
        artifact_suffixes=(".tflite",),
        platforms=("arm64 CPU (XNNPACK)", "arm64 GPU delegate (fp16)", "x86-64 CPU"),
    )
    Options = TFLiteOptions

    def check(self) -> Availability:
        """Compile needs the converter toolchain; run needs ai-edge-litert (or tflite-runtime)."""
        tc = toolchains.status(TOOLCHAIN)
        can_run = any(_runtime_available(r) for r in RUNTIMES)
        reasons = []
        if not tc.installed:
            reasons.append(f"converter toolchain {tc.reason}")
        if not can_run:
            reasons.append("no runtime: pip install 'edgepipe[tflite]' (ai-edge-litert)")
        return Availability(tc.installed, can_run, "; ".join(reasons))

    def check_target(self, target: Target) -> Availability:
        avail = self.check()
        opts: TFLiteOptions = self.options(target)
        if opts.delegate == "gpu" and avail.run and not gpu_delegate_found(opts.delegate_library):
            why = (f"the GPU delegate ({opts.delegate_library}) is not on this machine (ai-edge-litert's x86-64 "
                   "wheels ship none; build it for the board): builds here evaluate on the CPU")
            return Availability(avail.compile, False, "; ".join(r for r in (avail.reason, why) if r))
        return avail

    def validate(self, target: Target) -> None:
        super().validate(target)
        opts: TFLiteOptions = self.options(target)
        if target.calibration.float_layers or target.calibration.keep_float:
            raise ConfigError(f"target {target.name!r}: calibration.float_layers / keep_float (mixed precision) is "
                              "not available for TFLite: onnx2tf's full-integer conversion quantizes every layer "
                              "(TFLite's own selective quantization, QuantizationDebugger's denylisted_nodes, needs "
                              "the TensorFlow converter on a SavedModel: not wired); use 0 float layers here")
        if opts.delegate == "gpu" and target.precision == "int8":
            raise ConfigError(f"target {target.name!r}: the GPU delegate runs float models; use precision "
                              "'fp16' (or 'fp32') with delegate = 'gpu', or delegate = 'xnnpack' for int8")

    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        opts: TFLiteOptions = self.options(target)
        python = toolchains.python(TOOLCHAIN)
        x = np.asarray(calibration.x, dtype=np.float32)
        if x.ndim != 4:
            raise CompileError(f"target {target.name!r}: calibration samples must be NCHW, got shape {list(x.shape)}")
        with tempfile.TemporaryDirectory(prefix="edgepipe-tflite-") as tmp:
            scratch = Path(tmp)
            result = run_driver(python, onnx, target.precision, x, opts, scratch)
            produced = scratch / "out" / f"model_{VARIANTS[target.precision]}.tflite"
            if not produced.is_file():
                raise CompileError(f"onnx2tf did not write {produced.name} for {onnx.path.name}; it wrote "
                                   f"{', '.join(result.get('files', [])) or 'nothing'}")
            out = workdir / ARTIFACT
            with atomic_path(out) as t:
                shutil.copyfile(produced, t)
        details = result.get("details", {})
        metadata: dict[str, Any] = {
            "converter": {"tool": "onnx2tf", **result.get("versions", {})},  # no timings: same inputs, same bytes
            "variant": VARIANTS[target.precision],
            "input_layout": "NHWC",
            "board": {"runtime": RUNTIME_DISTS[opts.runtime], "delegate": opts.delegate,
                      "threads": target.runtime.threads,
                      **({"delegate_library": opts.delegate_library} if opts.delegate == "gpu" else {})},
            "tensors": details,
            "network_attempts": 0,
        }
        if opts.delegate == "gpu" and not gpu_delegate_found(opts.delegate_library):
            metadata["evaluated_here_on"] = "CPU (XNNPACK): the GPU delegate is not on the build machine"
        if target.precision == "int8":
            metadata["quantization"] = {
                "kind": "full-integer", "weights": f"int8 {opts.quant_type}", "io_dtype": opts.io_dtype,
                "calibration": {**calibration.record(), "method": target.calibration.method}, "normalization": {"mean": 0.0, "std": 1.0},
            }
        return Artifact(self.name, target.precision, out, metadata=metadata)

    def load(self, artifact: Artifact, threads: int | None = None) -> TFLiteRunner:
        self.require("run")
        board = artifact.metadata.get("board", {})
        runtime = next((r for r, d in RUNTIME_DISTS.items() if d == board.get("runtime")), "litert")
        delegate = board.get("delegate", "xnnpack")
        return TFLiteRunner(artifact.path, threads, runtime, delegate, board.get("delegate_library", GPU_DELEGATE))


def offline_env() -> dict[str, str]:
    """The converter's environment: no PYTHONPATH from ours, every proxy pointed at a closed local port."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proxy = os.environ.get("EDGEPIPE_OFFLINE_PROXY", OFFLINE_PROXY)
    for k in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy"):
        env[k] = env[k.upper()] = proxy
    env["no_proxy"] = env["NO_PROXY"] = ""
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""  # convert on the CPU wherever this runs: same bytes everywhere
    return env


def run_driver(python: Path, onnx: OnnxModel, precision: str, x_nchw: np.ndarray, opts: TFLiteOptions,
               scratch: Path) -> dict[str, Any]:
    """Convert ``onnx`` with the toolchain's onnx2tf in ``scratch``, offline; returns the driver's result."""
    channels = int(x_nchw.shape[1])
    shutil.copyfile(onnx.path, scratch / "model.onnx")  # onnx2tf names its outputs model_<variant>.tflite
    np.save(scratch / "calibration_nhwc.npy", np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
    np.save(scratch / SAMPLE_FILE, sample_file(x_nchw))
    request = {
        "workdir": str(scratch), "onnx": str(scratch / "model.onnx"), "out": str(scratch / "out"),
        "result": str(scratch / "result.json"), "precision": precision, "input_name": onnx.input_name,
        "calibration": str(scratch / "calibration_nhwc.npy"), "channels": channels,
        # our samples are already what the model consumes ([0, 1] floats): no normalization
        "mean": [0.0] * channels, "std": [1.0] * channels,
        "quant_type": opts.quant_type, "io_dtype": opts.io_dtype, "variant": VARIANTS[precision],
    }
    (scratch / "request.json").write_text(json.dumps(request))
    log = scratch / "convert.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run([str(python), str(DRIVER), str(scratch / "request.json")], cwd=scratch,
                                  stdout=f, stderr=subprocess.STDOUT, env=offline_env(), timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise CompileError(f"onnx2tf ran past {CONVERT_TIMEOUT_S} s on {onnx.path.name}") from e
    result_path = scratch / "result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False}
    attempts = result.get("network_attempts", [])
    if attempts:
        first = attempts[0]
        raise CompileError(
            f"onnx2tf tried to reach the network while converting {onnx.path.name} ({len(attempts)} attempt(s), "
            f"first: {first['event']} {first['address']} from {first['caller']}); it was blocked and the "
            "build stopped: edgepipe builds never download anything"
        )
    if proc.returncode != 0 or not result.get("ok"):
        error = str(result.get("error") or "")
        if not error or error.startswith("SystemExit"):  # onnx2tf logs its reason, then exits
            error = _log_tail(log)
        raise CompileError(f"onnx2tf could not convert {onnx.path.name} ({precision}): {error.splitlines()[0][:400]}")
    return result


def _log_tail(log: Path, n: int = 4) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR") or "Error:" in ln]
    return " | ".join((errors or lines)[-n:]) or "no output"
