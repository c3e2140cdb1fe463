"""Pruning on the example model: unstructured (magnitude, Taylor, regularised) and structured (Torch-Pruning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgepipe.compress import CompressContext, apply_recipe, recipe_from_dict, technique
from edgepipe.config.recipe import FinetuneConfig, load_recipe
from edgepipe.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _fresh() -> nn.Module:
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def _ctx(splits, **ft) -> CompressContext:
    cfg = FinetuneConfig(**{"epochs": 1, "max_batches": 4, **ft})
    return CompressContext(splits, cfg, torch.from_numpy(splits.test.x[:1]))


def _apply(name: str, params: dict, splits, model: nn.Module | None = None, **ft) -> nn.Module:
    tech = technique(name)
    return tech.apply(model or _fresh(), tech.parse(params), _ctx(splits, **ft))


def _convs_and_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def _zero_fraction(ws: list[torch.Tensor]) -> float:
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


# ---------------------------------------------------------------------------------------------------------
# unstructured: magnitude


def test_global_magnitude_reaches_the_sparsity_with_uneven_layers(splits):
    model = _apply("magnitude_prune", {"sparsity": 0.8}, splits)
    weights = {n: m.weight for n, m in _convs_and_linears(model).items()}
    assert _zero_fraction(list(weights.values())) == pytest.approx(0.8, abs=1e-3)
    per_layer = [_zero_fraction([w]) for w in weights.values()]
    assert max(per_layer) - min(per_layer) > 0.2  # one threshold over all layers, not the same ratio each
    # the zeros are the smallest magnitudes overall
    orig = {n: m.weight for n, m in _convs_and_linears(_fresh()).items()}
    kept = torch.cat([orig[n][w != 0].abs() for n, w in weights.items()])
    dropped = torch.cat([orig[n][w == 0].abs() for n, w in weights.items()])
    assert kept.min() >= dropped.max()


def test_layer_scope_ratio_dict_and_ignored_layers(splits):
    model = _apply("magnitude_prune", {"sparsity": 0.6, "scope": "layer", "layers": {"stem.0": 0.25},
                                       "ignored_layers": ["fc"]}, splits)
    layers = _convs_and_linears(model)
    assert _zero_fraction([layers["stem.0"].weight]) == pytest.approx(0.25, abs=0.01)
    assert _zero_fraction([layers["fc"].weight]) == 0.0
    for name, m in layers.items():
        if name not in ("stem.0", "fc"):
            assert _zero_fraction([m.weight]) == pytest.approx(0.6, abs=0.01), name


def test_threshold_zeroes_exactly_the_small_weights(splits):
    before = {n: m.weight.detach().clone() for n, m in _convs_and_linears(_fresh()).items()}
    model = _apply("magnitude_prune", {"threshold": 0.05, "module_types": ["Conv2d"]}, splits)
    for name, m in _convs_and_linears(model).items():
        w, w0 = m.weight, before[name]
        if isinstance(m, nn.Linear):
            assert torch.equal(w, w0)  # not a chosen type
        else:
            assert torch.equal(w == 0, w0.abs() < 0.05), name


def test_masks_hold_through_finetune_and_finalize_leaves_plain_weights(splits, tmp_path, example_onnx):
    from edgepipe.export import export

    model = _apply("magnitude_prune", {"sparsity": 0.8}, splits)
    masks = {n: m.weight_mask.clone() for n, m in _convs_and_linears(model).items()}
    ctx = _ctx(splits, max_batches=3, lr=1e-2)
    model = ctx.finetune(model)
    for n, m in _convs_and_linears(model).items():
        assert torch.all(m.weight[masks[n] == 0] == 0), n  # pruned weights stayed at zero
    assert any(not torch.equal(m.weight_orig[masks[n] == 1], _convs_and_linears(_fresh())[n].weight[masks[n] == 1])
               for n, m in _convs_and_linears(model).items())  # the kept weights did train
    model = technique("magnitude_prune").finalize(model)
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in model.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert not any(m._forward_pre_hooks for m in model.modules())
    pruned = export(model, (1, 1, 32, 32), tmp_path / "pruned.onnx")
    dense = example_onnx
    g, g0 = onnx.load(str(pruned.path)).graph, onnx.load(str(dense.path)).graph
    assert sorted(n.op_type for n in g.node) == sorted(n.op_type for n in g0.node)  # no mask Mul ops
    assert len(g.initializer) == len(g0.initializer)
    conv_weights = [onnx.numpy_helper.to_array(i) for i in g.initializer if i.dims and len(i.dims) == 4]
    assert np.mean(np.concatenate([w.ravel() for w in conv_weights]) == 0) > 0.7


def test_magnitude_recipe_records_nonzero_params(splits):
    recipe = recipe_from_dict({"steps": [{"technique": "magnitude_prune", "sparsity": 0.5, "scope": "layer"}]})
    _, [rec] = apply_recipe(_fresh(), recipe, splits)
    total = sum(m.weight.numel() for m in _convs_and_linears(_fresh()).values())
    assert rec["before"]["params"] == rec["after"]["params"]
    assert rec["before"]["nonzero_params"] - rec["after"]["nonzero_params"] == pytest.approx(total / 2, abs=20)


# ---------------------------------------------------------------------------------------------------------
# unstructured: Taylor and regularised


def test_taylor_scores_are_weight_times_gradient(splits):
    from edgepipe.compress.prune import taylor_scores

    model = _fresh()
    layers = {"fc": model.fc}
    scores = taylor_scores(model, layers, _ctx(splits), batches=1, batch_size=32)
    idx = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:32].numpy()
    ref = _fresh()
    nn.functional.cross_entropy(ref(torch.from_numpy(splits.train.x[idx])), torch.from_numpy(splits.train.y[idx])).backward()
    assert torch.allclose(scores[model.fc], (ref.fc.weight * ref.fc.weight.grad).abs(), atol=1e-7)
    assert model.fc.weight.grad is None  # gradients cleared


def test_taylor_prune_reaches_sparsity_and_differs_from_magnitude(splits):
    taylor = _apply("taylor_prune", {"sparsity": 0.7, "batches": 2}, splits)
    magnitude = _apply("magnitude_prune", {"sparsity": 0.7}, splits)
    t_w = [m.weight for m in _convs_and_linears(taylor).values()]
    m_w = [m.weight for m in _convs_and_linears(magnitude).values()]
    assert _zero_fraction(t_w) == pytest.approx(0.7, abs=1e-3)
    differ = sum(int(((a == 0) != (b == 0)).sum()) for a, b in zip(t_w, m_w, strict=True))
    assert differ > 0.05 * sum(w.numel() for w in t_w)


def test_l1_regularised_training_shrinks_weights_then_prunes(splits):
    base = torch.cat([m.weight.detach().abs().ravel() for m in _convs_and_linears(_fresh()).values()]).mean()
    model = _apply("regularized_prune", {"penalty": "l1", "strength": 1e-3, "sparsity": 0.8}, splits,
                   max_batches=4, lr=2e-3)
    weights = [m.weight for m in _convs_and_linears(model).values()]
    assert _zero_fraction(weights) == pytest.approx(0.8, abs=1e-3)
    trained = torch.cat([m.weight_orig.detach().abs().ravel() for m in _convs_and_linears(model).values()]).mean()
    assert trained < 0.9 * base  # the penalty pulled weights toward zero


def test_group_lasso_zeroes_whole_output_channels(splits):
    model = _apply("regularized_prune", {"penalty": "group_lasso", "strength": 1e-3, "sparsity": 0.3},
                   splits, max_batches=2)
    assert not hasattr(model.fc, "weight_orig")  # the classifier is left out: every class keeps its row
    convs = [m for n, m in _convs_and_linears(model).items() if n != "fc"]
    dead = sum(int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in convs)
    total = sum(m.out_channels for m in convs)
    assert dead == pytest.approx(0.3 * total, abs=1)
    for m in convs:  # a channel is either all zero or not touched
        rows = m.weight.flatten(1)
        assert torch.all((rows == 0).all(1) | (rows != 0).any(1))


# ---------------------------------------------------------------------------------------------------------
# structured


def _channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "bn_scale", "lamp"])
def test_structured_shrinks_every_layer_to_multiples_of_round_to(splits, importance):
    before = _channels(_fresh())
    model = _apply("structured_prune", {"ratio": 0.5, "round_to": 8, "importance": importance, "batches": 1},
                   splits)
    after = _channels(model)
    assert all(after[n] == before[n] // 2 and after[n] % 8 == 0 for n in before), after
    assert model.fc.out_features == 10 and model.fc.in_features == 32
    y = model(torch.from_numpy(splits.test.x[:4]))  # residual adds still line up
    assert y.shape == (4, 10)


def test_structured_global_scope_prunes_unevenly(splits):
    model = _apply("structured_prune", {"ratio": 0.5, "scope": "global", "max_ratio": 0.8}, splits)
    before, after = _channels(_fresh()), _channels(model)
    ratios = {round(after[n] / before[n], 2) for n in before}
    assert len(ratios) > 1
    assert sum(after.values()) < 0.75 * sum(before.values())


def test_structured_layer_ratio_and_ignored_layers(splits):
    model = _apply("structured_prune", {"ratio": 0.5, "layers": {"layer3.0.conv1": 0.75},
                                        "ignored_layers": ["stem.0"]}, splits)
    after = _channels(model)
    assert after["layer3.0.conv1"] == 16  # 64 * (1 - 0.75)
    assert after["stem.0"] == 16  # ignored: all 16 output channels kept
    assert after["layer2.0.conv1"] == 16


def test_structured_graph_exports_smaller_and_matches_torch(splits, tmp_path, example_onnx):
    from edgepipe.export import check_parity, export, parity

    model = _apply("structured_prune", {"ratio": 0.5, "round_to": 8}, splits)
    small = export(model, (1, 1, 32, 32), tmp_path / "small.onnx")
    big = example_onnx
    assert small.path.stat().st_size < 0.4 * big.path.stat().st_size
    conv_out = sorted({i.dims[0] for i in onnx.load(str(small.path)).graph.initializer if len(i.dims) == 4})
    assert max(conv_out) == 32 and all(c % 8 == 0 for c in conv_out)
    check_parity(parity(model, small, splits.test.x[:64]))


@pytest.mark.slow
def test_finetune_with_distillation_recovers_structured_accuracy(splits):
    params = {"ratio": 0.5, "round_to": 8}
    hurt = _ctx(splits).top1(_apply("structured_prune", params, splits))
    # batch 32: one epoch of the train split (60 % of digits) is 34 steps, enough for the student to recover
    recipe = recipe_from_dict({"finetune": {"epochs": 1, "lr": 3e-3, "batch_size": 32}, "distill": {"kind": "soft"},
                               "steps": [{"technique": "structured_prune", **params, "finetune": True}]})
    _, [rec] = apply_recipe(_fresh(), recipe, splits)
    assert rec["distill"] == "soft" and rec["after"]["macs"] < 0.3 * rec["before"]["macs"]
    assert hurt < 0.5 and rec["after"]["top1"] > 0.85, (hurt, rec["after"]["top1"])


# ---------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(("step", "message"), [
    ({"technique": "magnitude_prune", "sparsity": 1.0}, r"sparsity = 1.0: must be in \[0, 1\)"),
    ({"technique": "magnitude_prune", "sparsity": -0.1}, r"sparsity = -0.1: must be in \[0, 1\)"),
    ({"technique": "magnitude_prune", "layers": {"fc": 1.5}}, r"layers.'fc' = 1.5: must be in \[0, 1\)"),
    ({"technique": "magnitude_prune"}, "give sparsity"),
    ({"technique": "magnitude_prune", "sparsity": 0.5, "threshold": 0.1}, "give one, not both"),
    ({"technique": "structured_prune", "ratio": 1.0}, r"ratio = 1.0: must be in \[0, 1\)"),
    ({"technique": "structured_prune", "round_to": 0}, "round_to = 0"),
    ({"technique": "structured_prune", "importance": "hessian"}, "choose one of 'magnitude'"),
    ({"technique": "taylor_prune", "threshold": 0.1}, "give sparsity instead"),
    ({"technique": "regularized_prune", "sparsity": 0.5, "penalty": "l3"}, "choose one of 'l1'"),
])
def test_bad_parameters_fail_when_the_recipe_loads(step, message):
    with pytest.raises(ConfigError, match=r"steps\[0\] \(" + step["technique"] + r"\): .*" + message):
        recipe_from_dict({"steps": [step]})


@pytest.mark.parametrize("name", ["magnitude_prune", "structured_prune", "taylor_prune"])
def test_ignored_layer_that_does_not_exist_names_the_ones_that_do(splits, name):
    params = {"sparsity": 0.5} if name != "structured_prune" else {}
    with pytest.raises(ConfigError, match=r"ignored_layers: no layer named 'layer9.conv'.*layers that exist.*"
                                          r"stem, stem.0, stem.1"):
        _apply(name, {**params, "ignored_layers": ["layer9.conv"]}, splits)


def test_ratio_for_a_layer_that_is_not_prunable(splits):
    with pytest.raises(ConfigError, match=r"layers: no layer named 'layer1.0.bn1'.*prunable layers.*stem.0"):
        _apply("magnitude_prune", {"layers": {"layer1.0.bn1": 0.5}}, splits)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


BAD_RECIPES = {
    "unknown technique": ('[[steps]]\ntechnique = "magnitude_prunne"\nsparsity = 0.5\n',
                          "unknown technique 'magnitude_prunne'; known techniques: "),
    "teacher of another shape": ('[distill]\nteacher = "wide_teacher:make"\n[finetune]\nepochs = 1\n'
                                 '[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.5\nfinetune = true\n',
                                 "teacher output shape (1, 12) differs from the student's (1, 10)"),
    "ratio out of range": ('[[steps]]\ntechnique = "structured_prune"\nratio = 1.2\n', "ratio = 1.2: must be in [0, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_compress_cli_bad_recipe_one_line_nothing_written(case, tmp_path, monkeypatch):
    text, expected = BAD_RECIPES[case]
    (tmp_path / "wide_teacher.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 12))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "bad.toml").write_text(text)
    out = tmp_path / "out" / "model.pt2"
    line = _one_error_line(_cli("compress", "--recipe", str(tmp_path / "bad.toml"), "--out", str(out)))
    assert expected in line, line
    if case == "unknown technique":
        assert all(t in line for t in ("magnitude_prune", "regularized_prune", "structured_prune", "taylor_prune"))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_compress_with_a_missing_ignored_layer_writes_nothing(tmp_path):
    from edgepipe import api

    (tmp_path / "bad.toml").write_text('[[steps]]\ntechnique = "structured_prune"\nignored_layers = ["head"]\n')
    out = tmp_path / "out" / "model.pt2"
    with pytest.raises(ConfigError, match=r"steps\[0\] \(structured_prune\): ignored_layers: no layer named 'head' "
                                          r"in the model; layers that exist"):
        api.compress(None, tmp_path / "bad.toml", out=out)
    assert not out.parent.exists() or not any(out.parent.iterdir())


# ---------------------------------------------------------------------------------------------------------
# recipes and the whole pipeline


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path.stem)
    assert recipe.steps and recipe.name == path.stem


@pytest.mark.slow
def test_build_with_recipe_carries_compression_records(tmp_path):
    recipe = tmp_path / "small.toml"
    recipe.write_text('[finetune]\nepochs = 1\nlr = 3e-3\nbatch_size = 32\n[distill]\nkind = "soft"\n'
                      '[[steps]]\ntechnique = "structured_prune"\nratio = 0.5\nround_to = 8\nfinetune = true\n'
                      '[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.5\n')
    r = _cli("build", "--recipe", str(recipe), "--target", "cpu-int8", "--out", str(tmp_path / "dist"),
             "--no-bench", "--allow-accuracy-drop", "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "dist" / "cpu-int8" / "manifest.json").read_text())
    structured, magnitude = manifest["compression"]
    assert structured["technique"] == "structured_prune" and structured["distill"] == "soft"
    assert structured["after"]["params"] < 0.3 * structured["before"]["params"]
    assert magnitude["after"]["nonzero_params"] < 0.6 * magnitude["before"]["nonzero_params"]
    assert structured["after"]["top1"] > 0.8  # distillation recovered the pruned model
    assert manifest["inputs"]["recipe"]
    acc = manifest["accuracy"]
    assert acc["compressed"] == pytest.approx(magnitude["after"]["top1"] * 100)  # the compressed model, validation
    # the reference is the original model, not the compressed one: fp32 on onnxruntime, same validation split
    assert acc["validation_reference"] == pytest.approx(structured["before"]["top1"] * 100, abs=1)
    assert acc["validation_drop"] == pytest.approx(acc["validation_reference"] - acc["validation_value"], abs=1e-3)
    src = onnx.load(str(tmp_path / "dist" / "cpu-int8" / "source.onnx"))
    assert max(i.dims[0] for i in src.graph.initializer if len(i.dims) == 4) == 32  # the shrunk graph shipped


def test_compress_writes_a_pt2_of_the_shrunk_model(tmp_path):
    from edgepipe import api
    from edgepipe.models import load_model

    recipe = tmp_path / "s.toml"
    recipe.write_text('[[steps]]\ntechnique = "structured_prune"\nratio = 0.5\nround_to = 8\n')
    path, [rec] = api.compress(None, recipe, out=tmp_path / "small.pt2")
    module = load_model(str(path), trust_code=True).module
    assert module is not None
    assert sum(p.numel() for p in module.parameters()) == rec["after"]["params"] < 0.3 * rec["before"]["params"]
