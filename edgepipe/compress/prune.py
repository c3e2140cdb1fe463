"""Unstructured pruning: set individual weights to zero; the tensors keep their shapes.

Three ways to choose the zeros, one mechanism to keep them: ``torch.nn.utils.prune`` masks, which hold
through fine-tuning (``weight = weight_orig * mask``) and are made permanent by :func:`make_permanent`
before export, so the exported graph has plain weights with zeros in them and no mask ops.

- ``magnitude_prune``: smallest |w|, to a target sparsity (one threshold over all chosen layers, or per
  layer, or a ratio per named layer) or below an absolute threshold.
- ``taylor_prune``: smallest |w · ∂L/∂w| (first-order Taylor estimate of the loss change), from a few
  training batches. ``L`` is cross-entropy on the labels for a one-output classifier with integer labels; for
  any other model, a random projection of every output, so no labels are needed.
- ``regularized_prune``: a sparsity-inducing fine-tune (L1 or L2 on the weights, or group lasso on output
  channels) that drives weights toward zero, then threshold or sparsity pruning.

Zeros in a dense tensor do not make onnxruntime, OpenVINO or TFLite any faster; they make the weights
compress (gzip, zip, Huffman). For speed, remove whole channels: :mod:`edgepipe.compress.structured`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from edgepipe.compress import CompressContext, register
from edgepipe.compress._layers import called, output_layers, pick, prunable
from edgepipe.config.techniques import MagnitudePruneConfig, RegularizedPruneConfig, TaylorPruneConfig
from edgepipe.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------
# shared mechanics


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into its weight (``prune.remove``): zeros stay, hooks go."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def _rank_and_mask(layers: dict[str, nn.Module], cfg: MagnitudePruneConfig,
                   scores: Callable[[nn.Module], torch.Tensor]) -> None:
    """Attach masks that zero the lowest-scoring weights, as ``cfg`` says (global, per layer, or named)."""
    named = pick(layers, cfg.layers, "layers", "prunable layers")
    rest = {n: m for n, m in layers.items() if n not in named}
    if cfg.threshold is not None:
        for m in rest.values():
            prune.custom_from_mask(m, "weight", (scores(m) >= cfg.threshold).to(m.weight.dtype))
    elif cfg.sparsity is not None and rest and cfg.sparsity > 0:
        if cfg.scope == "global":
            prune.global_unstructured([(m, "weight") for m in rest.values()], pruning_method=prune.L1Unstructured,
                                      amount=cfg.sparsity, importance_scores={(m, "weight"): scores(m)
                                                                              for m in rest.values()})
        else:
            for m in rest.values():
                prune.l1_unstructured(m, "weight", amount=cfg.sparsity, importance_scores=scores(m))
    for name, ratio in cfg.layers.items():
        m = named[name]
        prune.l1_unstructured(m, "weight", amount=ratio, importance_scores=scores(m))


def _layers(model: nn.Module, cfg: MagnitudePruneConfig, ctx: CompressContext) -> dict[str, nn.Module]:
    """The chosen layers that the forward pass calls (a mask on a layer whose weight its parent reads directly,
    such as attention's ``out_proj``, would never be applied)."""
    layers = called(model, ctx.example, prunable(model, cfg.module_types, cfg.ignored_layers))
    if not layers:
        raise ConfigError(f"no layers to prune: the model has no {'/'.join(cfg.module_types)} layers "
                          "outside ignored_layers")
    return layers


def _magnitude(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs()


# ---------------------------------------------------------------------------------------------------------
# techniques


@register("magnitude_prune", MagnitudePruneConfig, finalize=make_permanent)
def magnitude_prune(model: nn.Module, cfg: MagnitudePruneConfig, ctx: CompressContext) -> nn.Module:
    """Unstructured magnitude pruning: zero the smallest |w| (global or per-layer sparsity, or a threshold)."""
    _rank_and_mask(_layers(model, cfg, ctx), cfg, _magnitude)
    return model


@register("taylor_prune", TaylorPruneConfig, finalize=make_permanent)
def taylor_prune(model: nn.Module, cfg: TaylorPruneConfig, ctx: CompressContext) -> nn.Module:
    """Unstructured gradient pruning: zero the smallest |w · dL/dw| (first-order Taylor) from a few batches."""
    layers = _layers(model, cfg, ctx)
    scores = taylor_scores(model, layers, ctx, cfg.batches, cfg.batch_size)
    _rank_and_mask(layers, cfg, lambda m: scores[m])
    return model


def taylor_scores(model: nn.Module, layers: dict[str, nn.Module], ctx: CompressContext, batches: int,
                  batch_size: int) -> dict[nn.Module, torch.Tensor]:
    """Mean over ``batches`` training batches of |w · dL/dw|, per layer. ``L``: cross-entropy on the labels for a
    one-output classifier with integer labels, else a label-free random projection of every output
    (:func:`edgepipe.compress.finetune.sensitivity_loss`).

    The model stays in eval mode (BatchNorm statistics untouched) and its gradients are cleared after.
    """
    gen = torch.Generator().manual_seed(ctx.finetune_config.seed)
    was_training = model.training
    model.eval()
    totals = {m: torch.zeros_like(m.weight) for m in layers.values()}
    n = 0
    for x, y in ctx.batches(model, batches, batch_size):
        model.zero_grad(set_to_none=True)
        loss = ctx.sensitivity_loss(model, x, y, gen)
        loss.backward()
        for m, t in totals.items():
            t += (m.weight.detach() * _grad(m)).abs()
        n += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {m: t / max(n, 1) for m, t in totals.items()}


def _grad(m: nn.Module) -> torch.Tensor:
    """dL/dw of ``m.weight``, or of ``weight_orig`` when an earlier mask is attached."""
    p = getattr(m, "weight_orig", m.weight)
    if p.grad is None:
        return torch.zeros_like(p)
    return p.grad.detach()


def _penalty(layers: dict[str, nn.Module], cfg: RegularizedPruneConfig) -> Callable[[nn.Module], torch.Tensor]:
    weights = list(layers.values())

    def penalty(_model: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for m in weights:
            w = m.weight
            if cfg.penalty == "l1":
                total = total + w.abs().sum()
            elif cfg.penalty == "l2":
                total = total + w.pow(2).sum()
            else:
                total = total + w.flatten(1).norm(dim=1).sum()
        return cfg.strength * total

    return penalty


def _channel_masks(layers: dict[str, nn.Module], cfg: RegularizedPruneConfig) -> None:
    """Zero whole output channels: those whose RMS weight is lowest (global or per layer) or under threshold."""
    rms = {m: m.weight.detach().flatten(1).pow(2).mean(dim=1).sqrt() for m in layers.values()}
    if cfg.threshold is not None:
        keep = {m: r >= cfg.threshold for m, r in rms.items()}
    elif cfg.scope == "global":
        allr = torch.cat(list(rms.values()))
        k = int(round(cfg.sparsity * len(allr)))  # type: ignore[operator]
        cut = allr.kthvalue(k).values if k > 0 else allr.min() - 1
        keep = {m: r > cut for m, r in rms.items()}
    else:
        keep = {}
        for m, r in rms.items():
            k = int(round(cfg.sparsity * len(r)))  # type: ignore[operator]
            mask = torch.ones_like(r, dtype=torch.bool)
            mask[r.argsort()[:k]] = False
            keep[m] = mask
    for m, k_ in keep.items():
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        prune.custom_from_mask(m, "weight", k_.to(m.weight.dtype).reshape(shape).expand_as(m.weight).clone())


@register("regularized_prune", RegularizedPruneConfig, finalize=make_permanent)
def regularized_prune(model: nn.Module, cfg: RegularizedPruneConfig, ctx: CompressContext) -> nn.Module:
    """Sparsity-inducing fine-tune (L1/L2 on weights or group lasso on channels), then threshold pruning."""
    layers = _layers(model, cfg, ctx)
    pick(layers, cfg.layers, "layers", "prunable layers")
    if cfg.penalty == "group_lasso":  # a zeroed output channel of an output layer would silence a class or channel
        layers = {n: m for n, m in layers.items() if n not in output_layers(model, ctx.example)}
    ft = ctx.finetune_config if cfg.epochs is None else dataclasses.replace(ctx.finetune_config, epochs=cfg.epochs)
    model = ctx.finetune(model, ft, regularizer=_penalty(layers, cfg), desc=f"{cfg.penalty}-regularised training")
    if cfg.penalty == "group_lasso":
        _channel_masks(layers, cfg)
    else:
        _rank_and_mask(layers, cfg, _magnitude)
    return model
