"""The release search space: which recipes and which quantization settings ``edgepipe release`` tries.

```toml
recipes = ["none", "structured-50"]      # "none", shipped recipe names, or paths to recipe .toml files
max_trials = 40                          # cap on candidates per target (sampled with Optuna beyond it)
noise = 0.05                             # latencies within 5 % of each other tie (then: smaller, more accurate)
sampler = "tpe"                          # "tpe" or "nsga2", for ranges or spaces over max_trials
seed = 0
finalists = 3                            # the fastest qualifying candidates (within finalist_margin of the
finalist_margin = 0.25                   # fastest) are re-timed together, interleaved over retime_rounds
retime_rounds = 7                        # rounds, and the choice uses the median of per-round ratios

[onnxruntime]                            # one table per backend; keys: precision, calibration,
calibration = ["minmax", "percentile"]   # calibration_samples, or any field of the backend's [options]
recipes = ["none", "structured-50-r16"]  # this backend's own recipes, instead of the top-level list
activation_type = ["uint8", "int8"]
calibration_samples = { low = 64, high = 512, step = 64 }    # a range: sampled, not enumerated
```

Every value is a list (enumerated) or a ``{low, high[, step][, log]}`` range (sampled). Keys are checked
against the backend's options dataclass and its Literal values when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgepipe._hashing import sha256_json
from edgepipe.config._schema import _coerce, load_toml
from edgepipe.config.options import backend_names, options_class
from edgepipe.config.target import PRECISIONS
from edgepipe.errors import ConfigError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TOP_KEYS = ("name", "recipes", "max_trials", "noise", "sampler", "seed", "finalists", "finalist_margin",
            "retime_rounds")
# The searchable settings that are not backend options: key -> (type, where it goes, field there). A key
# not in this table is one of the backend's ``[options]``. The schema (``_allowed``) and the candidate
# builder (``pipeline.search.candidate_target``) both read it: a new searchable setting is one row here.
TARGET_KEYS: dict[str, tuple[Any, str, str]] = {
    "precision": (Literal[PRECISIONS], "target", "precision"),
    "calibration": (Literal[CALIBRATION_METHODS], "calibration", "method"),
    "calibration_samples": (int, "calibration", "samples"),
    "float_layers": (int, "calibration", "float_layers"),
    "equalize": (bool, "calibration", "equalize"),
    "finetune": (int, "calibration", "finetune"),
    "float_mixed_ranges": (bool, "calibration", "float_mixed_ranges"),
    "adaround": (int, "calibration", "adaround"),
}


@dataclass(frozen=True)
class Range:
    """A numeric range, sampled by Optuna: ``low`` to ``high`` inclusive, on a ``step`` grid or log scale."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"range low = {self.low} is above high = {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"log range low = {self.low}: must be > 0")


Values = tuple[Any, ...] | Range


@dataclass(frozen=True)
class SearchSpace:
    """Recipes × per-backend settings. ``settings[backend][key]`` is a tuple of values or a Range."""

    recipes: tuple[str, ...] = ("none",)
    settings: dict[str, dict[str, Values]] = field(default_factory=dict)
    backend_recipes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a backend's own recipe list
    max_trials: int = 40
    noise: float = 0.05
    sampler: Literal["tpe", "nsga2"] = "tpe"
    seed: int = 0
    name: str = "default"
    #: how many of the fastest qualifying candidates are re-timed together before the choice (1: none)
    finalists: int = 3
    #: a finalist is within this fraction of the fastest candidate's own p50
    finalist_margin: float = 0.25
    #: rounds of the interleaved re-timing; the choice uses the median of per-round ratios
    retime_rounds: int = 7

    def __post_init__(self) -> None:
        for where, r in (("recipes", self.recipes), *((f"{b}.recipes", v) for b, v in self.backend_recipes.items())):
            if not r:
                raise ConfigError(f"{where} is empty: list at least one, e.g. recipes = [\"none\"]")
        if self.max_trials < 1:
            raise ConfigError(f"max_trials = {self.max_trials}: must be >= 1")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise = {self.noise}: a fraction of latency in [0, 1), e.g. 0.05")
        if isinstance(self.finalists, bool) or not isinstance(self.finalists, int) or not 1 <= self.finalists <= 8:
            raise ConfigError(f"finalists = {self.finalists!r}: an integer from 1 (no re-timing) to 8")
        if not 0 <= self.finalist_margin <= 1:
            raise ConfigError(f"finalist_margin = {self.finalist_margin}: a fraction of latency in [0, 1], e.g. 0.25")
        if isinstance(self.retime_rounds, bool) or not isinstance(self.retime_rounds, int) \
                or not 3 <= self.retime_rounds <= 50:
            raise ConfigError(f"retime_rounds = {self.retime_rounds!r}: an integer from 3 to 50")

    def for_backend(self, backend: str) -> dict[str, Values]:
        return self.settings.get(backend, {})

    def recipes_for(self, backend: str) -> tuple[str, ...]:
        """The recipes a backend's targets try: its table's ``recipes``, else the top-level list."""
        return self.backend_recipes.get(backend, self.recipes)

    @property
    def all_recipes(self) -> tuple[str, ...]:
        """Every recipe any backend tries, each once, in the order first named."""
        return tuple(dict.fromkeys([*self.recipes, *(r for v in self.backend_recipes.values() for r in v)]))

    def is_sampled(self, backend: str) -> bool:
        """Whether this backend's space has a range or more combinations than ``max_trials``."""
        space = self.for_backend(backend)
        if any(isinstance(v, Range) for v in space.values()):
            return True
        return self.size(backend) > self.max_trials

    def size(self, backend: str) -> int:
        n = len(self.recipes_for(backend))
        for v in self.for_backend(backend).values():
            n *= len(v) if isinstance(v, tuple) else 1
        return n

    def grid(self, backend: str) -> list[tuple[str, dict[str, Any]]]:
        """Every (recipe, settings) of a list-only space, in a fixed order."""
        space = self.for_backend(backend)
        keys = sorted(space)
        out = []
        for recipe in self.recipes_for(backend):
            for combo in itertools.product(*(space[k] for k in keys)):  # type: ignore[misc]
                out.append((recipe, dict(zip(keys, combo, strict=True))))
        return out

    def to_dict(self) -> dict[str, Any]:
        def enc(v: Values) -> Any:
            return dataclasses.asdict(v) if isinstance(v, Range) else list(v)

        return {"name": self.name, "recipes": list(self.recipes), "max_trials": self.max_trials, "noise": self.noise,
                "sampler": self.sampler, "seed": self.seed, "finalists": self.finalists,
                "finalist_margin": self.finalist_margin, "retime_rounds": self.retime_rounds,
                **{b: {**{k: enc(v) for k, v in sorted(self.settings.get(b, {}).items())},
                       **({"recipes": list(self.backend_recipes[b])} if b in self.backend_recipes else {})}
                   for b in sorted({*self.settings, *self.backend_recipes})}}

    @property
    def sha256(self) -> str:
        return sha256_json(self.to_dict())


