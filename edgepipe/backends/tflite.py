"""TFLite / LiteRT for ARM boards: ONNX -> ``.tflite`` with onnx2tf, run on ai-edge-litert.

Compile runs onnx2tf in its own toolchain environment (``edgepipe toolchain install tflite``: it pins
tensorflow 2.19, onnx 1.19 and numpy 1.26, which edgepipe's environment cannot share) as a subprocess
with a small driver, in a scratch directory, offline: the driver refuses and records any socket, the
proxy variables point at a closed local port, and the sample image file onnx2tf would otherwise download
is written beforehand from the target's own calibration set. fp32 and fp16 are onnx2tf's float
variants; int8 is full-integer (int8 inputs and outputs, per-channel int8 weights) calibrated on the
target's calibration samples (one array per input).

Layouts: 4-D float inputs (images) become NHWC; every other input keeps the ONNX layout (onnx2tf's ``-k``
for 3-D and 5-D ones, which it would otherwise make channels-last). Each output's layout (4-D outputs come
out NHWC) and which converted tensor is which ONNX input and output are measured at conversion (the driver
runs the ONNX model and the conversion on the same samples) and recorded in the artifact's metadata
(``layouts``, ``output_layouts``, ``tensor_names``). The Runner owns all of it: it takes arrays by ONNX input
name in the ONNX layout (NCHW float32 images, integer ids as they are), transposes, quantizes int8 inputs and
dequantizes int8 outputs with the model's own scales and zero points, resizes the batch dimension as needed,
and returns every output in the ONNX model's order and layout.

Full-integer int8 quantizes every input: a model with an integer input (token ids) is refused before any
work (:meth:`TFLiteBackend.check_signature`); fp32 and fp16 take it as it is.
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
from edgepipe.backends.base import (
    Availability,
    Backend,
    Capabilities,
    calibration_feeds,
    check_feeds,
    signature_of,
)
from edgepipe.config import Target
from edgepipe.config.options import GPU_DELEGATE, TFLiteOptions
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Signature, TensorSpec

DRIVER = Path(__file__).with_name("_tflite_driver.py")
TOOLCHAIN = "tflite"
ARTIFACT = "model.tflite"
# onnx2tf's output file suffix for each precision (<stem>_<suffix>.tflite)
VARIANTS = {"fp32": "float32", "fp16": "float16", "int8": "full_integer_quant"}
#: int8 weights with 16-bit activations (TFLite's 16x8 mode, EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_
#: WEIGHTS_INT8), with float input and output: onnx2tf writes it in the same -oiqt conversion
INT16_ACT_VARIANT = "integer_quant_with_int16_act"


def variant(precision: str, opts: TFLiteOptions) -> str:
    """onnx2tf's output file suffix for ``precision`` with these options."""
    return INT16_ACT_VARIANT if precision == "int8" and opts.activations == "int16" else VARIANTS[precision]
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


#: an input's or output's layout in the converted model: channels-last (by rank) or the ONNX layout
CHANNELS_LAST = {3: "NWC", 4: "NHWC", 5: "NDHWC"}
AS_IS = "as-is"


def input_layout(spec: TensorSpec) -> str:
    """How the converted model takes an ONNX input: NHWC for a 4-D float input (an image), else as it is."""
    return "NHWC" if spec.rank == 4 and spec.is_float else AS_IS


def _to_tflite(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, *range(2, x.ndim), 1)) if layout != AS_IS else x


def _from_tflite(x: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, x.ndim - 1, *range(1, x.ndim - 1))) if layout != AS_IS else x


def _quantized(detail: dict[str, Any]) -> bool:
    """A tensor of integers standing for floats (full-integer models' int8 inputs and outputs)."""
    scale, _ = detail["quantization"]
    return np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16) and bool(scale)


def _dequantize(a: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if _quantized(detail):
        scale, zero = detail["quantization"]
        return (a.astype(np.float32) - zero) * np.float32(scale)
    return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a  # integer outputs stay integers


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if not _quantized(detail) or x.dtype.kind != "f":  # float inputs, and integer ids (never scaled)
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / np.float32(scale)) + zero, info.min, info.max).astype(dtype)


