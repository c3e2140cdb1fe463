"""Sequences of symbols (OCR, speech, any CTC or token model): exact match and character error rate.

``outputs[0]`` is either per-step symbol scores ``[N, T, C]`` of a CTC model, read greedily (the best symbol at
each step, repeats merged, the blank dropped; the blank is symbol 0, as PaddleOCR, ddddocr and most CTC heads
put it), or decoded symbol ids ``[N, L]`` padded with a negative number. Target ``"text"`` is the true symbol
ids ``[N, L]``, padded with ``-1``. Symbols are compared as ids, so no alphabet is needed here: the data builder
maps its strings to the model's ids (see :mod:`edgepipe.models.zoo`).
"""

from __future__ import annotations

import numpy as np

from edgepipe.metrics._registry import register
from edgepipe.metrics.base import Metric, MetricError, integers, shape

BLANK = 0


def ctc_greedy(scores: np.ndarray, blank: int = BLANK) -> list[list[int]]:
    """Best path decoding of CTC scores ``[N, T, C]``: per sample, the symbol ids with repeats merged and blanks
    dropped."""
    best = scores.argmax(-1)
    keep = np.ones_like(best, dtype=bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != blank
    return [row[k].tolist() for row, k in zip(best, keep, strict=True)]


def sequences(metric: str, out: np.ndarray) -> list[list[int]]:
    """The predicted id sequences from ``outputs[0]`` (CTC scores or padded ids)."""
    if out.ndim == 3 and np.issubdtype(out.dtype, np.floating):
        if not np.isfinite(out).all():
            raise MetricError(f"metric {metric!r}: outputs[0] (CTC scores {shape(out)}) hold nan or inf")
        return ctc_greedy(out)
    if out.ndim == 2:
        ids = integers(metric, "outputs[0] (symbol ids [N, L])", out)
        return [row[row >= 0].tolist() for row in ids]
    raise MetricError(f"metric {metric!r} needs outputs[0] as CTC scores [N, T, C] or symbol ids [N, L] but it "
                      f"is {shape(out)}: choose the model's metric with --metric, or a postprocess")


def truths(metric: str, y: np.ndarray, n: int) -> list[list[int]]:
    """The true id sequences from target ``"text"`` ``[N, L]`` padded with -1."""
    if y.ndim != 2 or len(y) != n:
        raise MetricError(f"metric {metric!r} needs target 'text' as symbol ids [N, L] padded with -1 for the {n} "
                          f"samples but it is {shape(y)}")
    ids = integers(metric, "target 'text'", y)
    return [row[row >= 0].tolist() for row in ids]


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn ``a`` into ``b``."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class _Text(Metric):
    targets = ("text",)

    def _pairs(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> tuple[list, list]:
        pred = sequences(self.name, outputs[0])
        return pred, truths(self.name, targets["text"], len(pred))


class ExactMatch(_Text):
    """Percent of samples whose whole predicted sequence equals the true one."""

    name = "exact_match"
    higher_is_better = True
    unit = "%"

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        pred, true = self._pairs(outputs, targets)
        return float(np.mean([p == t for p, t in zip(pred, true, strict=True)]) * 100.0)


class CharErrorRate(_Text):
    """Character error rate: edit distance over the split divided by the true symbols' count, percent."""

    name = "cer"
    higher_is_better = False
    unit = "%"

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        pred, true = self._pairs(outputs, targets)
        total = sum(len(t) for t in true)
        if total == 0:
            raise MetricError(f"metric {self.name!r}: target 'text' holds no symbol (every id is padding -1)")
        return float(sum(edit_distance(p, t) for p, t in zip(pred, true, strict=True)) / total * 100.0)


register(ExactMatch())
register(CharErrorRate())
