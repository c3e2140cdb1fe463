"""HashedNets on the example model: the draw, the expansion to dense layers, export, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.compress import apply_recipe, recipe_from_dict
from edgepipe.compress.hashing import (
    HashedConv2d,
    HashedLinear,
    HashingConfig,
    finalize,
    hash_indices,
    hash_layers,
)
from edgepipe.errors import ConfigError


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def test_hash_is_seeded_and_spread():
    idx, sign = hash_indices(80_000, 1000, seed=7)
    again, _ = hash_indices(80_000, 1000, seed=7)
    other, _ = hash_indices(80_000, 1000, seed=8)
    assert np.array_equal(idx, again) and not np.array_equal(idx, other)
    counts = np.bincount(idx, minlength=1000)
    assert counts.min() > 40 and counts.max() < 130  # ~80 per bucket
    assert 0.48 < (sign > 0).mean() < 0.52


def test_hashed_layers_keep_the_ratio_and_expand_to_identical_dense_weights(splits):
    model = _fresh()
    specs = hash_layers(model, HashingConfig(ratio=0.125, seed=3))
    assert isinstance(model.fc, HashedLinear) and isinstance(model.layer3[1].conv2, HashedConv2d)
    assert specs["layer3.1.conv2"].buckets == round(36_864 / 8) and specs["fc"].buckets == 80
    virtual = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, HashedLinear | HashedConv2d)}
    real = sum(p.numel() for n, p in model.named_parameters() if n.endswith("buckets"))
    assert real == sum(s.buckets for s in specs.values())
    x = torch.from_numpy(splits.test.x[:16])
    with torch.no_grad():
        out = model(x)
    finalize(model)
    for name, w in virtual.items():
        dense = model.get_submodule(name)
        assert type(dense) in (nn.Linear, nn.Conv2d)
        assert torch.equal(dense.weight, w), name  # bit for bit
        assert len(torch.unique(dense.weight.abs())) <= specs[name].buckets
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-5)


def _train_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    model.eval()
    return loss


def test_hashed_model_fine_tunes_and_exports(tmp_path, splits):
    from edgepipe.compress import CompressContext
    from edgepipe.config.recipe import FinetuneConfig
    from edgepipe.export import export, parity

    model = _fresh()
    hash_layers(model, HashingConfig(ratio=0.25, ignored_layers=("stem.0",)))
    x, y = torch.from_numpy(splits.train.x[:256]), torch.from_numpy(splits.train.y[:256])
    buckets = model.fc.buckets.detach().clone()
    before = _train_loss(model, x, y)
    ctx = CompressContext(splits, FinetuneConfig(epochs=1, max_batches=12, lr=3e-3), x[:1])
    ctx.finetune(model)
    assert _train_loss(model, x, y) < 0.7 * before  # the buckets learn
    assert not torch.equal(model.fc.buckets, buckets)
    finalize(model)
    assert model.fc.edgepipe_hash.buckets == 160
    onnx = export(model, (1, 1, 32, 32), tmp_path / "hashed.onnx")
    p = parity(model, onnx, splits.test.x[:64])
    assert p.max_abs_error < 1e-3 and p.top1_agreement == 1.0


def test_hashing_step_in_a_recipe(splits):
    recipe = recipe_from_dict({"steps": [{"technique": "hashing", "ratio": 0.5, "layers": ["fc"]}]})
    model, (rec,) = apply_recipe(_fresh(), recipe, splits)
    assert type(model.fc) is nn.Linear and model.fc.edgepipe_hash.buckets == 320
    assert rec["after"]["top1"] < rec["before"]["top1"]  # no fine-tune: the draw alone costs accuracy


def test_bad_inputs():
    with pytest.raises(ConfigError, match=r"ratio = 0.0: the fraction of real parameters must be in \(0, 1\]"):
        HashingConfig(ratio=0.0)
    with pytest.raises(ConfigError, match=r"layer 'nope' is not in the model"):
        hash_layers(_fresh(), HashingConfig(layers=("nope",)))