class TFLiteRunner:
    """A LiteRT ``Interpreter`` behind the pipeline's arrays: by ONNX input name, in the ONNX layout.

    ``io`` is what the conversion recorded (the artifact's ``tensor_names``, ``layouts`` and
    ``output_layouts``); without it (an artifact made before edgepipe recorded them) the model must have one
    4-D input, taken as NCHW, and its outputs are returned as they are.
    """

    def __init__(self, path: Path, threads: int | None = None, runtime: str = "litert",
                 delegate: str = "xnnpack", delegate_library: str = GPU_DELEGATE,
                 io: dict[str, Any] | None = None) -> None:
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
        by_name = {d["name"]: k for k, d in enumerate(self._in)}
        out_by_name = {d["name"]: k for k, d in enumerate(self._out)}
        if io and io.get("tensor_names"):
            names, layouts = io["tensor_names"], io.get("layouts", {})
            try:
                # (ONNX name, position in get_input_details(), layout) per input, in the ONNX model's order
                self._inputs = [(n, by_name[t], layouts.get(n, AS_IS)) for n, t in names["inputs"].items()]
                self._outputs = [(out_by_name[t], io.get("output_layouts", {}).get(n, AS_IS))
                                 for n, t in names["outputs"].items()]
            except KeyError as e:
                raise ConfigError(f"{Path(path).name}: the artifact's metadata names tensor {e} that the model does "
                                  "not have; recompile it") from None
        else:
            if len(self._in) != 1 or len(self._in[0]["shape_signature"]) != 4:
                raise ConfigError(f"{Path(path).name}: without the artifact's metadata (tensor_names), edgepipe's "
                                  "tflite runner takes one 4-D (NHWC image) input; this model has "
                                  f"{[list(d['shape_signature']) for d in self._in]}")
            self._inputs = [(_signature_input_name(self.interpreter) or self._in[0]["name"], 0, "NHWC")]
            self._outputs = [(k, AS_IS) for k in range(len(self._out))]
        first = int(self._in[self._inputs[0][1]]["shape_signature"][0])
        self._static_batch = first if first > 0 else None
        self._batch = int(self._in[self._inputs[0][1]]["shape"][0])
        self.interpreter.allocate_tensors()
        self.inputs = []
        for name, k, layout in self._inputs:
            d = self._in[k]
            dims = [int(v) for v in d["shape_signature"]]
            if layout != AS_IS:
                dims = [dims[0], dims[-1], *dims[1:-1]]
            shape = (self._static_batch, *(v if v > 0 else None for v in dims[1:]))
            dtype = np.dtype(d["dtype"])
            self.inputs.append(TensorSpec(name, shape, "float32" if _quantized(d) or dtype.kind == "f" else dtype.name))

    def _resize(self, n: int) -> None:
        if n != self._batch:
            for _, k, _ in self._inputs:
                self.interpreter.resize_tensor_input(self._in[k]["index"], [n, *self._in[k]["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()
            self._out = self.interpreter.get_output_details()
            self._batch = n

    def _invoke(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        for (_, k, _), x in zip(self._inputs, xs, strict=True):
            self.interpreter.set_tensor(self._in[k]["index"], _quantize(x, self._in[k]))
        self.interpreter.invoke()
        return [_from_tflite(_dequantize(self.interpreter.get_tensor(self._out[k]["index"]), self._out[k]), layout)
                for k, layout in self._outputs]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        xs = []
        for spec, (_, _, layout) in zip(self.inputs, self._inputs, strict=True):
            x = np.asarray(feeds[spec.name], dtype=spec.dtype)
            want = spec.shape[1:]
            if x.ndim != spec.rank or any(w is not None and w != v for w, v in zip(want, x.shape[1:], strict=True)):
                what = "NCHW batches" if layout == "NHWC" else "batches"
                raise ValueError(f"input {spec.name!r} of shape {list(x.shape)}: this model takes {what} of "
                                 f"{['?' if w is None else w for w in want]}")
            xs.append(_to_tflite(x, layout))
        n = len(xs[0])
        if self._static_batch is None:
            self._resize(n)
            return self._invoke(xs)
        b, outs = self._static_batch, []
        for i in range(0, n, b):  # a fixed-batch model: run in chunks, padding the last
            parts = [x[i : i + b] for x in xs]
            pad = b - len(parts[0])
            if pad:
                parts = [np.concatenate([p, np.repeat(p[-1:], pad, axis=0)]) for p in parts]
            outs.append([o[: b - pad] for o in self._invoke(parts)])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def _signature_input_name(interpreter: Any) -> str | None:
    """The one input's name in the model's signature (onnx2tf writes the ONNX input name there)."""
    try:
        keys = list(interpreter.get_signature_runner().get_input_details())
    except (ValueError, AttributeError, RuntimeError):  # no signature, or a runtime without signature runners
        return None
    return keys[0] if len(keys) == 1 else None


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
        cal = target.calibration
        if cal.float_layers or cal.keep_float or (cal.float_mixed_ranges and target.precision == "int8"):
            raise ConfigError(f"target {target.name!r}: calibration.float_layers / keep_float / float_mixed_ranges "
                              "(mixed precision) is "
                              "not available for TFLite: onnx2tf's full-integer conversion quantizes every layer "
                              "(TFLite's own selective quantization, QuantizationDebugger's denylisted_nodes, needs "
                              "the TensorFlow converter on a SavedModel: not wired); use 0 float layers here")
        if opts.delegate == "gpu" and target.precision == "int8":
            raise ConfigError(f"target {target.name!r}: the GPU delegate runs float models; use precision "
                              "'fp16' (or 'fp32') with delegate = 'gpu', or delegate = 'xnnpack' for int8")

    def check_signature(self, signature: Signature, target: Target) -> None:
        """Full-integer int8 quantizes every input: an integer input (token ids) cannot be one of them."""
        if target.precision != "int8":
            return
        for t in signature.inputs:
            if not t.is_float:
                raise CompileError(
                    f"target {target.name!r}: full-integer int8 TFLite quantizes every input, and input {t.name!r} is "
                    f"{t.dtype} (ids, not a float to quantize; onnx2tf's calibration would cast it to float32); use "
                    "precision 'fp32' or 'fp16' on TFLite for this model, or int8 on onnxruntime or openvino")

    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        opts: TFLiteOptions = self.options(target)
        python = toolchains.python(TOOLCHAIN)
        signature = signature_of(onnx)
        if len(calibration) == 0:
            raise CompileError(f"target {target.name!r}: onnx2tf checks its conversion on samples of the model's "
                               "inputs; the calibration set is empty")
        feeds = calibration_feeds(signature.inputs, calibration)
        for t in signature.inputs:
            if feeds[t.name].ndim != t.rank:
                raise CompileError(f"target {target.name!r}: calibration samples of input {t.name!r} have shape "
                                   f"{list(feeds[t.name].shape)}; the input is {list(t.shape)}"
                                   + (" (NCHW)" if input_layout(t) == "NHWC" else ""))
        with tempfile.TemporaryDirectory(prefix="edgepipe-tflite-") as tmp:
            scratch = Path(tmp)
            result = run_driver(python, onnx, target.precision, feeds, opts, scratch, signature, target)
            produced = scratch / "out" / f"model_{variant(target.precision, opts)}.tflite"
            if not produced.is_file():
                raise CompileError(f"onnx2tf did not write {produced.name} for {onnx.path.name}; it wrote "
                                   f"{', '.join(result.get('files', [])) or 'nothing'}")
            out = workdir / ARTIFACT
            with atomic_path(out) as t:
                shutil.copyfile(produced, t)
        details = result.get("details", {})
        io = result.get("io") or {}
        layouts = {t.name: input_layout(t) for t in signature.inputs}
        metadata: dict[str, Any] = {
            "converter": {"tool": "onnx2tf", **result.get("versions", {})},  # no timings: same inputs, same bytes
            "variant": variant(target.precision, opts),
            **({"input_layout": layouts[signature.inputs[0].name]} if len(signature.inputs) == 1 else {}),
            "layouts": layouts,  # each ONNX input's layout in the .tflite: NHWC (4-D float) or as-is
            "output_layouts": {o["onnx"]: o["layout"] for o in io.get("outputs", [])},
            "tensor_names": {"inputs": {i["onnx"]: i["tflite"] for i in io.get("inputs", [])},
                             "outputs": {o["onnx"]: o["tflite"] for o in io.get("outputs", [])}},
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
                **({"kind": "full-integer", "io_dtype": opts.io_dtype} if opts.activations == "int8" else
                   {"kind": "16x8: int8 weights, int16 activations", "io_dtype": "float32"}),
                "weights": f"int8 {opts.quant_type}",
                "calibration": {**calibration.record(), "method": target.calibration.method}, "normalization": {"mean": 0.0, "std": 1.0},
            }
        return Artifact(self.name, target.precision, out, metadata=metadata)

    def load(self, artifact: Artifact, threads: int | None = None) -> TFLiteRunner:
        self.require("run")
        board = artifact.metadata.get("board", {})
        runtime = next((r for r, d in RUNTIME_DISTS.items() if d == board.get("runtime")), "litert")
        delegate = board.get("delegate", "xnnpack")
        return TFLiteRunner(artifact.path, threads, runtime, delegate, board.get("delegate_library", GPU_DELEGATE),
                            io=artifact.metadata)


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


def run_driver(python: Path, onnx: OnnxModel, precision: str, feeds: dict[str, np.ndarray] | np.ndarray,
               opts: TFLiteOptions, scratch: Path, signature: Signature | None = None,
               target: Target | None = None) -> dict[str, Any]:
    """Convert ``onnx`` with the toolchain's onnx2tf in ``scratch``, offline; returns the driver's result.

    ``feeds``: samples of every input by name, in the ONNX layout (one NCHW array: the one input's)."""
    signature = signature or signature_of(onnx)
    if not isinstance(feeds, dict):
        feeds = {signature.inputs[0].name: feeds}
    shutil.copyfile(onnx.path, scratch / "model.onnx")  # onnx2tf names its outputs model_<variant>.tflite
    inputs, keep = [], []
    for k, t in enumerate(signature.inputs):
        layout = input_layout(t)
        x = feeds[t.name]
        path = scratch / ("calibration_nhwc.npy" if len(signature.inputs) == 1 and layout == "NHWC"
                          else f"calibration_{k}.npy")
        np.save(path, _to_tflite(np.ascontiguousarray(x), layout))
        # mean 0, std 1 (our samples are already what the model consumes), shaped to broadcast: per channel for
        # an NHWC image, one value otherwise
        norm = (1, 1, 1, int(x.shape[1])) if layout == "NHWC" else (1,) * x.ndim
        inputs.append({"name": t.name, "calibration": str(path), "layout": layout,
                       "mean": np.zeros(norm, np.float32).tolist(), "std": np.ones(norm, np.float32).tolist()})
        if layout == AS_IS and t.rank in (3, 4, 5):
            keep.append(t.name)  # onnx2tf would make it channels-last
    image = next((feeds[t.name] for t in signature.inputs if input_layout(t) == "NHWC"), None)
    if image is not None:
        np.save(scratch / SAMPLE_FILE, sample_file(np.asarray(image, dtype=np.float32)))
    loose = [t for t in signature.inputs if any(not isinstance(d, int) for d in t.shape[1:])]
    overwrite = []
    if loose:  # onnx2tf needs sizes for dynamic dimensions beyond the batch: the target's
        if target is None:
            raise CompileError(f"{onnx.path.name}: input {loose[0].name!r} has dynamic dimensions {list(loose[0].shape)}; "
                               "give the target's input_shape for it")
        shapes = target.shapes(signature.input_names)
        overwrite = [f"{t.name}:{','.join(map(str, shapes[t.name]))}" for t in signature.inputs]
    request = {
        "workdir": str(scratch), "onnx": str(scratch / "model.onnx"), "out": str(scratch / "out"),
        "result": str(scratch / "result.json"), "precision": precision, "inputs": inputs, "keep_as_is": keep,
        "overwrite_input_shape": overwrite,
        "quant_type": opts.quant_type, "io_dtype": opts.io_dtype, "variant": variant(precision, opts),
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
