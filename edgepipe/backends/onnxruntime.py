"""onnxruntime: the generic CPU reference. fp32 as exported, int8 by static QDQ quantization.

On x86 CPUs with VNNI, unsigned activations with signed weights (U8S8) let onnxruntime fuse every Conv
into QLinearConv; signed activations (S8S8) leave most Convs unfused and run slower than fp32 (measured
on an AMD EPYC). ``activation_type`` in the target's ``[options]`` picks per target.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.backends import register
from edgepipe.backends.base import Backend, Capabilities, calibration_feeds, check_feeds, signature_of
from edgepipe.config import Target
from edgepipe.config.options import OrtOptions
from edgepipe.errors import CompileError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, TensorSpec

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}

# What each calibrator is given (recorded in the artifact's metadata). onnxruntime's defaults for the
# entropy calibrator are 128 histogram bins and 128 quantized bins: its KL threshold search then has one
# candidate, the full range, so "entropy" gave minmax's scales byte for byte. 512 bins with 128 quantized
# bins gives it 193 thresholds, down to a quarter of the range (TensorRT's 2048 bins reach a sixteenth, but
# onnxruntime's search is pure Python and quadratic in the bins: 8x slower on the example). quantize_static
# forwards no bin counts from ``extra_options`` (only CalibTensorRangeSymmetric, CalibMovingAverage(Constant),
# CalibMaxIntermediateOutputs and CalibPercentile), so for entropy edgepipe runs the calibrator itself and
# hands quantize_static its ranges (``calibration_cache_path``, onnxruntime >= 1.32). The other methods'
# options are onnxruntime's defaults, made explicit.
_CALIBRATOR: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": False, "moving_average": False},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128, "symmetric": False},
    "percentile": {"percentile": 99.999, "symmetric": True},
}
# the ones quantize_static forwards to its calibrator, under its extra_options names
_FORWARDED = {"symmetric": "CalibTensorRangeSymmetric", "moving_average": "CalibMovingAverage",
              "percentile": "CalibPercentile"}
#: ``options.op_types = "weighted"``: the operators that get Q/DQ (as NNCF quantizes: weighted layers' inputs)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


#: onnxruntime's graph transformer (basic level) that, for a Conv/Gemm whose input comes from a
#: DequantizeLinear, quantizes its float weight (per tensor) and bias (int32) when the session starts.
#: Two ways it changes what a graph computes:
#: * a layer that mixed precision keeps in float, after an int8 one, gets int8 per-tensor weights after
#:   all (EfficientNet-Lite0 with its first depthwise conv kept float: logit NMSE 0.012 -> 0.23);
#: * in an fp16 Q/DQ graph (what modelopt makes for TensorRT) it computes the bias scale, input scale x
#:   weight scale, in fp16: a near-dead channel's subnormal weight scale (6e-8) makes it 0, bias / 0, and
#:   the network answers one class (EfficientNet-Lite0: 2.5 % agreement where the graph computes 77.5 %).
#: Every onnxruntime session edgepipe opens (evaluation, bench, sensitivity, stand-ins) leaves it out. On
#: a graph quantized whole (int8 weights, int32 biases) and on a float graph it has nothing to do, so
#: leaving it out costs nothing there. An onnxruntime artifact with float layers also names it in its
#: metadata (``disabled_optimizers``), for whoever loads the ``.onnx`` with their own session.
QDQ_UNSAFE_OPTIMIZERS = ("WeightBiasQuantization",)

#: onnxruntime's calibrators hold every intermediate tensor of every sample they read until they reduce them:
#: 600 text lines through PP-OCRv4's recognizer held 12 GB. Past this many samples edgepipe runs the
#: calibrator itself, a chunk of this many at a time.
CHUNK_SAMPLES = 64


class OrtRunner:
    """An ``InferenceSession`` on the CPU execution provider, without :data:`QDQ_UNSAFE_OPTIMIZERS`."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        from edgepipe._threads import work_threads

        so = ort.SessionOptions()
        threads = threads or work_threads()  # a benchmark gives its target's threads; other work $EDGEPIPE_THREADS
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: its graph-optimizer warnings (fp16 folding, ...) are not for users
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(QDQ_UNSAFE_OPTIMIZERS))
        except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, NotImplemented, ...)
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileError(f"onnxruntime cannot load {path.name}: {text.rpartition('failed:')[2].strip() or text}; "
                               "the model uses an operator or feature onnxruntime's CPU provider lacks "
                               "(custom ops are not supported)") from e
        self.inputs = [TensorSpec(i.name, tuple(i.shape), numpy_dtype(i.type)) for i in self.session.get_inputs()]
        self._dtypes = {t.name: np.dtype(t.dtype) for t in self.inputs if not t.dtype.startswith("onnx:")}

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        feeds = {k: np.asarray(v, dtype=self._dtypes.get(k)) for k, v in feeds.items()}
        return self.session.run(None, feeds)


