"""Low-rank factorisation: ``Linear`` by truncated SVD, ``Conv2d`` by Tucker-2 (tensorly's partial Tucker).

A ``Linear(in, out)`` becomes ``Linear(in, r) -> Linear(r, out)``; a ``Conv2d(cin, cout, k)`` becomes
``1x1 (cin -> r_in) -> kxk core (r_in -> r_out, the original stride/padding) -> 1x1 (r_out -> cout)``, with
a factor folded into the core when its rank is full (Tucker-1). Every factorised layer is an
``nn.Sequential`` of ordinary layers, so it exports to ONNX as plain Conv/Gemm and runs on every backend.

Ranks per layer come from an energy threshold (the smallest rank keeping that fraction of the squared
singular values of the layer, or of each mode's unfolding for a conv), from VBMF (Nakajima et al. 2013,
analytic empirical variational Bayes: the rank selection of Kim et al. 2016), or are given per layer. With
a budget (``macs`` / ``params`` as fractions of the model's), one energy threshold shared by all layers
is searched so the whole model fits. A layer is only factorised when that makes it cheaper.

```toml
[[steps]]
technique = "lowrank"
macs = 0.5               # half the model's multiply-accumulates
finetune = true
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgepipe.compress import CompressContext, register
from edgepipe.compress._inputs import Inputs, call, select
from edgepipe.config.techniques import LowRankConfig
from edgepipe.errors import CompressionError, ConfigError

# ---------------------------------------------------------------------------------------------------------
# rank selection


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose leading singular values hold ``energy`` of the total squared sum."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    if e[-1] <= 0:
        return 1
    return int(np.searchsorted(e / e[-1], energy - 1e-12) + 1)


def vbmf_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Rank chosen by analytic empirical VBMF (Nakajima et al., JMLR 2013) from the singular values ``s``.

    The noise variance is estimated by minimising the free energy; components whose singular value
    exceeds the resulting threshold are kept.
    """
    from scipy.optimize import minimize_scalar

    L, M = sorted(shape)
    s = np.asarray(s, dtype=np.float64)[:L]
    if L < 2:
        return L
    alpha = L / M
    tau_ub = 2.5129 * np.sqrt(alpha)
    x_ub = (1 + tau_ub) * (1 + alpha / tau_ub)
    h_ub = int(min(np.ceil(L / (1 + alpha)) - 1, L)) - 1
    if h_ub + 1 >= len(s):
        return L
    upper = np.sum(s**2) / (L * M)
    lower = max(s[h_ub + 1] ** 2 / (M * x_ub), np.mean(s[h_ub + 1 :] ** 2) / M)
    if not upper > lower > 0:
        return L

    def free_energy(sigma2: float) -> float:
        x = s**2 / (M * sigma2)
        z1, z2 = x[x > x_ub], x[x <= x_ub]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return float(np.sum(z2 - np.log(z2 + np.finfo(float).eps)) + np.sum(z1 - tau)
                     + np.sum(np.log((tau + 1) / z1)) + alpha * np.sum(np.log(tau / alpha + 1)))

    sigma2 = float(minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x)
    threshold = np.sqrt(M * sigma2 * (1 + tau_ub) * (1 + alpha / tau_ub))
    return int(np.sum(s > threshold))


# ---------------------------------------------------------------------------------------------------------
# one layer: its spectra, its costs, its factorisation


@dataclass
class _Layer:
    name: str
    module: nn.Linear | nn.Conv2d
    spectra: list[np.ndarray]  # Linear: [s]; Conv2d: [mode-0 (out) s, mode-1 (in) s]
    max_ranks: tuple[int, ...]
    in_positions: int  # spatial positions (or rows) the layer reads
    out_positions: int  # spatial positions (or rows) it writes

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    def dense_cost(self) -> tuple[int, int]:
        """(MACs, weight parameters) of the layer as it is."""
        w = self.module.weight
        return self.out_positions * w.numel(), w.numel()

    def cost(self, ranks: tuple[int, ...]) -> tuple[int, int]:
        """(MACs, weight parameters) after factorising with ``ranks``."""
        m = self.module
        if not self.is_conv:
            (r,) = ranks
            p = r * (m.in_features + m.out_features)
            return self.out_positions * p, p
        r_out, r_in = ranks
        kk = m.kernel_size[0] * m.kernel_size[1]
        cout, cin = m.out_channels, m.in_channels
        core_in = cin if r_in == cin else r_in
        core_out = cout if r_out == cout else r_out
        macs = self.out_positions * core_out * core_in * kk
        params = core_out * core_in * kk
        if r_in != cin:
            macs += self.in_positions * cin * r_in
            params += cin * r_in
        if r_out != cout:
            macs += self.out_positions * r_out * cout
            params += r_out * cout
        return macs, params

    def ranks_for(self, rule: str, energy: float, min_rank: int) -> tuple[int, ...]:
        if rule == "vbmf":
            w = self.module.weight.detach().numpy()
            shapes = [w.reshape(w.shape[0], -1).shape]
            if self.is_conv:
                shapes.append(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1).shape)
            rs = [vbmf_rank(s, sh) for s, sh in zip(self.spectra, shapes, strict=True)]
        else:
            rs = [energy_rank(s, energy) for s in self.spectra]
        return tuple(min(max(r, min_rank), mx) for r, mx in zip(rs, self.max_ranks, strict=True))


