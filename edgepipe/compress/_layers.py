"""Finding layers by name: what a step may touch, and errors that say which names exist."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgepipe.config.techniques import ModuleType  # noqa: F401  (re-exported)
from edgepipe.errors import ConfigError

if TYPE_CHECKING:
    from edgepipe.compress._inputs import Inputs

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


_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def called(model: nn.Module, example: Inputs, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The ``layers`` a forward pass on ``example`` calls as modules. Others (attention's ``out_proj``, whose
    weight ``nn.MultiheadAttention`` reads directly) would ignore a mask or a replacement."""
    from edgepipe.compress._inputs import call

    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda *_a, n=n: ran.add(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            call(model.eval(), example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: m for n, m in layers.items() if n in ran}


def output_layers(model: nn.Module, example: Inputs) -> dict[str, nn.Module]:
    """The layers that produce the model's outputs: on every path back from an output through the autograd
    graph (through reshapes, activations, pooling, concatenations and additions), the first Conv or Linear
    layer met. Structured pruning leaves them alone, so every output keeps its shape: a classifier's classes,
    a segmenter's K channels, a detector's box and score heads.

    When no output has a gradient path (frozen weights), the ``classifier_layers`` of output 0's last size.
    """
    from edgepipe.compress._inputs import call, outputs

    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, _LAYER_TYPES)}
    produced: dict[object, str] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(_mod: nn.Module, _inp: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                produced[out.grad_fn] = name
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        with torch.enable_grad():
            outs = outputs(call(model.eval(), example))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    found: set[str] = set()
    seen: set[object] = set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.add(produced[node])
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    if found:
        return {n: m for n, m in layers.items() if n in found}
    return classifier_layers(model, int(outs[0].shape[-1])) if outs and outs[0].dim() else {}
