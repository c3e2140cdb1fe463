"""Compression: recipes of ordered steps, each a registered technique ``(model, config, context) -> model``.

Adding a technique is one module that calls :func:`register` and one line in ``_MODULES``. Each step
records what it changed (parameters, non-zero parameters, MACs, and how good the model is before and after,
``measure`` naming how: ``top1`` for a classifier, else the build's metric or ``sqnr_db``, the fidelity to
the original model) for the manifest.

Any model: several inputs of any rank and dtype (the context's ``example`` is one tensor per input, from the
validation split) and any outputs. The fine-tune objective is cross-entropy on the labels only for a
one-output ``[N, C]`` classifier with integer labels ``y``; for every other model it is distillation from
the original (uncompressed, fp32) model over every float output, which needs no labels
(:class:`edgepipe.compress.distill.OutputMatch`). A ``[distill]`` table replaces either.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgepipe._progress import NullReporter, Reporter
from edgepipe.config._schema import from_dict
from edgepipe.config.recipe import (
    DistillConfig,
    FinetuneConfig,
    Recipe,
    Step,
    load_recipe,
    recipe_from_dict,
)
from edgepipe.config.techniques import config_class
from edgepipe.errors import CompressionError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgepipe.compress._inputs import Inputs
    from edgepipe.compress._stats import Scorer
    from edgepipe.data import Splits

_MODULES: tuple[str, ...] = (
    "edgepipe.compress.prune",
    "edgepipe.compress.structured",
    "edgepipe.compress.lowrank",
    "edgepipe.compress.share",
    "edgepipe.compress.hashing",
    "edgepipe.compress.student",
)


@dataclass(frozen=True)
class Technique:
    """A registered compression technique."""

    name: str
    config: type
    apply: Callable[[nn.Module, Any, CompressContext], nn.Module]
    finalize: Callable[[nn.Module], nn.Module] | None = None  # make the change permanent before export
    summary: str = ""

    def parse(self, params: dict[str, Any], where: str = "") -> Any:
        """Validate a step's parameters into this technique's config dataclass."""
        try:
            return from_dict(self.config, params, "")
        except ConfigError as e:
            raise ConfigError(f"{where} ({self.name}): {e}" if where else f"{self.name}: {e}") from None


_REGISTRY: dict[str, Technique] = {}


def register(name: str, config: type, *, finalize: Callable[[nn.Module], nn.Module] | None = None,
             summary: str = "") -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(model, config, ctx) -> model`` as technique ``name`` with its config type."""

    if config_class(name) is not config:
        raise TypeError(f"technique {name!r}: {config.__name__} is not the config registered for it in "
                        "edgepipe.config.techniques")

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = Technique(name, config, fn, finalize, summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def techniques() -> dict[str, Technique]:
    for mod in _MODULES:
        importlib.import_module(mod)
    return dict(sorted(_REGISTRY.items()))


def technique(name: str, where: str = "") -> Technique:
    known = techniques()
    if name not in known:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown technique {name!r}; known techniques: {', '.join(known) or '(none)'}")
    return known[name]


@dataclass
class CompressContext:
    """What a technique may use: the data splits, the shared fine-tune loop, the teacher, progress.

    ``example``: one sample of every input (one tensor, or a tuple in ``forward``'s order for several inputs),
    for tracing (Torch-Pruning's dependency graph), MACs and shapes. ``original``: the model before the recipe,
    which a model that is not a labelled classifier is fine-tuned to match.
    """

    splits: Splits
    finetune_config: FinetuneConfig
    example: Inputs
    distill: DistillConfig | None = None
    teacher: nn.Module | None = None
    reporter: Reporter = field(default_factory=NullReporter)
    original: nn.Module | None = None

    def is_classifier(self, model: nn.Module) -> bool:
        """Whether ``model`` is a one-output ``[N, C]`` classifier and the training data has integer labels."""
        import torch

        from edgepipe.compress._inputs import is_classifier, run

        with torch.no_grad():
            return is_classifier(run(model.eval(), self.example), self.splits.train.y)

    def objective(self, model: nn.Module) -> Any:
        """The recipe's fine-tune objective: distillation from the teacher if configured; else cross-entropy on
        the labels for a one-output classifier with integer labels ``y``; else label-free distillation from the
        original model over every output (:class:`edgepipe.compress.distill.OutputMatch`)."""
        from edgepipe.compress.finetune import Objective

        if self.distill is None:
            if self.is_classifier(model):
                return Objective()
            from edgepipe.compress.distill import OutputMatch

            if self.original is None:
                raise CompressionError("fine-tune: this model is not a one-output classifier with integer labels "
                                       "'y', so it is fine-tuned to match the original model's outputs; give "
                                       "CompressContext(original=the model before compression)")
            return OutputMatch(self.original)
        from edgepipe.compress.distill import make_objective  # provided by the distillation module

        return make_objective(self.distill, model, self.teacher, self.example)

    def describe_objective(self, model: nn.Module) -> str:
        """What the fine-tune minimises, in words, for the step records."""
        if self.distill is not None:
            return f"{self.distill.kind} distillation" + (
                "" if self.is_classifier(model) else " (distillation term over every output: no class labels)")
        if self.is_classifier(model):
            return "cross-entropy on the labels 'y'"
        return "distillation from the original model over every output (KL for class scores, normalised MSE else)"

    def sensitivity_loss(self, model: nn.Module, x: Inputs, y: torch.Tensor | None,
                         generator: torch.Generator) -> torch.Tensor:
        """The loss whose gradients Taylor importance uses (:func:`edgepipe.compress.finetune.sensitivity_loss`)."""
        from edgepipe.compress.finetune import sensitivity_loss

        return sensitivity_loss(model, x, y, generator)

    def batches(self, model: nn.Module, batches: int, batch_size: int) -> list[tuple[Inputs, torch.Tensor | None]]:
        """Up to ``batches`` training batches (seeded by the fine-tune seed): every input and ``y`` (or None)."""
        import torch

        from edgepipe.compress._inputs import as_inputs, select

        data = self.splits.train
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(self.finetune_config.seed))
        x = as_inputs(model, data.x)
        y = torch.from_numpy(data.y) if data.y is not None else None
        out = []
        for b in range(batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            if len(idx) == 0:
                break
            out.append((select(x, idx), y[idx] if y is not None else None))
        return out

    def finetune(self, model: nn.Module, cfg: FinetuneConfig | None = None, **kwargs: Any) -> nn.Module:
        """Run the shared fine-tune loop on the training split with the recipe's objective."""
        from edgepipe.compress.finetune import finetune

        if kwargs.get("objective") is None:  # not setdefault: building an unused objective leaves its hooks behind
            kwargs["objective"] = self.objective(model)
        return finetune(model, self.splits.train, cfg or self.finetune_config, reporter=self.reporter, **kwargs)

    def top1(self, model: nn.Module) -> float:
        from edgepipe.compress._stats import top1

        return top1(model, self.splits.validation.x, self.splits.validation.y)  # type: ignore[arg-type]


def _load_teacher(cfg: DistillConfig, original: nn.Module) -> nn.Module:
    if cfg.teacher is None:
        return copy.deepcopy(original).eval()
    from pathlib import Path

    from edgepipe.models import load_model

    src = load_model(cfg.teacher, Path(cfg.teacher_weights) if cfg.teacher_weights else None)
    if src.module is None:
        raise ConfigError(f"distill.teacher {cfg.teacher!r} is ONNX; a teacher must be a torch model")
    return src.module.eval()


def _check_teacher(teacher: nn.Module, student: nn.Module, example: Inputs) -> None:
    import torch

    from edgepipe.compress._inputs import run

    with torch.no_grad():
        t, s = run(teacher, example), run(student, example)
    ts, ss = [tuple(o.shape) for o in t], [tuple(o.shape) for o in s]
    if ts != ss:
        what = (f"output shape {ts[0]} differs from the student's {ss[0]}" if len(ts) == len(ss) == 1
                else f"outputs {ts} differ from the student's {ss}")
        raise ConfigError(f"distill.teacher {what}; the teacher must predict the same classes")


def apply_recipe(model: nn.Module, recipe: Recipe, splits: Splits, reporter: Reporter | None = None,
                 scorer: Scorer | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply every step of ``recipe`` in order; returns the compressed model and one record per step.

    Args:
        model: the model, any signature: its inputs are fed from ``splits`` by ``forward``'s argument names.
        recipe: the steps, the fine-tune loop and the optional ``[distill]`` objective.
        splits: train (fine-tuning), validation (every record's measure, the example inputs).
        reporter: progress.
        scorer: the build's metric, recorded for a model that is not a one-output classifier with integer labels
            (a classifier records top-1; without a scorer, the SQNR of each output against the original).

    Each record holds ``before``/``after`` (params, non-zero params, MACs and the ``measure`` it names), the
    step's fine-tune settings and ``objective``: what that fine-tune minimised.
    """
    from edgepipe.compress._inputs import as_inputs, is_classifier, predict, select
    from edgepipe.compress._stats import Judge
    from edgepipe.types import take

    rep = reporter or NullReporter()
    model = model.eval()
    ev = splits.validation
    example = select(as_inputs(model, ev.x), slice(0, 1))
    classifier = is_classifier(predict(model, take(ev.x, slice(0, 2))), ev.y)
    teacher = None
    if recipe.distill is not None:
        teacher = _load_teacher(recipe.distill, model)
        _check_teacher(teacher, model, example)
    original = None
    if not classifier:  # the fine-tune matches it and the records compare with it
        own_teacher = recipe.distill is not None and recipe.distill.teacher is None
        original = teacher if own_teacher and teacher is not None else copy.deepcopy(model).eval()
    ctx = CompressContext(splits, recipe.finetune, example, recipe.distill, teacher, rep, original)
    judge = Judge(original if original is not None else model, ev, example, classifier, scorer)
    before = judge(model)
    records = []
    for i, step in enumerate(recipe.steps):
        tech = technique(step.technique, where=f"steps[{i}]")
        cfg = step.config
        with rep.stage(f"compress {i + 1}/{len(recipe.steps)}: {step.technique}"):
            try:
                model = tech.apply(model, cfg, ctx)
            except ConfigError as e:  # a value only the model can refute (a layer name): say which step
                raise ConfigError(f"steps[{i}] ({step.technique}): {e}") from None
            except CompressionError as e:
                msg = str(e)
                if msg.startswith(f"steps[{i}]"):
                    raise
                raise CompressionError(f"steps[{i}] ({step.technique}): {msg}") from None
            except Exception as e:
                raise CompressionError(f"steps[{i}] ({step.technique}) failed: {type(e).__name__}: {e}") from e
        ft = step.finetune_config(recipe.finetune)
        objective = None
        if ft is not None:
            objective = ctx.describe_objective(model)
            try:
                model = ctx.finetune(model, ft, desc=f"fine-tune after {step.technique}")
            except (ConfigError, CompressionError) as e:
                raise type(e)(f"steps[{i}] ({step.technique}) fine-tune: {e}") from None
        if tech.finalize is not None:
            model = tech.finalize(model)
        after = judge(model)
        records.append({
            "step": i, "technique": step.technique, "params": step.params,
            "finetune": (ft.__dict__ if ft else None),
            "distill": recipe.distill.kind if (ft and recipe.distill) else None,
            "objective": objective, "measure": judge.measure,
            "before": before.to_dict(), "after": after.to_dict(),
        })
        before = after
    return model.eval(), records


__all__ = ["CompressContext", "DistillConfig", "FinetuneConfig", "Recipe", "Step", "Technique", "apply_recipe",
           "load_recipe", "recipe_from_dict", "register", "technique", "techniques"]
