"""Per-layer sensitivity to int8: quantize one layer at a time and measure the output error.

The model is calibrated once (onnxruntime's calibrator, the target's method); then, for every layer that
int8 kernels run (Conv, Gemm, MatMul), a copy of the model with *only that layer* quantized (its weights
int8 per channel, its input activation uint8 with the calibrated range, as ``cpu-int8`` does; a Relu or
Clip right after it quantized with it, as int8 kernels fuse them) runs on
the samples, and its logits are compared with the fp32 logits: the normalised mean squared error
(MSE / mean square of the fp32 logits) and the top-1 agreement. The layers with the largest error are the
ones a mixed-precision plan keeps in float (:func:`keep_float`).

onnxruntime's quantizer is the yardstick for every backend: what makes a layer fragile (a weight or
activation range that int8 cannot resolve) is the layer's, not the backend's. The samples are
calibration samples (drawn from the training split): the number of float layers is then chosen against
the accuracy budget on the validation split by the release search, which tries ``float_layers`` values
as candidates.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError
from edgepipe.types import OnnxModel

#: the operations whose int8 kernels do the work (the layers a plan can keep in float)
LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerError:
    """One layer quantized alone: its output error against fp32."""

    name: str  # the ONNX node name
    op: str
    nmse: float  # mean squared logit error / mean squared fp32 logit
    agreement: float  # top-1 agreement with fp32 on the samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.evaluate import predict

    return predict(OrtRunner(path, None), x).astype(np.float32)


@contextlib.contextmanager
def _no_root_warnings() -> Any:
    """onnxruntime's quantizer logs "consider pre-processing" to the root logger once per call."""
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def layers(path: Path) -> list[tuple[str, str]]:
    """(node name, op type) of every layer int8 kernels run, in graph order."""
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type in LAYER_OPS]


def _with_activation(path: Path) -> dict[str, list[str]]:
    """Each layer with the Relu/Clip that alone reads its output: quantized together, as in the whole int8
    model, where the activation is folded and the layer's output is quantized on the activation's range.
    (Quantizing the layer alone would quantize its pre-activation output, whose range can be 25x wider
    than ReLU6's: EfficientNet-Lite0's stem went from 0.3 to the real error.)"""
    from edgepipe.backends.onnxruntime import fused_activations

    fused = fused_activations(path)
    return {name: [name] + ([fused[name][1].name] if name in fused else []) for name, _op in layers(path)}


def layer_sensitivity(onnx_model: OnnxModel, x: np.ndarray, method: str = "minmax", samples: int = 32,
                      progress: Any = None) -> list[LayerError]:
    """Every layer's error when it alone is int8, most sensitive first (see the module docstring).

    Args:
        onnx_model: the fp32 model.
        x: samples (NCHW float32); the first ``samples`` are run, all of them calibrate.
        method: the calibration method (``minmax``, ``entropy``, ``percentile``).
        progress: called with 1 after each layer (a progress bar's advance).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgepipe.backends.onnxruntime import _CALIBRATOR, _FORWARDED, _METHODS, _Reader, calibrate_ranges

    if isinstance(x, dict) or len(onnx_model.inputs) != 1:
        raise CompileError(f"per-layer sensitivity (calibration.float_layers) takes one-input models for now; "
                           f"{onnx_model.path.name} has inputs {', '.join(t.name for t in onnx_model.inputs)}: "
                           "set float_layers = 0, or name the float layers with calibration.keep_float")
    run_x = np.ascontiguousarray(x[:samples], dtype=np.float32)
    calibrator = _CALIBRATOR[method]
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    extra.update({_FORWARDED[k]: v for k, v in calibrator.items() if k in _FORWARDED})
    out: list[LayerError] = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-sensitivity-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), _no_root_warnings():
        work = Path(tmp)
        ref = _logits(onnx_model.path, run_x)
        static = isinstance(onnx_model.input_shape[0], int) and onnx_model.input_shape[0] == 1
        reader = _Reader(onnx_model.input_name, x, 1 if static else 32)
        calibrate_method = getattr(CalibrationMethod, _METHODS[method])
        ranges = calibrate_ranges(onnx_model.path, work, calibrate_method, calibrator, reader)
        together = _with_activation(onnx_model.path)
        for name, op in layers(onnx_model.path):
            q = work / "one.onnx"
            try:
                quantize_static(str(onnx_model.path), str(q), None, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_quantize=together[name], calibration_cache_path=str(ranges),
                                calibrate_method=calibrate_method, extra_options=extra)
            except Exception as e:  # onnxruntime raises plain exceptions of many kinds
                raise CompileError(f"per-layer sensitivity: quantizing {name!r} ({op}) alone failed: {e}") from e
            y = _logits(q, run_x)
            nmse = float(np.mean((y - ref) ** 2) / max(float(np.mean(ref ** 2)), 1e-12))
            out.append(LayerError(name, op, nmse, float(np.mean(y.argmax(1) == ref.argmax(1)))))
            if progress:
                progress(1)
    return sorted(out, key=lambda e: (-e.nmse, e.name))


def keep_float(errors: list[LayerError], k: int) -> tuple[str, ...]:
    """The ``k`` most sensitive layers' names (sorted, so the plan's bytes do not depend on ties' order)."""
    return tuple(sorted(e.name for e in errors[:k]))
