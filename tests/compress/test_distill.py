"""Distillation objectives: soft (T² · KL), hard (teacher argmax), intermediate (FitNets hints with adapters)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.compress import CompressContext, apply_recipe, recipe_from_dict, technique
from edgepipe.compress.distill import HardDistill, HintDistill, SoftDistill, make_objective
from edgepipe.config.recipe import DistillConfig, FinetuneConfig
from edgepipe.errors import ConfigError


def _fresh() -> nn.Module:
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


S = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
T = np.array([[1.5, 0.0, -0.5], [-1.0, 2.5, 0.3]])
Y = np.array([0, 2])


def _hand_soft(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    p, q = _softmax(t / temp), _softmax(s / temp)
    return float((p * (np.log(p) - np.log(q))).sum(1).mean() * temp**2)


def _hand_ce(s: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(_softmax(s)[np.arange(len(y)), y]).mean())


@pytest.mark.parametrize(("temp", "alpha"), [(1.0, 1.0), (4.0, 1.0), (4.0, 0.7), (2.5, 0.0)])
def test_soft_loss_is_t_squared_kl_mixed_with_ce(temp, alpha):
    obj = SoftDistill(nn.Identity(), temp, alpha)
    got = obj.logit_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    want = alpha * _hand_soft(S, T, temp) + (1 - alpha) * _hand_ce(S, Y)
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_soft_loss_through_the_models():
    """With a teacher that returns fixed logits, the objective equals the hand computation end to end."""
    teacher = nn.Linear(2, 3)
    student = nn.Linear(2, 3)
    x = torch.randn(2, 2)
    obj = make_objective(DistillConfig(kind="soft", temperature=3.0, alpha=0.5), student, teacher, x)
    with torch.no_grad():
        s, t = student(x).double().numpy(), teacher(x).double().numpy()
    got = obj(student, x, torch.tensor(Y[:2]))
    assert float(got.detach()) == pytest.approx(0.5 * _hand_soft(s, t, 3.0) + 0.5 * _hand_ce(s, Y[:2]), rel=1e-5)
    got.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None  # the teacher does not learn


def test_hard_loss_uses_teacher_argmax_as_targets():
    obj = HardDistill(nn.Identity(), 4.0, 1.0)
    got = obj.logit_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    assert T.argmax(1).tolist() == [0, 1] != Y.tolist()  # the teacher disagrees with the labels on sample 2
    assert float(got) == pytest.approx(_hand_ce(S, T.argmax(1)), rel=1e-6)
    assert float(got) != pytest.approx(_hand_ce(S, Y), rel=1e-3)
    mixed = HardDistill(nn.Identity(), 4.0, 0.25).logit_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    assert float(mixed) == pytest.approx(0.25 * _hand_ce(S, T.argmax(1)) + 0.75 * _hand_ce(S, Y), rel=1e-6)


def _pruned_student(splits) -> nn.Module:
    tech = technique("structured_prune")
    ctx = CompressContext(splits, FinetuneConfig(), torch.from_numpy(splits.test.x[:1]))
    return tech.apply(_fresh(), tech.parse({"ratio": 0.5, "round_to": 8}), ctx)


def test_intermediate_adapters_where_channels_differ_and_they_train(splits):
    teacher, student = _fresh().eval(), _pruned_student(splits)
    cfg = DistillConfig(kind="intermediate", layers=(("layer3", "layer3"), ("stem.0", "stem.0")))
    ctx = CompressContext(splits, FinetuneConfig(epochs=1, max_batches=3, lr=1e-2),
                          torch.from_numpy(splits.test.x[:1]), cfg, teacher)
    obj = ctx.objective(student)
    assert isinstance(obj, HintDistill)
    deep, stem = obj.adapters
    assert isinstance(deep, nn.Conv2d) and (deep.in_channels, deep.out_channels, deep.kernel_size) == (32, 64, (1, 1))
    assert stem is not None and (stem.in_channels, stem.out_channels) == (8, 16)
    before = [p.detach().clone() for p in obj.parameters()]
    assert len(before) == 2
    ctx.finetune(student, objective=obj)
    assert all(not torch.equal(b, p) for b, p in zip(before, obj.parameters(), strict=True))  # adapters trained
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))  # hooks removed


def test_intermediate_hint_loss_is_zero_for_an_identical_student(splits):
    teacher = _fresh()
    student = copy.deepcopy(teacher)
    x = torch.from_numpy(splits.test.x[:8])
    cfg = DistillConfig(kind="intermediate", alpha=1.0, temperature=2.0, layers=(("layer2", "layer2"),),
                        hint_weight=5.0)
    obj = make_objective(cfg, student.eval(), teacher, x[:1])
    assert obj.adapters == [None]  # same channels: no adapter
    loss = obj(student, x, torch.from_numpy(splits.test.y[:8]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # same logits (KL 0) and same features (hint 0)
    obj.close()


def test_intermediate_bad_layer_names_list_the_ones_that_exist(splits):
    cfg = DistillConfig(kind="intermediate", layers=(("layer3", "layer3"), ("blocks.2", "layer2")))
    with pytest.raises(ConfigError, match=r"distill.layers \(student\): no layer named 'blocks.2'.*layers that "
                                          r"exist.*stem, stem.0"):
        make_objective(cfg, _fresh(), _fresh(), torch.from_numpy(splits.test.x[:1]))
    cfg = DistillConfig(kind="intermediate", layers=(("layer3", "layer3.9"),))
    with pytest.raises(ConfigError, match=r"distill.layers \(teacher\): no layer named 'layer3.9'"):
        make_objective(cfg, _fresh(), _fresh(), torch.from_numpy(splits.test.x[:1]))


def test_intermediate_pairs_at_different_resolutions_are_refused(splits):
    cfg = DistillConfig(kind="intermediate", layers=(("layer1", "layer3"),))
    with pytest.raises(ConfigError, match=r"differ in more than channels"):
        make_objective(cfg, _fresh(), _fresh(), torch.from_numpy(splits.test.x[:1]))


def test_intermediate_needs_pairs():
    with pytest.raises(ConfigError, match="needs \\[student, teacher\\] layer pairs"):
        recipe_from_dict({"distill": {"kind": "intermediate"}, "steps": [{"technique": "magnitude_prune",
                                                                          "sparsity": 0.5}]})


@pytest.mark.slow
def test_distilled_recipe_records_the_objective_and_learns_from_the_teacher(splits):
    recipe = recipe_from_dict({
        # one epoch (34 steps of 32 on the train split): the pruned model predicts one class until then
        "finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 32},
        "distill": {"kind": "hard", "alpha": 1.0},
        "steps": [{"technique": "structured_prune", "ratio": 0.5, "round_to": 8, "finetune": True}],
    })
    model, [rec] = apply_recipe(_fresh(), recipe, splits)
    assert rec["distill"] == "hard" and rec["before"]["top1"] > 0.95
    x = torch.from_numpy(splits.test.x)
    with torch.no_grad():
        agree = float((model(x).argmax(1) == _fresh()(x).argmax(1)).float().mean())
    assert agree > 0.8
