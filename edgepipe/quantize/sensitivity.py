"""Per-layer sensitivity to int8: quantize one layer at a time and measure the output error.

The model is calibrated once (onnxruntime's calibrator, the target's method, every input fed: integer
inputs such as token ids exactly as given, never quantized); then, for every layer that int8 kernels run
(Conv, Gemm, MatMul), a copy of the model with *only that layer* quantized (its weights int8 per channel,
its float inputs uint8 with the calibrated range, as ``cpu-int8`` does; a Relu or Clip right after it
quantized with it, as int8 kernels fuse them) runs on the samples, and its outputs are compared with the
fp32 outputs: the normalised mean squared error of each float output (MSE / mean square of the fp32
output), **averaged over the float outputs** (each output weighs the same whatever its scale: a detector's
boxes and its scores), and the top-1 agreement where the first output is ``[N, C]`` class scores (as
:func:`edgepipe.metrics.fidelity` reads class scores; ``None`` for other outputs). The layers with the
largest error are the ones a mixed-precision plan keeps in float (:func:`keep_float`). Given a ``scorer``
(the model's own metric on the samples' outputs, higher better), layers are ranked by how much quantizing
each alone lowers that score instead, the NMSE breaking ties.

onnxruntime's quantizer is the yardstick for every backend: what makes a layer fragile (a weight or
activation range that int8 cannot resolve) is the layer's, not the backend's. The samples are
calibration samples (drawn from the training split): the number of float layers is then chosen against
the accuracy budget on the validation split by the release search, which tries ``float_layers`` values
as candidates.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError
from edgepipe.types import CalibrationSet, OnnxModel, Samples

#: the operations whose int8 kernels do the work (the layers a plan can keep in float)
LAYER_OPS = ("Conv", "Gemm", "MatMul")

#: the model's own metric on every output of the samples (in the model's output order): higher is better
#: (wrap a lower-is-better metric as its negative). ``edgepipe.pipeline.stages.Scorer`` gives one:
#: ``lambda outs: scorer(outs, split, reference)``.
OutputScorer = Callable[[list[np.ndarray]], float]


@dataclass(frozen=True)
class LayerError:
    """One layer quantized alone: its output error against fp32."""

    name: str  # the ONNX node name
    op: str
    nmse: float  # per float output, MSE / mean square of the fp32 output; averaged over the float outputs
    agreement: float | None  # top-1 agreement with fp32 where the first output is [N, C] class scores, else None
    score: float | None = None  # the scorer's value with this layer alone int8 (None: ranked by nmse)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.evaluate import predict

    return predict(OrtRunner(path, None), x).astype(np.float32)


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every output of the model at ``path`` on ``feeds`` (onnxruntime, as edgepipe runs it)."""
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.evaluate import outputs

    return outputs(OrtRunner(path, None), feeds)


def _is_class_scores(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] >= 2 and np.issubdtype(a.dtype, np.floating)


def output_error(y: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float | None]:
    """How far outputs ``y`` are from the fp32 outputs ``ref``.

    Returns:
        The normalised MSE (MSE / mean square of the fp32 output) of each float output, averaged over the
        float outputs; and the top-1 agreement where the first output is ``[N, C]`` class scores (else None).
    """
    errs = []
    for a, r in zip(y, ref, strict=True):
        if not np.issubdtype(r.dtype, np.floating):
            continue  # an integer output (indices, counts) is not an error measure
        a32 = np.asarray(a, np.float32).reshape(len(a), -1)
        r32 = np.asarray(r, np.float32).reshape(len(r), -1)
        errs.append(float(np.mean((a32 - r32) ** 2) / max(float(np.mean(r32 ** 2)), 1e-12)))
    if not errs:
        raise CompileError("per-layer sensitivity: the model has no float output to measure the int8 error on")
    agreement = None
    if ref and _is_class_scores(ref[0]) and len(ref[0]):
        agreement = float(np.mean(np.asarray(y[0]).argmax(1) == ref[0].argmax(1)))
    return float(np.mean(errs)), agreement


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


def _feeds(onnx_model: OnnxModel, x: Samples) -> tuple[dict[str, np.ndarray], bool]:
    """``x`` by input name, each in its input's dtype (integer inputs exactly as given); whether every input
    has a fixed batch of 1."""
    from edgepipe.backends.base import calibration_feeds, signature_of

    specs = signature_of(onnx_model).inputs
    try:
        feeds = calibration_feeds(specs, CalibrationSet(x))
    except ValueError as e:  # samples that do not name the model's inputs
        raise CompileError(f"per-layer sensitivity of {onnx_model.path.name}: {e}") from None
    return feeds, all(t.shape and t.shape[0] == 1 for t in specs)


def layer_sensitivity(onnx_model: OnnxModel, x: Samples, method: str = "minmax", samples: int = 32,
                      progress: Any = None, scorer: OutputScorer | None = None) -> list[LayerError]:
    """Every layer's error when it alone is int8, most sensitive first (see the module docstring).

    Args:
        onnx_model: the fp32 model (any number of inputs and outputs).
        x: samples: one array (a one-input model) or one array per input name; the first ``samples`` are
            run, all of them calibrate. Integer inputs (token ids) are fed as they are.
        method: the calibration method (``minmax``, ``entropy``, ``percentile``).
        progress: called with 1 after each layer (a progress bar's advance).
        scorer: the model's own metric on the outputs of the first ``samples`` (higher better): layers are
            ranked by it (lowest score first, the NMSE breaking ties) instead of by the NMSE.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgepipe.backends.onnxruntime import (
        _CALIBRATOR,
        _FORWARDED,
        _METHODS,
        _FeedsReader,
        calibrate_ranges,
        quiet_root_logger,
    )

    feeds, static = _feeds(onnx_model, x)
    run = {k: np.ascontiguousarray(v[:samples]) for k, v in feeds.items()}
    calibrator = _CALIBRATOR[method]
    extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": False}
    extra.update({_FORWARDED[k]: v for k, v in calibrator.items() if k in _FORWARDED})
    out: list[LayerError] = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-sensitivity-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), quiet_root_logger():
        work = Path(tmp)
        ref = _outputs(onnx_model.path, run)
        reader = _FeedsReader(feeds, 1 if static else 32)
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
            y = _outputs(q, run)
            nmse, agreement = output_error(y, ref)
            score = None
            if scorer is not None:
                score = float(scorer(y))
                if not math.isfinite(score):
                    raise CompileError(f"per-layer sensitivity: the scorer gave {score} with {name!r} ({op}) int8; "
                                       "it must return a finite number (higher better)")
            out.append(LayerError(name, op, nmse, agreement, score))
            if progress:
                progress(1)
    if scorer is not None:
        return sorted(out, key=lambda e: (e.score, -e.nmse, e.name))
    return sorted(out, key=lambda e: (-e.nmse, e.name))


def keep_float(errors: list[LayerError], k: int) -> tuple[str, ...]:
    """The ``k`` most sensitive layers' names (sorted, so the plan's bytes do not depend on ties' order)."""
    return tuple(sorted(e.name for e in errors[:k]))
