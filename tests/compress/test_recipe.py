"""The recipe machinery every technique plugs into: registry, validation, records, the fine-tune loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from edgepipe.compress import apply_recipe, recipe_from_dict, register, techniques
from edgepipe.compress.finetune import finetune
from edgepipe.config.recipe import FinetuneConfig, load_recipe
from edgepipe.errors import ConfigError

FAKE = "test_scale_fc"


def _scale_fc(model, cfg, ctx):
    """Scale the classifier weights (a damage that fine-tuning can repair)."""
    with torch.no_grad():
        model.fc.weight.mul_(cfg.factor)
        model.fc.bias.mul_(cfg.factor)
    return model


@pytest.fixture
def scale_fc():
    """A fake technique, registered for one test in both registries (config and function), then removed."""
    from edgepipe import compress
    from edgepipe.config import techniques as tc

    techniques()  # the real ones first, so that removing the fake leaves them as they were
    assert FAKE not in compress._REGISTRY and FAKE not in tc._CONFIGS
    before = (dict(compress._REGISTRY), dict(tc._CONFIGS))

    @dataclass(frozen=True)
    class ScaleFc:
        factor: float = 0.0

    try:
        tc.technique_config(FAKE)(ScaleFc)
        register(FAKE, ScaleFc)(_scale_fc)
        yield ScaleFc
    finally:
        compress._REGISTRY.pop(FAKE, None)
        tc._CONFIGS.pop(FAKE, None)
    assert before == (compress._REGISTRY, tc._CONFIGS)


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def test_unknown_technique_lists_known_ones(scale_fc):
    with pytest.raises(ConfigError, match=r"steps\[0\]: unknown technique 'magnitude_prunne'; known techniques: .*test_scale_fc"):
        recipe_from_dict({"steps": [{"technique": "magnitude_prunne"}]})


def test_step_parameters_are_validated_by_the_technique(scale_fc):
    with pytest.raises(ConfigError, match=r"unknown key 'facter'; allowed keys here: factor"):
        recipe_from_dict({"steps": [{"technique": "test_scale_fc", "facter": 0.5}]})
    with pytest.raises(ConfigError, match=r"finetune.lr = -1.0: must be > 0"):
        recipe_from_dict({"finetune": {"lr": -1.0}, "steps": [{"technique": "test_scale_fc"}]})


def test_recipe_round_trips_through_toml(scale_fc, tmp_path):
    r = recipe_from_dict({"finetune": {"epochs": 1}, "steps": [{"technique": "test_scale_fc", "factor": 0.5,
                                                               "finetune": True}]})
    f = tmp_path / "r.toml"
    f.write_text(r.to_toml())
    again = load_recipe(f)
    assert again.sha256 == r.sha256 and again.steps[0].finetune is True


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe 'nope.toml' not found"):
        load_recipe("nope.toml")


def test_records_and_finetune_repair_the_damage(scale_fc, splits):
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


def test_teacher_with_another_output_shape_is_refused(scale_fc, splits, tmp_path, monkeypatch):
    (tmp_path / "wide_teacher.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 12))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = recipe_from_dict({"distill": {"teacher": "wide_teacher:make"},
                               "steps": [{"technique": "test_scale_fc", "factor": 1.0}]})
    with pytest.raises(ConfigError, match=r"teacher output shape \(1, 12\) differs from the student's \(1, 10\)"):
        apply_recipe(_fresh(), recipe, splits)


def test_registry_lists_techniques(scale_fc):
    known = techniques()
    assert known[FAKE].config is scale_fc and known[FAKE].apply is _scale_fc
    assert known[FAKE].summary == "Scale the classifier weights (a damage that fine-tuning can repair)."
    assert {"magnitude_prune", "structured_prune", "lowrank", "weight_share", "hashing"} <= set(known)


def test_without_the_fixture_the_fake_technique_is_unknown():
    """Nothing leaks between tests: the fake exists only while a test asks for it."""
    from edgepipe.config.techniques import config_names

    assert FAKE not in techniques() and FAKE not in config_names()
    with pytest.raises(ConfigError, match=f"unknown technique '{FAKE}'"):
        recipe_from_dict({"steps": [{"technique": FAKE}]})


def test_register_refuses_a_config_not_registered_in_config_techniques():
    @dataclass(frozen=True)
    class Unregistered:
        factor: float = 0.0

    with pytest.raises(ConfigError, match="unknown technique 'test_unregistered'"):
        register("test_unregistered", Unregistered)
    assert "test_unregistered" not in techniques()


def test_recipe_built_in_python_equals_the_toml_one(scale_fc):
    from edgepipe.compress import Recipe, Step

    r = Recipe([scale_fc(factor=0.5), Step(scale_fc(factor=1.0), finetune=True)])
    assert [s.technique for s in r.steps] == [FAKE, FAKE] and r.steps[0].params == {"factor": 0.5}
    again = recipe_from_dict({"steps": [{"technique": FAKE, "factor": 0.5},
                                        {"technique": FAKE, "factor": 1.0, "finetune": True}]})
    assert again.sha256 == r.sha256
    with pytest.raises(ConfigError, match="is not a compression technique config"):
        Recipe([{"technique": FAKE}])
