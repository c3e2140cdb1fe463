"""Low-rank factorisation on the example model: ranks, energy, budgets, export, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.compress import apply_recipe, recipe_from_dict
from edgepipe.compress._stats import count_macs
from edgepipe.compress.lowrank import LowRankConfig, _unfold, energy_rank, factorise, vbmf_rank
from edgepipe.errors import ConfigError


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


@pytest.fixture
def example_input(splits):
    return torch.from_numpy(splits.test.x[:1])


def test_linear_is_the_truncated_svd(example_input):
    model = _fresh()
    w = model.fc.weight.detach().double()
    plan = factorise(model, LowRankConfig(ranks={"fc": 4}, layers=("fc",)), example_input)
    assert plan == {"fc": (4,)}
    first, second = model.fc
    assert (first.in_features, first.out_features, second.out_features) == (64, 4, 10)
    product = (second.weight.double() @ first.weight.double()).detach()
    s = torch.linalg.svdvals(w)
    # Eckart-Young: the best rank-4 approximation leaves exactly the tail singular values
    assert torch.linalg.norm(w - product) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)


def test_energy_threshold_sets_each_conv_mode_rank(example_input):
    model = _fresh()
    original = {n: m.weight.detach().double().numpy() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = factorise(model, LowRankConfig(energy=0.8), example_input)
    assert plan, "nothing factorised"
    for name, ranks in plan.items():
        if name == "fc":
            continue
        for mode, r in enumerate(ranks):
            s = np.linalg.svd(_unfold(original[name], mode), compute_uv=False) ** 2
            kept = s[:r].sum() / s.sum()
            assert kept >= 0.8 - 1e-9  # the energy is kept ...
            assert r == 1 or s[: r - 1].sum() / s.sum() < 0.8  # ... by the smallest rank that keeps it


def test_mac_budget_halves_the_model_and_fine_tune_recovers(splits):
    recipe = recipe_from_dict({"finetune": {"epochs": 1, "max_batches": 16, "lr": 1e-3},
                               "steps": [{"technique": "lowrank", "macs": 0.5, "finetune": True}]})
    model, (rec,) = apply_recipe(_fresh(), recipe, splits)
    assert rec["after"]["macs"] <= 0.5 * rec["before"]["macs"]
    assert rec["after"]["params"] < rec["before"]["params"]
    assert rec["after"]["top1"] > 0.8
    assert any(isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d) for m in model.modules())


def test_factorised_model_exports_and_runs_on_onnxruntime(tmp_path, splits, example_input):
    from edgepipe.export import export, parity

    model = _fresh()
    factorise(model, LowRankConfig(energy=0.9), example_input)
    onnx = export(model, (1, 1, 32, 32), tmp_path / "lowrank.onnx")
    p = parity(model, onnx, splits.test.x[:64])
    assert p.max_abs_error < 1e-3 and p.top1_agreement == 1.0


def test_vbmf_finds_the_rank_of_a_noisy_low_rank_matrix():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 200)) + 0.1 * rng.normal(size=(80, 200))
    assert vbmf_rank(np.linalg.svd(y, compute_uv=False), y.shape) == 6
    assert energy_rank(np.array([4.0, 3.0, 0.0]), 0.6) == 1 and energy_rank(np.array([4.0, 3.0]), 0.7) == 2


def test_vbmf_rule_factorises(example_input):
    model = _fresh()
    before = count_macs(model, example_input)
    plan = factorise(model, LowRankConfig(rank="vbmf"), example_input)
    assert plan and count_macs(model, example_input) < before


def test_rank_above_full_rank_is_refused(example_input):
    with pytest.raises(ConfigError, match=r"ranks.fc = 11 is above the layer's full rank; its maximum rank is 10"):
        factorise(_fresh(), LowRankConfig(ranks={"fc": 11}), example_input)
    with pytest.raises(ConfigError, match=r"ranks.stem.0 = 2 \(input mode\) is above .* maximum rank is 1"):
        factorise(_fresh(), LowRankConfig(ranks={"stem.0": (4, 2)}), example_input)


def test_bad_configs_are_refused(example_input):
    with pytest.raises(ConfigError, match=r"energy = 1.5: must be in \(0, 1\]"):
        LowRankConfig(energy=1.5)
    with pytest.raises(ConfigError, match='a macs/params budget searches an energy threshold'):
        LowRankConfig(rank="vbmf", macs=0.5)
    with pytest.raises(ConfigError, match=r"layer 'layer9' is not in the model"):
        factorise(_fresh(), LowRankConfig(layers=("layer9",)), example_input)
    with pytest.raises(ConfigError, match=r"the budget .* cannot be met"):
        factorise(_fresh(), LowRankConfig(macs=0.01, layers=("fc",)), example_input)
