"""A model's inputs and outputs as compression steps see them, whatever its signature.

Samples (one array, or one array per input by name; samples on axis 0) become ``forward``'s positional tensors:
one tensor for a one-input model (as it always was), a tuple in ``forward``'s order for several. Integer inputs
(token ids) stay integers. Outputs are always a list of tensors (a tuple or nested outputs flattened in order).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepipe.errors import CompressionError, EdgepipeError
from edgepipe.types import Samples, feeds_of, sample_count

#: what a forward pass is fed: one tensor (one input) or a tuple of tensors in ``forward``'s order
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def input_names(model: nn.Module, x: Samples) -> list[str]:
    """The names ``x`` is fed under, in ``forward``'s order (the data's own order when ``forward`` has none)."""
    if not isinstance(x, dict):
        return ["input"]
    from edgepipe.export import forward_input_names

    try:
        return forward_input_names(model)
    except EdgepipeError:
        return list(x)


def arrays(model: nn.Module, x: Samples) -> dict[str, np.ndarray]:
    """``x`` as arrays by input name in ``forward``'s order (``CompressionError`` when an input has no samples)."""
    try:
        return feeds_of(x, input_names(model, x))
    except ValueError as e:
        raise CompressionError(f"compression: {e}") from None


def as_inputs(model: nn.Module, x: Samples) -> Inputs:
    """``x`` as the tensors ``model``'s forward takes: one tensor for one input, else a tuple in forward's order."""
    if not isinstance(x, dict):
        return torch.from_numpy(x)
    ts = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in arrays(model, x).values())
    return ts[0] if len(ts) == 1 else ts


def as_tuple(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def select(x: Inputs, idx: Any) -> Inputs:
    """The samples ``idx`` (an index tensor, array or slice) of every input."""
    return tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]


def count(x: Inputs) -> int:
    return len(as_tuple(x)[0])


def call(model: nn.Module, x: Inputs) -> Any:
    """``model(*x)`` for several inputs, ``model(x)`` for one."""
    return model(*x) if isinstance(x, tuple) else model(x)


def outputs(result: Any) -> list[torch.Tensor]:
    """Every tensor a forward returned, in order (one tensor, a tuple, or nested containers)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]


def run(model: nn.Module, x: Inputs) -> list[torch.Tensor]:
    """The model's outputs on ``x`` as a list of tensors."""
    return outputs(call(model, x))


@torch.no_grad()
def predict(model: nn.Module, x: Samples, batch: int = 256) -> list[np.ndarray]:
    """Every output of ``model`` (in eval mode, its mode restored after) on all samples of ``x``. A program
    loaded from a ``.pt2`` (which refuses ``eval()``) runs as it is: it was exported for inference."""
    changed = False
    if model.training:
        with contextlib.suppress(NotImplementedError):
            model.eval()
            changed = True
    inputs = as_inputs(model, x)
    n = sample_count(x)
    parts: list[list[np.ndarray]] = []
    try:
        for i in range(0, n, batch):
            outs = run(model, select(inputs, slice(i, i + batch)))
            if not parts:
                parts = [[] for _ in outs]
            for p, o in zip(parts, outs, strict=True):
                p.append(o.detach().cpu().numpy())
    finally:
        if changed:
            model.train()
    return [np.concatenate(p) for p in parts]


def is_class_scores(t: torch.Tensor | np.ndarray) -> bool:
    """A 2-D float output ``[N, C]`` with ``C >= 2``: class scores (the rule fidelity's flip rate uses)."""
    dtype_ok = t.is_floating_point() if isinstance(t, torch.Tensor) else np.issubdtype(t.dtype, np.floating)
    return t.ndim == 2 and t.shape[1] >= 2 and bool(dtype_ok)


def is_labels(y: torch.Tensor | np.ndarray | None) -> bool:
    """Integer class labels ``[N]``."""
    if y is None:
        return False
    integer = not (y.is_floating_point() or y.is_complex()) if isinstance(y, torch.Tensor) else (
        np.issubdtype(y.dtype, np.integer))
    return y.ndim == 1 and bool(integer)


def is_classifier(outs: list[torch.Tensor] | list[np.ndarray], y: torch.Tensor | np.ndarray | None) -> bool:
    """One ``[N, C]`` float output and integer labels ``y`` ``[N]``: what cross-entropy on the labels fits."""
    return len(outs) == 1 and is_class_scores(outs[0]) and is_labels(y)


def describe(x: Inputs) -> str:
    """``(1, 3, 16, 16) float32, (1, 8) float32`` for messages."""
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in as_tuple(x))
