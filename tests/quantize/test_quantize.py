"""Equalization, bias correction, per-layer sensitivity and mixed precision, on real models through real
backends (the example; a small ReLU6 network whose channel ranges are badly balanced)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgepipe import backends
from edgepipe.config import load_target
from edgepipe.errors import ConfigError
from edgepipe.export import export
from edgepipe.pipeline import stages
from edgepipe.quantize import keep_float, layer_sensitivity
from edgepipe.quantize.equalize import equalize, fake_int8
from edgepipe.quantize.sensitivity import _logits
from edgepipe.types import Artifact, CalibrationSet


class _Relu6Net(nn.Module):
    """conv -> ReLU6 -> depthwise -> ReLU6 -> pointwise -> pool -> fc, with one depthwise channel whose
    weights are 50x the others' (the weight-range problem equalization exists for)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.dw.weight[3] *= 50.0
            self.pw.weight[:, 3] /= 50.0
            self.c1.weight *= 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.c1(x), 0, 6)
        x = torch.clamp(self.dw(x), 0, 6)
        x = self.pw(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def relu6_onnx(tmp_path_factory):
    return export(_Relu6Net().eval(), (1, 1, 32, 32), tmp_path_factory.mktemp("relu6") / "relu6.onnx")


def _weights_int8(src: Path, out: Path) -> Path:
    m = onnx.load(str(src))
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = numpy_helper.to_array(inits[n.input[1]])
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(fake_int8(w), n.input[1]))
    onnx.save(m, str(out))
    return out


def _nmse(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((y - ref) ** 2) / np.mean(ref ** 2))


@pytest.mark.parametrize("which", ["example", "relu6"])
def test_equalization_keeps_the_function_and_bias_correction_cuts_the_int8_weight_error(which, example_onnx,
                                                                                         relu6_onnx, splits,
                                                                                         tmp_path):
    src = (example_onnx if which == "example" else relu6_onnx).path
    x, calib = splits.test.x, splits.calibration.x
    ref = _logits(src, x)
    eq_only = tmp_path / "eq.onnx"
    rec = equalize(src, eq_only, calib, bias_correction=False)
    assert rec["channels_rescaled"] > 0
    assert np.abs(_logits(eq_only, x) - ref).max() < 1e-3 * np.abs(ref).max()  # same function (ReLU6 kept)
    both = tmp_path / "eqbc.onnx"
    rec = equalize(src, both, calib)
    assert rec["bias_corrected_layers"] >= 3
    plain = _nmse(_logits(_weights_int8(src, tmp_path / "wq.onnx"), x), ref)
    fixed = _nmse(_logits(_weights_int8(both, tmp_path / "wq_eq.onnx"), x), ref)
    assert fixed < plain, (fixed, plain)
    if which == "relu6":  # the 50x channel: its weight ranges now meet in the middle
        g = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(eq_only)).graph.initializer}
        dw = next(v for v in g.values() if v.shape == (8, 1, 3, 3))
        r = np.abs(dw.reshape(8, -1)).max(1)
        assert r.max() / r.min() < 50


def test_relu6_channels_that_saturate_are_left_alone(relu6_onnx, splits, tmp_path):
    """Scaling a channel whose ReLU6 clips would move the clip: such channels keep their weights."""
    big = np.clip(splits.calibration.x * 400.0, 0, None).astype(np.float32)  # the first ReLU6 saturates
    normal = equalize(relu6_onnx.path, tmp_path / "n.onnx", splits.calibration.x, bias_correction=False)
    out = tmp_path / "eq.onnx"
    rec = equalize(relu6_onnx.path, out, big, bias_correction=False)
    assert rec["channels_rescaled"] < normal["channels_rescaled"]
    assert np.allclose(_logits(out, big[:32]), _logits(relu6_onnx.path, big[:32]), atol=1e-4)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_sensitivity_ranks_the_layer_int8_hurts_first(method, relu6_onnx, splits, tmp_path):
    """A weight outlier in the pointwise layer makes it the one int8 resolves worst."""
    m = onnx.load(str(relu6_onnx.path))
    inits = {i.name: i for i in m.graph.initializer}
    pw = next(n for n in m.graph.node if n.op_type == "Conv" and numpy_helper.to_array(inits[n.input[1]]).shape[:2] == (16, 8))
    w = numpy_helper.to_array(inits[pw.input[1]]).copy()
    w[:, 0] += 300.0 * np.sign(w[:, 0] + 1e-9)  # every output channel gets one huge weight: the rest round to 0
    inits[pw.input[1]].CopyFrom(numpy_helper.from_array(w, pw.input[1]))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    model = dataclasses.replace(relu6_onnx, path=bad)
    errors = layer_sensitivity(model, splits.calibration.x[:64], method, samples=32)
    assert len(errors) == 4 and errors[0].name == pw.name
    assert errors[0].nmse > 10 * errors[-1].nmse
    assert keep_float(errors, 2) == tuple(sorted(e.name for e in errors[:2]))


