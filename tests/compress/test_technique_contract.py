"""What every registered compression technique promises: parametrized over ``compress.techniques()``.

Each technique's config builds from its defaults (or, where it has no sensible default, from the smallest
valid parameters below), applies to the example through a Recipe built in Python, leaves a model that
still exports to ONNX and runs with the same outputs as torch, and round-trips through TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib

import numpy as np
import pytest
import torch

from edgepipe import backends
from edgepipe.compress import apply_recipe, recipe_from_dict, techniques
from edgepipe.config.recipe import FinetuneConfig, Recipe
from edgepipe.config.techniques import config_class, config_names, technique_of
from edgepipe.errors import ConfigError
from edgepipe.evaluate import predict
from edgepipe.types import Artifact

NAMES = sorted(techniques())

# Techniques whose configs have no default amount of compression (they say so): the smallest valid set.
MINIMAL: dict[str, dict] = {
    "magnitude_prune": {"sparsity": 0.5},
    "taylor_prune": {"sparsity": 0.5, "batches": 1, "batch_size": 16},
    "regularized_prune": {"sparsity": 0.5},
    "student": {"model": "edgepipe.models.example:digits_student"},
}
QUICK = FinetuneConfig(epochs=1, max_batches=2, batch_size=32)  # for techniques that train while applying


def _config(name: str):
    cls = techniques()[name].config
    if name in MINIMAL:
        with pytest.raises(ConfigError):
            cls()  # listed here only because its defaults are refused
        return cls(**MINIMAL[name])
    return cls()


def _fresh():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def test_every_config_has_a_technique_and_every_technique_a_config():
    assert config_names() == NAMES
    assert set(MINIMAL) <= set(NAMES)
    for name, tech in techniques().items():
        assert config_class(name) is tech.config and tech.summary, name


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_toml(name):
    cfg = _config(name)
    assert technique_of(cfg) == name and dataclasses.is_dataclass(cfg)
    recipe = Recipe([cfg], finetune=QUICK, name=f"contract-{name}")
    again = recipe_from_dict(tomllib.loads(recipe.to_toml()), "round trip")
    assert again.steps[0].config == cfg and type(again.steps[0].config) is type(cfg)
    assert again.sha256 == recipe.sha256 and again.finetune == QUICK and again.name == recipe.name
    with pytest.raises(ConfigError, match=rf"steps\[0\] \({name}\): unknown key 'no_such_key'"):
        recipe_from_dict({"steps": [{**recipe.to_dict()["steps"][0], "no_such_key": 1}]})


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_applies_to_the_example_and_still_exports_and_runs(name, splits, tmp_path):
    from edgepipe.export import check_parity, export, parity

    original = {k: v.clone() for k, v in _fresh().state_dict().items()}
    model, [rec] = apply_recipe(_fresh(), Recipe([_config(name)], finetune=QUICK), splits)
    assert rec["technique"] == name and rec["step"] == 0 and rec["params"] == Recipe([_config(name)]).steps[0].params
    assert not model.training
    after = model.state_dict()
    changed = set(after) != set(original) or any(
        after[k].shape != original[k].shape or not torch.equal(after[k], original[k]) for k in original)
    assert changed, f"{name} left the model as it was"
    for key in ("params", "nonzero_params"):  # compression never makes the model bigger
        assert rec["after"][key] <= rec["before"][key], (key, rec["before"], rec["after"])

    onnx = export(model, (1, 1, 32, 32), tmp_path / f"{name}.onnx")
    x = splits.test.x[:32]
    p = parity(model, onnx, x)
    check_parity(p)  # onnxruntime computes what torch computes
    assert p.samples == len(x)
    logits = predict(backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", onnx.path)), x)
    assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
