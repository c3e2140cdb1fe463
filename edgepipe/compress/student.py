"""Distillation into a smaller student architecture (Hinton et al. 2015; the survey's "student" network).

The step swaps the model for a new architecture built by a factory (``package.module:factory``, optionally
with starting weights) and leaves the training to the step's fine-tune with the recipe's ``[distill]``
objective, whose teacher is the model as it was before the recipe (without a ``[distill]`` table the
fine-tune trains the student on the labels alone). Later steps compress the student.

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
    with torch.no_grad():
        want = model.eval()(ctx.example).shape
        try:
            got = new.eval()(ctx.example).shape
        except Exception as e:
            raise ConfigError(f"model = {cfg.model!r} cannot take the model's input {tuple(ctx.example.shape)}: "
                              f"{type(e).__name__}: {e}") from None
    if got != want:
        raise ConfigError(f"model = {cfg.model!r} outputs {tuple(got)}, the model {tuple(want)}: "
                          "the student must predict the same classes")
    n_new, n_old = (sum(p.numel() for p in m.parameters()) for m in (new, model))
    ctx.reporter.note(f"student {cfg.model}: {n_new:,} parameters (was {n_old:,})" + (
        "" if ctx.distill else "; no [distill] table: the fine-tune trains it on the labels alone"))
    return new
