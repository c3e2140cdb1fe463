"""The recipe machinery every technique plugs into: registry, validation, records, the fine-tune loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from edgepipe.compress import apply_recipe, recipe_from_dict, register, techniques
from edgepipe.compress.finetune import finetune
from edgepipe.config.recipe import FinetuneConfig, load_recipe
from edgepipe.errors import ConfigError


@dataclass(frozen=True)
class _ScaleFc:
    factor: float = 0.0


@register("test_scale_fc", _ScaleFc)
def _scale_fc(model, cfg, ctx):
    """Scale the classifier weights (a damage that fine-tuning can repair)."""
    with torch.no_grad():
        model.fc.weight.mul_(cfg.factor)
        model.fc.bias.mul_(cfg.factor)
    return model


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def test_unknown_technique_lists_known_ones():
    with pytest.raises(ConfigError, match=r"steps\[0\]: unknown technique 'magnitude_prunne'; known techniques: .*test_scale_fc"):
        recipe_from_dict({"steps": [{"technique": "magnitude_prunne"}]})


def test_step_parameters_are_validated_by_the_technique():
    with pytest.raises(ConfigError, match=r"unknown key 'facter'; allowed keys here: factor"):
        recipe_from_dict({"steps": [{"technique": "test_scale_fc", "facter": 0.5}]})
    with pytest.raises(ConfigError, match=r"finetune.lr = -1.0: must be > 0"):
        recipe_from_dict({"finetune": {"lr": -1.0}, "steps": [{"technique": "test_scale_fc"}]})


def test_recipe_round_trips_through_toml(tmp_path):
    r = recipe_from_dict({"finetune": {"epochs": 1}, "steps": [{"technique": "test_scale_fc", "factor": 0.5,
                                                               "finetune": True}]})
    f = tmp_path / "r.toml"
    f.write_text(r.to_toml())
    again = load_recipe(f)
    assert again.sha256 == r.sha256 and again.steps[0].finetune is True


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe 'nope.toml' not found"):
        load_recipe("nope.toml")


def test_records_and_finetune_repair_the_damage(splits):
    recipe = recipe_from_dict({
        "finetune": {"epochs": 1, "lr": 2e-3, "max_batches": 12},
        "steps": [{"technique": "test_scale_fc", "factor": 0.0},
                  {"technique": "test_scale_fc", "factor": 1.0, "finetune": True}],
    })
    model, records = apply_recipe(_fresh(), recipe, splits)
    assert [r["technique"] for r in records] == ["test_scale_fc", "test_scale_fc"]
    first, second = records
    assert first["before"]["top1"] > 0.97 and first["after"]["top1"] < 0.2  # all-zero logits: one class
    assert first["after"]["nonzero_params"] == first["before"]["nonzero_params"] - 650
    assert first["before"]["macs"] == first["after"]["macs"] > 1_000_000
    assert second["finetune"]["epochs"] == 1 and second["after"]["top1"] > 0.9  # fine-tune repaired it
    assert not model.training


def test_finetune_is_deterministic(splits):
    cfg = FinetuneConfig(epochs=1, max_batches=3, seed=3)
    a = finetune(_fresh(), splits.train, cfg)
    b = finetune(_fresh(), splits.train, cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_teacher_with_another_output_shape_is_refused(splits, tmp_path, monkeypatch):
    (tmp_path / "wide_teacher.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 12))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_from_dict({"distill": {"teacher": "wide_teacher:make"},
                               "steps": [{"technique": "test_scale_fc", "factor": 1.0}]})
    with pytest.raises(ConfigError, match=r"teacher output shape \(1, 12\) differs from the student's \(1, 10\)"):
        apply_recipe(_fresh(), recipe, splits)


def test_registry_lists_techniques():
    assert "test_scale_fc" in techniques()
