"""Structured pruning that shrinks the graph: whole channels and filters removed with Torch-Pruning.

Torch-Pruning traces the model into a dependency graph, so a channel removed from one layer is removed
everywhere it flows: the BatchNorm after it, the next layer's input, and every branch joined to it by a
residual add. The classifier's outputs are left alone (the classes stay). The result is an ordinary
``nn.Module`` with smaller layers: the exported ONNX has smaller tensors and runs faster on every runtime.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.compress._layers import classifier_layers, pick, resolve
from edgepipe.config.techniques import Importance, StructuredPruneConfig
from edgepipe.errors import ConfigError


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
    """Cross-entropy gradients summed over a few training batches (eval mode: BatchNorm stats untouched)."""
    data = ctx.splits.train
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(ctx.finetune_config.seed)).numpy()
    model.eval()
    model.zero_grad(set_to_none=True)
    for b in range(batches):
        idx = perm[b * batch_size : (b + 1) * batch_size]
        if len(idx) == 0:
            break
        loss = nn.functional.cross_entropy(model(torch.from_numpy(data.x[idx])), torch.from_numpy(data.y[idx]))
        loss.backward()


@register("structured_prune", StructuredPruneConfig)
def structured_prune(model: nn.Module, cfg: StructuredPruneConfig, ctx: CompressContext) -> nn.Module:
    """Structured channel pruning (Torch-Pruning dependency graph): the graph really shrinks."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        raise ConfigError("structured_prune needs torch-pruning: pip install 'edgepipe[prune]'") from e

    example = ctx.example
    ignored = dict(resolve(model, cfg.ignored_layers, "ignored_layers"))
    if cfg.ignore_classifier:
        with torch.no_grad():
            out = model.eval()(example)
        ignored.update(classifier_layers(model, int(out.shape[-1])))
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
    return model.eval()
