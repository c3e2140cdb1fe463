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
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.backends import register
from edgepipe.backends.base import Backend, Capabilities
from edgepipe.config import Target
from edgepipe.config.options import OrtOptions
from edgepipe.errors import CompileError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, TensorSpec

_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class OrtRunner:
    """An ``InferenceSession`` on the CPU execution provider."""

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: its graph-optimizer warnings (fp16 folding, ...) are not for users
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [TensorSpec(i.name, tuple(i.shape), i.type) for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class _Reader:
    """Feeds calibration samples to onnxruntime's calibrator in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int) -> None:
        self._it = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


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
        return Artifact(self.name, "int8", out, metadata=self._quantize(onnx, calibration, target.calibration.method, opts, out))

    def _quantize(self, onnx: OnnxModel, calibration: CalibrationSet, method: str, opts: OrtOptions,
                  out: Path) -> dict[str, Any]:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        static_batch = isinstance(onnx.input_shape[0], int)
        batch = 1 if static_batch and onnx.input_shape[0] == 1 else opts.calibration_batch
        act = QuantType.QUInt8 if opts.activation_type == "uint8" else QuantType.QInt8
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            # (its calibrators print progress to stdout)
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(onnx.path), str(pre), skip_symbolic_shape=False)
                quantize_static(
                    str(pre), str(out), _Reader(onnx.input_name, calibration.x, batch),
                    quant_format=QuantFormat.QDQ,
                    per_channel=opts.per_channel,
                    reduce_range=opts.reduce_range,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
            except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                out.unlink(missing_ok=True)
                raise CompileError(f"onnxruntime int8 quantization of {onnx.path.name} failed: {e}") from e
        return {
            "quantization": "static QDQ",
            "activation_type": opts.activation_type,
            "weight_type": "int8",
            "per_channel": opts.per_channel,
            "calibration": {**calibration.record(), "method": method},
        }

    def load(self, artifact: Artifact, threads: int | None = None) -> OrtRunner:
        self.require("run")
        return OrtRunner(artifact.path, threads)
