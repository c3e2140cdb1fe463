"""Every compression technique on models of any signature (issue 28, "compress"), parametrized over the registry.

The models are the seeded task models of :mod:`edgepipe.models.tasks`, with data whose targets are each model's
own answers: a two-input image + vector classifier (labelled: cross-entropy; unlabelled: distillation), a
segmenter (per-pixel scores [N, 4, 32, 32], masks as ``y``: distillation), an int64-token transformer (Linear and
Embedding layers) and a two-output detector. Each case applies a one-step recipe and checks that every output
keeps its shape, that the parameters change as the technique says, that the fine-tune lowered the loss it
minimises on the data it trained on (cross-entropy on the labels, or the distillation loss against the original)
and kept the outputs close to the original's, and that the step record names what it measured.

The fidelity bound, 15 dB of SQNR on the validation split (noise power at most 3 % of the signal's), has margin
under what these settings reach (19-30 dB measured: 50 % sparsity, ranks keeping 80 % of the energy, 3-bit
sharing, a quarter of the weights hashed) and is far above what a broken step gives (0 dB or less).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.compress import apply_recipe, techniques
from edgepipe.compress._inputs import as_inputs, predict, run
from edgepipe.config.recipe import DistillConfig, FinetuneConfig, Recipe, Step
from edgepipe.data import Dataset, split
from edgepipe.errors import ConfigError
from edgepipe.models.tasks import TASKS

FT = FinetuneConfig(epochs=2, batch_size=32, lr=1e-3)
HASHING_FT = FinetuneConfig(epochs=3, batch_size=32, lr=3e-3)
SQNR_FLOOR_DB = 15.0

STUDENTS = '''
import torch
from torch import nn


class SmallImageVector(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(8 + 8, 10)

    def forward(self, image, feats):
        return self.fc(torch.cat([self.conv(image), feats], dim=1))


class ImageOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))

    def forward(self, image):
        return self.fc(image)


class SmallSegmenter(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, image):
        return self.net(image)


def small_image_vector():
    return SmallImageVector()


def image_only():
    return ImageOnly()


def small_segmenter():
    return SmallSegmenter()


def three_class_segmenter():
    return SmallSegmenter(3)
'''

# one step of each technique, at settings that compress these tiny models by about half
PARAMS: dict[str, dict] = {
    "magnitude_prune": {"sparsity": 0.5},
    "taylor_prune": {"sparsity": 0.5, "batches": 2, "batch_size": 32},
    "regularized_prune": {"sparsity": 0.5, "epochs": 1},
    "structured_prune": {"ratio": 0.5},
    "lowrank": {"energy": 0.8},
    "weight_share": {"bits": {"conv": 3, "linear": 3}},
    "hashing": {"ratio": 0.25, "conv": True},
    "student": {"model": "anystudents:small_segmenter"},
}
STUDENT_FOR = {"image_vector": "anystudents:small_image_vector", "segmenter": "anystudents:small_segmenter"}
SPARSE = ("magnitude_prune", "taylor_prune", "regularized_prune")


def _splits(task: str, labels: bool = True):
    d = TASKS[task].data()
    x = {k: d.pop(k) for k in TASKS[task].shapes}
    y = d.pop("y", None)
    if not labels:
        return split(Dataset(f"{task}-unlabelled", x, None, {}), 64)
    return split(Dataset(task, x, y, d), 64)


_SPLITS: dict[tuple[str, bool], object] = {}


def _data(case: str):
    task, _, rest = case.partition("-")
    key = (task, rest != "unlabelled")
    if key not in _SPLITS:
        _SPLITS[key] = _splits(*key)
    return task, _SPLITS[key]


# (model, labels): the two-input classifier with and without labels, the segmenter, int64 tokens (every technique
# that applies to Linear/Embedding layers; a student needs a token architecture of its own)
CASES = [(case, name) for case in ("image_vector", "image_vector-unlabelled", "segmenter", "tokens")
         for name in sorted(techniques())
         if not (name == "student" and case not in STUDENT_FOR)]


@pytest.fixture
def students(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "anystudents.py").write_text(STUDENTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("anystudents", None)


def _recipe(name: str, task: str, finetune: bool) -> Recipe:
    params = dict(PARAMS[name])
    if name == "student":
        params["model"] = STUDENT_FOR[task]
    # hashed layers start far from the weights they replace: their fine-tune is the shipped recipe's (lr 3e-3)
    ft = HASHING_FT if name == "hashing" else FT
    return Recipe([Step(techniques()[name].config(**params), finetune=ft if finetune else False)], finetune=FT)


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _train_loss(model: nn.Module, original: nn.Module, splits, classifier: bool) -> float:
    """The loss the fine-tune minimises, on the training split: cross-entropy on the labels for a labelled
    classifier, else each output's MSE over the original output's mean square (KL for class scores)."""
    from edgepipe.compress.distill import match_outputs

    x = as_inputs(model, splits.train.x)
    with torch.no_grad():
        s, t = run(model.eval(), x), run(original.eval(), x)
        if classifier:
            return float(nn.functional.cross_entropy(s[0], torch.from_numpy(splits.train.y)))
        return float(match_outputs(s, t, 4.0))


def _sqnr(model: nn.Module, original: nn.Module, splits) -> list[float]:
    from edgepipe.metrics import sqnr_per_output

    return sqnr_per_output(predict(model, splits.validation.x), predict(original, splits.validation.x))


@pytest.mark.parametrize(("case", "name"), CASES)
def test_every_technique_compresses_any_model(case, name, students):
    task, splits = _data(case)
    original = TASKS[task].module()
    classifier = case in ("image_vector", "tokens")
    shapes = [o.shape[1:] for o in predict(original, splits.validation.x)]

    plain, [no_ft] = apply_recipe(TASKS[task].module(), _recipe(name, task, finetune=False), splits)
    model, [rec] = apply_recipe(TASKS[task].module(), _recipe(name, task, finetune=True), splits)

    # every output keeps its shape: a classifier's classes, the segmenter's 4 channels per pixel
    assert [o.shape[1:] for o in predict(model, splits.validation.x)] == shapes
    before, after = rec["before"], rec["after"]

    # the parameters change as the technique says
    if name in SPARSE:  # half of every pruned layer's weights are zero, the tensors keep their shapes
        assert after["params"] == before["params"]
        weights = torch.cat([m.weight.detach().reshape(-1) for m in _layers(model)
                             if not (task == "tokens" and m is model.enc.layers[0].self_attn.out_proj)])
        assert float((weights == 0).float().mean()) >= 0.45
        assert after["nonzero_params"] < before["nonzero_params"]
    elif name == "structured_prune":  # channels removed: the graph really shrinks
        assert after["params"] < 0.75 * before["params"] and after["macs"] < 0.75 * before["macs"]
    elif name == "lowrank":
        assert after["params"] < before["params"]
        assert any(isinstance(m, nn.Sequential) and len(m) >= 2 and all(isinstance(c, nn.Linear | nn.Conv2d) for c in m)
                   for m in model.modules())
    elif name == "weight_share":  # 3 bits: at most 8 distinct non-zero values in every shared layer
        assert after["params"] == before["params"]
        shared = [m for m in _layers(model) if isinstance(m, nn.Linear | nn.Conv2d)]
        assert shared and all(len(torch.unique(m.weight[m.weight != 0])) <= 8 for m in shared)
    elif name == "hashing":  # a quarter of each hashed layer's weights are real: its |w| take that many values
        assert after["params"] == before["params"]
        hashed = [m for m in model.modules() if hasattr(m, "edgepipe_hash")]
        assert hashed and all(len(torch.unique(m.weight.abs())) <= m.edgepipe_hash.buckets for m in hashed)
        assert all(m.edgepipe_hash.buckets <= math.ceil(0.25 * m.weight.numel()) for m in hashed)
    elif name == "student":
        student = sum(p.numel() for p in plain.parameters())
        assert after["params"] == student < before["params"]

    # the step record names what it measured: top-1 for a labelled classifier, else the SQNR of every output
    assert rec["measure"] == after["measure"] == before["measure"]
    if classifier:
        assert rec["measure"] == "top1" and 0 <= after["top1"] <= 1 and "cross-entropy" in rec["objective"]
    else:
        assert rec["measure"] == "sqnr_db" and "top1" not in after and "distillation" in rec["objective"]
        assert len(after["sqnr_db"]) == len(shapes) and before["sqnr_db"] == [200.0] * len(shapes)
        assert after["sqnr_db"] == pytest.approx(_sqnr(model, original, splits), abs=1e-3)

    # the fine-tune lowered the loss it minimises, and the outputs stay close to the original's
    loss_plain = _train_loss(plain, original, splits, classifier)
    loss_tuned = _train_loss(model, original, splits, classifier)
    assert loss_tuned < loss_plain, (loss_plain, loss_tuned)
    if not classifier and name != "student":  # a student starts from its own random weights
        tuned, untuned = min(_sqnr(model, original, splits)), min(_sqnr(plain, original, splits))
        if task == "segmenter":  # its objective is the normalised MSE, which the SQNR measures
            assert tuned > SQNR_FLOOR_DB, (untuned, tuned)
        else:  # class scores are matched by KL, which ignores a shift of all logits: the SQNR must not fall
            assert tuned > untuned, (untuned, tuned)


def test_a_record_names_the_builds_metric_when_there_is_one():
    from edgepipe.pipeline.stages import Scorer

    _, splits = _data("segmenter")
    recipe = _recipe("structured_prune", "segmenter", finetune=True)
    _, [rec] = apply_recipe(TASKS["segmenter"].module(), recipe, splits, scorer=Scorer("miou"))
    assert rec["measure"] == "miou" and rec["before"]["miou"] == pytest.approx(100.0)  # the masks are its answers
    assert 25 < rec["after"]["miou"] < 100 and rec["after"]["unit"] == "%"  # 4 classes: chance is far below 25
    assert len(rec["after"]["sqnr_db"]) == 1  # the fidelity is recorded beside it


def test_explicit_distillation_handles_several_outputs():
    """A [distill] table on a two-output detector: the distillation term of every output (no class labels)."""
    r = np.random.default_rng(0)
    x = {"image": r.random((160, 3, 32, 32), dtype=np.float32)}
    splits = split(Dataset("det", x, None, {}), 64)
    original = TASKS["detector"].module()
    recipe = Recipe([Step(techniques()["structured_prune"].config(ratio=0.5), finetune=True)], finetune=FT,
                    distill=DistillConfig(alpha=0.5))
    plain, _ = apply_recipe(TASKS["detector"].module(), Recipe([Step(recipe.steps[0].config)]), splits)
    model, [rec] = apply_recipe(TASKS["detector"].module(), recipe, splits)
    assert rec["distill"] == "soft" and "every output" in rec["objective"] and rec["measure"] == "sqnr_db"
    assert [o.shape for o in predict(model, x)] == [(160, 8, 4), (160, 8)]  # boxes and scores keep the head
    assert len(rec["after"]["sqnr_db"]) == 2
    assert _train_loss(model, original, splits, False) < _train_loss(plain, original, splits, False)


def test_label_free_taylor_importance_keeps_what_matters():
    """Without labels, Taylor pruning ranks weights by a random projection of the outputs: at 50 % sparsity (no
    fine-tune) the segmenter keeps more of its outputs than magnitude pruning does."""
    _, splits = _data("segmenter")
    original = TASKS["segmenter"].module()
    taylor, _ = apply_recipe(TASKS["segmenter"].module(), _recipe("taylor_prune", "segmenter", False), splits)
    magnitude, _ = apply_recipe(TASKS["segmenter"].module(), _recipe("magnitude_prune", "segmenter", False), splits)
    assert _sqnr(taylor, original, splits)[0] > _sqnr(magnitude, original, splits)[0] + 2


@pytest.mark.parametrize(("task", "student", "message"), [
    ("image_vector", "anystudents:image_only", r"steps\[0\] \(student\): model = 'anystudents:image_only' takes "
                                               r"inputs \(image\), the model \(image, feats\)"),
    ("segmenter", "anystudents:three_class_segmenter", r"steps\[0\] \(student\): model = "
                                                       r"'anystudents:three_class_segmenter' outputs \(1, 3, 32, 32\), "
                                                       r"the model \(1, 4, 32, 32\)"),
])
def test_a_student_that_does_not_fit_the_model_is_refused_in_one_line(task, student, message, students):
    _, splits = _data(task)
    recipe = Recipe([Step(techniques()["student"].config(model=student), finetune=True)], finetune=FT)
    with pytest.raises(ConfigError, match=message) as e:
        apply_recipe(TASKS[task].module(), recipe, splits)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("task", ["segmenter", "detector"])
def test_the_default_searchs_compression_candidate_applies_to_a_non_classifier(task):
    """recipes/search/default.toml's structured-50-distill-long: its [distill] soft term over every output."""
    from edgepipe.config.recipe import load_recipe
    from edgepipe.models import load_model
    from edgepipe.pipeline.cache import Cache
    from edgepipe.pipeline.stages import compress

    splits = _splits(task)
    src = load_model(f"edgepipe.models.tasks:{task}")
    out, record = compress(src, load_recipe("structured-50-distill-long"), splits, Cache(enabled=False))
    assert record.skipped is None and out.fp32_validation_top1 is None
    assert out.fp32_validation is not None and out.fp32_validation["measure"] == "sqnr_db"
    assert min(out.fp32_validation["value"]) > SQNR_FLOOR_DB
    ref = [o.shape for o in predict(src.module, splits.validation.x)]
    assert [o.shape for o in predict(out.module, splits.validation.x)] == ref


