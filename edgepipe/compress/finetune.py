"""The fine-tuning loop every compression step shares: optimizer, epochs, seed, progress, pluggable objective.

Techniques customise it without copying it: an ``Objective`` computes the loss (cross-entropy, or a
distillation objective with its own trainable adapters), a ``regularizer`` adds a penalty (L1, group
lasso), and ``after_step`` runs after each optimizer step (e.g. to keep pruned weights at zero).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgepipe._progress import NullReporter, Reporter
from edgepipe.config.recipe import FinetuneConfig
from edgepipe.data import Dataset


class Objective:
    """The training loss. Subclasses may own extra trainable parameters (returned by ``parameters``)."""

    def parameters(self) -> list[nn.Parameter]:
        return []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def close(self) -> None:
        """Remove hooks; called when fine-tuning ends."""


def finetune(
    model: nn.Module,
    data: Dataset,
    cfg: FinetuneConfig,
    *,
    objective: Objective | None = None,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    reporter: Reporter | None = None,
    desc: str = "fine-tune",
) -> nn.Module:
    """Train ``model`` in place on ``data`` (the training split) and return it in eval mode.

    Args:
        model: the model to train.
        data: labelled samples (never the evaluation split).
        cfg: epochs, learning rate, optimizer, batch size, seed.
        objective: the loss; cross-entropy on the labels by default.
        regularizer: a penalty added to the loss (e.g. L1 on weights).
        after_step: called after each optimizer step (e.g. re-apply pruning masks).
        reporter: progress reporting.
        desc: the progress bar's label.
    """
    objective = objective or Objective()
    rep = reporter or NullReporter()
    if cfg.epochs == 0:
        return model.eval()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad] + objective.parameters()
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    n_batches = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * n_batches)
    model.train()
    try:
        with rep.stage(desc, total=cfg.epochs * n_batches) as advance:
            for _ in range(cfg.epochs):
                perm = torch.randperm(len(x), generator=gen)
                for b in range(n_batches):
                    idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    loss = objective(model, x[idx], y[idx])
                    if regularizer is not None:
                        loss = loss + regularizer(model)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    if after_step is not None:
                        after_step(model)
                    advance(1)
    finally:
        objective.close()
    return model.eval()
