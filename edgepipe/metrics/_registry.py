"""The registry: built-in metrics by name, the user's own by ``package.module:object``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgepipe._imports import first_line as _first_line
from edgepipe._imports import import_object
from edgepipe.errors import ConfigError
from edgepipe.metrics.base import FunctionMetric, Metric

_REGISTRY: dict[str, Metric] = {}
SPEC_HINT = "or give your own as package.module:object"

Postprocess = Callable[[list[np.ndarray]], list[np.ndarray]]


def _check(metric: Any, what: str) -> Metric:
    if not isinstance(metric, Metric):
        raise ConfigError(f"{what}: {type(metric).__name__} is not an edgepipe.metrics.Metric")
    problems = []
    if not isinstance(metric.name, str) or not metric.name:
        problems.append(f"name {metric.name!r} (give a non-empty string)")
    if not isinstance(metric.higher_is_better, bool):
        problems.append(f"higher_is_better {metric.higher_is_better!r} (give True or False)")
    if not isinstance(metric.unit, str):
        problems.append(f"unit {metric.unit!r} (give a string such as '%', 'dB' or '')")
    if (not isinstance(metric.targets, tuple | list)
            or not all(isinstance(k, str) for k in metric.targets)):
        problems.append(f"targets {metric.targets!r} (give a tuple of target keys)")
    if not isinstance(metric.reference, bool):
        problems.append(f"reference {metric.reference!r} (give True or False)")
    if problems:
        raise ConfigError(f"{what}: wrong " + "; ".join(problems))
    return metric


def register(metric: Metric | type[Metric], *, replace: bool = False) -> Any:
    """Make a metric known by its ``name``; usable as a class decorator.

    Args:
        metric: a ``Metric`` instance, or a subclass that takes no arguments.
        replace: allow taking over a name already registered.

    Returns:
        ``metric`` itself.
    """
    inst = metric() if inspect.isclass(metric) and issubclass(metric, Metric) else metric
    inst = _check(inst, f"metric {getattr(inst, 'name', inst)!r}")
    if ":" in inst.name:
        raise ConfigError(f"metric {inst.name!r}: a registered name cannot hold ':' "
                          "(that is how package.module:object specs are told apart)")
    if inst.name in _REGISTRY and not replace and _REGISTRY[inst.name] is not inst:
        raise ConfigError(f"metric {inst.name!r} is registered already; pick another name or pass replace=True")
    _REGISTRY[inst.name] = inst
    return metric


def names() -> list[str]:
    """The registered metrics' names, sorted."""
    return sorted(_REGISTRY)


def _load(spec: str, what: str, example: str) -> Any:
    return import_object(spec, what, example)


def get(spec: str) -> Metric:
    """The metric a name or a ``package.module:object`` spec stands for.

    Args:
        spec: a registered name (see :func:`names`), or ``package.module:object`` where ``object`` is a
            ``Metric`` instance, a ``Metric`` subclass taking no arguments, or a plain function
            ``(outputs, targets) -> float`` (then named ``spec``, higher is better, no unit, no targets).

    Returns:
        The metric.
    """
    if ":" not in spec:
        if spec not in _REGISTRY:
            raise ConfigError(f"unknown metric {spec!r}; choose one of: {', '.join(names())}, {SPEC_HINT}")
        return _REGISTRY[spec]
    obj = _load(spec, "metric", "object (a Metric, a Metric subclass, or a function)")
    if isinstance(obj, Metric):
        return _check(obj, f"metric {spec!r}")
    if inspect.isclass(obj):
        if not issubclass(obj, Metric):
            raise ConfigError(f"metric {spec!r}: class {obj.__name__} is not an edgepipe.metrics.Metric subclass")
        try:
            inst = obj()
        except Exception as e:
            raise ConfigError(f"metric {spec!r}: {obj.__name__}() raised {type(e).__name__}: "
                              f"{_first_line(e)} (a Metric subclass is made with no arguments)") from e
        if not inst.name:
            inst.name = spec
        return _check(inst, f"metric {spec!r}")
    if callable(obj):
        return FunctionMetric(obj, spec)
    raise ConfigError(f"metric {spec!r}: {type(obj).__name__} is neither a Metric nor a function")


def get_postprocess(spec: str) -> Postprocess:
    """The user's postprocess, ``package.module:function`` taking and returning a list of arrays.

    Args:
        spec: ``package.module:function``.

    Returns:
        The function.
    """
    fn = _load(spec, "postprocess", "function")
    if not callable(fn) or inspect.isclass(fn):
        raise ConfigError(f"postprocess {spec!r}: {type(fn).__name__} is not a function "
                          "(give one that takes and returns a list of arrays)")
    return fn


def _dims(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def default_for(output_shapes: Sequence[Sequence[Any]], targets: Mapping[str, np.ndarray]) -> str:
    """The metric to use when none is chosen: ``top1`` for a classifier with labels, no guess otherwise.

    Args:
        output_shapes: the model's output shapes (named or unknown dims allowed, e.g. ``("N", 10)``).
        targets: the split's target arrays by key.

    Returns:
        ``"top1"`` when there is one output of rank 2 and the targets hold integer labels ``"y"`` [N].
    """
    y = targets.get("y")
    if (len(output_shapes) == 1 and len(output_shapes[0]) == 2 and y is not None
            and np.asarray(y).ndim == 1 and np.issubdtype(np.asarray(y).dtype, np.integer)):
        return "top1"
    outs = ", ".join(_dims(s) for s in output_shapes) or "none"
    keys = ", ".join(repr(k) for k in targets) or "none"
    raise ConfigError(f"this model (outputs {outs}; targets {keys}) is not a one-output classifier with "
                      f"integer labels 'y': give --metric, one of: {', '.join(names())}, {SPEC_HINT}")
