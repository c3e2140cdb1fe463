"""The one evaluation path: postprocess, check, metric, check."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError
from edgepipe.metrics._registry import _first_line, get, get_postprocess
from edgepipe.metrics.base import REFERENCE_PREFIX, Metric, MetricError, reference_key


def _name(fn: Any) -> str:
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}:{qual}" if mod else qual


def _postprocess(fn: Callable[[list[np.ndarray]], Any], name: str, arrays: list[np.ndarray],
                 what: str) -> list[np.ndarray]:
    try:
        result = fn(list(arrays))
    except EdgepipeError:
        raise
    except Exception as e:
        raise MetricError(f"postprocess {name!r} raised {type(e).__name__} on {what}: {_first_line(e)}") from e
    if not isinstance(result, list | tuple):
        raise MetricError(f"postprocess {name!r} returned {type(result).__name__} on {what}; "
                          "return a list of numpy arrays")
    bad = [f"item {i} is {type(a).__name__}" for i, a in enumerate(result) if not isinstance(a, np.ndarray)]
    if bad or not result:
        why = bad[0] if bad else "the list is empty"
        raise MetricError(f"postprocess {name!r} returned no list of numpy arrays on {what} ({why}); "
                          "return a list of numpy arrays")
    return list(result)


def _samples(outputs: list[np.ndarray]) -> int:
    if not outputs:
        raise MetricError("there are no outputs to score")
    for i, o in enumerate(outputs):
        if o.ndim == 0:
            raise MetricError(f"output {i} is a scalar; every output needs the samples on axis 0")
    n = outputs[0].shape[0]
    for i, o in enumerate(outputs[1:], 1):
        if o.shape[0] != n:
            raise MetricError(f"output {i} holds {o.shape[0]} samples but output 0 holds {n}; "
                              "every output needs the same samples on axis 0")
    if n == 0:
        raise MetricError("the outputs hold no samples; score a split that is not empty")
    return n


def score(metric: Metric | str, outputs: Sequence[np.ndarray], targets: Mapping[str, np.ndarray],
          postprocess: str | Callable[[list[np.ndarray]], list[np.ndarray]] | None = None) -> float:
    """A model's value under ``metric``: every judgement of a model goes through here.

    Args:
        metric: a ``Metric``, a registered name, or ``package.module:object``.
        outputs: the model's outputs in order over the whole split (samples on axis 0).
        targets: target arrays by key, the same samples on axis 0. A metric with ``reference=True``
            needs the fp32 model's raw outputs on the same samples as ``"fp32:0"``, ``"fp32:1"``, ...
        postprocess: ``package.module:function`` or a function, list of arrays -> list of arrays; applied
            to the outputs, and to the fp32 reference when the metric uses it.

    Returns:
        The metric's value, a finite float.
    """
    m = get(metric) if isinstance(metric, str) else metric
    outs = [np.asarray(o) for o in outputs]
    tgts = {k: np.asarray(v) for k, v in targets.items()}
    if postprocess is not None:
        fn = get_postprocess(postprocess) if isinstance(postprocess, str) else postprocess
        pname = postprocess if isinstance(postprocess, str) else _name(postprocess)
        outs = _postprocess(fn, pname, outs, "the outputs")
        ref_keys = []
        while reference_key(len(ref_keys)) in tgts:
            ref_keys.append(reference_key(len(ref_keys)))
        if m.reference and ref_keys:
            ref = _postprocess(fn, pname, [tgts.pop(k) for k in ref_keys], "the fp32 reference")
            tgts.update({reference_key(i): r for i, r in enumerate(ref)})
    n = _samples(outs)
    needed = list(m.targets) + ([reference_key(i) for i in range(len(outs))] if m.reference else [])
    missing = [k for k in needed if k not in tgts]
    if missing:
        have = ", ".join(repr(k) for k in tgts) or "none"
        ref = " (fp32:i are the fp32 model's outputs on the same samples)" if any(
            k.startswith(REFERENCE_PREFIX) for k in missing) else ""
        raise MetricError(f"metric {m.name!r} needs targets {', '.join(repr(k) for k in needed)}; "
                          f"missing {', '.join(repr(k) for k in missing)}{ref}; the data has: {have}")
    for k, v in tgts.items():
        if v.ndim == 0:
            raise MetricError(f"target {k!r} is a scalar; targets need the samples on axis 0")
        if v.shape[0] != n:
            raise MetricError(f"target {k!r} holds {v.shape[0]} samples but the outputs hold {n}; "
                              "targets and outputs must come from the same samples")
    try:
        value = m(outs, tgts)
    except EdgepipeError:
        raise
    except Exception as e:
        raise MetricError(f"metric {m.name!r} raised {type(e).__name__}: {_first_line(e)}") from e
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise MetricError(f"metric {m.name!r} returned {type(value).__name__}, not a number") from e
    if not math.isfinite(value):
        raise MetricError(f"metric {m.name!r} returned {value}, not a finite number "
                          "(check the outputs for nan or inf, and the metric for a division by zero)")
    return value
