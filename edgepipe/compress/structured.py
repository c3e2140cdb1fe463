"""Structured pruning that shrinks the graph: whole channels and filters removed with Torch-Pruning.

Torch-Pruning traces the model into a dependency graph, so a channel removed from one layer is removed
everywhere it flows: the BatchNorm after it, the next layer's input, and every branch joined to it by a
residual add. The layers that produce the model's outputs are left alone (``ignore_classifier``): every
output keeps its shape, a classifier's classes, a segmenter's K channels, a detector's heads. The graph is
traced on one validation sample of every input (a tuple in ``forward``'s order; integer inputs as they are).
The result is an ordinary ``nn.Module`` with smaller layers: the exported ONNX has smaller tensors and runs
faster on every runtime.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.compress._inputs import as_tuple, describe, run
from edgepipe.compress._layers import output_layers, pick, resolve
from edgepipe.config.techniques import Importance, StructuredPruneConfig
from edgepipe.errors import CompressionError, ConfigError


def _importance(name: Importance) -> Any:
    """The torch_pruning ``Importance`` for ``name``."""
    import torch_pruning as tp

    imp = tp.pruner.importance
    return {
        "magnitude": lambda: imp.GroupMagnitudeImportance(p=2),
        "taylor": lambda: imp.GroupTaylorImportance(),
        "bn_scale": lambda: imp.BNScaleImportance(),
        "lamp": lambda: imp.LAMPImportance(p=2),
    }[name]()


def _accumulate_gradients(model: nn.Module, ctx: CompressContext, batches: int, batch_size: int) -> None:
    """Gradients summed over a few training batches (eval mode: BatchNorm stats untouched): of cross-entropy for
    a labelled classifier, else of a label-free random projection of the outputs (``ctx.sensitivity_loss``)."""
    gen = torch.Generator().manual_seed(ctx.finetune_config.seed)
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in ctx.batches(model, batches, batch_size):
        loss = ctx.sensitivity_loss(model, x, y, gen)
        loss.backward()


@register("structured_prune", StructuredPruneConfig)
def structured_prune(model: nn.Module, cfg: StructuredPruneConfig, ctx: CompressContext) -> nn.Module:
    """Structured channel pruning (Torch-Pruning dependency graph): the graph really shrinks."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ConfigError("structured_prune needs torch-pruning: pip install 'edgepipe[prune]'") from e

    example = as_tuple(ctx.example)  # Torch-Pruning calls model(*example_inputs)
    ignored = dict(resolve(model, cfg.ignored_layers, "ignored_layers"))
    if cfg.ignore_classifier:
        ignored.update(output_layers(model, ctx.example))
    with torch.no_grad():
        shapes = [tuple(o.shape) for o in run(model.eval(), ctx.example)]
    roots = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)}
    ratio_dict = {m: r for m, r in zip(pick(roots, cfg.layers, "layers", "prunable layers").values(),
                                       cfg.layers.values(), strict=True)}
    pruner = tp.pruner.BasePruner(
        model, example, importance=_importance(cfg.importance), global_pruning=cfg.scope == "global",
        pruning_ratio=cfg.ratio, pruning_ratio_dict=ratio_dict, max_pruning_ratio=cfg.max_ratio,
        ignored_layers=list(ignored.values()), round_to=cfg.round_to if cfg.round_to > 1 else None,
    )
    if cfg.importance == "taylor":
        _accumulate_gradients(model, ctx, cfg.batches, cfg.batch_size)
    pruner.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = [tuple(o.shape) for o in run(model.eval(), ctx.example)]
    if after != shapes and cfg.ignore_classifier:
        raise CompressionError(
            f"structured_prune changed the model's output shapes {shapes} to {after} (traced on inputs "
            f"{describe(ctx.example)}): name the layers that produce the outputs in ignored_layers")
    return model.eval()
