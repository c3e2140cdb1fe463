"""What a compression step changed: parameters, non-zero parameters, MACs, top-1."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class ModelStats:
    params: int
    nonzero_params: int
    macs: int
    top1: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FlopCounterMode, FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return int(counter.get_total_flops() // 2)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective parameters, following torch.nn.utils.prune reparametrisations (weight = orig * mask)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name.endswith("_orig") and hasattr(mod, p_name[: -len("_orig")]):
                out[key[: -len("_orig")]] = getattr(mod, p_name[: -len("_orig")])
            else:
                out[key] = p
    return out


@torch.no_grad()
def top1(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 (0..1) of a torch classifier on ``x`` against ``y``: the metric registry's ``top1`` as a fraction."""
    from edgepipe import metrics
    from edgepipe.data import check_labels

    was_training = model.training
    model.eval()
    try:
        logits = np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])
    finally:
        model.train(was_training)
    logits = logits.reshape(len(logits), -1)
    check_labels(y, logits.shape[1], "the data's labels")
    return metrics.score("top1", [logits], {"y": y}) / 100.0


def stats(model: nn.Module, example: torch.Tensor, x: np.ndarray, y: np.ndarray) -> ModelStats:
    weights = _weights(model)
    return ModelStats(
        params=sum(int(w.numel()) for w in weights.values()),
        nonzero_params=sum(int(torch.count_nonzero(w)) for w in weights.values()),
        macs=count_macs(model.eval(), example),
        top1=top1(model, x, y),
    )
