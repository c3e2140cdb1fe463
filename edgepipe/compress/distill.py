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

The label terms above need a one-output ``[N, C]`` classifier with integer labels ``y``. For any other model
(several outputs, per-pixel scores, boxes) the loss is the distillation term alone, summed over every float
output (integer outputs carry no gradient): ``soft`` and ``intermediate`` take ``T² · KL`` for class-score
outputs (``[N, C]`` floats) and, for every other output, the mean squared error divided by the teacher
output's mean square (so outputs of any scale weigh alike: it is ``10^(-SQNR/10)`` of that batch); ``hard``
takes cross-entropy on the teacher's argmax for class-score outputs and the same normalised MSE for the rest.

:class:`OutputMatch` is the fine-tune objective of a model that is not such a classifier when the recipe has no
``[distill]`` table: the ``soft`` distillation term from the original (fp32, uncompressed) model, which needs
no labels and fits any output.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepipe.compress._inputs import Inputs, call, is_class_scores, is_classifier, run
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


def normalised_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)²) / mean(t²)``: the squared error relative to the teacher output's power."""
    return nn.functional.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)


def match_outputs(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float,
                  hard: bool = False) -> torch.Tensor:
    """The distillation term over every float output, without labels: ``T² · KL`` (or, ``hard``, cross-entropy
    on the teacher's argmax) for class-score outputs ``[N, C]``, MSE over the teacher's mean square for others."""
    if len(student) != len(teacher):
        raise ConfigError(f"distillation: the student gives {len(student)} outputs, the teacher {len(teacher)}")
    total = torch.zeros(())
    used = 0
    for s, t in zip(student, teacher, strict=True):
        if not s.is_floating_point():
            continue
        if is_class_scores(s):
            total = total + (nn.functional.cross_entropy(s, t.argmax(dim=1)) if hard
                             else soft_kl(s, t, temperature))
        else:
            total = total + normalised_mse(s, t)
        used += 1
    if not used:
        from edgepipe.errors import CompressionError

        raise CompressionError("distillation: the model has no float output to match the teacher's on; "
                               "fine-tune it without a recipe step that trains (finetune = false)")
    return total


class SoftDistill(Objective):
    """Temperature-scaled KL to the teacher's soft labels, mixed with cross-entropy on the true labels (for a
    model that is not a one-output classifier with integer labels: the distillation term of every output)."""

    hard = False

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.alpha = alpha

    def teacher_logits(self, x: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return call(self.teacher, x)

    def teacher_outputs(self, x: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach() for t in run(self.teacher, x)]

    def output_loss(self, s: list[torch.Tensor], t: list[torch.Tensor], y: torch.Tensor | None) -> torch.Tensor:
        """The loss over every output: :meth:`logit_loss` for a labelled classifier, else :func:`match_outputs`."""
        if is_classifier(s, y) and len(t) == 1:
            return self.logit_loss(s[0], t[0], y)  # type: ignore[arg-type]
        return match_outputs(s, t, self.temperature, self.hard)

    def logit_loss(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.alpha * soft_kl(s, t, self.temperature)
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * nn.functional.cross_entropy(s, y)
        return loss

    def __call__(self, model: nn.Module, x: Inputs, y: torch.Tensor | None) -> torch.Tensor:
        t = self.teacher_outputs(x)
        return self.output_loss(run(model, x), t, y)


class HardDistill(SoftDistill):
    """Cross-entropy on the teacher's argmax predictions, mixed with cross-entropy on the true labels."""

    hard = True

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

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig, example: Inputs) -> None:
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
            call(student, example)
            call(teacher, example)
        student.train(was_training)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # adapters start the same on every run
            self.adapters = [
                _adapter(sh.take(), th.take(), pair)
                for sh, th, pair in zip(self.student_hooks, self.teacher_hooks, pairs, strict=True)
            ]

    def parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters if a is not None for p in a.parameters()]

    def __call__(self, model: nn.Module, x: Inputs, y: torch.Tensor | None) -> torch.Tensor:
        t = self.teacher_outputs(x)
        loss = self.output_loss(run(model, x), t, y)
        hints = torch.zeros(())
        for sh, th, a in zip(self.student_hooks, self.teacher_hooks, self.adapters, strict=True):
            s_feat, t_feat = sh.take(), th.take().detach()
            hints = hints + nn.functional.mse_loss(a(s_feat) if a is not None else s_feat, t_feat)
        return loss + self.hint_weight * hints / len(self.adapters)

    def close(self) -> None:
        for h in self.student_hooks + self.teacher_hooks:
            h.handle.remove()


class OutputMatch(SoftDistill):
    """Label-free distillation from the original model: :func:`match_outputs` over every float output (``T² · KL``
    at ``temperature`` for class scores, normalised MSE for the rest). The default fine-tune objective of a
    model that is not a one-output classifier with integer labels."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0) -> None:
        super().__init__(teacher, temperature, 1.0)

    def output_loss(self, s: list[torch.Tensor], t: list[torch.Tensor], y: torch.Tensor | None) -> torch.Tensor:
        return match_outputs(s, t, self.temperature)


def make_objective(cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None,
                   example: Inputs) -> Objective:
    """The fine-tune objective ``cfg`` describes, distilling ``teacher`` into ``student``.

    Args:
        cfg: kind (soft, hard, intermediate), temperature, alpha, layer pairs, hint weight.
        student: the model being fine-tuned (hooks are attached to it for ``intermediate``).
        teacher: the model whose outputs guide the student.
        example: one input batch (a tuple for several inputs), to size the hint adapters.
    """
    if teacher is None:
        raise ConfigError("distillation needs a teacher: set distill.teacher, or leave it out to use the "
                          "model as it was before the recipe")
    if cfg.kind == "soft":
        return SoftDistill(teacher, cfg.temperature, cfg.alpha)
    if cfg.kind == "hard":
        return HardDistill(teacher, cfg.temperature, cfg.alpha)
    return HintDistill(teacher, student, cfg, example)
