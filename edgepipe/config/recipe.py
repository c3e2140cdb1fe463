"""Recipes: an ordered list of compression steps, loadable from TOML, buildable in Python, writable back.

```toml
[finetune]                 # the shared fine-tuning loop (steps opt in with finetune = true)
epochs = 3
lr = 1e-3

[[steps]]
technique = "magnitude_prune"   # any technique: `edgepipe compress --list`
sparsity = 0.8
finetune = true
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgepipe._hashing import sha256_json
from edgepipe.config._schema import from_dict, load_toml, to_dict
from edgepipe.config.techniques import config_class, technique_of
from edgepipe.errors import ConfigError


@dataclass(frozen=True)
class FinetuneConfig:
    """The shared fine-tuning loop: every step that sets ``finetune = true`` runs it after it is applied."""

    epochs: int = 3
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 64
    seed: int = 0
    max_batches: int | None = None  # cap batches per epoch (quick runs, tests)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"finetune.epochs = {self.epochs}: must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"finetune.lr = {self.lr}: must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size = {self.batch_size}: must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation as the fine-tune objective (teacher: the uncompressed model by default)."""

    kind: Literal["soft", "hard", "intermediate"] = "soft"
    teacher: str | None = None  # a model source; None = the model as it was before the recipe
    teacher_weights: str | None = None
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the distillation term; (1 - alpha) on the true labels
    layers: tuple[tuple[str, str], ...] = ()  # (student layer, teacher layer) pairs for "intermediate"
    hint_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature = {self.temperature}: must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha = {self.alpha}: must be in [0, 1]")
        if self.kind == "intermediate" and not self.layers:
            raise ConfigError('distill.layers: "intermediate" distillation needs [student, teacher] layer pairs')


@dataclass(frozen=True)
class Step:
    """One recipe step: a technique's config object (which names the technique) and its fine-tuning."""

    config: Any
    finetune: bool | FinetuneConfig = False

    def __post_init__(self) -> None:
        technique_of(self.config)  # a ConfigError when it is not a registered technique's config

    @property
    def technique(self) -> str:
        return technique_of(self.config)

    @property
    def params(self) -> dict[str, Any]:
        return to_dict(self.config)

    def finetune_config(self, default: FinetuneConfig) -> FinetuneConfig | None:
        if self.finetune is True:
            return default
        return self.finetune or None


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps sharing one fine-tuning loop and an optional distillation objective.

    Steps may be given as technique configs: ``Recipe([MagnitudePrune(sparsity=0.8)])``.
    """

    steps: tuple[Step, ...]
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig | None = None
    name: str = "recipe"

    def __post_init__(self) -> None:
        steps = tuple(s if isinstance(s, Step) else Step(s) for s in self.steps)
        if not steps:
            raise ConfigError("a recipe needs at least one step")
        object.__setattr__(self, "steps", steps)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "finetune": to_dict(self.finetune)}
        if self.distill:
            out["distill"] = to_dict(self.distill)
        out["steps"] = [
            {"technique": s.technique, **s.params,
             **({"finetune": to_dict(s.finetune) if isinstance(s.finetune, FinetuneConfig) else s.finetune}
                if s.finetune else {})}
            for s in self.steps
        ]
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @property
    def sha256(self) -> str:
        return sha256_json(self.to_dict())


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Build a Recipe from a TOML-shaped dict; errors name ``where``, the field and what is allowed."""
    data = dict(data)
    try:
        raw_steps = data.pop("steps", None)
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ConfigError("a recipe needs at least one [[steps]] table with a technique")
        steps = []
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict) or "technique" not in raw:
                raise ConfigError(f"steps[{i}] needs a technique = \"...\" key")
            raw = dict(raw)
            tech = str(raw.pop("technique"))
            ft = raw.pop("finetune", False)
            if isinstance(ft, dict):
                ft = from_dict(FinetuneConfig, ft, f"steps[{i}].finetune")
            elif not isinstance(ft, bool):
                raise ConfigError(f"steps[{i}].finetune = {ft!r}: expected true/false or a table")
            cls = config_class(tech, where=f"steps[{i}]")
            try:
                cfg = from_dict(cls, raw, "")
            except ConfigError as e:
                raise ConfigError(f"steps[{i}] ({tech}): {e}") from None
            steps.append(Step(cfg, finetune=ft))
        rest = from_dict(_RecipeTop, dict(data))
        return Recipe(steps=tuple(steps), finetune=rest.finetune, distill=rest.distill, name=rest.name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class _RecipeTop:
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig | None = None
    name: str = "recipe"


def load_recipe(spec: str | Path) -> Recipe:
    """Load a recipe TOML by path, or by name from the recipes shipped with edgepipe (``recipes/``)."""
    path = Path(spec)
    if not path.is_file():
        here = Path(__file__).resolve().parents[1]  # the edgepipe package
        shipped = [d / f"{spec}.toml" for d in (here.parent / "recipes", here / "_recipes")]  # checkout, wheel
        found = [p for p in shipped if p.is_file()]
        if path.suffix != ".toml" and found:
            path = found[0]
        else:
            names = sorted({p.stem for d in (here.parent / "recipes", here / "_recipes") if d.is_dir()
                            for p in d.glob("*.toml")})
            raise ConfigError(f"recipe {str(spec)!r} not found: give a path to a .toml recipe, or the name of a "
                              f"shipped one: {', '.join(names) or '(none)'}")
    return recipe_from_dict(load_toml(path, "recipe"), f"recipe file {str(path)!r}")
