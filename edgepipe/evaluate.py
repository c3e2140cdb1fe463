"""Running a loaded artifact (its Runner) over samples: every output, batched as the runner's inputs allow.

What the outputs are worth is the metric's business (:mod:`edgepipe.metrics`); this module only runs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgepipe.types import Runner, Samples, feeds_of, sample_count


def outputs(runner: Runner, x: Samples, batch: int = 64,
            progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Every output of ``runner`` over every sample of ``x`` (one array, or one per input name), in the model's
    output order, samples on axis 0. A fixed-batch model gets its last batch padded (and the padding dropped)."""
    feeds = feeds_of(x, [spec.name for spec in runner.inputs])
    n = sample_count(feeds)
    first = runner.inputs[0].shape[0] if runner.inputs[0].shape else None
    static = first if isinstance(first, int) and first > 0 else None
    step = static or batch
    parts: list[list[np.ndarray]] = []
    for i in range(0, n, step):
        fb = {k: v[i : i + step] for k, v in feeds.items()}
        m = len(next(iter(fb.values())))
        if static and m < static:
            fb = {k: np.concatenate([v, np.repeat(v[-1:], static - m, axis=0)]) for k, v in fb.items()}
        got = runner({k: np.ascontiguousarray(v) for k, v in fb.items()})
        parts.append([np.asarray(o)[:m] for o in got])
        if progress:
            progress(m)
    if not parts:
        return []
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


def predict(runner: Runner, x: Samples, batch: int = 64,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The first output for every sample of ``x``, one row per sample (a classifier's logits)."""
    out = outputs(runner, x, batch, progress)[0]
    return out.reshape(len(out), -1)


def top1(runner: Runner, x: np.ndarray, y: np.ndarray, progress: Callable[[int], None] | None = None) -> float:
    """Top-1 accuracy (0..1) of ``runner`` on ``x`` against labels ``y``: the registry's ``top1`` as a fraction."""
    from edgepipe import metrics

    return metrics.score("top1", [predict(runner, x, progress=progress)], {"y": y}) / 100.0