def _float_convs(path: Path) -> set[str]:
    """Conv/Gemm nodes whose weight input does not come from a DequantizeLinear (left in float)."""
    m = onnx.load(str(path))
    dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in dq}


def test_float_layers_keep_the_most_sensitive_layers_float_on_onnxruntime_and_tensorrt(example_onnx, splits,
                                                                                       tmp_path):
    from edgepipe.pipeline.cache import Cache

    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    expect = keep_float(layer_sensitivity(example_onnx, calib.x, samples=32), 2)
    for name in ("cpu-int8", "jetson-orin-nano-int8"):
        t = load_target(name)
        t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, float_layers=2))
        art, _ = stages.compile(example_onnx, t, calib, tmp_path / name, Cache(enabled=False))
        plan = art.metadata["mixed_precision"]
        assert tuple(plan["kept_float"]) == expect and plan["sensitivity"][0]["name"] in expect
        graph = art.path if name == "cpu-int8" else backends.get("tensorrt").stand_in(art).artifact.path
        assert set(expect) <= _float_convs(graph)
        assert len(_float_convs(graph)) == 2, _float_convs(graph)


def test_float_layers_on_openvino_become_its_ignored_scope(example_onnx, splits, tmp_path):
    pytest.importorskip("nncf")
    from edgepipe.pipeline.cache import Cache

    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    t = load_target("intel-cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, float_layers=2))
    art, _ = stages.compile(example_onnx, t, calib, tmp_path, Cache(enabled=False))
    kept = art.metadata["mixed_precision"]["kept_float"]
    assert art.metadata["quantization"]["float_nodes"] == kept and len(kept) == 2
    quantized = art.metadata["quantization"]["quantized_layers"]
    assert not [q for q in quantized if q.split("/")[0] in kept], quantized
    assert len(quantized) == 16 - 2  # the example's 15 Convs and its Gemm, less the two kept in float
    runner = backends.get("openvino").load(art)
    y = runner({runner.inputs[0].name: splits.test.x[:8]})[0]
    assert y.shape == (8, 10)


def test_tflite_says_it_cannot_keep_layers_in_float():
    t = load_target("arm64-cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, float_layers=2))
    with pytest.raises(ConfigError, match="not available for TFLite"):
        backends.get("tflite").validate(t)


def test_equalize_in_compile_is_recorded_and_changes_the_artifact(example_onnx, splits, tmp_path):
    from edgepipe.pipeline.cache import Cache

    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    t = load_target("cpu-int8")
    assert t.calibration.equalize  # on in the shipped int8 targets
    off = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, equalize=False))
    plain, _ = stages.compile(example_onnx, off, calib, tmp_path / "plain", Cache(enabled=False))
    assert "equalization" not in plain.metadata
    eq, _ = stages.compile(example_onnx, t, calib, tmp_path / "eq", Cache(enabled=False))
    assert eq.metadata["equalization"]["channels_rescaled"] > 0
    assert stages.artifact_sha256(eq) != stages.artifact_sha256(plain)
    ort = backends.get("onnxruntime")
    for art in (plain, eq):
        assert isinstance(art, Artifact)
    y_eq = ort.load(eq)
    top1 = np.mean(y_eq({y_eq.inputs[0].name: splits.test.x})[0].argmax(1) == splits.test.y)
    assert top1 > 0.95


def test_the_search_space_names_equalize_and_float_layers():
    from edgepipe.config.search import search_from_dict
    from edgepipe.pipeline.search import candidate_target

    space = search_from_dict({"recipes": ["none"], "onnxruntime": {"equalize": [False, True],
                                                                   "float_layers": [0, 4]}})
    grid = space.grid("onnxruntime")
    assert len(grid) == 4
    t = candidate_target(load_target("cpu-int8"), {"equalize": True, "float_layers": 4})
    assert t.calibration.equalize and t.calibration.float_layers == 4
    assert t.sha256 != load_target("cpu-int8").sha256  # the manifest and the cache keys see the setting
    with pytest.raises(ConfigError, match="float_layers"):
        candidate_target(load_target("cpu-int8"), {"float_layers": -1})
    with pytest.raises(ConfigError, match="not available for TFLite"):
        candidate_target(load_target("arm64-cpu-int8"), {"float_layers": 2})


