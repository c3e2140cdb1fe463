"""Compression technique configs: one frozen dataclass per technique, validated on construction.

They live here, below ``compress/``, so a recipe is checked whole when it is loaded or built in Python
(``Recipe([MagnitudePrune(sparsity=0.8)])``) without importing torch. ``compress/`` registers the
function that applies each config under the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from edgepipe.errors import ConfigError

ModuleType = Literal["Conv1d", "Conv2d", "Conv3d", "Linear"]
Importance = Literal["magnitude", "taylor", "bn_scale", "lamp"]

T = TypeVar("T", bound=type)
_CONFIGS: dict[str, type] = {}


def technique_config(name: str) -> Callable[[T], T]:
    """Class decorator: ``cls`` is the config of technique ``name``."""

    def deco(cls: T) -> T:
        _CONFIGS[name] = cls
        cls.technique = name  # type: ignore[attr-defined]
        return cls

    return deco


def config_class(name: str, where: str = "") -> type:
    """The config dataclass of technique ``name``; ``ConfigError`` listing the known ones otherwise."""
    if name not in _CONFIGS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown technique {name!r}; known techniques: {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[name]


def technique_of(config: object) -> str:
    """The technique name of a config object; ``ConfigError`` when it is not a technique config."""
    name = getattr(type(config), "technique", None)
    if name is None or _CONFIGS.get(name) is not type(config):
        raise ConfigError(f"{config!r} is not a compression technique config; known: {', '.join(sorted(_CONFIGS))}")
    return str(name)


def config_names() -> list[str]:
    return sorted(_CONFIGS)


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} = {value}: must be in [0, 1) (the fraction of weights set to zero)")


@technique_config("magnitude_prune")
@dataclass(frozen=True)
class MagnitudePruneConfig:
    """Which weights become zero: a target ``sparsity`` or an absolute ``threshold``, over chosen layers.

    ``scope = "global"`` ranks all chosen layers' weights together (one threshold; layers that matter
    less lose more); ``"layer"`` gives every layer the same sparsity. ``layers`` sets a ratio per named
    layer (it overrides ``sparsity`` there; layers not named get ``sparsity``, or are left alone if
    only ``layers`` is given). ``ignored_layers`` are never touched.
    """

    sparsity: float | None = None
    threshold: float | None = None
    scope: Literal["global", "layer"] = "global"
    layers: dict[str, float] = field(default_factory=dict)
    ignored_layers: tuple[str, ...] = ()
    module_types: tuple[ModuleType, ...] = ("Conv2d", "Linear")

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.threshold is not None:
            raise ConfigError("sparsity and threshold: give one, not both")
        if self.sparsity is None and self.threshold is None and not self.layers:
            raise ConfigError("give sparsity (fraction of weights set to zero, in [0, 1)), threshold "
                              "(absolute magnitude below which weights become zero) or layers (ratio per layer)")
        if self.sparsity is not None:
            _check_ratio("sparsity", self.sparsity)
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError(f"threshold = {self.threshold}: must be >= 0 (an absolute weight magnitude)")
        for name, ratio in self.layers.items():
            _check_ratio(f"layers.{name!r}", ratio)
        if not self.module_types:
            raise ConfigError("module_types is empty: choose from Conv1d, Conv2d, Conv3d, Linear")


@technique_config("taylor_prune")
@dataclass(frozen=True)
class TaylorPruneConfig(MagnitudePruneConfig):
    """Like ``magnitude_prune`` (sparsity, scope, layers), ranked by |w · ∂L/∂w| over ``batches`` batches."""

    batches: int = 8
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold is not None:
            raise ConfigError("threshold: Taylor scores have no natural scale; give sparsity instead")
        if self.batches < 1 or self.batch_size < 1:
            raise ConfigError(f"batches = {self.batches}, batch_size = {self.batch_size}: both must be >= 1")


@technique_config("regularized_prune")
@dataclass(frozen=True)
class RegularizedPruneConfig(MagnitudePruneConfig):
    """A fine-tune with a sparsity-inducing ``penalty`` times ``strength``, then pruning.

    ``l1``/``l2`` penalise the weights (then unstructured pruning by magnitude); ``group_lasso`` penalises
    the L2 norm of each output channel (then whole output channels are zeroed: ``sparsity`` is the
    fraction of channels, ``threshold`` a bound on a channel's RMS weight; the classifier is left out). ``epochs`` overrides the
    recipe's ``[finetune].epochs`` for the regularised training.
    """

    penalty: Literal["l1", "l2", "group_lasso"] = "l1"
    strength: float = 1e-4
    epochs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength <= 0:
            raise ConfigError(f"strength = {self.strength}: must be > 0")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs = {self.epochs}: must be >= 1")
        if self.penalty == "group_lasso" and self.layers:
            raise ConfigError("layers: per-layer ratios are for unstructured penalties; "
                              "group_lasso takes sparsity or threshold")


@technique_config("structured_prune")
@dataclass(frozen=True)
class StructuredPruneConfig:
    """Remove a fraction of channels from every prunable group (Conv/Linear outputs and what depends on them).

    ``ratio`` is the fraction of channels removed (0.5 halves every layer's width, about 4x fewer MACs).
    ``scope = "global"`` ranks channels of all groups together, so layers that matter less lose more
    (capped per group by ``max_ratio``); ``"layer"`` removes the same fraction everywhere. ``layers``
    sets a ratio per named layer. ``round_to`` keeps channel counts multiples of it (8 suits SIMD and
    tensor cores). ``importance``: ``magnitude`` (group L2 norm of the weights), ``taylor`` (|w · dL/dw|
    from ``batches`` training batches), ``bn_scale`` (|gamma| of the BatchNorm after each conv, as in
    network slimming), ``lamp`` (layer-adaptive magnitude). ``ignored_layers`` keep their output
    channels; the classifier (layers with as many outputs as the model) is ignored unless
    ``ignore_classifier = false``.
    """

    ratio: float = 0.5
    scope: Literal["global", "layer"] = "layer"
    layers: dict[str, float] = field(default_factory=dict)
    round_to: int = 1
    importance: Importance = "magnitude"
    ignored_layers: tuple[str, ...] = ()
    ignore_classifier: bool = True
    max_ratio: float = 0.9
    batches: int = 4
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"ratio = {self.ratio}: must be in [0, 1) (the fraction of channels removed)")
        for name, r in self.layers.items():
            if not 0.0 <= r < 1.0:
                raise ConfigError(f"layers.{name!r} = {r}: must be in [0, 1) (the fraction of channels removed)")
        if self.round_to < 1:
            raise ConfigError(f"round_to = {self.round_to}: must be >= 1 (1: no rounding)")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"max_ratio = {self.max_ratio}: must be in (0, 1]")
        if self.batches < 1 or self.batch_size < 1:
            raise ConfigError(f"batches = {self.batches}, batch_size = {self.batch_size}: both must be >= 1")


@technique_config("lowrank")
@dataclass(frozen=True)
class LowRankConfig:
    """Which layers to factorise and how their ranks are chosen."""

    rank: Literal["energy", "vbmf"] = "energy"
    energy: float = 0.95  # fraction of squared singular values kept per layer (rank = "energy", no budget)
    ranks: dict[str, int | tuple[int, ...]] = field(default_factory=dict)  # per layer: r, or [r_out, r_in] for a conv
    macs: float | None = None  # global budget: keep at most this fraction of the model's MACs
    params: float | None = None  # global budget: keep at most this fraction of the model's parameters
    layers: tuple[str, ...] = ()  # only these layers (default: every Linear and Conv2d)
    ignored_layers: tuple[str, ...] = ()
    min_rank: int = 1
    tucker_iterations: int = 50

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy = {self.energy}: must be in (0, 1], the fraction of energy kept")
        for name, value in (("macs", self.macs), ("params", self.params)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} = {value}: a budget is a fraction of the model's {name}, in (0, 1]")
        if (self.macs is not None or self.params is not None) and self.rank != "energy":
            raise ConfigError('a macs/params budget searches an energy threshold: set rank = "energy"')
        if self.min_rank < 1:
            raise ConfigError(f"min_rank = {self.min_rank}: must be >= 1")
        for name, r in self.ranks.items():
            rs = r if isinstance(r, tuple) else (r,)
            if not 1 <= len(rs) <= 2 or min(rs) < 1:
                raise ConfigError(f"ranks.{name} = {r!r}: give a rank >= 1, or [r_out, r_in] for a conv")


@technique_config("weight_share")
@dataclass(frozen=True)
class ShareConfig:
    """Bits per layer kind (``conv``, ``linear``) or per layer name; layers with no entry stay as they are."""

    bits: dict[str, int] = field(default_factory=lambda: {"conv": 8, "linear": 5})
    ignored_layers: tuple[str, ...] = ()
    init: Literal["linear", "density", "random"] = "linear"
    seed: int = 0
    codebook: Literal["float32", "float16"] = "float32"  # float16: round the shared values to halves
    others: Literal["float32", "float16"] = "float32"  # float16: round biases and norm layers to halves too

    def __post_init__(self) -> None:
        for key, b in self.bits.items():
            if not 1 <= b <= 16:
                raise ConfigError(f"bits.{key} = {b}: weight sharing takes 1 to 16 bits (2 to 65,536 shared values)")


@technique_config("hashing")
@dataclass(frozen=True)
class HashingConfig:
    """Which layers are hashed and how many real parameters each keeps."""

    ratio: float = 0.125  # real parameters / virtual weights, per layer
    conv: bool = True  # hash Conv2d layers too (Linear layers always)
    layers: tuple[str, ...] = ()  # only these layers (default: every Linear, and Conv2d if conv)
    ignored_layers: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio = {self.ratio}: the fraction of real parameters must be in (0, 1]")


@technique_config("student")
@dataclass(frozen=True)
class StudentConfig:
    """Distillation into a smaller architecture: the step replaces the model by ``model`` (a factory), which
    the step's fine-tune then trains with the recipe's ``[distill]`` objective, the teacher being the model
    before the recipe. Use it first; later steps (pruning, sharing, ...) then compress the student."""

    model: str = ""  # package.module:factory, e.g. edgepipe.models.cifar_resnet:resnet20
    weights: str | None = None  # its starting weights (.safetensors or a torch state dict); None: the factory's

    def __post_init__(self) -> None:
        if ":" not in self.model:
            raise ConfigError(f"model = {self.model!r}: name the student's factory as package.module:factory "
                              "(e.g. edgepipe.models.cifar_resnet:resnet20)")


# Short names for Python recipes: ``Recipe([MagnitudePrune(sparsity=0.8), LowRank(energy=0.9)])``.
MagnitudePrune = MagnitudePruneConfig
TaylorPrune = TaylorPruneConfig
RegularizedPrune = RegularizedPruneConfig
StructuredPrune = StructuredPruneConfig
LowRank = LowRankConfig
WeightShare = ShareConfig
Hashing = HashingConfig
Student = StudentConfig
