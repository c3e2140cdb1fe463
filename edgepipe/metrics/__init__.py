"""The metric registry: how a model is judged, built in (top1, top5, miou, map, map50, agreement, sqnr,
exact_match, cer)
or the user's own (``package.module:object``), and its fidelity to the fp32 model.

Every judgement goes through :func:`score`. Adding a built-in: one module whose metric calls
:func:`register`, and one import below.
"""

from __future__ import annotations

from edgepipe.metrics import classification, detection, reference, segmentation, text  # noqa: F401 (register)
from edgepipe.metrics._registry import default_for, get, get_postprocess, names, register
from edgepipe.metrics._score import score
from edgepipe.metrics.base import FunctionMetric, Metric, MetricError, reference_key
from edgepipe.metrics.classification import Agreement, TopK
from edgepipe.metrics.detection import CocoMap
from edgepipe.metrics.reference import SQNR_CAP_DB, Sqnr, fidelity, sqnr_per_output
from edgepipe.metrics.segmentation import IGNORE_LABEL, MeanIoU
from edgepipe.metrics.text import CharErrorRate, ExactMatch, ctc_greedy

__all__ = [
    "IGNORE_LABEL", "SQNR_CAP_DB", "Agreement", "CharErrorRate", "CocoMap", "ExactMatch", "FunctionMetric", "MeanIoU", "Metric", "MetricError",
    "Sqnr", "TopK", "default_for", "fidelity", "get", "get_postprocess", "names", "reference_key", "register",
    "ctc_greedy", "score", "sqnr_per_output",
]
