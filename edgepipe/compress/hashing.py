"""HashedNets (Chen et al. 2015): layers whose weights are drawn by a seeded hash from a few real parameters.

A hashed layer keeps ``ratio`` of its weights as real parameters ("buckets"); each virtual weight ``i`` is
``sign(i) * bucket[h(i)]``, with ``h`` and ``sign`` from a seeded 64-bit mix of ``i`` (splitmix64's
finaliser, in numpy, so every platform draws the same). Buckets start as the least-squares fit of the
trained dense weights and are trained by the step's fine-tune. ``finalize`` expands the virtual weights
into an ordinary ``Linear``/``Conv2d`` so every backend runs the model; the packed archive
(:mod:`edgepipe.package.archive`) stores only the buckets and the seed.

```toml
[[steps]]
technique = "hashing"
ratio = 0.125            # 1/8 of the weights are real parameters
finetune = { epochs = 10, lr = 3e-3 }
```
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.config.techniques import HashingConfig
from edgepipe.errors import ConfigError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class HashSpec:
    """What the archive needs to redraw a hashed weight: its seed and bucket count."""

    seed: int
    buckets: int


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_indices(numel: int, buckets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket (int64) and sign (+1/-1, float32) of each of ``numel`` virtual weights."""
    if buckets < 1:
        raise ValueError("a hashed weight needs at least one bucket")
    with np.errstate(over="ignore"):
        h = _mix(np.arange(numel, dtype=np.uint64) + np.uint64(seed & (2**64 - 1)) * _GOLDEN)
    idx = (h % np.uint64(buckets)).astype(np.int64)
    sign = np.where((h >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)
    return idx, sign


def expand(buckets: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The dense virtual weight of ``shape`` drawn from ``buckets`` (float32, exact: one multiply by +-1)."""
    numel = int(np.prod(shape))
    idx, sign = hash_indices(numel, len(buckets), seed)
    return (buckets[torch.from_numpy(idx)] * torch.from_numpy(sign)).reshape(shape)


def layer_seed(seed: int, name: str) -> int:
    """Each layer draws with its own seed, derived from the step's seed and the layer's name."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


class _Hashed(nn.Module):
    """Shared by the hashed Linear and Conv2d: buckets, the fixed draw, and the virtual weight."""

    bias: nn.Parameter | None

    def _init_hash(self, dense: torch.Tensor, bias: torch.Tensor | None, ratio: float, seed: int) -> None:
        numel = dense.numel()
        k = max(1, round(numel * ratio))
        idx, sign = hash_indices(numel, k, seed)
        self.shape = tuple(dense.shape)
        self.spec = HashSpec(seed, k)
        self.register_buffer("index", torch.from_numpy(idx), persistent=False)
        self.register_buffer("sign", torch.from_numpy(sign), persistent=False)
        # least-squares start from the trained weights: each bucket is the mean of its signed members
        signed = dense.detach().reshape(-1).double() * self.sign.double()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, self.index, signed)
        counts = torch.bincount(self.index, minlength=k).clamp(min=1)
        self.buckets = nn.Parameter((sums / counts).float())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return (self.buckets[self.index] * self.sign).reshape(self.shape)


class HashedLinear(_Hashed):
    def __init__(self, m: nn.Linear, ratio: float, seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self._init_hash(m.weight, m.bias, ratio, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def dense(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _fill(out, self)


class HashedConv2d(_Hashed):
    def __init__(self, m: nn.Conv2d, ratio: float, seed: int) -> None:
        super().__init__()
        self.conv_args = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                              stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                              padding_mode=m.padding_mode)
        self._init_hash(m.weight, m.bias, ratio, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        return nn.functional.conv2d(x, self.weight, self.bias, a["stride"], a["padding"], a["dilation"], a["groups"])

    def dense(self) -> nn.Conv2d:
        out = nn.Conv2d(**self.conv_args, bias=self.bias is not None)  # type: ignore[arg-type]
        return _fill(out, self)


def _fill(out: nn.Linear | nn.Conv2d, h: _Hashed) -> nn.Module:
    with torch.no_grad():
        out.weight.copy_(h.weight)
        if h.bias is not None:
            out.bias.copy_(h.bias)  # type: ignore[union-attr]
    out.edgepipe_hash = h.spec  # type: ignore[assignment]  # read by the archive: store buckets + seed only
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def hash_layers(model: nn.Module, cfg: HashingConfig) -> dict[str, HashSpec]:
    """Replace the chosen layers of ``model`` by hashed ones in place; returns each layer's hash spec."""
    mods = dict(model.named_modules())
    for name in (*cfg.layers, *cfg.ignored_layers):
        if name not in mods:
            raise ConfigError(f"layer {name!r} is not in the model")
    kinds = (nn.Linear, nn.Conv2d) if cfg.conv else (nn.Linear,)
    out = {}
    for name, m in mods.items():
        if not isinstance(m, kinds) or name in cfg.ignored_layers or (cfg.layers and name not in cfg.layers):
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            continue
        seed = layer_seed(cfg.seed, name)
        h = HashedConv2d(m, cfg.ratio, seed) if isinstance(m, nn.Conv2d) else HashedLinear(m, cfg.ratio, seed)
        _set(model, name, h)
        out[name] = h.spec
    if not out:
        raise ConfigError("hashing: no layer to hash (check layers / ignored_layers / conv)")
    return out


def finalize(model: nn.Module) -> nn.Module:
    """Expand every hashed layer into an ordinary dense layer (it remembers its seed for the archive)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, _Hashed):
            _set(model, name, m.dense())
    return model


@register("hashing", HashingConfig, finalize=finalize)
def hashing(model: nn.Module, cfg: HashingConfig, ctx: CompressContext) -> nn.Module:
    """HashedNets: weights drawn by a seeded hash from ratio x as many real parameters (fine-tuned)."""
    specs = hash_layers(model, cfg)
    virtual = sum(int(np.prod(mm.shape)) for mm in model.modules() if isinstance(mm, _Hashed))
    real = sum(s.buckets for s in specs.values())
    ctx.reporter.note(f"hashing: {len(specs)} layers, {virtual:,} virtual weights from {real:,} buckets")
    return model
