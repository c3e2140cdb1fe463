"""Accuracy-preserving quantization shared by every backend: per-layer sensitivity and the mixed-precision
plan (which layers stay in float), applied to the ONNX before any backend's own quantizer runs."""

from edgepipe.quantize.sensitivity import (
    LayerError,
    OutputScorer,
    keep_float,
    layer_sensitivity,
    output_error,
)

__all__ = ["LayerError", "OutputScorer", "keep_float", "layer_sensitivity", "output_error"]
