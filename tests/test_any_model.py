"""Any model through the whole pipeline, judged by its own metric: several inputs, other ranks and dtypes,
several outputs, built-in and user metrics, a postprocess; and every bad input is one line that writes nothing.

The models are small seeded torch modules defined in a module this test writes; the data are .npz files
made here, one array per input under its name and the targets under any other name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe import api
from edgepipe.errors import ConfigError, DataError, EdgepipeError

MODELS = '''
import torch
from torch import nn


class ImageAndVector(nn.Module):
    """An image and a feature vector -> 4 class scores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8 + 5, 4)

    def forward(self, image, feats):
        return self.fc(torch.cat([self.conv(image), feats], dim=1))


class Segmenter(nn.Module):
    """[N, 3, 16, 16] -> [N, 3, 16, 16] per-pixel scores: class = which channel is brightest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        with torch.no_grad():  # make it close to "argmax over input channels" so mIoU is high but not perfect
            self.net[0].weight.zero_(); self.net[0].bias.zero_(); self.net[2].weight.zero_(); self.net[2].bias.zero_()
            for c in range(3):
                self.net[0].weight[c, c, 1, 1] = 1.0
                self.net[2].weight[c, c, 0, 0] = 1.0

    def forward(self, x):
        return self.net(x)


class Audio(nn.Module):
    """1-D audio [N, 1, 1600] -> 3 class scores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv1d(1, 8, 9, stride=4), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                 nn.Linear(8, 3))

    def forward(self, wave):
        return self.net(wave)


class Tokens(nn.Module):
    """int64 token ids [N, 16] -> 2 class scores through a transformer encoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)).mean(dim=1))


class TwoHeads(nn.Module):
    """A detector-shaped toy: one image -> (boxes [N, 2, 4], scores [N, 2])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.box = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8))
        self.score = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))

    def forward(self, image):
        return self.box(image).reshape(-1, 2, 4), self.score(image).sigmoid()


def image_and_vector():
    return ImageAndVector().eval()


def segmenter():
    return Segmenter().eval()


def audio():
    return Audio().eval()


def tokens():
    return Tokens().eval()


def two_heads():
    return TwoHeads().eval()


def decode(outputs):
    """The user's postprocess: boxes, scores and classes (0 for every box) as the map metric reads them."""
    boxes, scores = outputs
    x1y1 = np.abs(boxes[..., :2]) * 2
    return [np.concatenate([x1y1, x1y1 + 4 + np.abs(boxes[..., 2:])], axis=-1), scores,
            np.zeros(scores.shape, np.int64)]


def mean_first_output(outputs, targets):
    """A user metric as a plain function: higher is better."""
    return float(outputs[0].mean())


def broken_metric(outputs, targets):
    raise RuntimeError("this metric is broken")


def nan_metric(outputs, targets):
    return float("nan")


def junk_postprocess(outputs):
    return "not arrays"


