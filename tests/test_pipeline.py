"""The spine end to end: `edgepipe build` on the bundled example through onnxruntime."""

from __future__ import annotations

import json

import pytest

from edgepipe import api
from edgepipe.errors import BudgetError, ConfigError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return out, api.build(None, ["cpu-int8", "cpu-fp32"], out=out, iterations=20)


def _calibration_split_sha256(samples: int, seed: int) -> str:
    """The hash of the calibration samples the digits split gives for these settings."""
    from edgepipe._hashing import sha256_arrays
    from edgepipe.pipeline.stages import data_splits

    return sha256_arrays(data_splits("digits", (1, 1, 32, 32), samples, seed).calibration.x)


def test_build_releases_artifact_source_and_manifest(built):
    out, result = built
    assert sorted(p.name for p in out.iterdir()) == ["cpu-fp32", "cpu-int8"]
    d = out / "cpu-int8"
    assert sorted(p.name for p in d.iterdir()) == ["calibration.json", "manifest.json", "model.int8.onnx",
                                                   "report.html", "source.onnx"]
    by = {r.manifest.name: r for r in result.results}
    assert by["cpu-int8"].release_dir == d
    report = (d / "report.html").read_text()
    acc = by["cpu-int8"].manifest.accuracy
    assert "cpu-int8" in report and acc.format(acc.value) in report and "SQNR vs fp32" in report
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema"] == 3
    for key in ("inputs", "tools", "stages", "accuracy", "latency", "artifact", "budgets", "signature", "fidelity"):
        assert m[key], key
    assert m["inputs"]["model"]["sha256"] and m["inputs"]["data"]["sha256"] and m["inputs"]["target"]
    assert m["inputs"]["data"]["splits"] == {"train": 1079, "calibration": 256, "validation": 359, "test": 359}
    assert m["tools"]["onnxruntime"] and m["tools"]["torch"].startswith("2.13.0")
    assert [s["name"] for s in m["stages"]] == ["compress", "export", "compile", "evaluate", "bench"]
    assert m["stages"][0]["skipped"] == "no recipe" and m["compression"] is None
    for s in m["stages"]:
        assert {"name", "inputs", "output_sha256"} <= set(s), s["name"]
        assert "seconds" not in s and "cached" not in s  # how this run went is not part of the release
    export, compile_, evaluate = m["stages"][1:4]
    assert export["parity"]["top1_agreement"] == 1.0
    assert compile_["inputs"]["onnx"] == export["output_sha256"] == m["source_onnx"]["sha256"]
    assert evaluate["metric"] == m["accuracy"]["metric"] == "top1"
    assert evaluate["test"] == m["accuracy"]["value"] and evaluate["validation"] == m["accuracy"]["validation_value"]
    assert m["signature"]["inputs"] == [{"name": "input", "shape": ["batch", 1, 32, 32], "dtype": "float32"}]
    assert [o["name"] for o in m["signature"]["outputs"]] == ["logits"]
    fid = m["fidelity"]
    assert len(fid["sqnr_db"]) == 1 and 15 < fid["sqnr_db"][0] < 200 and 0 <= fid["flip_rate"] <= 2
    lat = m["latency"]
    assert lat["iterations"] == 20 and lat["p50_ms"] <= lat["p99_ms"] and lat["peak_rss_above_baseline_mb"] > 0
    from edgepipe._hashing import sha256_file

    assert m["artifact"]["files"][0]["sha256"] == sha256_file(d / "model.int8.onnx")


def test_calibration_is_recorded_with_its_method(built):
    """calibration.json says which samples calibrated (count and hash) and how; the manifest agrees."""
    out, result = built
    for r in result.results:
        t = r.manifest.target.calibration
        calib = json.loads((r.release_dir / "calibration.json").read_text())
        assert calib["samples"] == t.samples == 256
        assert calib["sha256"] == _calibration_split_sha256(t.samples, t.seed)
        assert calib["method"] == t.method == r.manifest.inputs["calibration_method"]
    int8 = next(r for r in result.results if r.manifest.name == "cpu-int8")
    recorded = int8.manifest.artifact.metadata["calibration"]  # what the backend calibrated with
    assert {k: recorded[k] for k in ("samples", "sha256", "method")} == {
        k: json.loads((int8.release_dir / "calibration.json").read_text())[k] for k in ("samples", "sha256", "method")}


def test_calibration_settings_of_the_target_reach_the_release(tmp_path):
    """Not the defaults: another method, sample count and seed are what calibrated, and what is recorded."""
    toml = tmp_path / "pct.toml"
    toml.write_text('backend = "onnxruntime"\nprecision = "int8"\n[calibration]\nmethod = "percentile"\n'
                    'samples = 64\nseed = 3\n')
    r = api.build(None, [str(toml)], out=tmp_path / "dist", bench=False).results[0]
    calib = json.loads((r.release_dir / "calibration.json").read_text())
    assert calib["method"] == "percentile" == r.manifest.inputs["calibration_method"]
    assert calib["samples"] == 64 and calib["sha256"] == _calibration_split_sha256(64, 3)
    assert calib["sha256"] != _calibration_split_sha256(64, 0)  # the seed chose the samples
    assert r.manifest.artifact.metadata["calibration"]["method"] == "percentile"


