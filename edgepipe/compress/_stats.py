"""What a compression step changed: parameters, non-zero parameters, MACs, and how good the model still is.

How good is measured as the model allows (``measure`` names it in every record):

- a one-output ``[N, C]`` classifier with integer labels ``y``: ``top1`` on the validation split, a fraction
  0..1 (the key the records always had);
- any other model: the build's metric when one is given (``measure`` is its name, the value under that name in
  the metric's ``unit``), and always ``sqnr_db``, each output's SQNR against the original (uncompressed)
  model's outputs on the validation split; with no metric, ``measure`` is ``sqnr_db``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from edgepipe.compress._inputs import Inputs, call, predict

if TYPE_CHECKING:
    from edgepipe.data import Dataset


class Scorer(Protocol):
    """The build's metric (``edgepipe.pipeline.stages.Scorer`` is one): a name and a score of outputs on a split."""

    spec: str

    def __call__(self, outputs: list[np.ndarray], split: Dataset, reference: list[np.ndarray] | None) -> float: ...


@dataclass(frozen=True)
class ModelStats:
    params: int
    nonzero_params: int
    macs: int
    top1: float | None = None  # classifiers: top-1 on the validation split, 0..1
    measure: str = "top1"  # what the record judged the model by: "top1", a metric's name, or "sqnr_db"
    value: float | None = None  # the metric's value (``measure`` a metric other than top-1), in ``unit``
    unit: str | None = None
    sqnr_db: tuple[float, ...] | None = None  # per output, against the original model (non-classifiers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params, "nonzero_params": self.nonzero_params, "macs": self.macs}
        if self.top1 is not None:
            out["top1"] = self.top1  # the key classifier records always had
        out["measure"] = self.measure
        if self.value is not None:
            out[self.measure] = self.value
            out["unit"] = self.unit
        if self.sqnr_db is not None:
            out["sqnr_db"] = list(self.sqnr_db)
        return out

    @property
    def score(self) -> float | None:
        """The figure ``measure`` names (the worst output's SQNR for ``sqnr_db``)."""
        if self.measure == "top1" and self.value is None:
            return self.top1
        if self.measure == "sqnr_db":
            return min(self.sqnr_db) if self.sqnr_db else None
        return self.value


def count_macs(model: nn.Module, example: Inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (torch's FlopCounterMode, FLOPs / 2).

    Attention's fused inference path is turned off while counting: the counter sees no FLOPs in it."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            call(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
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
def top1(model: nn.Module, x: Any, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 (0..1) of a torch classifier on ``x`` (one array, or arrays by input name) against ``y``: the
    metric registry's ``top1`` as a fraction."""
    from edgepipe import metrics
    from edgepipe.data import check_labels

    logits = predict(model, x, batch)[0]
    logits = logits.reshape(len(logits), -1)
    check_labels(y, logits.shape[1], "the data's labels")
    return metrics.score("top1", [logits], {"y": y}) / 100.0


def _sizes(model: nn.Module, example: Inputs) -> tuple[int, int, int]:
    weights = _weights(model)
    return (sum(int(w.numel()) for w in weights.values()),
            sum(int(torch.count_nonzero(w)) for w in weights.values()),
            count_macs(model.eval(), example))


def stats(model: nn.Module, example: Inputs, x: Any, y: np.ndarray) -> ModelStats:
    """Parameters, non-zero parameters, MACs and top-1 of a classifier."""
    params, nonzero, macs = _sizes(model, example)
    return ModelStats(params, nonzero, macs, top1=top1(model, x, y))


class Judge:
    """Measures a model after each step the same way: top-1 for a classifier, else the build's metric (if any)
    and the SQNR of every output against the original model's, on the validation split."""

    def __init__(self, original: nn.Module, split: Dataset, example: Inputs, classifier: bool,
                 scorer: Scorer | None = None) -> None:
        self.split = split
        self.example = example
        self.classifier = classifier
        self.scorer = None if classifier else scorer
        self.reference = None if classifier else predict(original, split.x)

    @property
    def measure(self) -> str:
        """What the records judge the model by."""
        if self.classifier:
            return "top1"
        return self.scorer.spec if self.scorer is not None else "sqnr_db"

    def __call__(self, model: nn.Module) -> ModelStats:
        from edgepipe import metrics

        if self.classifier:
            assert self.split.y is not None
            return stats(model, self.example, self.split.x, self.split.y)
        params, nonzero, macs = _sizes(model, self.example)
        outs = predict(model, self.split.x)
        sqnr = tuple(round(v, 4) for v in metrics.sqnr_per_output(outs, self.reference or []))
        if self.scorer is None:
            return ModelStats(params, nonzero, macs, measure="sqnr_db", sqnr_db=sqnr)
        value = float(self.scorer(outs, self.split, self.reference))
        unit = getattr(getattr(self.scorer, "metric", None), "unit", None)
        return ModelStats(params, nonzero, macs, measure=self.scorer.spec, value=value, unit=unit, sqnr_db=sqnr)