def test_a_two_input_model_builds_with_a_recipe_and_its_release_records_the_steps(tmp_path):
    """Through the api: compress (two inputs) -> export -> onnxruntime fp32 -> a release whose manifest holds the
    compress record with both steps."""
    from edgepipe import api

    data = tmp_path / "iv.npz"
    np.savez(data, **TASKS["image_vector"].data())
    recipe = tmp_path / "r.toml"
    recipe.write_text('[finetune]\nepochs = 2\nbatch_size = 32\n\n[[steps]]\ntechnique = "structured_prune"\n'
                      'ratio = 0.5\nfinetune = true\n\n[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.3\n')
    res = api.build("edgepipe.models.tasks:image_vector", ["cpu-fp32"], out=tmp_path / "dist", data=str(data),
                    input_shape={"image": (1, 3, 16, 16), "feats": (1, 8)}, recipe=str(recipe), bench=False,
                    allow_accuracy_drop=True)
    m = json.loads((res.results[0].release_dir / "manifest.json").read_text())
    steps = m["compression"]
    assert [s["technique"] for s in steps] == ["structured_prune", "magnitude_prune"]
    assert all(s["measure"] == "top1" and "top1" in s["after"] for s in steps)
    assert steps[0]["after"]["params"] < 0.75 * steps[0]["before"]["params"]
    assert steps[1]["after"]["nonzero_params"] < steps[1]["before"]["nonzero_params"]
    assert m["accuracy"]["compressed"] == pytest.approx(steps[-1]["after"]["top1"] * 100)
    assert [t["name"] for t in m["signature"]["inputs"]] == ["image", "feats"]
    assert next(s for s in m["stages"] if s["name"] == "compress")["steps"] == 2


