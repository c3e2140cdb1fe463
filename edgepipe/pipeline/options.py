"""How a build or a release runs, beyond the model and the targets: :class:`BuildOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepipe.config.recipe import Recipe

__all__ = ["BuildOptions"]


@dataclass(frozen=True)
class BuildOptions:
    """How a build runs, beyond the model and the targets (the keyword options of :func:`edgepipe.api.build`
    and :func:`edgepipe.api.release`).

    Attributes:
        out: the output directory.
        data: the samples: ``digits``, ``mnist5k``, ``photos``, an ``.npz`` or an image folder.
        input_shape: the model's input shape (``None``: the target's, or the model's own signature).
        recipe: a compression recipe (name, path or object; ``None``: none).
        weights: weights to load into the model (safetensors; ``.pt2`` only with ``trust_code``).
        bench: measure latency and memory.
        iterations: timed runs per measurement (``None``: the target's ``[runtime] iterations``).
        allow_accuracy_drop: write the artifact even when it misses the accuracy budget.
        cache: reuse stages whose inputs are unchanged (``$EDGEPIPE_CACHE_DIR``).
        parity_atol: the largest absolute difference allowed between PyTorch and the exported ONNX.
        local_bench: measure on this machine even when the target names a ``[board]``.
        trust_code: load ``.pt2`` / TorchScript models and ``.pt2`` weights, which can run code.
        metric: a registered metric or ``pkg.mod:obj`` (``None``: top-1 for a classifier, else refused).
        postprocess: ``pkg.mod:fn`` run on the outputs before the metric (a detector's decode + NMS).
        max_metric_drop: every target's metric budget, in the metric's units (``None``: each target's own).
    """

    out: Path = Path("dist")
    data: str = "digits"
    input_shape: tuple[int, ...] | None = None
    recipe: str | Recipe | None = None
    weights: Path | None = None
    bench: bool = True
    iterations: int | None = None
    allow_accuracy_drop: bool = False
    cache: bool = True
    parity_atol: float = 1e-3
    local_bench: bool = False
    trust_code: bool = False
    metric: str | None = None
    postprocess: str | None = None
    max_metric_drop: float | None = None