def test_int8_accuracy_within_one_point_of_fp32_and_at_least_95(built):
    _, result = built
    by = {r.manifest.name: r.manifest.accuracy for r in result.results}
    assert by["cpu-int8"].metric == "top1" and by["cpu-int8"].unit == "%" and by["cpu-int8"].value >= 95
    assert by["cpu-int8"].drop <= 1.0 and by["cpu-int8"].validation_drop <= 1.0
    assert by["cpu-fp32"].value == by["cpu-fp32"].reference and by["cpu-fp32"].drop == 0
    assert by["cpu-fp32"].validation_value == by["cpu-fp32"].validation_reference
    assert by["cpu-int8"].reference == by["cpu-fp32"].value  # one reference: the original model in fp32
    assert by["cpu-int8"].compressed is None  # no recipe
    assert by["cpu-int8"].dataset == "digits:test" and by["cpu-int8"].samples == 359


def test_same_inputs_give_identical_artifacts_and_hashes(built, tmp_path):
    out, first = built
    again = api.build(None, ["cpu-int8"], out=tmp_path, bench=False, cache=False)
    a = next(r.manifest for r in first.results if r.manifest.name == "cpu-int8")
    b = again.results[0].manifest
    assert a.artifact.files == b.artifact.files
    assert a.source_onnx == b.source_onnx
    assert a.inputs == b.inputs
    hashes = lambda m: [(s.name, s.output_sha256) for s in m.stages if s.name != "bench"]  # noqa: E731
    assert hashes(a) == hashes(b)


def test_second_build_reuses_the_cache(tmp_path, monkeypatch):
    import edgepipe.evaluate
    import edgepipe.export
    from edgepipe.backends.onnxruntime import OnnxRuntimeBackend

    api.build(None, ["cpu-int8"], out=tmp_path / "a", bench=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a stage ran again instead of coming from the cache")

    for owner, name in ((edgepipe.export, "export"), (edgepipe.evaluate, "top1"), (OnnxRuntimeBackend, "_compile")):
        monkeypatch.setattr(owner, name, must_not_run)
    api.build(None, ["cpu-int8"], out=tmp_path / "b", bench=False)
    # and a cached stage leaves the same release, byte for byte
    for name in ("manifest.json", "model.int8.onnx", "source.onnx", "calibration.json"):
        assert (tmp_path / "a" / "cpu-int8" / name).read_bytes() == (tmp_path / "b" / "cpu-int8" / name).read_bytes()


@pytest.fixture(scope="module")
def onnx_with_recipe(built, tmp_path_factory):
    """The released ONNX built again with a recipe: (build result, what the reporter was told)."""
    from edgepipe._progress import NullReporter

    out, _ = built
    tmp = tmp_path_factory.mktemp("onnx-recipe")
    recipe = tmp / "r.toml"
    recipe.write_text('[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.5\n')
    rep = NullReporter()
    r = api.build(str(out / "cpu-fp32" / "source.onnx"), ["cpu-int8"], out=tmp / "o", bench=False,
                  recipe=str(recipe), reporter=rep)
    return r, rep.notes


def test_onnx_model_source_skips_compression(onnx_with_recipe):
    r, told = onnx_with_recipe
    m = r.results[0].manifest
    assert m.inputs["model"]["kind"] == "onnx" and m.inputs["recipe"] is None and m.compression is None
    assert m.stages[0].name == "compress" and m.stages[0].skipped == "model is already ONNX"
    assert any("compression recipe skipped" in n for n in told)


def test_onnx_model_source_skip_is_in_the_build_notes(onnx_with_recipe):
    r, _ = onnx_with_recipe
    assert any("compression recipe skipped" in n for n in r.notes)


OUTLIER_MODEL = """
import numpy as np
import torch
from edgepipe.data import digits, split


def make():
    \"\"\"A least-squares digit classifier plus one hidden unit 10^4 times larger than the rest.

    fp32 ignores the outlier (its output weight is 0), but int8 gives the whole hidden tensor one
    scale, so the real units round to zero: a model that int8 quantization ruins, on purpose.
    \"\"\"
    s = split(digits((1, 32, 32)))
    x = s.train.x.reshape(len(s.train.x), -1)
    y = np.eye(10)[s.train.y]
    w = np.linalg.solve(x.T @ x + 1e-1 * np.eye(x.shape[1]), x.T @ y).T
    fc1 = torch.nn.Linear(1024, 11)
    fc2 = torch.nn.Linear(11, 10)
    with torch.no_grad():
        fc1.weight[:10] = torch.from_numpy(w).float()
        fc1.weight[10] = 1e4
        fc1.bias.zero_()
        fc2.weight.copy_(torch.cat([torch.eye(10), torch.zeros(10, 1)], 1))
        fc2.bias.zero_()
    return torch.nn.Sequential(torch.nn.Flatten(), fc1, fc2)
"""


def test_accuracy_budget_fails_the_build_and_releases_nothing(tmp_path, monkeypatch):
    (tmp_path / "outlier_model.py").write_text(OUTLIER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BudgetError, match=r"top1 .* points worse than .* over the budget of 1.0"):
        api.build("outlier_model:make", ["cpu-int8"], out=tmp_path / "dist", bench=False)
    assert not (tmp_path / "dist" / "cpu-int8").exists()
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
    r = api.build("outlier_model:make", ["cpu-int8"], out=tmp_path / "dist", bench=False, allow_accuracy_drop=True)
    m = r.results[0].manifest
    assert m.accuracy.reference > 85 and m.accuracy.drop > 1.0
    budget = m.budgets["max_metric_drop"]  # judged on the validation split, in the metric's units
    assert budget.ok is False and budget.value == m.accuracy.validation_drop > 1.0


def test_unknown_target_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown target"):
        api.build(None, ["cpu-int8", "nope"], out=tmp_path)
    assert not list(tmp_path.iterdir())


def test_targets_listing():
    rows = {r.name: r for r in api.targets()}
    assert rows["cpu-int8"].backend == "onnxruntime" and rows["cpu-int8"].can_compile and rows["cpu-int8"].can_run