@pytest.mark.parametrize("task", ["image_vector", "tokens"])
def test_the_cached_program_takes_every_input_at_its_dtype(task, tmp_path):
    """The compress stage saves a .pt2 for every input's shape and dtype (int64 token ids stay integers); a
    cache hit loads it and computes what the compressed module computed."""
    from edgepipe.models import load_model
    from edgepipe.pipeline.cache import Cache
    from edgepipe.pipeline.stages import compress

    splits = _splits(task)
    src = load_model(f"edgepipe.models.tasks:{task}")
    recipe = Recipe([Step(techniques()["magnitude_prune"].config(sparsity=0.5))], finetune=FT)
    cache = Cache(tmp_path / "cache")
    first, rec = compress(src, recipe, splits, cache)
    again, hit = compress(src, recipe, splits, cache)
    assert not rec.cached and hit.cached and again.fp32_validation_top1 == first.fp32_validation_top1
    want, got = predict(first.module, splits.validation.x), predict(again.module, splits.validation.x)
    assert len(got) == len(want) == 1 and np.allclose(got[0], want[0], atol=1e-5)


def test_a_segmenter_builds_with_a_recipe_and_records_its_metric(tmp_path):
    from edgepipe import api

    data = tmp_path / "seg.npz"
    np.savez(data, **TASKS["segmenter"].data())
    recipe = tmp_path / "r.toml"
    recipe.write_text('[finetune]\nepochs = 2\nbatch_size = 32\n\n[[steps]]\ntechnique = "structured_prune"\n'
                      'ratio = 0.5\nfinetune = true\n')
    res = api.build("edgepipe.models.tasks:segmenter", ["cpu-fp32"], out=tmp_path / "dist", data=str(data),
                    input_shape=(1, 3, 32, 32), recipe=str(recipe), metric="miou", bench=False,
                    allow_accuracy_drop=True)
    m = res.results[0].manifest
    (step,) = m.compression
    assert step["measure"] == "miou" and "distillation" in step["objective"]
    assert m.accuracy.metric == "miou" and m.accuracy.compressed == pytest.approx(step["after"]["miou"])


