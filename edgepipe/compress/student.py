"""Distillation into a smaller student architecture (Hinton et al. 2015; the survey's "student" network).

The step swaps the model for a new architecture built by a factory (``package.module:factory``, optionally
with starting weights) and leaves the training to the step's fine-tune with the recipe's ``[distill]``
objective, whose teacher is the model as it was before the recipe (without a ``[distill]`` table the
fine-tune trains the student on the labels alone for a one-output classifier with integer labels, and by
matching the original model's outputs for any other model). Later steps compress the student. A student must
take the same inputs (by ``forward``'s argument names, for several) and give outputs of the same shapes;
one that does not is refused in one line.

```toml
[finetune]
epochs = 6
[distill]
kind = "soft"              # teacher: the model before the recipe (here, ResNet-56)
[[steps]]
technique = "student"
model = "edgepipe.models.cifar_resnet:resnet20"
finetune = true
```
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.compress._inputs import describe, run
from edgepipe.config.techniques import StudentConfig
from edgepipe.errors import ConfigError, ModelLoadError


@register("student", StudentConfig)
def student(model: nn.Module, cfg: StudentConfig, ctx: CompressContext) -> nn.Module:
    """Distillation into a smaller architecture: the model is replaced by a student factory's, trained by the fine-tune."""
    from edgepipe.models import load_model

    try:
        new = load_model(cfg.model, Path(cfg.weights) if cfg.weights else None).module
    except ModelLoadError as e:  # it names the model already
        raise ConfigError(str(e)) from None
    if new is None:
        raise ConfigError(f"model = {cfg.model!r} is not a torch factory")
    several = isinstance(ctx.example, tuple)
    if several:  # its inputs are fed by name from here on (export, the .pt2): the student must name them alike
        from edgepipe.errors import EdgepipeError
        from edgepipe.export import forward_input_names

        try:
            mine, theirs = forward_input_names(model), forward_input_names(new)
        except EdgepipeError as e:
            raise ConfigError(f"model = {cfg.model!r}: {e}") from None
        if mine != theirs:
            raise ConfigError(f"model = {cfg.model!r} takes inputs ({', '.join(theirs)}), the model "
                              f"({', '.join(mine)}): give the student a forward with the same arguments")
    with torch.no_grad():
        want = [tuple(o.shape) for o in run(model.eval(), ctx.example)]
        try:
            got = [tuple(o.shape) for o in run(new.eval(), ctx.example)]
        except Exception as e:
            what = "inputs" if several else "input"
            raise ConfigError(f"model = {cfg.model!r} cannot take the model's {what} {describe(ctx.example)}: "
                              f"{type(e).__name__}: {e}") from None
    if got != want:
        g, w = (got[0], want[0]) if len(got) == len(want) == 1 else (got, want)
        raise ConfigError(f"model = {cfg.model!r} outputs {g}, the model {w}: "
                          "the student must predict the same classes" + (
                              "" if len(want) == 1 else " (the same outputs, in the same shapes)"))
    n_new, n_old = (sum(p.numel() for p in m.parameters()) for m in (new, model))
    alone = ("the labels alone" if ctx.is_classifier(model) else
             "matching the original model's outputs (distillation without labels)")
    ctx.reporter.note(f"student {cfg.model}: {n_new:,} parameters (was {n_old:,})" + (
        "" if ctx.distill else f"; no [distill] table: the fine-tune trains it on {alone}"))
    return new
