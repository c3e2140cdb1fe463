"""Distillation into a smaller student architecture (the ``student`` technique)."""

from __future__ import annotations

import pytest
import torch

from edgepipe.compress import apply_recipe, recipe_from_dict
from edgepipe.errors import ConfigError
from edgepipe.models.cifar_resnet import CifarResNet
from edgepipe.models.example import digits_resnet, digits_student

QUICK = {"epochs": 1, "max_batches": 4, "lr": 3e-3}


def _recipe(model: str, distill: bool = True, **extra) -> dict:
    r = {"finetune": QUICK, "steps": [{"technique": "student", "model": model, "finetune": True, **extra}]}
    if distill:
        r["distill"] = {"kind": "soft"}
    return r


def test_student_replaces_the_architecture_and_learns_from_the_teacher(splits):
    teacher = digits_resnet()
    recipe = recipe_from_dict(_recipe("edgepipe.models.example:digits_student") | {
        "finetune": {"epochs": 4, "lr": 3e-3}})
    student, records = apply_recipe(teacher, recipe, splits)
    assert isinstance(student, CifarResNet) and student.depth == 8
    rec = records[0]
    assert rec["technique"] == "student" and rec["distill"] == "soft"
    assert rec["after"]["params"] < rec["before"]["params"] / 2
    assert rec["after"]["macs"] < rec["before"]["macs"] / 20  # 4x4 pooling first: 1/16 of the pixels
    # an untrained student is at chance (~10 %); four epochs of distillation take it far above
    untrained = digits_student()
    with torch.no_grad():
        x = torch.from_numpy(splits.validation.x)
        chance = float((untrained(x).argmax(1).numpy() == splits.validation.y).mean())
    assert chance < 0.3
    assert rec["after"]["top1"] > 0.8


def test_student_then_structured_pruning_shrinks_the_student(splits):
    data = _recipe("edgepipe.models.example:digits_student")
    data["steps"].append({"technique": "structured_prune", "ratio": 0.5, "round_to": 8})
    student, records = apply_recipe(digits_resnet(), recipe_from_dict(data), splits)
    assert [r["technique"] for r in records] == ["student", "structured_prune"]
    assert records[1]["after"]["params"] < records[1]["before"]["params"]
    assert student(torch.from_numpy(splits.validation.x[:2])).shape == (2, 10)


@pytest.mark.parametrize(("recipe", "message"), [
    (_recipe("edgepipe.models.zoo:resnet18"), "cannot take the model's input (1, 1, 32, 32)"),
    (_recipe("edgepipe.models.lenet:lenet_300_100"), None),  # same classes, same input: accepted
    (_recipe("edgepipe.models.nowhere:net"), "steps[0] (student): model 'edgepipe.models.nowhere:net': cannot import"),
])
def test_student_errors_name_the_problem(splits, recipe, message):
    if message is None:
        model, _ = apply_recipe(digits_resnet(), recipe_from_dict(recipe), splits)
        assert type(model).__name__ != "DigitsResNet"
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_recipe(digits_resnet(), recipe_from_dict(recipe), splits)


def test_student_model_must_be_a_factory():
    with pytest.raises(ConfigError, match="package.module:factory"):
        recipe_from_dict(_recipe("resnet20"))


def test_student_with_other_classes_is_refused(splits, monkeypatch):
    import edgepipe.models.example as ex

    monkeypatch.setattr(ex, "eleven", lambda: CifarResNet(8, num_classes=11), raising=False)
    with pytest.raises(ConfigError, match=r"outputs \(1, 11\), the model \(1, 10\)"):
        apply_recipe(digits_resnet(), recipe_from_dict(_recipe("edgepipe.models.example:eleven")), splits)


def test_student_without_distill_trains_on_the_labels(splits):
    model, [rec] = apply_recipe(digits_resnet(), recipe_from_dict(
        _recipe("edgepipe.models.example:digits_student", distill=False)), splits)
    assert isinstance(model, CifarResNet) and rec["distill"] is None and rec["finetune"]["max_batches"] == 4


def test_digits_student_starts_the_same_and_leaves_the_callers_rng_alone():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    a, b = digits_student(), digits_student()
    assert torch.equal(torch.rand(3), want)  # the factory's seeding did not touch the global generator
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