def test_edgepipe_compress_takes_a_segmenter_and_prints_what_it_measured(tmp_path):
    from click.testing import CliRunner

    from edgepipe.cli import cli

    data = tmp_path / "seg.npz"
    arrays = TASKS["segmenter"].data()
    np.savez(data, input=arrays["image"], y=arrays["y"])  # `edgepipe compress` reads one input as "input"
    recipe = tmp_path / "r.toml"
    recipe.write_text('[finetune]\nepochs = 1\nbatch_size = 32\n\n[[steps]]\ntechnique = "magnitude_prune"\n'
                      'sparsity = 0.5\nfinetune = true\n')
    args = ["compress", "edgepipe.models.tasks:segmenter", "--recipe", str(recipe), "--data", str(data),
            "--input-shape", "1,3,32,32", "--out", str(tmp_path / "small.pt2")]
    res = CliRunner().invoke(cli, args, catch_exceptions=False, env={"COLUMNS": "200"})  # the table unwrapped
    assert res.exit_code == 0, res.output
    assert "SQNR 200.0 ->" in res.output and "dB" in res.output and (tmp_path / "small.pt2").is_file()
    res = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    (step,) = json.loads(res.output)["steps"]
    assert step["measure"] == "sqnr_db" and step["after"]["sqnr_db"][0] > SQNR_FLOOR_DB