def _allowed(backend: str) -> dict[str, Any]:
    """key -> type hint for every searchable key of ``backend``."""
    cls = options_class(backend)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {k: tp for k, (tp, _, _) in TARGET_KEYS.items()}
    for f in dataclasses.fields(cls):
        out[f.name] = hints[f.name]
    return out


def _values(where: str, tp: Any, raw: Any) -> Values:
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "step", "log"}
        if unknown or "low" not in raw or "high" not in raw:
            raise ConfigError(f"{where}: a range is {{ low = ..., high = ...[, step = ...][, log = true] }}; "
                              f"got keys {sorted(raw)}")
        base = tp if tp in (int, float) else None
        if base is None:
            raise ConfigError(f"{where}: only numeric settings take a range; give a list of values instead")
        return Range(float(raw["low"]), float(raw["high"]), raw.get("step"), bool(raw.get("log", False)),
                     integer=base is int)
    if not isinstance(raw, list):
        raw = [raw]
    if not raw:
        raise ConfigError(f"{where} is an empty list: give at least one value, or leave the key out")
    return tuple(_coerce(tp, v, f"{where}[{i}]") for i, v in enumerate(raw))


def search_from_dict(data: dict[str, Any], where: str = "search space") -> SearchSpace:
    """Build a SearchSpace from a TOML-shaped dict; errors name ``where``, the key and what is allowed."""
    try:
        settings: dict[str, dict[str, Values]] = {}
        backend_recipes: dict[str, tuple[str, ...]] = {}
        top: dict[str, Any] = {}
        for key, value in data.items():
            if key in TOP_KEYS:
                top[key] = value
                continue
            if key not in backend_names():
                raise ConfigError(f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}, or a backend table: "
                                  f"{', '.join(f'[{b}]' for b in backend_names())}")
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table ([{key}]) of settings")
            allowed = _allowed(key)
            table = {}
            for k, raw in value.items():
                if k == "recipes":
                    backend_recipes[key] = _recipe_list(raw, f"{key}.recipes")
                    continue
                if k not in allowed:
                    raise ConfigError(f"unknown key '{key}.{k}'; allowed keys here: "
                                      f"{', '.join(sorted([*allowed, 'recipes']))}")
                table[k] = _values(f"{key}.{k}", allowed[k], raw)
            settings[key] = table
        recipes = _recipe_list(top.get("recipes", ["none"]), "recipes")
        return SearchSpace(recipes=recipes, settings=settings, backend_recipes=backend_recipes,
                           max_trials=int(top.get("max_trials", 40)),
                           noise=float(top.get("noise", 0.05)), sampler=top.get("sampler", "tpe"),
                           seed=int(top.get("seed", 0)), name=str(top.get("name", "search")),
                           finalists=top.get("finalists", 3),
                           finalist_margin=float(top.get("finalist_margin", 0.25)),
                           retime_rounds=top.get("retime_rounds", 7))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _recipe_list(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
        raise ConfigError(f"{where} = {raw!r}: give a list of names or paths, e.g. [\"none\", \"structured-50\"]")
    return tuple(raw)


def default_search_file() -> Path:
    here = Path(__file__).resolve().parents[1]  # the edgepipe package
    for p in (here.parent / "recipes" / "search" / "default.toml", here / "_recipes" / "search" / "default.toml"):
        if p.is_file():
            return p
    raise ConfigError("the default search space (recipes/search/default.toml) is missing from this install")


def load_search(spec: str | Path | None = None) -> SearchSpace:
    """Load a search space TOML (``None``: the default space shipped with edgepipe)."""
    path = Path(spec) if spec is not None else default_search_file()
    if not path.is_file():
        raise ConfigError(f"search file {str(path)!r} not found")
    data = load_toml(path, "search")
    if spec is None:
        data["name"] = "default"
    return search_from_dict(data, f"search file {str(path)!r}")
