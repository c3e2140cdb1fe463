"""The fine-tuning loop every compression step shares: optimizer, epochs, seed, progress, pluggable objective.

Techniques customise it without copying it: an ``Objective`` computes the loss (cross-entropy, or a
distillation objective with its own trainable adapters), a ``regularizer`` adds a penalty (L1, group
lasso), and ``after_step`` runs after each optimizer step (e.g. to keep pruned weights at zero).

The loop feeds every input of the model: a batch ``x`` is one tensor for a one-input model and a tuple in
``forward``'s order for several (integer inputs such as token ids as they are); ``y`` is the data's ``y``
target (labels ``[N]``, masks ``[N, H, W]``) or None. Which objective fits the model is the context's choice
(:meth:`edgepipe.compress.CompressContext.objective`): cross-entropy only for a one-output ``[N, C]``
classifier with integer labels, else distillation from the original model over every output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgepipe._progress import NullReporter, Reporter
from edgepipe.compress._inputs import Inputs, as_inputs, count, is_classifier, is_labels, run, select
from edgepipe.config.recipe import FinetuneConfig
from edgepipe.data import Dataset


class Objective:
    """The training loss; this one is cross-entropy on integer labels ``y`` of a one-output ``[N, C]`` classifier.
    Subclasses may own extra trainable parameters (returned by ``parameters``)."""

    def parameters(self) -> list[nn.Parameter]:
        return []

    def __call__(self, model: nn.Module, x: Inputs, y: torch.Tensor | None) -> torch.Tensor:
        outs = run(model, x)
        if not is_classifier(outs, y):
            from edgepipe.errors import CompressionError

            raise CompressionError(
                "fine-tune: cross-entropy needs one [N, C] output and integer labels 'y' [N]; the model gives "
                f"{len(outs)} output(s) {[tuple(o.shape) for o in outs]}"
                f"{'' if is_labels(y) else ' and the data has no such labels'}: fine-tune by distillation from "
                "the original model (CompressContext.objective chooses it)")
        return nn.functional.cross_entropy(outs[0], y)

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
        data: the training split (never the evaluation split): every input, and its ``y`` target if any.
        cfg: epochs, learning rate, optimizer, batch size, seed.
        objective: the loss; cross-entropy on the labels by default (a one-output classifier's only).
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
    x = as_inputs(model, data.x)
    y = torch.from_numpy(data.y) if data.y is not None else None
    n = count(x)
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * n_batches)
    model.train()
    try:
        with rep.stage(desc, total=cfg.epochs * n_batches) as advance:
            for _ in range(cfg.epochs):
                perm = torch.randperm(n, generator=gen)
                for b in range(n_batches):
                    idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    loss = objective(model, select(x, idx), y[idx] if y is not None else None)
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


def sensitivity_loss(model: nn.Module, x: Inputs, y: torch.Tensor | None,
                     generator: torch.Generator) -> torch.Tensor:
    """The loss whose gradients rank weights by how much they matter (Taylor pruning importance).

    A one-output ``[N, C]`` classifier with integer labels: cross-entropy on the labels. Any other model:
    ``sum_o <r_o, f_o(x)> / rms(f_o)`` over its float outputs with fresh Gaussian ``r_o`` (seeded by
    ``generator``). No labels are needed: for a Gaussian ``r``, ``|w * dL/dw|`` is on average proportional
    to ``|w| * ||df/dw||``, the first-order change of the outputs when ``w`` is removed (a distillation loss
    against the original would have zero gradient before anything is removed).
    """
    outs = run(model, x)
    if is_classifier(outs, y):
        return nn.functional.cross_entropy(outs[0], y)
    total = torch.zeros(())
    for o in outs:
        if not o.is_floating_point():
            continue
        r = torch.randn(o.shape, generator=generator, dtype=o.dtype)
        rms = o.detach().pow(2).mean().sqrt().clamp(min=1e-12)
        total = total + (r * o).sum() / rms
    return total