def test_edgepipe_compress_takes_a_two_input_model_by_its_input_names(tmp_path):
    """`edgepipe compress` reads the data by the forward's names at each input's shape, judges the step by
    --metric, and writes a .pt2 that takes both inputs; that .pt2 compresses again (with --trust-code)."""
    import torch
    from click.testing import CliRunner

    from edgepipe.cli import cli

    task = TASKS["image_vector"]
    data = tmp_path / "iv.npz"
    np.savez(data, **task.inputs())  # no labels: the step is judged by --metric (agreement needs none)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[finetune]\nepochs = 1\nbatch_size = 32\n\n[[steps]]\ntechnique = "magnitude_prune"\n'
                      'sparsity = 0.5\nfinetune = true\n')
    out = tmp_path / "small.pt2"
    args = ["compress", "edgepipe.models.tasks:image_vector", "--recipe", str(recipe), "--data", str(data),
            "--input-shape", "image=1,3,16,16", "--input-shape", "feats=1,8", "--metric", "agreement", "--json"]
    res = CliRunner().invoke(cli, [*args, "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (step,) = json.loads(res.output)["steps"]
    assert step["measure"] == "agreement" and step["after"]["nonzero_params"] < step["before"]["nonzero_params"]
    program = torch.export.load(str(out)).module()
    x = task.inputs(4, seed=3)
    logits = program(torch.from_numpy(x["image"]), torch.from_numpy(x["feats"]))
    assert tuple(logits.shape) == (4, task.module()(torch.zeros(1, 3, 16, 16), torch.zeros(1, 8)).shape[1])
    # compressing again starts from the factory with the .pt2's weights (code: only with --trust-code) ...
    again = tmp_path / "smaller.pt2"
    res = CliRunner().invoke(cli, [*args, "--weights", str(out), "--trust-code", "--out", str(again)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert again.is_file()
    # ... the .pt2 program itself has no layers left to take apart: one line says what to give instead
    res = CliRunner().invoke(cli, ["compress", str(out), *args[2:], "--trust-code", "--out", str(tmp_path / "no.pt2")])
    assert isinstance(res.exception, ConfigError) and not (tmp_path / "no.pt2").exists()
    assert "pkg.mod:factory --weights small.pt2 --trust-code" in str(res.exception)


@pytest.mark.parametrize("shapes, message", [
    (["img=1,3,16,16", "feats=1,8"], "--input-shape names img but the model's inputs are image, feats (no shape for image)"),
    (["1,3,16,16"], "--input-shape: one shape, but the model has 2 inputs (image, feats)"),
])
def test_edgepipe_compress_names_a_shape_that_does_not_fit_the_model(tmp_path, shapes, message):
    from click.testing import CliRunner

    from edgepipe.cli import cli

    out = tmp_path / "small.pt2"
    args = ["compress", "edgepipe.models.tasks:image_vector", "--recipe", "structured-50", "--out", str(out)]
    res = CliRunner().invoke(cli, [*args, *(a for s in shapes for a in ("--input-shape", s))])
    assert isinstance(res.exception, ConfigError) and message in str(res.exception), res.exception
    assert "target" not in str(res.exception).split(";")[0] and not out.exists()
