"""Weight sharing on the example model: 2^b values per layer, zeros kept, centroids trained, bad bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepipe.compress import apply_recipe, recipe_from_dict
from edgepipe.compress.share import ShareConfig
from edgepipe.errors import ConfigError


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def _distinct_nonzero(w: torch.Tensor) -> int:
    return len(torch.unique(w[w != 0]))


def test_every_layer_takes_exactly_2_to_the_b_values(splits):
    recipe = recipe_from_dict({
        "finetune": {"epochs": 1, "max_batches": 4},
        "steps": [{"technique": "weight_share", "bits": {"conv": 4, "linear": 3, "layer3.1.conv2": 5},
                   "finetune": True}],
    })
    model, (rec,) = apply_recipe(_fresh(), recipe, splits)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            want = 32 if name == "layer3.1.conv2" else 8 if name == "fc" else 16
            assert _distinct_nonzero(m.weight) == want, name
            assert not hasattr(m, "edgepipe_share")  # finalize cleaned up
    assert rec["after"]["top1"] > 0.8


def test_pruned_zeros_stay_zero_and_centroids_train(splits):
    model = _fresh()
    with torch.no_grad():  # a pruned classifier: half its weights zero
        w = model.fc.weight
        w.mul_((torch.arange(w.numel()) % 2).reshape(w.shape).float())
    zeros = model.fc.weight == 0
    from edgepipe.compress import CompressContext
    from edgepipe.compress.share import finalize, weight_share
    from edgepipe.config.recipe import FinetuneConfig

    ctx = CompressContext(splits, FinetuneConfig(epochs=1, max_batches=6, lr=1e-2), torch.zeros(1, 1, 32, 32))
    weight_share(model, ShareConfig(bits={"fc": 3}), ctx)
    before = torch.unique(model.fc.weight[~zeros])
    ctx.finetune(model)
    during = torch.unique(model.fc.weight[~zeros])
    assert len(during) == 8  # members got equal (grouped) updates: still 8 values without re-projection
    assert not torch.allclose(before, during)  # ... and the centroids moved
    finalize(model)
    assert torch.equal(model.fc.weight == 0, zeros)
    assert _distinct_nonzero(model.fc.weight) == 8


def test_half_precision_codebook_and_others(splits):
    recipe = recipe_from_dict({"steps": [{"technique": "weight_share", "bits": {"conv": 4, "linear": 4},
                                          "codebook": "float16", "others": "float16"}]})
    model, _ = apply_recipe(_fresh(), recipe, splits)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            assert torch.equal(t.half().float(), t), name


@pytest.mark.parametrize("bits", [0, 17, -3])
def test_bits_outside_1_to_16_are_refused(bits):
    with pytest.raises(ConfigError, match=rf"bits.conv = {bits}: weight sharing takes 1 to 16 bits"):
        ShareConfig(bits={"conv": bits})
    with pytest.raises(ConfigError, match=rf"bits.conv = {bits}"):
        recipe_from_dict({"steps": [{"technique": "weight_share", "bits": {"conv": bits}}]})


def test_unknown_layer_is_refused(splits):
    recipe = recipe_from_dict({"steps": [{"technique": "weight_share", "bits": {"layer9.conv": 4}}]})
    with pytest.raises(ConfigError, match=r"layer 'layer9.conv' is not in the model"):
        apply_recipe(_fresh(), recipe, splits)
