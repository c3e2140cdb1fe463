"""Knowledge distillation as the fine-tune objective: the teacher's outputs (and features) guide the student.

- ``soft``: ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1 - alpha) * CE(s, y)`` (Hinton et al.; the
  T² keeps the soft term's gradients on the scale of the hard one as T changes).
- ``hard``: ``alpha * CE(s, argmax t) + (1 - alpha) * CE(s, y)``: the teacher's predictions as labels.
- ``intermediate``: the soft loss plus ``hint_weight`` times the mean squared error between chosen
  student and teacher layers' outputs (FitNets hints). Where their channel counts differ, a learned 1×1
  convolution (or linear map) takes the student's features to the teacher's; it trains with the student
  and is discarded after.

The teacher runs in eval mode without gradients. The recipe's ``[distill]`` table configures it; by
default the teacher is the model as it was before the recipe.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepipe.compress._layers import resolve
from edgepipe.compress.finetune import Objective
from edgepipe.config.recipe import DistillConfig
from edgepipe.errors import ConfigError


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, dim=1),
        nn.functional.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean", log_target=True,
    ) * (t * t)


class SoftDistill(Objective):
    """Temperature-scaled KL to the teacher's soft labels, mixed with cross-entropy on the true labels."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.alpha = alpha

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def logit_loss(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.alpha * soft_kl(s, t, self.temperature)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * nn.functional.cross_entropy(s, y)
        return loss

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.teacher_logits(x)
        return self.logit_loss(model(x), t, y)


class HardDistill(SoftDistill):
    """Cross-entropy on the teacher's argmax predictions, mixed with cross-entropy on the true labels."""

    def logit_loss(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.alpha * nn.functional.cross_entropy(s, t.argmax(dim=1))
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * nn.functional.cross_entropy(s, y)
        return loss


class _Capture:
    """A forward hook that keeps the last output of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        assert v is not None, "the hooked layer did not run in this forward pass"
        return v


def _adapter(s: torch.Tensor, t: torch.Tensor, pair: tuple[str, str]) -> nn.Module | None:
    """A learned map from the student's features to the teacher's shape, or None when they already match."""
    if s.shape == t.shape:
        return None
    if s.dim() != t.dim() or s.shape[2:] != t.shape[2:]:
        raise ConfigError(
            f"distill.layers {list(pair)}: student output {tuple(s.shape[1:])} and teacher output "
            f"{tuple(t.shape[1:])} differ in more than channels; pair layers at the same resolution"
        )
    if s.dim() == 2:
        return nn.Linear(s.shape[1], t.shape[1], bias=False)
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}.get(s.dim())
    if conv is None:
        raise ConfigError(f"distill.layers {list(pair)}: cannot adapt {s.dim()}-d features")
    return conv(s.shape[1], t.shape[1], kernel_size=1, bias=False)


class HintDistill(SoftDistill):
    """Soft distillation plus FitNets hints between named student and teacher layers."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig, example: torch.Tensor) -> None:
        super().__init__(teacher, cfg.temperature, cfg.alpha)
        self.hint_weight = cfg.hint_weight
        pairs = []
        for i, pair in enumerate(cfg.layers):
            if len(pair) != 2:
                raise ConfigError(f"distill.layers[{i}] = {list(pair)}: give a [student layer, teacher layer] pair")
            pairs.append((pair[0], pair[1]))
        s_mods = resolve(student, [p[0] for p in pairs], "distill.layers (student)")
        t_mods = resolve(teacher, [p[1] for p in pairs], "distill.layers (teacher)")
        self.pairs = pairs
        self.student_hooks = [_Capture(s_mods[s]) for s, _ in pairs]
        self.teacher_hooks = [_Capture(t_mods[t]) for _, t in pairs]
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(example)
            teacher(example)
        student.train(was_training)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # adapters start the same on every run
            self.adapters = [
                _adapter(sh.take(), th.take(), pair)
                for sh, th, pair in zip(self.student_hooks, self.teacher_hooks, pairs, strict=True)
            ]

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters if a is not None for p in a.parameters()]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.teacher_logits(x)
        loss = self.logit_loss(model(x), t, y)
        hints = torch.zeros(())
        for sh, th, a in zip(self.student_hooks, self.teacher_hooks, self.adapters, strict=True):
            s_feat, t_feat = sh.take(), th.take().detach()
            hints = hints + nn.functional.mse_loss(a(s_feat) if a is not None else s_feat, t_feat)
        return loss + self.hint_weight * hints / len(self.adapters)

    def close(self) -> None:
        for h in self.student_hooks + self.teacher_hooks:
            h.handle.remove()


def make_objective(cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None,
                   example: torch.Tensor) -> Objective:
    """The fine-tune objective ``cfg`` describes, distilling ``teacher`` into ``student``.

    Args:
        cfg: kind (soft, hard, intermediate), temperature, alpha, layer pairs, hint weight.
        student: the model being fine-tuned (hooks are attached to it for ``intermediate``).
        teacher: the model whose outputs guide the student.
        example: one input batch, to size the hint adapters.
    """
    if teacher is None:
        raise ConfigError("distillation needs a teacher: set distill.teacher, or leave it out to use the "
                          "model as it was before the recipe")
    if cfg.kind == "soft":
        return SoftDistill(teacher, cfg.temperature, cfg.alpha)
    if cfg.kind == "hard":
        return HardDistill(teacher, cfg.temperature, cfg.alpha)
    return HintDistill(teacher, student, cfg, example)
