"""The onnxruntime backend: fp32 as exported, int8 by static QDQ with each calibration method."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepipe import backends
from edgepipe.config import load_target, target_from_dict
from edgepipe.evaluate import predict, top1
from edgepipe.types import Artifact, CalibrationSet

METHODS = ("minmax", "entropy", "percentile")
ORT = backends.get("onnxruntime")


def _target(precision: str, **kw):
    return target_from_dict({"name": "t", "backend": "onnxruntime", "precision": precision, **kw}, "test")


def _cpu_int8(method: str, samples: int):
    """The shipped cpu-int8 target with another calibration method (its other settings as shipped)."""
    t = load_target("cpu-int8")
    return dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, method=method, samples=samples))


def _activation_scales(path) -> dict[str, float]:
    """Activation tensor -> its QuantizeLinear scale (weights are stored quantized, not quantized at run time)."""
    m = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            scale = consts[n.input[1]]
            assert scale.ndim == 0, f"{n.name}: activations are quantized per tensor"
            out[n.input[0]] = float(scale)
    return out


@pytest.fixture(scope="module")
def calib(splits) -> CalibrationSet:
    return CalibrationSet(splits.calibration.x, "digits:calibration")


@pytest.fixture(scope="module")
def int8(example_onnx, calib, tmp_path_factory) -> dict[str, tuple]:
    """cpu-int8 compiled once per calibration method: method -> (target, artifact)."""
    out = {}
    for method in METHODS:
        t = _cpu_int8(method, len(calib.x))
        out[method] = (t, ORT.compile(example_onnx, t, calib, tmp_path_factory.mktemp(f"int8-{method}")))
    return out


@pytest.fixture(scope="module")
def fp32_top1(example_onnx, splits) -> dict[str, float]:
    runner = ORT.load(Artifact("onnxruntime", "fp32", example_onnx.path))
    return {s: top1(runner, getattr(splits, s).x, getattr(splits, s).y) for s in ("validation", "test")}


def test_fp32_matches_the_exported_model(example_onnx, calibration, splits, tmp_path, example_model):
    import torch

    art = ORT.compile(example_onnx, _target("fp32"), calibration, tmp_path)
    assert art.path.read_bytes() == example_onnx.path.read_bytes()
    logits = predict(ORT.load(art), splits.test.x[:32])
    with torch.no_grad():
        ref = example_model(torch.from_numpy(splits.test.x[:32])).numpy()
    assert np.abs(logits - ref).max() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_int8_with_each_method_stays_within_the_targets_budget(method, int8, splits, example_onnx, fp32_top1):
    t, art = int8[method]
    assert art.precision == "int8" and art.metadata["calibration"]["method"] == method
    runner = ORT.load(art)
    drop = {s: (fp32_top1[s] - top1(runner, getattr(splits, s).x, getattr(splits, s).y)) * 100
            for s in ("validation", "test")}
    assert drop["validation"] <= t.budgets.max_accuracy_drop, drop  # what the build's budget check uses
    assert drop["test"] <= 1.0, drop
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert art.path.stat().st_size < example_onnx.path.stat().st_size / 2


def test_each_method_computes_its_own_activation_scales(int8):
    """minmax, entropy and percentile must not collapse into one another (entropy once gave minmax's bytes)."""
    scales = {m: _activation_scales(art.path) for m, (_, art) in int8.items()}
    names = set(scales["minmax"])
    assert len(names) >= 20 and all(set(s) == names for s in scales.values())
    for a, b in itertools.combinations(METHODS, 2):
        differ = [n for n in names if not np.isclose(scales[a][n], scales[b][n], rtol=1e-6, atol=0)]
        assert len(differ) >= len(names) // 4, f"{a} and {b}: only {len(differ)} of {len(names)} scales differ"
        assert int8[a][1].path.read_bytes() != int8[b][1].path.read_bytes()
    # entropy clips outliers within the observed range: never a wider range than minmax, narrower somewhere
    assert all(scales["entropy"][n] <= scales["minmax"][n] * (1 + 1e-6) for n in names)
    assert sum(scales["entropy"][n] < 0.99 * scales["minmax"][n] for n in names) >= len(names) // 4


def test_calibrator_settings_are_recorded(int8, calib):
    for method, (_, art) in int8.items():
        rec = art.metadata["calibration"]
        assert rec["method"] == method and rec["samples"] == len(calib.x) and rec["sha256"] == calib.sha256
        assert isinstance(rec["calibrator"], dict) and rec["calibrator"], method
    entropy = int8["entropy"][1].metadata["calibration"]["calibrator"]
    # the KL search picks among num_bins/2 - num_quantized_bins/2 + 1 thresholds: more bins than quantized bins
    assert entropy["num_bins"] >= 4 * entropy["num_quantized_bins"]
    assert int8["percentile"][1].metadata["calibration"]["calibrator"]["percentile"] == 99.999


def test_onnxruntimes_entropy_search_is_degenerate_with_its_default_bins():
    """Why the backend sets the bins: with onnxruntime's defaults (128 bins, 128 quantized bins) the
    threshold search has one candidate, so entropy returns the full range, exactly as minmax."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    x = np.concatenate([np.abs(rng.normal(0, 1, 50_000)), [30.0]]).astype(np.float32)  # a post-ReLU tail

    def entropy_range(num_bins: int, num_quantized_bins: int) -> tuple[float, float]:
        c = HistogramCollector("entropy", symmetric=False, num_bins=num_bins, num_quantized_bins=num_quantized_bins,
                               percentile=99.999, scenario="same")
        c.collect({"t": x})
        lo, hi = c.compute_collection_result()["t"][:2]
        return float(lo), float(hi)

    assert entropy_range(128, 128) == (float(x.min()), float(x.max()))  # minmax's range
    lo, hi = entropy_range(512, 128)
    assert lo == float(x.min()) and hi < 15.0  # the tail is clipped


def test_u8s8_fuses_every_conv(example_onnx, calibration, tmp_path):
    """U8S8 QDQ becomes QLinearConv for every Conv once onnxruntime optimizes the graph."""
    import onnxruntime as ort

    art = ORT.compile(example_onnx, _target("int8"), calibration, tmp_path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    n_convs = sum(1 for n in onnx.load(str(example_onnx.path)).graph.node if n.op_type == "Conv")
    assert ops.count("QLinearConv") == n_convs and "Conv" not in ops


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_int8_build_is_deterministic(method, int8, example_onnx, calib, tmp_path):
    t, first = int8[method]
    again = ORT.compile(example_onnx, t, calib, tmp_path)
    assert again.path.read_bytes() == first.path.read_bytes()
    assert again.metadata == first.metadata


def test_runner_handles_static_batch_with_padding(tmp_path, example_model, splits):
    from edgepipe.export import export

    m = export(example_model, (4, 1, 32, 32), tmp_path / "s.onnx", dynamic_batch=False)
    runner = ORT.load(Artifact("onnxruntime", "fp32", m.path))
    assert predict(runner, splits.test.x[:10]).shape == (10, 10)


def test_weighted_op_types_and_mean_ranges(example_onnx, splits, tmp_path):
    """``op_types = "weighted"``: Q/DQ only on the inputs of Conv/Gemm/MatMul (NNCF's scheme); ``mean_ranges``:
    each range the mean of per-sample ranges, never wider than the extremes; both keep top-1 on the example;
    more calibration samples than one chunk give the same minmax scales as a smaller set's extremes merged."""
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    plain = ORT.compile(example_onnx, _target("int8", options={}), calib, tmp_path / "plain")
    weighted = ORT.compile(example_onnx, _target("int8", options={"op_types": "weighted"}), calib, tmp_path / "w")
    mean = ORT.compile(example_onnx, _target("int8", options={"mean_ranges": True}), calib, tmp_path / "m")
    assert weighted.metadata["op_types"] == "weighted" and mean.metadata["ranges"].startswith("mean")

    def weighted_readers(path):
        """Per quantized activation: whether a Conv/Gemm/MatMul reads its dequantized value or wrote it."""
        m = onnx.load(str(path))
        consts = {i.name for i in m.graph.initializer}
        q_of = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] not in consts}
        deq = {n.output[0]: q_of[n.input[0]] for n in m.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in q_of}
        read = {t: False for t in q_of.values()}
        for n in m.graph.node:
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.output[0] in read:
                read[n.output[0]] = True
            for i in n.input:
                if i in deq and n.op_type in ("Conv", "Gemm", "MatMul"):
                    read[deq[i]] = True
        return read

    w, p = weighted_readers(weighted.path), weighted_readers(plain.path)
    assert w and all(w.values())  # every quantized tensor is a weighted layer's input or output
    assert not all(p.values())  # the default also quantizes others (a residual Add's output, say)
    s_plain, s_mean = _activation_scales(plain.path), _activation_scales(mean.path)
    common = set(s_plain) & set(s_mean)
    assert common and all(s_mean[k] <= s_plain[k] * (1 + 1e-6) for k in common)
    assert any(s_mean[k] < s_plain[k] * 0.99 for k in common)
    ref = top1(ORT.load(Artifact("onnxruntime", "fp32", example_onnx.path)), splits.test.x, splits.test.y)
    for art in (weighted, mean):
        assert top1(ORT.load(art), splits.test.x, splits.test.y) >= ref - 0.02


def test_calibration_in_chunks_gives_the_extremes_of_every_sample(example_onnx, splits, tmp_path):
    from edgepipe.backends import onnxruntime as ortb

    x = np.concatenate([splits.calibration.x] * 2)[:200]  # past one chunk of CHUNK_SAMPLES
    assert len(x) > ortb.CHUNK_SAMPLES
    x[-1] *= 3.0  # the last sample, in the last chunk, widens the input's range
    art = ORT.compile(example_onnx, _target("int8", options={}), CalibrationSet(x, "x"), tmp_path / "c")
    scales = _activation_scales(art.path)
    name = onnx.load(str(art.path)).graph.input[0].name
    lo, hi = float(min(x.min(), 0)), float(x.max())
    assert scales[name] == pytest.approx((hi - lo) / 255, rel=1e-5)