def _unfold(w: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def _describe(name: str, module: nn.Linear | nn.Conv2d, in_pos: int, out_pos: int) -> _Layer:
    w = module.weight.detach().double().numpy()
    if isinstance(module, nn.Linear):
        s = np.linalg.svd(w, compute_uv=False)
        return _Layer(name, module, [s], (min(w.shape),), in_pos, out_pos)
    spectra = [np.linalg.svd(_unfold(w, m), compute_uv=False) for m in (0, 1)]
    max_ranks = tuple(min(_unfold(w, m).shape) for m in (0, 1))
    return _Layer(name, module, spectra, max_ranks, in_pos, out_pos)


class FactorisedLinear(nn.Sequential):
    """``Linear(in, r) -> Linear(r, out)``, which also answers ``weight`` (the product of its factors), ``bias``,
    ``in_features`` and ``out_features`` like the ``Linear`` it replaced: code that reads a layer's weights
    instead of calling it (``nn.TransformerEncoderLayer``'s inference fast path) computes the same function."""

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self[1].weight @ self[0].weight

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self[1].bias

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features


def _factorise_linear(m: nn.Linear, r: int) -> nn.Sequential:
    w = m.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    first = nn.Linear(m.in_features, r, bias=False)
    second = nn.Linear(r, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:r]).float())
        second.weight.copy_((u[:, :r] * root[None, :]).float())
        if m.bias is not None:
            second.bias.copy_(m.bias)
    return FactorisedLinear(first, second)


def _factorise_conv(m: nn.Conv2d, r_out: int, r_in: int, iterations: int) -> nn.Sequential:
    try:
        import tensorly as tl
        from tensorly.decomposition import partial_tucker
    except ImportError as e:
        raise CompressionError("low-rank factorisation of Conv2d layers needs tensorly: "
                               "pip install 'edgepipe[lowrank]'") from e

    w = m.weight.detach().double().numpy()
    cout, cin = w.shape[:2]
    tl.set_backend("numpy")
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                              n_iter_max=iterations, random_state=0)
    layers: list[nn.Module] = []
    if r_in == cin:  # full rank: fold the (orthogonal) factor into the core instead of a 1x1 layer
        core = np.einsum("abhw,ib->aihw", core, u_in)
    else:
        first = nn.Conv2d(cin, r_in, 1, bias=False)
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(u_in.T.copy())[:, :, None, None].float())
        layers.append(first)
    if r_out == cout:
        core = np.einsum("abhw,oa->obhw", core, u_out)
    mid = nn.Conv2d(core.shape[1], core.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                    bias=m.bias is not None and r_out == cout)
    with torch.no_grad():
        mid.weight.copy_(torch.from_numpy(np.ascontiguousarray(core)).float())
    layers.append(mid)
    if r_out != cout:
        last = nn.Conv2d(r_out, cout, 1, bias=m.bias is not None)
        with torch.no_grad():
            last.weight.copy_(torch.from_numpy(u_out.copy())[:, :, None, None].float())
        layers.append(last)
    bias_owner = layers[-1]
    if m.bias is not None:
        with torch.no_grad():
            bias_owner.bias.copy_(m.bias)  # type: ignore[union-attr]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------------
# the step


def _candidates(model: nn.Module, cfg: LowRankConfig, example: Inputs) -> list[_Layer]:
    mods = dict(model.named_modules())
    for name in (*cfg.layers, *cfg.ignored_layers, *cfg.ranks):
        if name not in mods:
            raise ConfigError(f"layer {name!r} is not in the model; its layers include "
                              f"{', '.join(n for n, m in mods.items() if isinstance(m, nn.Linear | nn.Conv2d))}")
        if not isinstance(mods[name], nn.Linear | nn.Conv2d):
            raise ConfigError(f"layer {name!r} is a {type(mods[name]).__name__}; low-rank factorises Linear and Conv2d")
    chosen = {}
    for name, m in mods.items():
        if not isinstance(m, nn.Linear | nn.Conv2d) or name in cfg.ignored_layers:
            continue
        if cfg.layers and name not in cfg.layers:
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
            if name in cfg.ranks:
                raise ConfigError(f"layer {name!r}: grouped or non-zero-padded convolutions are not factorised")
            continue
        chosen[name] = m
    positions: dict[str, tuple[int, int]] = {}

    def hook(name: str):  # noqa: ANN202
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                positions[name] = (inp[0].shape[-2] * inp[0].shape[-1], out.shape[-2] * out.shape[-1])
            else:
                rows = inp[0].numel() // inp[0].shape[-1]
                positions[name] = (rows, rows)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in chosen.items()]
    try:
        with torch.no_grad():
            call(model.eval(), select(example, slice(0, 1)))
    finally:
        for h in handles:
            h.remove()
    return [_describe(n, m, *positions[n]) for n, m in chosen.items() if n in positions]


