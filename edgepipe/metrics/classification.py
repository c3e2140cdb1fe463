"""Class scores ``[N, C]``: top-k accuracy against labels, top-1 agreement with the fp32 model."""

from __future__ import annotations

import numpy as np

from edgepipe.metrics._registry import register
from edgepipe.metrics.base import Metric, MetricError, integers, reference_key, shape


def class_scores(metric: str, a: np.ndarray, what: str = "outputs[0]") -> np.ndarray:
    """``a`` if it is class scores ``[N, C]``; a one-line error saying what to choose otherwise."""
    if a.ndim != 2:
        raise MetricError(f"metric {metric!r} needs {what} as class scores [N, C] but it is {shape(a)}: "
                          "choose the model's metric with --metric, or a postprocess that returns [N, C] scores")
    return a


def labels(metric: str, y: np.ndarray, classes: int) -> np.ndarray:
    """Integer labels ``[N]`` in ``0 .. classes-1``."""
    if y.ndim != 1:
        raise MetricError(f"metric {metric!r} needs target 'y' as class labels [N] but it is {shape(y)}")
    y = integers(metric, "target 'y'", y)
    bad = y[(y < 0) | (y >= classes)]
    if bad.size:
        raise MetricError(f"metric {metric!r}: label {int(bad[0])} is outside the {classes} classes 0..{classes - 1} "
                          f"of outputs[0] ({bad.size} of {y.size} labels are)")
    return y


def rank(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each label's place in its row sorted by score, highest first, ties by index (as ``argmax`` breaks them)."""
    true = np.take_along_axis(scores, y[:, None], axis=1)
    cols = np.arange(scores.shape[1])[None, :]
    return (scores > true).sum(1) + ((scores == true) & (cols < y[:, None])).sum(1)


class TopK(Metric):
    """Percent of samples whose label is among the ``k`` highest scores of ``outputs[0]``."""

    higher_is_better = True
    unit = "%"
    targets = ("y",)

    def __init__(self, k: int) -> None:
        self.k = k
        self.name = f"top{k}"

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        scores = class_scores(self.name, outputs[0])
        if scores.shape[1] <= self.k and self.k > 1:
            raise MetricError(f"metric {self.name!r} needs more than {self.k} classes but outputs[0] has "
                              f"{scores.shape[1]}: every sample would count; choose top1")
        y = labels(self.name, targets["y"], scores.shape[1])
        return float((rank(scores, y) < self.k).mean() * 100.0)


class Agreement(Metric):
    """Percent of samples whose top-1 class is the fp32 model's top-1 class (no labels needed)."""

    name = "agreement"
    higher_is_better = True
    unit = "%"
    reference = True

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        out = class_scores(self.name, outputs[0])
        ref = class_scores(self.name, targets[reference_key(0)], "the fp32 reference 'fp32:0'")
        if out.shape != ref.shape:
            raise MetricError(f"metric {self.name!r}: outputs[0] is {shape(out)} but the fp32 reference is "
                              f"{shape(ref)}; give the fp32 model's outputs on the same samples")
        return float((out.argmax(1) == ref.argmax(1)).mean() * 100.0)


register(TopK(1))
register(TopK(5))
register(Agreement())
