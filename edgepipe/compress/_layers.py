"""Finding layers by name: what a step may touch, and errors that say which names exist."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from edgepipe.config.techniques import ModuleType  # noqa: F401  (re-exported)
from edgepipe.errors import ConfigError

MODULE_TYPES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear,
}
_SHOWN = 20


def names_hint(names: Iterable[str], what: str = "layers that exist") -> str:
    """``'layers that exist: a, b, c'``, cut after the first few."""
    names = [n for n in names if n]
    shown = ", ".join(names[:_SHOWN])
    more = f" (first {_SHOWN} of {len(names)})" if len(names) > _SHOWN else ""
    return f"{what}{more}: {shown or '(none)'}"


def pick(allowed: dict[str, nn.Module], names: Iterable[str], field: str,
         kind: str = "layers that exist") -> dict[str, nn.Module]:
    """``allowed[name]`` for each name; ``ConfigError`` naming ``field``, the unknown names and the known ones."""
    names = list(names)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ConfigError(
            f"{field}: no layer named {', '.join(repr(n) for n in unknown)} in the model; {names_hint(allowed, kind)}"
        )
    return {n: allowed[n] for n in names}


def resolve(model: nn.Module, names: Iterable[str], field: str) -> dict[str, nn.Module]:
    """Modules of ``model`` by name (as ``model.named_modules()`` gives them, e.g. ``layer1.0.conv1``)."""
    return pick({n: m for n, m in model.named_modules() if n}, names, field)


def prunable(model: nn.Module, module_types: Iterable[str], ignored: Iterable[str] = (),
             field: str = "ignored_layers") -> dict[str, nn.Module]:
    """The layers of the chosen types, by name, without ``ignored`` (every ignored name must exist)."""
    types = tuple(MODULE_TYPES[t] for t in module_types)
    skip = resolve(model, ignored, field)
    return {n: m for n, m in model.named_modules() if n and isinstance(m, types) and n not in skip}


def classifier_layers(model: nn.Module, num_outputs: int) -> dict[str, nn.Module]:
    """The layers that produce the model's outputs: Linear (or, failing that, Conv) layers with as many
    output features as the model has outputs. Structured pruning leaves them alone, so the classes stay."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_outputs}
    if linear:
        return linear
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_outputs}