def test_cli_quantize_analyze_prints_every_layer_as_json(capsys):
    import json

    from edgepipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", "--analyze", "--json", "--samples", "8"])
    assert e.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "cpu-int8" and report["samples"] == 8
    names = [layer["name"] for layer in report["layers"]]
    assert len(names) == 16 and len(set(names)) == 16
    nmse = [layer["nmse"] for layer in report["layers"]]
    assert nmse == sorted(nmse, reverse=True) and nmse[0] > 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "recipes" / "search").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_search_space_loads_and_its_candidates_are_valid(path):
    from edgepipe.config.search import load_search
    from edgepipe.pipeline.search import candidate_target

    space = load_search(path)
    shipped = {"onnxruntime": "cpu-int8", "openvino": "intel-cpu-int8", "tflite": "arm64-cpu-int8",
               "tensorrt": "jetson-orin-nano-int8"}
    for backend, name in shipped.items():
        for _recipe, settings in space.grid(backend):
            candidate_target(load_target(name), settings)  # the backend accepts every candidate


def test_onnxruntime_float_layers_stay_float_when_the_session_starts(example_onnx, splits, tmp_path):
    """onnxruntime's WeightBiasQuantization would int8 (per tensor) a float layer fed by a DequantizeLinear
    when the session starts; the artifact says to leave it out, and edgepipe's runner does: it computes
    exactly the graph (onnxruntime with every optimizer off)."""
    import onnxruntime as ort

    from edgepipe.pipeline.cache import Cache

    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    t = load_target("cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, float_layers=3))
    art, _ = stages.compile(example_onnx, t, calib, tmp_path, Cache(enabled=False))
    assert art.metadata["disabled_optimizers"] == ["WeightBiasQuantization"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    x = splits.test.x[:64]
    truth = plain.run(None, {plain.get_inputs()[0].name: x})[0]
    runner = backends.get("onnxruntime").load(art)
    ours = runner({runner.inputs[0].name: x})[0]
    assert np.abs(ours - truth).max() < 5e-3 * np.abs(truth).max()  # int8 kernel rounding only (13x that without)


def test_the_equalizer_writes_any_float_layers_as_equalizing_afresh_would(example_onnx, splits, tmp_path):
    """Equalized once, written for two sets of float layers: each file is the bytes a fresh equalization with
    those float layers writes, and the float layers' biases are the ones left uncorrected."""
    from edgepipe.quantize.equalize import Equalizer

    convs = [n.name for n in onnx.load(str(example_onnx.path)).graph.node if n.op_type == "Conv"]
    x = splits.calibration.x[:64]
    eq = Equalizer(example_onnx.path, x)
    every = eq.write(tmp_path / "every.onnx")
    two = eq.write(tmp_path / "two.onnx", tuple(convs[:2]))
    fresh = equalize(example_onnx.path, tmp_path / "fresh.onnx", x, keep_float=tuple(convs[:2]))
    assert two == fresh and (tmp_path / "two.onnx").read_bytes() == (tmp_path / "fresh.onnx").read_bytes()
    assert every["bias_corrected_layers"] == two["bias_corrected_layers"] + 2
    eq.write(tmp_path / "again.onnx")
    assert (tmp_path / "every.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()  # writing changes nothing


def test_int8_with_float_layers_equalizes_once(example_onnx, splits, tmp_path, monkeypatch):
    """The float layers are chosen on the equalized model and then left uncorrected, from one equalization."""
    from edgepipe.pipeline.cache import Cache
    from edgepipe.quantize import equalize as eq_module

    made = []
    real = eq_module.Equalizer.__init__

    def counting(self, *a, **kw):
        made.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(eq_module.Equalizer, "__init__", counting)
    t = load_target("cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, equalize=True, float_layers=1))
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    art, _ = stages.compile(example_onnx, t, calib, tmp_path / "c", Cache(enabled=False))
    assert made == [1]
    kept = art.metadata["mixed_precision"]["kept_float"]
    convs = [n for n in onnx.load(str(example_onnx.path)).graph.node if n.op_type == "Conv"]
    every = len(convs) - sum(1 for n in convs if n.name in kept)
    assert len(kept) == 1 and art.metadata["equalization"]["bias_corrected_layers"] == every
