"""Accuracy of a loaded artifact (through its Runner) on labelled samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgepipe.types import Runner


def predict(runner: Runner, x: np.ndarray, batch: int = 64,
            progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits for every sample of ``x`` (NCHW float32), batching as the runner's input allows."""
    spec = runner.inputs[0]
    static = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    step = static or batch
    outs = []
    for i in range(0, len(x), step):
        xb = x[i : i + step]
        n = len(xb)
        if static and n < static:  # pad a short last batch for a fixed-batch model
            xb = np.concatenate([xb, np.repeat(xb[-1:], static - n, axis=0)])
        outs.append(np.asarray(runner({spec.name: np.ascontiguousarray(xb)})[0])[:n])
        if progress:
            progress(n)
    return np.concatenate(outs).reshape(len(x), -1)


def top1(runner: Runner, x: np.ndarray, y: np.ndarray, progress: Callable[[int], None] | None = None) -> float:
    """Top-1 accuracy (0..1) of ``runner`` on ``x`` against labels ``y``."""
    from edgepipe.data import check_labels

    logits = predict(runner, x, progress=progress)
    check_labels(y, logits.shape[1], "the data's labels")
    return float((logits.argmax(1) == y).mean())
