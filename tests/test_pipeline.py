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


def test_build_releases_artifact_source_and_manifest(built):
    out, result = built
    assert sorted(p.name for p in out.iterdir()) == ["cpu-fp32", "cpu-int8"]
    d = out / "cpu-int8"
    assert sorted(p.name for p in d.iterdir()) == ["calibration.json", "manifest.json", "model.int8.onnx",
                                                   "report.html", "source.onnx"]
    report = (d / "report.html").read_text()
    assert "cpu-int8" in report and f"{result.results[0].top1:.2%}" in report
    m = json.loads((d / "manifest.json").read_text())
    for key in ("inputs", "tools", "stages", "accuracy", "latency", "artifact", "budgets"):
        assert m[key], key
    assert m["inputs"]["model"]["sha256"] and m["inputs"]["data"]["sha256"] and m["inputs"]["target"]
    assert m["tools"]["onnxruntime"] and m["tools"]["torch"].startswith("2.13.0")
    assert [s["name"] for s in m["stages"]] == ["export", "compile"]
    assert m["stages"][0]["parity"]["top1_agreement"] == 1.0
    lat = m["latency"]
    assert lat["iterations"] == 20 and lat["p50_ms"] <= lat["p99_ms"] and lat["peak_rss_above_baseline_mb"] > 0
    from edgepipe._hashing import sha256_file

    assert m["artifact"]["files"][0]["sha256"] == sha256_file(d / "model.int8.onnx")
    assert m["calibration"] if "calibration" in m else m["artifact"]["metadata"]["calibration"]["samples"] == 256


def test_int8_accuracy_within_one_point_of_fp32_and_at_least_95(built):
    _, result = built
    by = {r.target.name: r.manifest["accuracy"] for r in result.results}
    assert by["cpu-int8"]["top1"] >= 0.95
    assert by["cpu-int8"]["drop_points"] <= 1.0
    assert by["cpu-fp32"]["top1"] == by["cpu-fp32"]["reference_top1"]


def test_same_inputs_give_identical_artifacts_and_hashes(built, tmp_path):
    out, first = built
    again = api.build(None, ["cpu-int8"], out=tmp_path, bench=False, cache=False)
    a, b = first.results[0].manifest, again.results[0].manifest
    assert a["artifact"]["files"] == b["artifact"]["files"]
    assert a["source_onnx"] == b["source_onnx"]
    assert a["inputs"] == b["inputs"]
    assert [s["output_sha256"] for s in a["stages"]] == [s["output_sha256"] for s in b["stages"]]


def test_second_build_reuses_the_cache(tmp_path):
    api.build(None, ["cpu-int8"], out=tmp_path / "a", bench=False)
    r = api.build(None, ["cpu-int8"], out=tmp_path / "b", bench=False)
    assert all(s["cached"] for s in r.results[0].manifest["stages"])


def test_onnx_model_source_skips_compression(built, tmp_path):
    out, _ = built
    recipe = tmp_path / "r.toml"
    recipe.write_text("")
    r = api.build(str(out / "cpu-fp32" / "source.onnx"), ["cpu-int8"], out=tmp_path / "o", bench=False,
                  recipe=str(recipe))
    assert r.results[0].manifest["inputs"]["model"]["kind"] == "onnx"
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
    with pytest.raises(BudgetError, match="over the budget of 1.0 points"):
        api.build("outlier_model:make", ["cpu-int8"], out=tmp_path / "dist", bench=False)
    assert not (tmp_path / "dist" / "cpu-int8").exists()
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())
    r = api.build("outlier_model:make", ["cpu-int8"], out=tmp_path / "dist", bench=False, allow_accuracy_drop=True)
    acc = r.results[0].manifest["accuracy"]
    assert acc["reference_top1"] > 0.85 and acc["drop_points"] > 1.0
    assert r.results[0].manifest["budgets"]["max_accuracy_drop"]["ok"] is False


def test_unknown_target_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown target"):
        api.build(None, ["cpu-int8", "nope"], out=tmp_path)
    assert not list(tmp_path.iterdir())


def test_targets_listing():
    rows = {r.name: r for r in api.targets()}
    assert rows["cpu-int8"].backend == "onnxruntime" and rows["cpu-int8"].can_compile and rows["cpu-int8"].can_run
