"""The metric type, its error, and the array checks the built-in metrics share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgepipe.errors import ConfigError

REFERENCE_PREFIX = "fp32:"


class MetricError(ConfigError):
    """A metric, its postprocess, or the arrays given to them do not fit together.

    A ``ConfigError``: what the user chose (a metric, a postprocess, targets) does not fit the model.
    """


def reference_key(i: int) -> str:
    """The target key under which the fp32 model's output ``i`` arrives (``"fp32:0"``, ``"fp32:1"``, ...)."""
    return f"{REFERENCE_PREFIX}{i}"


class Metric:
    """A way to judge a model's outputs over a whole split.

    Subclass it, set the class attributes and implement ``__call__``::

        class Recall(Metric):
            name = "recall"
            unit = "%"
            targets = ("y",)

            def __call__(self, outputs, targets):
                ...

    Attributes:
        name: how ``--metric`` and the manifest call it.
        higher_is_better: whether a larger value is a better model.
        unit: what the value counts (``"%"``, ``"dB"``, ``"points"``, or ``""``).
        targets: the target arrays it needs, by key.
        reference: whether it needs the fp32 model's outputs, given in ``targets`` as ``"fp32:0"``, ...
    """

    name: str = ""
    higher_is_better: bool = True
    unit: str = ""
    targets: tuple[str, ...] = ()
    reference: bool = False

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        """The metric's value.

        Args:
            outputs: the model's outputs in order, each with the samples on axis 0.
            targets: target arrays by key, the same samples on axis 0 (and ``"fp32:i"`` if ``reference``).

        Returns:
            One number (percent-like metrics: 0 to 100).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, higher_is_better={self.higher_is_better}, "
                f"unit={self.unit!r}, targets={tuple(self.targets)!r}, reference={self.reference})")


class FunctionMetric(Metric):
    """A plain function ``(outputs, targets) -> float`` as a metric."""

    def __init__(self, fn: Callable[[list[np.ndarray], dict[str, np.ndarray]], Any], name: str, *,
                 higher_is_better: bool = True, unit: str = "", targets: tuple[str, ...] = (),
                 reference: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.higher_is_better = higher_is_better
        self.unit = unit
        self.targets = tuple(targets)
        self.reference = reference

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        return self.fn(outputs, targets)


def shape(a: np.ndarray) -> str:
    """``[N, 4, 8]``: an array's shape as the messages write it."""
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def integers(metric: str, what: str, a: np.ndarray) -> np.ndarray:
    """``a`` as int64 if it holds whole numbers (an integer dtype, or floats that are all integral)."""
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if finite.all() and (a == np.round(a)).all():
            return a.astype(np.int64)
        bad = a[~finite] if not finite.all() else a[a != np.round(a)]
        raise MetricError(f"metric {metric!r}: {what} must hold whole numbers (class indices); "
                          f"it holds {bad.reshape(-1)[0]!r}")
    raise MetricError(f"metric {metric!r}: {what} must hold whole numbers (class indices); "
                      f"its dtype is {a.dtype}")
