"""Weight sharing, Deep Compression's trained quantization (Han et al. 2016, section 3).

Each layer's non-zero weights are clustered by k-means (scikit-learn, seeded, centroids initialised
linearly between the smallest and largest weight, as in the paper) into ``2**bits`` shared values; pruned
zeros stay zero and take no cluster. While the step's fine-tune runs, each weight's gradient is replaced by
the sum of the gradients of its cluster (the paper's grouped gradient): members of a cluster start equal
and get equal updates, so training moves the centroids. ``finalize`` writes the centroids back, so every
layer's dense weights take exactly its shared values (and zero), which :mod:`edgepipe.package.archive`
then stores as a codebook plus Huffman-coded indices.

```toml
[[steps]]
technique = "weight_share"
bits = { conv = 8, linear = 5, "layer3.1.conv2" = 4 }   # per kind, and per-layer overrides
finetune = true
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.config.techniques import ShareConfig
from edgepipe.errors import ConfigError

_KINDS = {"conv": nn.Conv2d, "linear": nn.Linear}


@dataclass
class _Shared:
    """A layer's cluster assignment while it is being fine-tuned."""

    index: torch.Tensor  # cluster of each weight, -1 where the weight is pruned (zero)
    clusters: int
    handle: torch.utils.hooks.RemovableHandle
    codebook: str


def _init_centroids(values: np.ndarray, k: int, how: str, seed: int) -> np.ndarray:
    if how == "linear":
        return np.linspace(values.min(), values.max(), k)
    if how == "density":  # equal-probability quantiles of the weight distribution
        return np.quantile(values, (np.arange(k) + 0.5) / k)
    return np.random.default_rng(seed).choice(values, size=k, replace=False)


def cluster(weight: torch.Tensor, bits: int, init: str = "linear", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of a weight's non-zero values into ``2**bits`` clusters.

    Returns:
        (centroids, index): float32 centroids, and per weight its cluster (-1 for zeros).
    """
    from sklearn.cluster import KMeans

    w = weight.detach().reshape(-1).double().numpy()
    nz = w != 0
    values = w[nz]
    k = 1 << bits
    index = np.full(w.shape, -1, dtype=np.int64)
    distinct = np.unique(values)
    if len(distinct) <= k:  # already at most 2**bits values: they are the codebook
        centroids = distinct
        index[nz] = np.searchsorted(distinct, values)
    else:
        init_c = _init_centroids(values, k, init, seed).reshape(-1, 1)
        from threadpoolctl import threadpool_limits

        km = KMeans(n_clusters=k, init=init_c, n_init=1, random_state=seed)
        with threadpool_limits(1):  # 1-D data: threads only add contention
            labels = km.fit_predict(values.reshape(-1, 1))
        centroids = km.cluster_centers_.reshape(-1)
        index[nz] = labels
    return torch.from_numpy(centroids.astype(np.float32)), torch.from_numpy(index).reshape(weight.shape)


def _grouped_gradient(index: torch.Tensor, k: int):  # noqa: ANN202
    """A gradient hook: every weight gets the summed gradient of its cluster; pruned weights get none."""
    flat = index.reshape(-1)
    valid = flat >= 0
    members = flat[valid]

    def hook(grad: torch.Tensor) -> torch.Tensor:
        g = grad.reshape(-1)
        sums = torch.zeros(k, dtype=g.dtype).index_add_(0, members, g[valid])
        out = torch.zeros_like(g)
        out[valid] = sums[members]
        return out.reshape(grad.shape)

    return hook


def _bits_for(name: str, module: nn.Module, cfg: ShareConfig) -> int | None:
    if name in cfg.bits and name not in _KINDS:  # "conv"/"linear" are kinds, even where a submodule is so named
        return cfg.bits[name]
    for kind, cls in _KINDS.items():
        if isinstance(module, cls) and kind in cfg.bits:
            return cfg.bits[kind]
    return None


def _project(module: nn.Module, state: _Shared) -> None:
    """Write each cluster's mean back to its members (they are equal already, up to float drift)."""
    w = module.weight
    flat = w.detach().reshape(-1)
    valid = state.index.reshape(-1) >= 0
    members = state.index.reshape(-1)[valid]
    sums = torch.zeros(state.clusters, dtype=torch.float64).index_add_(0, members, flat[valid].double())
    counts = torch.zeros(state.clusters, dtype=torch.float64).index_add_(0, members, torch.ones_like(members, dtype=torch.float64))
    centroids = (sums / counts.clamp(min=1)).float()
    if state.codebook == "float16":
        centroids = centroids.half().float()
    new = torch.zeros_like(flat)
    new[valid] = centroids[members]
    with torch.no_grad():
        w.copy_(new.reshape(w.shape))


def finalize(model: nn.Module) -> nn.Module:
    """Make sharing permanent: centroids written back, gradient hooks removed, halves applied if asked."""
    shared_weights = set()
    for m in model.modules():
        state = getattr(m, "edgepipe_share", None)
        if isinstance(state, _Shared):
            _project(m, state)
            state.handle.remove()
            del m.edgepipe_share
            shared_weights.add(id(m.weight))
    if getattr(model, "edgepipe_share_others", "float32") == "float16":
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point() and id(t) not in shared_weights:
                    half = t.half().float()
                    t.copy_(torch.where(torch.isfinite(half), half, t))
    if hasattr(model, "edgepipe_share_others"):
        del model.edgepipe_share_others
    return model


@register("weight_share", ShareConfig, finalize=finalize)
def weight_share(model: nn.Module, cfg: ShareConfig, ctx: CompressContext) -> nn.Module:
    """Weight sharing: per-layer k-means into 2^bits shared values, centroids trained by grouped gradients."""
    mods = dict(model.named_modules())
    for name in (*cfg.ignored_layers, *(k for k in cfg.bits if k not in _KINDS)):
        if name not in mods:
            raise ConfigError(f"layer {name!r} is not in the model (bits keys are 'conv', 'linear' or layer names)")
    shared = 0
    for name, m in mods.items():
        bits = _bits_for(name, m, cfg)
        if bits is None or name in cfg.ignored_layers:
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter):
            raise ConfigError(f"layer {name!r} has no weight parameter to share (is it pruned and not finalized?)")
        centroids, index = cluster(w, bits, cfg.init, cfg.seed)
        with torch.no_grad():
            w.copy_(torch.where(index >= 0, centroids[index.clamp(min=0)], torch.zeros(())))
        handle = w.register_hook(_grouped_gradient(index, len(centroids)))
        m.edgepipe_share = _Shared(index, len(centroids), handle, cfg.codebook)  # type: ignore[assignment]
        shared += 1
    if not shared:
        raise ConfigError(f"weight_share: no layer matched bits = {cfg.bits}")
    model.edgepipe_share_others = cfg.others  # type: ignore[assignment]
    ctx.reporter.note(f"weight sharing: {shared} layers clustered")
    return model