def _explicit_ranks(layer: _Layer, given: int | tuple[int, ...]) -> tuple[int, ...]:
    rs = given if isinstance(given, tuple) else (given,) * len(layer.max_ranks)
    if len(rs) != len(layer.max_ranks):
        raise ConfigError(f"ranks.{layer.name} = {given!r}: a {type(layer.module).__name__} takes "
                          f"{len(layer.max_ranks)} rank(s)")
    for r, mx, what in zip(rs, layer.max_ranks, ("output", "input"), strict=False):
        if r > mx:
            mode = f" ({what} mode)" if layer.is_conv else ""
            raise ConfigError(f"ranks.{layer.name} = {r}{mode} is above the layer's full rank; its maximum rank is {mx}")
    return tuple(rs)


def _plan(layers: list[_Layer], cfg: LowRankConfig, total_macs: int, total_params: int) -> dict[str, tuple[int, ...]]:
    """Ranks per layer to factorise (layers left out stay dense)."""
    fixed = {ly.name: _explicit_ranks(ly, cfg.ranks[ly.name]) for ly in layers if ly.name in cfg.ranks}
    free = [ly for ly in layers if ly.name not in fixed]

    def choose(energy: float) -> dict[str, tuple[int, ...]]:
        plan = dict(fixed)
        for ly in free:
            r = ly.ranks_for(cfg.rank, energy, cfg.min_rank)
            macs, params = ly.cost(r)
            if macs < ly.dense_cost()[0] and params < ly.dense_cost()[1]:
                plan[ly.name] = r
        return plan

    if cfg.macs is None and cfg.params is None:
        return choose(cfg.energy)

    def cost(plan: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        macs, params = total_macs, total_params
        for ly in layers:
            if ly.name in plan:
                dm, dp = ly.dense_cost()
                fm, fp = ly.cost(plan[ly.name])
                macs, params = macs - dm + fm, params - dp + fp
        return macs, params

    def fits(plan: dict[str, tuple[int, ...]]) -> bool:
        macs, params = cost(plan)
        return (cfg.macs is None or macs <= cfg.macs * total_macs) and (
            cfg.params is None or params <= cfg.params * total_params)

    if not fits(choose(0.0)):
        macs, params = cost(choose(0.0))
        raise ConfigError(
            f"the budget (macs = {cfg.macs}, params = {cfg.params}) cannot be met by factorising these layers: "
            f"at rank {cfg.min_rank} the model keeps {macs / total_macs:.2f} of its MACs and "
            f"{params / total_params:.2f} of its parameters; raise the budget or factorise more layers")
    lo, hi = 0.0, 1.0  # fits(lo) holds; find the largest energy that still fits
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(choose(mid)) else (lo, mid)
    return choose(lo)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def factorise(model: nn.Module, cfg: LowRankConfig, example: Inputs) -> dict[str, tuple[int, ...]]:
    """Factorise ``model``'s layers in place; returns the ranks used per factorised layer.

    ``example``: one batch of every input (one tensor, or a tuple in ``forward``'s order). Only layers the
    forward pass calls are factorised (a layer whose weight its parent reads directly is left alone)."""
    from edgepipe.compress._stats import count_macs

    layers = _candidates(model, cfg, example)
    if not layers:
        raise CompressionError("low-rank: no Linear or Conv2d layer to factorise (check layers / ignored_layers)")
    total_macs = count_macs(model, select(example, slice(0, 1)))
    total_params = sum(p.numel() for p in model.parameters())
    plan = _plan(layers, cfg, total_macs, total_params)
    by_name = {ly.name: ly for ly in layers}
    for name, ranks in plan.items():
        m = by_name[name].module
        new = (_factorise_conv(m, ranks[0], ranks[1], cfg.tucker_iterations) if isinstance(m, nn.Conv2d)
               else _factorise_linear(m, ranks[0]))
        _set(model, name, new)
    return plan


@register("lowrank", LowRankConfig)
def lowrank(model: nn.Module, cfg: LowRankConfig, ctx: CompressContext) -> nn.Module:
    """Low-rank factorisation: Linear by truncated SVD, Conv2d by Tucker-2; ranks by energy, VBMF or a budget."""
    plan = factorise(model, cfg, ctx.example)
    ctx.reporter.note(f"low-rank: factorised {len(plan)} layers: "
                      + ", ".join(f"{n} r={'x'.join(map(str, r))}" for n, r in plan.items()))
    return model