import numpy as np  # noqa: E402  (used by decode)
'''


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "anymodels.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("anymodels", None)
    return tmp_path


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _image_vector_data(path: Path, n: int = 120) -> Path:
    r = _rng()
    np.savez(path, image=r.random((n, 3, 8, 8), dtype=np.float32), feats=r.random((n, 5), dtype=np.float32),
             y=r.integers(0, 4, n))
    return path


def _segmentation_data(path: Path, n: int = 80) -> Path:
    r = _rng()
    x = r.random((n, 3, 16, 16), dtype=np.float32)
    np.savez(path, x=x, y=x.argmax(1).astype(np.int64))  # masks [N, H, W]
    return path


def _build(model: str, target: str | Path, tmp_path: Path, **options):  # type: ignore[no-untyped-def]
    return api.build(model, [str(target)], out=tmp_path / "dist", bench=False, **options).results[0].manifest


def test_two_input_model_builds_with_named_shapes_and_its_signature_is_recorded(zoo, tmp_path):
    data = _image_vector_data(tmp_path / "iv.npz")
    m = _build("anymodels:image_and_vector", "cpu-fp32", tmp_path, data=str(data),
               input_shape={"image": (1, 3, 8, 8), "feats": (1, 5)})
    sig = m.signature
    assert [(t["name"], t["shape"], t["dtype"]) for t in sig["inputs"]] == [
        ("image", ["batch", 3, 8, 8], "float32"), ("feats", ["batch", 5], "float32")]
    assert m.accuracy.metric == "top1" and 0 <= m.accuracy.value <= 100  # a classifier: top1 by default
    assert m.accuracy.drop == 0 and m.fidelity["sqnr_db"][0] >= 100  # fp32 is the reference itself
    assert m.fidelity["flip_rate"] == 0


def test_a_target_file_can_give_a_table_of_input_shapes(zoo, tmp_path):
    data = _image_vector_data(tmp_path / "iv.npz")
    t = tmp_path / "iv.toml"
    t.write_text('backend = "onnxruntime"\nprecision = "fp32"\n'
                 'input_shape = { image = [1, 3, 8, 8], feats = [1, 5] }\n')
    m = _build("anymodels:image_and_vector", t, tmp_path, data=str(data))
    assert m.target.input_shape == {"image": (1, 3, 8, 8), "feats": (1, 5)}


def test_segmenter_is_scored_by_miou_and_needs_a_metric(zoo, tmp_path):
    data = _segmentation_data(tmp_path / "seg.npz")
    shape = (1, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"give --metric, one of: .*miou"):
        _build("anymodels:segmenter", "cpu-fp32", tmp_path, data=str(data), input_shape=shape)
    assert not (tmp_path / "dist" / "cpu-fp32").exists()
    m = _build("anymodels:segmenter", "cpu-fp32", tmp_path, data=str(data), input_shape=shape, metric="miou")
    assert m.accuracy.metric == "miou" and m.accuracy.value == pytest.approx(100.0)  # channel argmax = the masks
    assert m.fidelity["flip_rate"] is None  # per-pixel scores are not one set of class scores
    index = json.loads((tmp_path / "dist" / "cpu-fp32" / "manifest.json").read_text())
    assert index["budgets"]["max_metric_drop"]["value"] == 0


def test_audio_of_rank_3_and_int64_tokens_build_through_int8(zoo, tmp_path):
    r = _rng()
    wave = tmp_path / "wave.npz"
    np.savez(wave, x=r.standard_normal((90, 1, 1600)).astype(np.float32), y=r.integers(0, 3, 90))
    m = _build("anymodels:audio", "cpu-int8", tmp_path, data=str(wave), input_shape=(1, 1, 1600))
    assert m.signature["inputs"][0]["shape"] == ["batch", 1, 1600] and m.artifact.precision == "int8"
    assert 10 < min(m.fidelity["sqnr_db"]) < 200  # int8: close to fp32, not identical
    toks = tmp_path / "tokens.npz"
    np.savez(toks, tokens=r.integers(0, 50, (90, 16)), y=r.integers(0, 2, 90))
    m = _build("anymodels:tokens", "cpu-fp32", tmp_path / "t", data=str(toks), input_shape={"tokens": (1, 16)},
               metric="agreement")
    assert m.signature["inputs"][0]["dtype"] == "int64" and m.accuracy.value == 100.0


def test_detector_with_a_postprocess_is_scored_by_map(zoo, tmp_path):
    r = _rng()
    n = 60
    boxes = np.full((n, 2, 4), -1, np.float32)
    boxes[:, 0] = [0, 0, 6, 6]
    classes = np.full((n, 2), -1, np.int64)
    classes[:, 0] = 0
    data = tmp_path / "det.npz"
    np.savez(data, image=r.random((n, 3, 8, 8), dtype=np.float32), boxes=boxes, classes=classes)
    m = _build("anymodels:two_heads", "cpu-fp32", tmp_path, data=str(data), input_shape=(1, 3, 8, 8),
               metric="map50", postprocess="anymodels:decode")
    assert m.accuracy.metric == "map50" and 0 <= m.accuracy.value <= 100
    assert [o["name"] for o in m.signature["outputs"]] == ["output_0", "output_1"]
    assert len(m.fidelity["sqnr_db"]) == 2  # one per output


def test_user_metric_as_a_plain_function(zoo, tmp_path):
    data = _image_vector_data(tmp_path / "iv.npz")
    m = _build("anymodels:image_and_vector", "cpu-fp32", tmp_path, data=str(data),
               input_shape={"image": (1, 3, 8, 8), "feats": (1, 5)}, metric="anymodels:mean_first_output")
    assert m.accuracy.metric == "anymodels:mean_first_output" and m.accuracy.unit == ""
    assert np.isfinite(m.accuracy.value)


# ---------------------------------------------------------------------------------------------------------
# bad input: one line each, nothing written


SHAPES = {"image": (1, 3, 8, 8), "feats": (1, 5)}


@pytest.mark.parametrize("arrays, message", [
    ({"image": (120, 3, 8, 8), "feat": (120, 5), "y": (120,)}, r"no array for the model's input 'feats'.*'feat'"),
    ({"image": (120, 3, 8, 8), "y": (120,)}, r"no array for the model's input 'feats'"),
    ({"image": (120, 3, 8, 8), "feats": (120, 6), "y": (120,)}, r"input 'feats' dimension 1 is 5 .* the data's is 6"),
    ({"image": (120, 3, 8, 8), "feats": (120, 5), "y": (119,)}, r"target 'y' has shape \[119\].*120 samples"),
    ({"image": (120, 3, 8, 8), "feats": (120, 5, 1), "y": (120,)}, r"input 'feats' is 2-D .* 3-D"),
])
def test_data_that_does_not_fit_the_model_is_one_line(zoo, tmp_path, arrays, message):
    r = _rng()
    data = tmp_path / "bad.npz"
    np.savez(data, **{k: (r.integers(0, 4, v) if k == "y" else r.random(v, dtype=np.float32))
                      for k, v in arrays.items()})
    with pytest.raises(DataError, match=message):
        _build("anymodels:image_and_vector", "cpu-fp32", tmp_path, data=str(data), input_shape=SHAPES)
    assert not (tmp_path / "dist" / "cpu-fp32").exists()


def test_a_float_array_for_an_integer_input_is_one_line(zoo, tmp_path):
    from edgepipe.data import load_data
    from edgepipe.types import TensorSpec

    data = tmp_path / "t.npz"
    np.savez(data, tokens=np.ones((10, 16), np.float32), y=np.zeros(10, np.int64))
    with pytest.raises(DataError, match=r"input 'tokens' is int64 in the model, but the data's array is float32"):
        load_data(str(data), [TensorSpec("tokens", (1, 16), "int64")])


@pytest.mark.parametrize("metric, postprocess, message", [
    ("nosuchmetric", None, r"unknown metric 'nosuchmetric'.*top1"),
    ("anymodels:broken_metric", None, r"anymodels:broken_metric.*RuntimeError: this metric is broken"),
    ("anymodels:nan_metric", None, r"anymodels:nan_metric.*(NaN|nan)"),
    ("map", None, r"(boxes|classes)"),
    ("top1", "anymodels:junk_postprocess", r"postprocess 'anymodels:junk_postprocess' returned str"),
])
def test_metric_errors_are_one_line_and_write_nothing(zoo, tmp_path, metric, postprocess, message):
    data = _image_vector_data(tmp_path / "iv.npz")
    with pytest.raises(EdgepipeError, match=message):
        _build("anymodels:image_and_vector", "cpu-fp32", tmp_path, data=str(data), input_shape=SHAPES,
               metric=metric, postprocess=postprocess)
    assert not (tmp_path / "dist" / "cpu-fp32").exists()


def test_cli_takes_named_shapes_and_a_metric_and_says_bad_ones_in_one_line(zoo, tmp_path):
    data = _image_vector_data(tmp_path / "iv.npz")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgepipe", "build", "anymodels:image_and_vector", "-t",
                               "cpu-fp32", "--no-bench", "--data", str(data), "--out", str(tmp_path / "d"), *args],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    r = cli("--input-shape", "image=1,3,8,8", "--input-shape", "feats=1,5", "--metric", "top5", "--json")
    assert r.returncode == 1 and "top5 needs more than 5 classes" in r.stderr.replace("'", "")  # 4 classes
    r = cli("--input-shape", "image=1,3,8,8", "--input-shape", "feats=1,5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["targets"]["cpu-fp32"]
    assert out["accuracy"]["metric"] == "top1" and len(out["signature"]["inputs"]) == 2
    r = cli("--input-shape", "1,3,8,8")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "has 2 inputs (image, feats)" in errors[0], r.stderr


def _dynamic_hw_onnx(path: Path) -> Path:
    """An ONNX classifier whose height and width are dynamic (``h``, ``w``), as detectors ship."""
    import onnx
    from onnx import TensorProto, helper

    r = _rng()
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], r.standard_normal(108).astype(np.float32).tolist())
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["scores"])]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                           ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_with_dynamic_height_and_width_is_built_and_benched_at_the_given_shape(tmp_path):
    model = _dynamic_hw_onnx(tmp_path / "dyn.onnx")
    r = _rng()
    data = tmp_path / "imgs.npz"
    np.savez(data, images=r.random((60, 3, 20, 24), dtype=np.float32), y=r.integers(0, 4, 60))
    res = api.build(str(model), ["cpu-fp32"], out=tmp_path / "dist", data=str(data), input_shape=(1, 3, 20, 24),
                    iterations=5)
    m = res.results[0].manifest
    assert m.signature["inputs"][0]["shape"] == ["batch", 3, "h", "w"] and m.latency.iterations == 5
    assert m.accuracy.metric == "top1"


def test_a_two_input_model_is_benched_with_every_input(zoo, tmp_path):
    data = _image_vector_data(tmp_path / "iv.npz")
    res = api.build("anymodels:image_and_vector", ["cpu-fp32"], out=tmp_path / "dist", data=str(data),
                    input_shape=SHAPES, iterations=5)
    m = res.results[0].manifest
    assert m.latency.iterations == 5 and m.latency.p50_ms > 0 and m.reference_latency.p50_ms > 0


def test_the_bench_worker_feeds_every_input_at_the_targets_shapes():
    from edgepipe.harness.worker import feeds_for
    from edgepipe.types import TensorSpec

    inputs = [TensorSpec("images", ("batch", 3, "h", "w"), "tensor(float)"),
              TensorSpec("tokens", ("batch", 16), "tensor(int64)")]
    feeds = feeds_for(inputs, {"images": [1, 3, 320, 256], "tokens": [1, 16]}, batch=2, seed=0)
    assert feeds["images"].shape == (2, 3, 320, 256) and feeds["images"].dtype == np.float32
    assert feeds["tokens"].shape == (2, 16) and feeds["tokens"].dtype == np.int64 and not feeds["tokens"].any()
    one = feeds_for([TensorSpec("x", ("batch", 1, "t"), "float32")], {"": [1, 1, 16000]}, batch=1, seed=0)
    assert one["x"].shape == (1, 1, 16000)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_a_sample_count_that_is_no_multiple_of_the_batch(method, example_onnx, splits,
                                                                                     tmp_path):
    """onnxruntime's histogram collectors stack every batch: a short last batch (50 = 32 + 18) broke them."""
    from edgepipe import backends
    from edgepipe.config import target_from_dict
    from edgepipe.types import CalibrationSet

    t = target_from_dict({"name": "t", "backend": "onnxruntime", "precision": "int8",
                          "calibration": {"method": method, "samples": 50}}, "test")
    art = backends.get("onnxruntime").compile(example_onnx, t, CalibrationSet(splits.calibration.x[:50]), tmp_path)
    assert art.precision == "int8" and art.metadata["calibration"]["samples"] == 50


def test_the_shipped_int8_targets_take_a_two_input_model(zoo, tmp_path):
    """Their equalization and bias correction run on every input (it fed only the first before)."""
    data = _image_vector_data(tmp_path / "iv.npz")
    res = api.build("anymodels:image_and_vector", ["cpu-int8", "intel-cpu-int8"], out=tmp_path / "dist",
                    data=str(data), input_shape=SHAPES, bench=False, allow_accuracy_drop=True)
    for r in res.results:
        m = r.manifest
        assert m.artifact.precision == "int8" and "equalization" in m.artifact.metadata
        assert 15 < min(m.fidelity["sqnr_db"]) < 200


def test_a_two_input_model_with_a_dynamic_dimension_is_benched_on_a_board_over_ssh(loopback_board, tmp_path):
    """The board's worker builds every input from the signature at the shapes it is sent (a dynamic width
    timed at the given size: a wrong size fails the model's Concat)."""
    import onnx
    from onnx import TensorProto, helper

    from edgepipe.harness import BenchSettings
    from edgepipe.harness.remote import measure_remote
    from edgepipe.types import Artifact

    # image [N, 3, 8, 24] and a mask [N, 1, 8, W] (int64, W dynamic) concatenated on channels: W must be 24
    nodes = [helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Concat", ["image", "m"], ["cat"], axis=1),
             helper.make_node("ReduceMean", ["cat"], ["scores"], keepdims=0, axes=[2, 3])]
    graph = helper.make_graph(nodes, "two", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 24]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 1, 8, "w"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    shapes = {"image": (1, 3, 8, 24), "mask": (1, 1, 8, 24)}
    m = measure_remote(Artifact("onnxruntime", "fp32", path), loopback_board,
                       BenchSettings(threads=1, warmup=2, iterations=10, shapes=shapes))
    assert m.iterations == 10 and m.p50_ms > 0
    with pytest.raises(EdgepipeError, match="Concat"):  # the model's static sizes alone: the mask is 1 wide
        measure_remote(Artifact("onnxruntime", "fp32", path), loopback_board, BenchSettings(iterations=2))


def test_a_release_of_a_one_input_model_whose_data_names_the_forward_argument(tmp_path):
    """The driver reads the data again for each candidate it writes: by the model's input name too."""
    from edgepipe.models.tasks import TASKS

    data = tmp_path / "a.npz"
    np.savez(data, **TASKS["audio"].data())  # the input under its forward argument's name, "wave"
    search = tmp_path / "s.toml"
    search.write_text('recipes = ["none"]\n[onnxruntime]\ncalibration = ["minmax", "percentile"]\n')
    res = api.release("edgepipe.models.tasks:audio", ["cpu-int8"], out=tmp_path / "rel", search=search,
                      data=str(data), input_shape=(1, 1, 4000), iterations=5, workers=2)
    (o,) = res.outcomes
    assert o.status == "released" and len(o.tried) == 2 and all(t.result is not None for t in o.tried)


def test_float_layers_are_ranked_by_the_models_own_metric(zoo, tmp_path):
    """With a metric, the layers kept in float are the ones whose int8 lowers the metric most on the validation
    split (the NMSE only breaks ties); the plan says so and records each layer's score."""
    data = _segmentation_data(tmp_path / "seg.npz")
    t = tmp_path / "seg-int8.toml"
    t.write_text('backend = "onnxruntime"\nprecision = "int8"\n[calibration]\nsamples = 32\nfloat_layers = 1\n'
                 '[budgets]\nmax_metric_drop = 100.0\n')
    m = _build("anymodels:segmenter", t, tmp_path, data=str(data), input_shape=(1, 3, 16, 16), metric="miou")
    plan = m.artifact.metadata["mixed_precision"]
    assert "the model's metric on the validation split" in plan["chosen_by"]
    scores = [e["score"] for e in plan["sensitivity"]]
    assert all(s is not None for s in scores) and scores == sorted(scores)  # lowest miou first
    assert plan["kept_float"] == [plan["sensitivity"][0]["name"]]


def test_max_metric_drop_overrides_every_targets_budget(zoo, tmp_path):
    data = _segmentation_data(tmp_path / "seg.npz")
    m = _build("anymodels:segmenter", "cpu-int8", tmp_path, data=str(data), input_shape=(1, 3, 16, 16),
               metric="miou", max_metric_drop=37.5, allow_accuracy_drop=True)
    assert m.budgets["max_metric_drop"].limit == 37.5
    with pytest.raises(ConfigError, match="--max-metric-drop -1.0: give a budget >= 0"):
        _build("anymodels:segmenter", "cpu-int8", tmp_path, data=str(data), input_shape=(1, 3, 16, 16),
               metric="miou", max_metric_drop=-1.0)
