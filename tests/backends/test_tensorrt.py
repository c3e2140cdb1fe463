"""The TensorRT backend: Q/DQ rules on the produced graph, its accuracy on onnxruntime, the build bundle and
its commands, the preflight; and, where TensorRT and a GPU exist (``gpu`` marker), the engine itself."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe import backends
from edgepipe.backends.tensorrt import BUNDLE_MANIFEST, TrtOptions, plan_for
from edgepipe.backends.tensorrt import preflight as preflight
from edgepipe.config import load_target, target_from_dict
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.evaluate import predict, top1
from edgepipe.types import Artifact, CalibrationSet

TRT = backends.get("tensorrt")
HAS_RUNTIME = TRT.check().run


def _target(precision: str, **kw):
    return target_from_dict({"name": "t", "backend": "tensorrt", "precision": precision, **kw}, "test")


@pytest.fixture(scope="module")
def calib(splits) -> CalibrationSet:
    return CalibrationSet(splits.calibration.x, "digits:calibration")


@pytest.fixture(scope="module")
def int8(example_onnx, calib, tmp_path_factory):
    """The shipped datacenter int8 target compiled once: (target, artifact)."""
    t = load_target("nvidia-gpu-int8")
    return t, TRT.compile(example_onnx, t, calib, tmp_path_factory.mktemp("int8"))


@pytest.fixture(scope="module")
def fp32_top1(example_onnx, splits) -> float:
    ort = backends.get("onnxruntime")
    return top1(ort.load(Artifact("onnxruntime", "fp32", example_onnx.path)), splits.test.x, splits.test.y)


def _stand_in_top1(art: Artifact, splits) -> float:
    s = TRT.stand_in(art)
    assert s is not None and s.artifact.backend == "onnxruntime"
    return top1(backends.get("onnxruntime").load(s.artifact), splits.test.x, splits.test.y)


# ---------------------------------------------------------------------------------------------------------
# the Q/DQ graph


def test_int8_qdq_follows_tensorrt_rules(int8):
    """Symmetric int8, zero points 0, per-channel weights on the output axis, every Conv input quantized,
    residual Adds fed a quantized skip input, Gemms quantized unless too small for int8 kernels."""
    _, art = int8
    m = onnx.load(str(art.path.parent / "model.int8.onnx"))
    consts = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    attr = lambda n, k, d: next((helper.get_attribute_value(a) for a in n.attribute if a.name == k), d)  # noqa: E731

    def dq(tensor: str):
        p = producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    assert next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 13
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) >= 30
    for n in qdq:
        zp, scale = consts[n.input[2]], consts[n.input[1]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
        assert np.all(scale > 0) and np.all(np.isfinite(scale)), n.name

    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 15
    for c in convs:
        x_dq, w_dq = dq(c.input[0]), dq(c.input[1])
        assert x_dq is not None and w_dq is not None, f"{c.name}: an input is not quantized"
        assert consts[x_dq.input[1]].ndim == 0, f"{c.name}: activation scale is not per tensor"
        w = consts[w_dq.input[0]]
        assert w.dtype == np.int8  # weights stored quantized
        assert attr(w_dq, "axis", 1) == 0 and consts[w_dq.input[1]].shape == (w.shape[0],), c.name

    for g in (n for n in m.graph.node if n.op_type in ("Gemm", "MatMul")):
        if dq(g.input[0]) and dq(g.input[1]):
            continue
        w = consts[g.input[1]]
        k, n_out = (w.shape[1], w.shape[0]) if attr(g, "transB", 0) else w.shape
        assert min(k, n_out) < 16, f"{g.name}: a GEMM large enough for int8 kernels was left unquantized"

    adds = [a for a in m.graph.node if a.op_type == "Add"
            and any(producer.get(i) is not None and producer[i].op_type == "Conv" for i in a.input)]
    assert len(adds) == 6
    for a in adds:  # TensorRT fuses Conv + Add when the Add's other input is quantized
        assert any(dq(i) for i in a.input), f"{a.name}: residual input not quantized"


def test_int8_qdq_accuracy_on_onnxruntime_within_one_point(int8, splits, fp32_top1):
    _, art = int8
    acc = _stand_in_top1(art, splits)
    assert acc >= 0.95 and fp32_top1 - acc <= 0.01


def test_a_near_dead_channel_does_not_break_the_evaluation_of_the_fp16_qdq_graph(example_model, splits, tmp_path):
    """Real networks (EfficientNet-Lite0's pretrained weights) have channels whose weights are ~0. In the
    fp16 Q/DQ graph modelopt makes for TensorRT their weight scale is an fp16 subnormal, and onnxruntime's
    WeightBiasQuantization transformer computed their bias scale (input x weight scale) in fp16: 0, bias / 0,
    and every sample got one class (2.5 % on EfficientNet-Lite0). The graph itself computes the right thing
    (it does with onnxruntime's optimizers off), and so must the evaluation that stands in for the engine."""
    import copy

    import onnxruntime as ort
    import torch

    from edgepipe.export import export

    model = copy.deepcopy(example_model)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight[:4] *= 1e-6  # four near-dead output channels, each keeps its (BatchNorm) bias
    src = export(model, (1, 1, 32, 32), tmp_path / "dead.onnx")
    t = load_target("jetson-orin-nano-int8")
    art = TRT.compile(src, t, CalibrationSet(splits.calibration.x, "digits:calibration"), tmp_path / "trt")
    stand_in = TRT.stand_in(art)
    assert stand_in is not None
    qdq = stand_in.artifact.path
    scales = [numpy_helper.to_array(i) for i in onnx.load(str(qdq)).graph.initializer if i.name.endswith("scale_2")]
    assert any(s.dtype == np.float16 and (s < np.float16(6.1e-5)).any() for s in scales)  # the trap is there

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
    x = splits.test.x
    truth = plain.run(None, {plain.get_inputs()[0].name: x})[0].astype(np.float32)
    ours = predict(backends.get("onnxruntime").load(stand_in.artifact), x).astype(np.float32)
    assert np.mean(ours.argmax(1) == truth.argmax(1)) >= 0.99
    assert np.abs(ours - truth).max() < 0.5
    dead_fp32 = top1(backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", src.path)), x,
                     splits.test.y)
    assert _stand_in_top1(art, splits) >= dead_fp32 - 0.02


def test_fp16_graph_keeps_io_fp32_and_accuracy(example_onnx, calib, splits, tmp_path, fp32_top1):
    art = TRT.compile(example_onnx, _target("fp16"), calib, tmp_path)
    m = onnx.load(str(tmp_path / "model.fp16.onnx"))
    assert sum(i.data_type == TensorProto.FLOAT16 for i in m.graph.initializer) >= 15  # the Conv weights
    assert [i.type.tensor_type.elem_type for i in (*m.graph.input, *m.graph.output)] == [TensorProto.FLOAT] * 2
    assert not [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert abs(fp32_top1 - _stand_in_top1(art, splits)) <= 0.005


def test_int8_bundle_is_deterministic(example_onnx, calib, tmp_path):
    t = load_target("jetson-orin-nano-int8")
    a = TRT.compile(example_onnx, t, calib, tmp_path / "a")
    b = TRT.compile(example_onnx, t, calib, tmp_path / "b")
    for name in ("model.int8.onnx", BUNDLE_MANIFEST, "trtexec.sh", "target.toml"):
        assert (a.path.parent / name).read_bytes() == (b.path.parent / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------
# the build bundle and its commands


def _flags(command: str) -> dict[str, str]:
    argv = shlex.split(command)
    assert argv[0] == "trtexec"
    out = {}
    for arg in argv[1:]:
        assert arg.startswith("--"), arg
        key, _, value = arg[2:].partition("=")
        assert key not in out, f"{key} given twice"
        out[key] = value
    return out


def test_bundle_holds_everything_the_board_needs(int8):
    from edgepipe._hashing import sha256_file

    t, art = int8
    root = art.path.parent
    if not HAS_RUNTIME:
        assert art.path.name == BUNDLE_MANIFEST
    assert {p.name for p in art.files} >= {"model.int8.onnx", "target.toml", "trtexec.sh", BUNDLE_MANIFEST}
    mf = json.loads((root / BUNDLE_MANIFEST).read_text())
    assert mf["onnx"]["sha256"] == sha256_file(root / "model.int8.onnx")
    assert mf["precision"] == "int8" and mf["target"] == t.name
    assert mf["qdq"]["quantized_layers"] == {"Conv": 15}
    assert load_target(root / "target.toml").to_dict() == t.to_dict()
    assert mf["commands"]["edgepipe"] == "edgepipe engine build ."
    script = (root / "trtexec.sh").read_text()
    assert mf["commands"]["trtexec"] in script and (root / "trtexec.sh").stat().st_mode & 0o111


def test_trtexec_line_matches_the_target(int8):
    t, art = int8
    mf = json.loads((art.path.parent / BUNDLE_MANIFEST).read_text())
    f = _flags(mf["commands"]["trtexec"])
    opts = t.options
    assert (art.path.parent / f["onnx"]).is_file() and f["saveEngine"] == "model.int8.engine"
    assert "stronglyTyped" in f and "fp16" not in f and "int8" not in f  # precision is in the graph
    assert isinstance(opts, TrtOptions)  # typed when the target was loaded
    assert f["minShapes"] == f"input:{opts.min_batch}x1x32x32"
    assert f["optShapes"] == f"input:{opts.opt_batch}x1x32x32"
    assert f["maxShapes"] == f"input:{opts.max_batch}x1x32x32"
    assert f["memPoolSize"] == f"workspace:{opts.workspace_mb}M"
    assert f["builderOptimizationLevel"] == str(opts.optimization_level)
    assert f["timingCacheFile"] == "timing.cache" and "useDLACore" not in f


def test_dla_target_plan():
    """The AGX Orin target: DLA core 0 with GPU fallback, static shapes, fp16 builder flag (TensorRT 10.x)."""
    t = load_target("jetson-agx-orin-fp16")
    TRT.validate(t)
    plan = plan_for(t, t.options, "input", (1, 1, 32, 32))
    f = _flags(plan.trtexec_command())
    assert f["useDLACore"] == "0" and "allowGPUFallback" in f and "fp16" in f
    assert "stronglyTyped" not in f and "minShapes" not in f and f["saveEngine"] == "model.fp16.engine"


@pytest.mark.parametrize(("precision", "options", "message"), [
    ("fp32", {"dla_core": 0}, "DLA runs fp16 and int8 only"),
    ("fp16", {"dla_core": 0, "max_batch": 8}, "DLA runs static shapes only"),
    ("int8", {"min_batch": 4, "max_batch": 2}, "min_batch <= max_batch"),
    ("int8", {"max_batch": 4, "opt_batch": 8}, "opt_batch = 8"),
    ("int8", {"typing": "loose"}, "typing"),
])
def test_bad_options_fail_at_validation(precision, options, message):
    with pytest.raises(ConfigError, match=message):
        TRT.validate(_target(precision, options=options))


# ---------------------------------------------------------------------------------------------------------
# preflight


def _det_model(path: Path) -> Path:
    """input [N, 1, 2, 2] -> Det: an operator TensorRT's parser does not have."""
    node = helper.make_node("Det", ["input"], ["logits"], name="det0")
    graph = helper.make_graph(
        [node], "det",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_preflight_stops_an_unsupported_operator_before_anything_ships(tmp_path, calib):
    from edgepipe.export import onnx_model

    src = onnx_model(_det_model(tmp_path / "det.onnx"))
    work = tmp_path / "work"
    with pytest.raises(CompileError, match=r"node 'det0' \(Det\): operator not supported by TensorRT"):
        TRT.compile(src, _target("int8", input_shape=[1, 1, 2, 2]), calib, work)
    assert not any(work.iterdir())


def _mutated(int8, mutate) -> onnx.ModelProto:
    _, art = int8
    m = onnx.load(str(art.path.parent / "model.int8.onnx"))
    assert preflight.violations(m) == []
    mutate(m)
    return m


def _first_conv_weight_dq(m: onnx.ModelProto):
    producer = {o: n for n in m.graph.node for o in n.output}
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    return producer[conv.input[1]]


def _set_init(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in m.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(value, name))


def _nonzero_zero_point(m):
    dq = _first_conv_weight_dq(m)
    zp = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == dq.input[2]).copy()
    zp[2] = 3
    _set_init(m, dq.input[2], zp)


def _uint8_zero_point(m):
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    _set_init(m, q.input[2], np.zeros((), np.uint8))


def _wrong_axis(m):
    dq = _first_conv_weight_dq(m)
    next(a for a in dq.attribute if a.name == "axis").i = 1


def _old_opset(m):
    next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = 11


def _dynamic_spatial(m):
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"


@pytest.mark.parametrize(("mutate", "message"), [
    (_nonzero_zero_point, r"\(DequantizeLinear\): zero point 3: TensorRT supports symmetric quantization only"),
    (_uint8_zero_point, r"\(QuantizeLinear\): zero point of type uint8: TensorRT quantizes to int8 only"),
    (_wrong_axis, r"\(DequantizeLinear\): .*axis 1"),
    (_old_opset, r"opset 11: TensorRT explicit quantization needs opset >= 13"),
    (_dynamic_spatial, r"node 'input' \(input\): dimension 2 is dynamic \(height\)"),
])
def test_preflight_names_the_node_and_the_rule(int8, mutate, message):
    m = _mutated(int8, mutate)
    with pytest.raises(CompileError, match=message) as e:
        preflight.check(m, "model.int8.onnx")
    if mutate in (_nonzero_zero_point, _wrong_axis):
        assert repr(_first_conv_weight_dq(m).name) in str(e.value)


def test_preflight_rejects_onnxruntime_u8s8_quantization(example_onnx, calib, tmp_path):
    """onnxruntime's CPU int8 (unsigned, asymmetric activations) is not a TensorRT graph: the rule says so."""
    art = backends.get("onnxruntime").compile(example_onnx, _target("int8", backend="onnxruntime"), calib, tmp_path)
    with pytest.raises(CompileError, match="zero point of type uint8"):
        preflight.check(onnx.load(str(art.path)), art.path.name)


# ---------------------------------------------------------------------------------------------------------
# this machine: what can and cannot happen here


@pytest.mark.skipif(HAS_RUNTIME, reason="TensorRT and a GPU are here")
def test_check_says_what_is_missing():
    avail = TRT.check()
    assert avail.compile and not avail.run
    assert "tensorrt" in avail.reason and "engine build" in avail.reason


@pytest.mark.skipif(HAS_RUNTIME, reason="TensorRT and a GPU are here")
def test_engine_build_without_tensorrt_fails_in_one_line(int8):
    _, art = int8
    with pytest.raises(BackendUnavailable, match="cannot run here"):
        TRT.load(art)  # no engine and no runtime: a clear error, not a crash
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "engine", "build", str(art.path.parent)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot build a TensorRT engine here" in lines[0] and "trtexec.sh" in lines[0]


def test_engine_build_refuses_a_directory_that_is_no_bundle(tmp_path):
    from edgepipe import api

    with pytest.raises(ConfigError, match="not a TensorRT build bundle"):
        api.engine_build(tmp_path)


@pytest.mark.skipif(HAS_RUNTIME, reason="TensorRT and a GPU are here: the build runs the engine itself")
def test_build_releases_a_bundle_evaluated_through_its_onnx(example_onnx, tmp_path):
    from edgepipe import api

    result = api.build(str(example_onnx.path), ["jetson-orin-nano-int8"], out=tmp_path / "dist", iterations=5)
    r = result.results[0]
    m = r.manifest
    assert m.accuracy.drop <= 1.0 and m.accuracy.validation_drop <= 1.0
    assert "onnxruntime (CPU)" in m.accuracy.evaluated_on
    assert m.latency is None and "edgepipe engine build" in m.bench_skipped
    assert m.artifact.file == BUNDLE_MANIFEST
    assert (r.release_dir / "model.int8.onnx").is_file() and (r.release_dir / "trtexec.sh").is_file()
    assert any("not benchmarked:" in n for n in result.notes)


# ---------------------------------------------------------------------------------------------------------
# where TensorRT and a GPU exist


@pytest.mark.gpu
def test_engine_matches_its_qdq_onnx(int8, splits, fp32_top1, tmp_path):
    from edgepipe.backends.tensorrt import build_bundle_engine

    _, art = int8
    record = build_bundle_engine(art.path.parent, tmp_path / "rebuilt.engine")
    assert record["bytes"] > 0 and record["typing"] == "strong"
    engine = TRT.load(Artifact("tensorrt", "int8", tmp_path / "rebuilt.engine"))
    stand_in = TRT.stand_in(art)
    assert stand_in is not None
    onnx_runner = backends.get("onnxruntime").load(stand_in.artifact)
    x = splits.test.x
    got, want = predict(engine, x, batch=64), predict(onnx_runner, x)  # 64 > max_batch: chunked
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert fp32_top1 - float((got.argmax(1) == splits.test.y).mean()) <= 0.01


@pytest.mark.gpu
def test_bench_of_an_engine_reports_gpu_memory(int8):
    from edgepipe.harness import BenchSettings, measure

    _, art = int8
    m = measure(art, BenchSettings(batch=1, warmup=5, iterations=20))
    assert m.device_memory_mb is not None and m.device_memory_mb > 0 and m.p50_ms > 0