def numpy_dtype(ort_type: str) -> str:
    """onnxruntime's type string (``tensor(float)``) as a numpy dtype name (``float32``)."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    return _ORT_TYPES.get(name, name if name in _NUMPY_NAMES else f"onnx:{name}")


_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
_NUMPY_NAMES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "bfloat16"}


class _FeedsReader:
    """Feeds calibration samples (one array per input name) to onnxruntime's calibrator in batches.

    Every input's samples are given as they are in the model's dtype: integer inputs (token ids, indices) are
    never scaled, and onnxruntime quantizes float tensors only (no Q/DQ on a Gather's indices)."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int) -> None:
        n = len(next(iter(feeds.values()))) if feeds else 0
        # batches of one size: onnxruntime's percentile and entropy collectors stack every batch's tensors and
        # fail on a short last batch ("inhomogeneous shape"), so take the largest size <= batch that divides n
        batch = max((d for d in range(1, max(batch, 1) + 1) if n % d == 0), default=1)
        self.samples, self.batch = n, batch
        self._it = iter([{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, n, batch)])
        self._left: int | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._left is not None:
            if self._left == 0:
                return None
            self._left -= 1
        return next(self._it, None)

    def chunks(self, samples: int) -> Iterator[_FeedsReader]:
        """This reader, ending after every ``samples`` (rounded to whole batches) until the feeds run out: the
        calibrator's ``collect_data`` keeps every intermediate tensor of what it reads, so it reads a chunk at
        a time and merges (min/max exactly; histograms by widening their range)."""
        per = max(1, samples // self.batch)
        for _ in range(0, self.samples, per * self.batch):
            self._left = per
            yield self
        self._left = None


class _Reader(_FeedsReader):
    """One input's calibration samples (what :mod:`edgepipe.quantize.sensitivity` passes)."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        super().__init__({name: x}, batch)


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    capabilities = Capabilities(
        precisions=("fp32", "int8"),
        calibration_methods=tuple(_METHODS),
        modules=("onnxruntime",),
        artifact_suffixes=(".onnx",),
        platforms=("x86-64 CPU", "arm64 CPU"),
    )
    Options = OrtOptions

    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        opts: OrtOptions = self.options(target)
        out = workdir / f"model.{target.precision}.onnx"
        if target.precision == "fp32":
            shutil.copyfile(onnx.path, out)
            return Artifact(self.name, "fp32", out)
        meta = self._quantize(onnx, calibration, target.calibration.method, opts, out, target.calibration.keep_float)
        if target.calibration.keep_float:  # a deployment's own session must leave it out too
            meta["disabled_optimizers"] = list(QDQ_UNSAFE_OPTIMIZERS)
        return Artifact(self.name, "int8", out, metadata=meta)

    def _quantize(self, onnx: OnnxModel, calibration: CalibrationSet, method: str, opts: OrtOptions,
                  out: Path, target_keep: tuple[str, ...] = ()) -> dict[str, Any]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        specs = signature_of(onnx).inputs
        batch = 1 if all(t.shape and t.shape[0] == 1 for t in specs) else opts.calibration_batch
        act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16,
               "int16": QuantType.QInt16}[opts.activation_type]
        calib_method = getattr(CalibrationMethod, _METHODS[method])
        calibrator = _CALIBRATOR[method]
        if opts.mean_ranges and method != "minmax":
            raise CompileError(f"options.mean_ranges applies to minmax calibration, not {method!r}; set "
                               "calibration.method = \"minmax\" or mean_ranges = false")
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if opts.activation_type.endswith("16") and _opset(onnx.path) < 21:
            extra["UseQDQContribOps"] = True  # 16-bit Q/DQ before opset 21: the com.microsoft ones
        extra.update({_FORWARDED[k]: v for k, v in calibrator.items() if k in _FORWARDED})
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), quiet_root_logger():
            # (its calibrators print progress to stdout; its quantizer logs advice to the root logger)
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(onnx.path), str(pre), skip_symbolic_shape=False)
                reader: _FeedsReader | None = _FeedsReader(calibration_feeds(specs, calibration), batch)
                ranges: dict[str, Any] = {}
                if opts.mean_ranges:
                    reader = _FeedsReader(calibration_feeds(specs, calibration), 1)  # one sample's range each
                if (any(k not in _FORWARDED for k in calibrator) or target_keep or reader.samples > CHUNK_SAMPLES
                        or opts.mean_ranges):
                    # options quantize_static would drop; float layers, whose int8 neighbours' outputs must be
                    # quantized on their activation's range; or more samples than fit in memory at once
                    ranges = {"calibration_cache_path": calibrate_ranges(pre, Path(tmp), calib_method, calibrator,
                                                                         reader, activation_ranges=bool(target_keep),
                                                                         mean_ranges=opts.mean_ranges)}
                    reader = None
                keep = list(target_keep)
                if keep:
                    import onnx as onnx_lib

                    have = {n.name for n in onnx_lib.load(str(pre), load_external_data=False).graph.node}
                    missing = [n for n in keep if n not in have]
                    if missing:
                        raise CompileError(f"calibration.keep_float names {missing[0]!r}, which is not a node of "
                                           f"{onnx.path.name} (after onnxruntime's pre-processing)")
                quantize_static(
                    str(pre), str(out), reader,
                    nodes_to_exclude=keep,
                    op_types_to_quantize=list(WEIGHTED_OPS) if opts.op_types == "weighted" else None,
                    quant_format=QuantFormat.QDQ,
                    per_channel=opts.per_channel,
                    reduce_range=opts.reduce_range,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    calibrate_method=calib_method,
                    extra_options=extra,
                    **ranges,
                )
            except CompileError:
                out.unlink(missing_ok=True)
                raise
            except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                out.unlink(missing_ok=True)
                raise CompileError(f"onnxruntime int8 quantization of {onnx.path.name} failed: {e}") from e
        return {
            "quantization": "static QDQ",
            "activation_type": opts.activation_type,
            "op_types": opts.op_types,
            **({"ranges": "mean of per-sample min/max"} if opts.mean_ranges else {}),
            "weight_type": "int8",
            "per_channel": opts.per_channel,
            "float_nodes": list(target_keep),
            "calibration": {**calibration.record(), "method": method, "calibrator": dict(calibrator)},
        }

    def load(self, artifact: Artifact, threads: int | None = None) -> OrtRunner:
        self.require("run")
        return OrtRunner(artifact.path, threads)


@contextlib.contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer logs advice to the root logger ("consider pre-processing", "automatically
    update the model to opset 21" for 16-bit Q/DQ): what it did is in the artifact's metadata instead."""
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _opset(model: Path) -> int:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)


def fused_activations(model: Path) -> dict[str, Any]:
    """Each Conv/Gemm/MatMul node's name -> the Relu/Clip node that alone reads its output (the pairs int8
    kernels fuse)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out = {}
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul"):
            r = readers.get(n.output[0], [])
            if len(r) == 1 and r[0].op_type in ("Relu", "Clip"):
                out[n.name] = (n, r[0])
    return out


def calibrate_ranges(model: Path, tmp: Path, method: Any, options: dict[str, Any], reader: _FeedsReader,
                     activation_ranges: bool = False, mean_ranges: bool = False) -> Path:
    """Run onnxruntime's calibrator with ``options`` on ``model``; the ranges, as quantize_static's cache file.

    ``activation_ranges``: a layer's output that only a Relu/Clip reads gets the range of the activation's
    output. The whole-int8 model fuses the two and quantizes after the activation anyway; where the
    activation's reader stays in float (mixed precision) onnxruntime would otherwise quantize the layer's
    pre-activation output on its raw range (EfficientNet-Lite0's stem: -83..70, a 0.6 step for values
    ReLU6 then keeps in 0..6): with the activation's range the Q/DQ pair is the activation."""
    import inspect

    import onnxruntime
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise CompileError(f"calibration method {method.name!r} needs onnxruntime >= 1.32 (quantize_static's "
                           f"calibration_cache_path); this is onnxruntime {onnxruntime.__version__}")
    calibrator = create_calibrator(
        model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
        augmented_model_path=str(tmp / "augmented.onnx"), calibrate_method=method,
        providers=["CPUExecutionProvider"], extra_options=options,
    )
    if mean_ranges:  # each batch's min and max alone (reset between batches), then their mean per tensor
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        lows: dict[str, list[float]] = {}
        highs: dict[str, list[float]] = {}
        for chunk in reader.chunks(reader.batch):
            calibrator.calibrate_tensors_range = None
            calibrator.collect_data(chunk)
            for name, td in calibrator.compute_data().data.items():
                lows.setdefault(name, []).append(float(np.asarray(td.range_value[0]).min()))
                highs.setdefault(name, []).append(float(np.asarray(td.range_value[1]).max()))
        data = TensorsData(method, {k: TensorData(lowest=np.array(np.mean(lows[k]), np.float32),
                                                  highest=np.array(np.mean(highs[k]), np.float32)) for k in lows})
    else:
        for chunk in reader.chunks(CHUNK_SAMPLES):
            calibrator.collect_data(chunk)
        data = calibrator.compute_data()
    path = tmp / "ranges.json"
    if activation_ranges:
        for layer, act in fused_activations(model).values():
            pre, post = layer.output[0], act.output[0]
            if pre in data and post in data:
                data[pre] = data[post]
    save_tensors_data(data, path)
    return path
