"""Compression: recipes of ordered steps, each a registered technique ``(model, config, context) -> model``.

Adding a technique is one module that calls :func:`register` and one line in ``_MODULES``. Each step
records what it changed (parameters, non-zero parameters, MACs, top-1 before and after) for the manifest.
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
    """What a technique may use: the data splits, the shared fine-tune loop, the teacher, progress."""

    splits: Splits
    finetune_config: FinetuneConfig
    example: torch.Tensor
    distill: DistillConfig | None = None
    teacher: nn.Module | None = None
    reporter: Reporter = field(default_factory=NullReporter)

    def objective(self, model: nn.Module) -> Any:
        """The recipe's fine-tune objective: distillation from the teacher if configured, else cross-entropy."""
        from edgepipe.compress.finetune import Objective

        if self.distill is None:
            return Objective()
        from edgepipe.compress.distill import make_objective  # provided by the distillation module

        return make_objective(self.distill, model, self.teacher, self.example)

    def finetune(self, model: nn.Module, cfg: FinetuneConfig | None = None, **kwargs: Any) -> nn.Module:
        """Run the shared fine-tune loop on the training split with the recipe's objective."""
        from edgepipe.compress.finetune import finetune

        if kwargs.get("objective") is None:  # not setdefault: building an unused objective leaves its hooks behind
            kwargs["objective"] = self.objective(model)
        return finetune(model, self.splits.train, cfg or self.finetune_config, reporter=self.reporter, **kwargs)

    def top1(self, model: nn.Module) -> float:
        from edgepipe.compress._stats import top1

        return top1(model, self.splits.validation.x, self.splits.validation.y)


def _load_teacher(cfg: DistillConfig, original: nn.Module) -> nn.Module:
    if cfg.teacher is None:
        return copy.deepcopy(original).eval()
    from pathlib import Path

    from edgepipe.models import load_model

    src = load_model(cfg.teacher, Path(cfg.teacher_weights) if cfg.teacher_weights else None)
    if src.module is None:
        raise ConfigError(f"distill.teacher {cfg.teacher!r} is ONNX; a teacher must be a torch model")
    return src.module.eval()


def _check_teacher(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> None:
    import torch

    with torch.no_grad():
        t, s = teacher(example), student(example)
    if t.shape != s.shape:
        raise ConfigError(
            f"distill.teacher output shape {tuple(t.shape)} differs from the student's {tuple(s.shape)}; "
            "the teacher must predict the same classes"
        )


def apply_recipe(model: nn.Module, recipe: Recipe, splits: Splits,
                 reporter: Reporter | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply every step of ``recipe`` in order; returns the compressed model and one record per step."""
    import torch

    from edgepipe.compress._stats import stats

    rep = reporter or NullReporter()
    example = torch.from_numpy(splits.validation.x[:1])
    model = model.eval()
    teacher = None
    if recipe.distill is not None:
        teacher = _load_teacher(recipe.distill, model)
        _check_teacher(teacher, model, example)
    ctx = CompressContext(splits, recipe.finetune, example, recipe.distill, teacher, rep)
    ev = splits.validation
    before = stats(model, example, ev.x, ev.y)
    records = []
    for i, step in enumerate(recipe.steps):
        tech = technique(step.technique, where=f"steps[{i}]")
        cfg = step.config
        with rep.stage(f"compress {i + 1}/{len(recipe.steps)}: {step.technique}"):
            try:
                model = tech.apply(model, cfg, ctx)
            except ConfigError as e:  # a value only the model can refute (a layer name): say which step
                raise ConfigError(f"steps[{i}] ({step.technique}): {e}") from None
            except CompressionError:
                raise
            except Exception as e:
                raise CompressionError(f"steps[{i}] ({step.technique}) failed: {type(e).__name__}: {e}") from e
        ft = step.finetune_config(recipe.finetune)
        if ft is not None:
            model = ctx.finetune(model, ft, desc=f"fine-tune after {step.technique}")
        if tech.finalize is not None:
            model = tech.finalize(model)
        after = stats(model, example, ev.x, ev.y)
        records.append({
            "step": i, "technique": step.technique, "params": step.params,
            "finetune": (ft.__dict__ if ft else None),
            "distill": recipe.distill.kind if (ft and recipe.distill) else None,
            "before": before.to_dict(), "after": after.to_dict(),
        })
        before = after
    return model.eval(), records


__all__ = ["CompressContext", "DistillConfig", "FinetuneConfig", "Recipe", "Step", "Technique", "apply_recipe",
           "load_recipe", "recipe_from_dict", "register", "technique", "techniques"]
