"""Against the fp32 model, whatever the metric: SQNR per output, and top-1 flips for class scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgepipe.metrics._registry import register
from edgepipe.metrics.base import Metric, MetricError, reference_key, shape

SQNR_CAP_DB = 200.0  # identical outputs: a large finite value rather than inf (and -200 for a zero reference)


def sqnr_per_output(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> list[float]:
    """Signal-to-quantization-noise ratio of each output against the fp32 reference, over the whole split.

    Args:
        outputs: the model's outputs in order.
        reference: the fp32 model's outputs on the same samples, in the same order.

    Returns:
        ``10 * log10(sum(ref**2) / sum((ref - out)**2))`` in dB per output, within +-``SQNR_CAP_DB``.
    """
    if len(outputs) != len(reference):
        raise MetricError(f"SQNR: the model has {len(outputs)} outputs but the fp32 reference has {len(reference)}")
    result = []
    for i, (o, r) in enumerate(zip(outputs, reference, strict=True)):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            raise MetricError(f"SQNR: output {i} is {shape(o)} but the fp32 reference's is {shape(r)}")
        for a, whose in ((o, "the model's"), (r, "the fp32 reference's")):
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                raise MetricError(f"SQNR: {whose} output {i} holds {int((~np.isfinite(a)).sum())} nan or inf "
                                  "values, so its SQNR is undefined")
        r64 = r.astype(np.float64)
        signal = float(np.square(r64).sum())
        noise = float(np.square(r64 - o.astype(np.float64)).sum())
        if noise == 0.0:
            db = SQNR_CAP_DB
        elif signal == 0.0:
            db = -SQNR_CAP_DB
        else:
            db = min(max(10.0 * math.log10(signal / noise), -SQNR_CAP_DB), SQNR_CAP_DB)
        result.append(db)
    return result


def _is_class_scores(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] >= 2 and np.issubdtype(a.dtype, np.floating)


def fidelity(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], margin: float = 0.25) -> dict[str, Any]:
    """How closely a model follows the fp32 model on the same samples.

    Args:
        outputs: the model's outputs in order.
        reference: the fp32 model's outputs on the same samples.
        margin: a sample is confident when the fp32 top-1 score beats the top-2 by more than this.

    Returns:
        ``sqnr_db`` (per output), and when outputs[0] is class scores (2-D float ``[N, C]``, C >= 2)
        ``flip_rate`` (percent of samples whose top-1 changed), ``confident_flip_rate`` (the same among
        confident samples; None if there is none) and ``confident_samples``; all three None otherwise.
        ``margin`` is echoed.
    """
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise MetricError(f"fidelity: margin {margin!r} must be a finite number >= 0")
    outs = [np.asarray(o) for o in outputs]
    refs = [np.asarray(r) for r in reference]
    result: dict[str, Any] = {"sqnr_db": sqnr_per_output(outs, refs), "flip_rate": None,
                              "confident_flip_rate": None, "confident_samples": None, "margin": float(margin)}
    if outs and _is_class_scores(outs[0]) and _is_class_scores(refs[0]) and len(refs[0]):
        flipped = outs[0].argmax(1) != refs[0].argmax(1)
        top2 = np.partition(refs[0].astype(np.float64), -2, axis=1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) > margin
        result["flip_rate"] = float(flipped.mean() * 100.0)
        result["confident_samples"] = int(confident.sum())
        if confident.any():
            result["confident_flip_rate"] = float(flipped[confident].mean() * 100.0)
    return result


class Sqnr(Metric):
    """The worst output's SQNR against the fp32 model, in dB."""

    name = "sqnr"
    higher_is_better = True
    unit = "dB"
    reference = True

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        return min(sqnr_per_output(outputs, [targets[reference_key(i)] for i in range(len(outputs))]))


register(Sqnr())
