"""Every backend takes any signature: several inputs, inputs of any rank, integer (token id) inputs, outputs
of any rank, several outputs.

Tiny seeded ONNX models are built here with ``onnx.helper`` (not through the exporter); every registered backend
that compiles here is held to onnxruntime fp32 on every output and its int8 to its fp32. A backend that compiles
but cannot run here (TensorRT without a GPU) is run through its stand-in. TFLite conversions are slow (~10 s):
it gets a few of the models, chosen to cover its layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe import backends
from edgepipe.backends.base import calibration_feeds, signature_of
from edgepipe.backends.tensorrt import plan_for
from edgepipe.backends.tensorrt.engine import EnginePlan
from edgepipe.config import Target
from edgepipe.config.target import Calibration
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.export import onnx_model
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Signature, TensorSpec

NAMES = backends.names()
ORT = backends.get("onnxruntime")
VOCAB = 16
F = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------------------
# the models


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[1:])), 1))).astype(np.float32)


def _model(name: str, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: dict[str, np.ndarray]) -> Any:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="edgepipe-tests")
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def _node(op: str, ins: list[str], out: str, **attrs: Any) -> Any:
    return helper.make_node(op, ins, [out], name=out, **attrs)


def two_inputs(rng: np.random.Generator) -> Any:
    """(a) image [N, 3, 8, 8] and vector [N, 4] -> logits [N, 5]."""
    inits = {"cw": _w(rng, 8, 3, 3, 3), "cb": _w(rng, 8), "vw": _w(rng, 8, 4).T.copy(), "fw": _w(rng, 5, 16),
             "fb": _w(rng, 5)}
    nodes = [_node("Conv", ["image", "cw", "cb"], "conv", pads=[1, 1, 1, 1]), _node("Relu", ["conv"], "relu"),
             _node("GlobalAveragePool", ["relu"], "pool"), _node("Flatten", ["pool"], "flat"),
             _node("MatMul", ["vector", "vw"], "vec"), _node("Relu", ["vec"], "vec_relu"),
             _node("Concat", ["flat", "vec_relu"], "cat", axis=1), _node("Gemm", ["cat", "fw", "fb"], "logits", transB=1)]
    return _model("two_inputs", nodes, [helper.make_tensor_value_info("image", F, ["batch", 3, 8, 8]),
                                        helper.make_tensor_value_info("vector", F, ["batch", 4])],
                  [helper.make_tensor_value_info("logits", F, ["batch", 5])], inits)


def audio(rng: np.random.Generator, length: int | str = 64) -> Any:
    """(b) 1-D audio [N, 1, 64] (or a dynamic length) -> scores [N, 3]."""
    inits = {"cw": _w(rng, 8, 1, 5), "cb": _w(rng, 8), "fw": _w(rng, 3, 8), "fb": _w(rng, 3)}
    nodes = [_node("Conv", ["audio", "cw", "cb"], "conv", pads=[2, 2]), _node("Relu", ["conv"], "relu"),
             _node("GlobalAveragePool", ["relu"], "pool"), _node("Flatten", ["pool"], "flat"),
             _node("Gemm", ["flat", "fw", "fb"], "scores", transB=1)]
    return _model("audio", nodes, [helper.make_tensor_value_info("audio", F, ["batch", 1, length])],
                  [helper.make_tensor_value_info("scores", F, ["batch", 3])], inits)


def tokens(rng: np.random.Generator) -> Any:
    """(c) int64 token ids [N, 8] -> an embedding (Gather), mean over the tokens -> logits [N, 4]."""
    inits = {"table": rng.standard_normal((VOCAB, 6)).astype(np.float32), "axes": np.array([1], np.int64),
             "fw": _w(rng, 4, 6), "fb": _w(rng, 4)}
    nodes = [_node("Gather", ["table", "tokens"], "embed", axis=0), _node("ReduceMean", ["embed", "axes"], "mean", keepdims=0),
             _node("Gemm", ["mean", "fw", "fb"], "logits", transB=1)]
    return _model("tokens", nodes, [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 8])],
                  [helper.make_tensor_value_info("logits", F, ["batch", 4])], inits)


def segmenter(rng: np.random.Generator) -> Any:
    """(d) image [N, 3, 8, 8] -> a mask [N, 2, 8, 8]."""
    inits = {"w1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8), "w2": _w(rng, 2, 8, 1, 1), "b2": _w(rng, 2)}
    nodes = [_node("Conv", ["image", "w1", "b1"], "conv1", pads=[1, 1, 1, 1]), _node("Relu", ["conv1"], "relu"),
             _node("Conv", ["relu", "w2", "b2"], "mask")]
    return _model("segmenter", nodes, [helper.make_tensor_value_info("image", F, ["batch", 3, 8, 8])],
                  [helper.make_tensor_value_info("mask", F, ["batch", 2, 8, 8])], inits)


def two_outputs(rng: np.random.Generator) -> Any:
    """(e) image [N, 3, 8, 8] -> a heat map [N, 1, 8, 8] (first) and logits [N, 4] (second)."""
    inits = {"w1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8), "w2": _w(rng, 1, 8, 1, 1), "b2": _w(rng, 1),
             "fw": _w(rng, 4, 8), "fb": _w(rng, 4)}
    nodes = [_node("Conv", ["image", "w1", "b1"], "conv1", pads=[1, 1, 1, 1]), _node("Relu", ["conv1"], "relu"),
             _node("Conv", ["relu", "w2", "b2"], "heat"), _node("GlobalAveragePool", ["relu"], "pool"),
             _node("Flatten", ["pool"], "flat"), _node("Gemm", ["flat", "fw", "fb"], "logits", transB=1)]
    return _model("two_outputs", nodes, [helper.make_tensor_value_info("image", F, ["batch", 3, 8, 8])],
                  [helper.make_tensor_value_info("heat", F, ["batch", 1, 8, 8]),
                   helper.make_tensor_value_info("logits", F, ["batch", 4])], inits)


MODELS = {"two_inputs": two_inputs, "audio": audio, "tokens": tokens, "segmenter": segmenter,
          "two_outputs": two_outputs}
#: the TFLite conversions (slow): several inputs (NHWC + as-is, int8 calibrated on both), 3-D kept as it is,
#: integer ids, a 4-D output before a 2-D one
TFLITE = {"fp32": ("two_inputs", "audio", "tokens", "two_outputs"), "int8": ("two_inputs",)}


def samples(sig: Signature, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples of every input: floats in [0, 1), token ids in [0, VOCAB)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in sig.inputs:
        shape = (n, *t.shape[1:])
        out[t.name] = rng.integers(0, VOCAB, shape).astype(t.dtype) if not t.is_float else rng.random(shape, np.float32)
    return out


def _target(backend: str, precision: str, sig: Signature, **kw: Any) -> Target:
    return Target(name=f"sig-{backend}-{precision}", backend=backend, precision=precision,  # type: ignore[arg-type]
                  input_shape={t.name: (1, *t.shape[1:]) for t in sig.inputs}, calibration=Calibration(samples=64), **kw)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal to quantization noise ratio of ``got`` against ``ref``, in dB."""
    noise = float(np.mean((got.astype(np.float64) - ref) ** 2))
    return 10 * np.log10(float(np.mean(ref.astype(np.float64) ** 2)) / max(noise, 1e-30))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxModel]:
    root = tmp_path_factory.mktemp("signatures")
    out = {}
    for name, build in MODELS.items():
        onnx.save(build(np.random.default_rng(0)), str(root / f"{name}.onnx"))
        out[name] = onnx_model(root / f"{name}.onnx")
    return out


def calibration_of(m: OnnxModel) -> CalibrationSet:
    """64 samples: a dict by input name for a model with several inputs, one array for a one-input model."""
    assert m.signature is not None
    x = samples(m.signature, 64, seed=1)
    return CalibrationSet(x if len(x) > 1 else x[m.signature.inputs[0].name], "synthetic")


class Compiled:
    """Compiles (backend, model, precision) once per module."""

    def __init__(self, models: dict[str, OnnxModel], root: Path) -> None:
        self.models, self.root = models, root
        self.done: dict[tuple[str, str, str], Artifact] = {}

    def __call__(self, backend: str, model: str, precision: str) -> Artifact:
        key = (backend, model, precision)
        if key not in self.done:
            be = backends.get(backend)
            avail = be.check()
            if not avail.compile:
                pytest.skip(f"{backend} cannot compile here: {avail.reason}")
            m = self.models[model]
            assert m.signature is not None
            self.done[key] = be.compile(m, _target(backend, precision, m.signature), calibration_of(m),
                                        self.root / f"{backend}-{model}-{precision}")
        return self.done[key]


@pytest.fixture(scope="module")
def compiled(models: dict[str, OnnxModel], tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return Compiled(models, tmp_path_factory.mktemp("signature-artifacts"))


def _runner(backend: str, art: Artifact) -> Any:
    """The artifact's runner here, else (TensorRT without a GPU) its stand-in's."""
    be = backends.get(backend)
    if be.check().run:
        return be.load(art)
    with pytest.raises(BackendUnavailable):
        be.load(art)
    stand_in = be.stand_in(art)
    if stand_in is None:
        pytest.skip(f"{backend} cannot run here and has no stand-in")
    return backends.get(stand_in.artifact.backend).load(stand_in.artifact)


def _cases(precision: str) -> list[Any]:
    out = []
    for b in NAMES:
        if precision not in backends.get(b).capabilities.precisions:
            continue
        for m in MODELS:
            if b == "tflite" and m not in TFLITE[precision]:
                continue
            out.append(pytest.param(b, m, id=f"{b}-{m}"))
    return out


# ---------------------------------------------------------------------------------------------------------
# compile, run, agree


@pytest.mark.parametrize(("backend", "model"), _cases("fp32"))
def test_fp32_matches_onnxruntime_on_every_output(backend, model, compiled, models):
    m = models[model]
    sig = m.signature
    runner = _runner(backend, compiled(backend, model, "fp32"))
    # every input, by its ONNX name, in the model's order, with its dtype and its sizes beyond the batch
    assert [t.name for t in runner.inputs] == sig.input_names
    assert [t.dtype for t in runner.inputs] == [t.dtype for t in sig.inputs]
    assert [tuple(t.shape[1:]) for t in runner.inputs] == [tuple(t.shape[1:]) for t in sig.inputs]
    x = samples(sig, 5, seed=2)  # 5: not a batch the artifact was made for
    ref = ORT.load(Artifact("onnxruntime", "fp32", m.path))(x)
    got = runner(x)
    assert len(got) == len(sig.outputs) == len(ref)
    for spec, r, g in zip(sig.outputs, ref, got, strict=True):  # in the ONNX model's output order
        assert g.shape == r.shape == (5, *spec.shape[1:]), spec.name
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4, err_msg=f"{backend} {model}: output {spec.name}")


@pytest.mark.parametrize(("backend", "model"), _cases("int8"))
def test_int8_stays_close_to_fp32_on_every_output(backend, model, compiled, models):
    m = models[model]
    art = compiled(backend, model, "int8")
    assert art.precision == "int8"
    x = samples(m.signature, 32, seed=3)
    ref = ORT.load(Artifact("onnxruntime", "fp32", m.path))(x)
    got = _runner(backend, art)(x)
    assert len(got) == len(ref)
    for spec, r, g in zip(m.signature.outputs, ref, got, strict=True):
        assert g.shape == r.shape, spec.name
        assert sqnr_db(r, g) > 20, (spec.name, sqnr_db(r, g))  # measured: 37-57 dB
        assert not np.array_equal(g, r)  # it is int8: not the float model under another name


@pytest.mark.parametrize("backend", [b for b in NAMES if "int8" in backends.get(b).capabilities.precisions])
def test_int8_calibration_record_counts_samples_of_every_input(backend, compiled, models):
    model = "two_inputs"
    art = compiled(backend, model, "int8")
    calib = calibration_of(models[model])
    assert isinstance(calib.x, dict) and len(calib) == 64
    records = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            if v.get("sha256") == calib.sha256:
                records.append(v)
            for w in v.values():
                walk(w)

    walk(art.metadata)
    assert records and all(r["samples"] == 64 for r in records)


@pytest.mark.parametrize("backend", [b for b in NAMES if b != "tflite"])
def test_a_wrong_feed_set_names_the_inputs(backend, compiled):
    runner = _runner(backend, compiled(backend, "two_inputs", "fp32"))
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"inputs are image, vector; got feeds for image\b"):
        runner({"image": x})
    with pytest.raises(ValueError, match="got feeds for image, vector, x"):
        runner({"image": x, "vector": np.zeros((1, 4), np.float32), "x": x})


# ---------------------------------------------------------------------------------------------------------
# integer inputs: fed as they are, never quantized


def test_calibration_feeds_keep_integer_ids_as_they_are(models):
    sig = models["tokens"].signature
    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 8)).astype(np.int32)
    got = calibration_feeds(sig.inputs, CalibrationSet(ids))["tokens"]
    assert got.dtype == np.int64 and np.array_equal(got, ids)  # the model's dtype, the same values
    assert np.array_equal(calibration_feeds(sig.inputs, CalibrationSet(ids.astype(np.float32)))["tokens"], ids)
    with pytest.raises(CompileError, match="'tokens' takes int64"):
        calibration_feeds(sig.inputs, CalibrationSet(ids / 16))  # scaled ids: refused, never rounded


def _onnx_consumers(path: Path, tensor: str) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if tensor in n.input]


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_no_qdq_on_integer_inputs_of_qdq_graphs(backend, compiled):
    art = compiled(backend, "tokens", "int8")
    path = art.path if backend == "onnxruntime" else art.path.parent / art.metadata["onnx"]
    assert _onnx_consumers(path, "tokens") == ["Gather"]  # the ids go straight to the embedding
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if backend == "onnxruntime":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # while the rest is quantized
    else:  # modelopt keeps a 6 -> 4 Gemm in fp16 (too small for int8 kernels): nothing to quantize here
        assert [k["node"] for k in art.metadata["qdq"]["high_precision_layers"]] == ["logits"]


def test_openvino_int8_leaves_integer_inputs_alone(compiled):
    import openvino as ov

    art = compiled("openvino", "tokens", "int8")
    model = ov.Core().read_model(str(art.path))
    (param,) = model.inputs
    assert param.get_element_type() == ov.Type.i64
    assert [t.get_node().get_type_name() for t in param.get_target_inputs()] == ["Gather"]
    assert art.metadata["quantization"]["quantized_layers"]  # the head is int8


def test_tflite_full_integer_refuses_an_integer_input_before_any_work(models, tmp_path, monkeypatch):
    be = backends.get("tflite")
    m = models["tokens"]
    t = _target("tflite", "int8", m.signature)
    with pytest.raises(CompileError, match=r"input 'tokens' is int64") as e:
        be.check_signature(m.signature, t)
    assert "\n" not in str(e.value)
    be.check_signature(m.signature, _target("tflite", "fp32", m.signature))  # float TFLite takes ids as they are
    monkeypatch.setenv("EDGEPIPE_TOOLCHAINS_DIR", str(tmp_path / "none"))  # no converter: refused before that too
    with pytest.raises(CompileError, match="'tokens'"):
        be.compile(m, t, calibration_of(m), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", NAMES)
def test_check_signature_accepts_float_models(backend, models):
    """The hook refuses only what the backend cannot do: every backend takes the float models as they are."""
    be = backends.get(backend)
    for name in ("two_inputs", "audio", "segmenter", "two_outputs"):
        sig = models[name].signature
        for p in be.capabilities.precisions:
            be.check_signature(sig, _target(backend, p, sig))


# ---------------------------------------------------------------------------------------------------------
# TFLite: layouts per input and per output, recorded


def test_tflite_records_each_inputs_and_outputs_layout(compiled):
    two = compiled("tflite", "two_inputs", "fp32").metadata
    assert two["layouts"] == {"image": "NHWC", "vector": "as-is"}
    assert list(two["tensor_names"]["inputs"]) == ["image", "vector"]
    shapes = {d["name"]: d["shape"] for d in two["tensors"]["inputs"]}
    assert shapes[two["tensor_names"]["inputs"]["image"]] == [-1, 8, 8, 3]
    assert shapes[two["tensor_names"]["inputs"]["vector"]] == [-1, 4]
    aud = compiled("tflite", "audio", "fp32").metadata
    assert aud["layouts"] == {"audio": "as-is"} and aud["input_layout"] == "as-is"
    assert [d["shape"] for d in aud["tensors"]["inputs"]] == [[-1, 1, 64]]  # kept NCW (onnx2tf's -k)
    heads = compiled("tflite", "two_outputs", "fp32").metadata
    assert heads["output_layouts"] == {"heat": "NHWC", "logits": "as-is"}  # in the ONNX model's order
    assert list(heads["tensor_names"]["outputs"]) == ["heat", "logits"]


def test_tflite_int8_quantizes_every_input_with_its_own_scale(compiled):
    art = compiled("tflite", "two_inputs", "int8")
    runner = backends.get("tflite").load(art)
    details = runner.interpreter.get_input_details()
    assert len(details) == 2 and all(d["dtype"] == np.int8 and d["quantization"][0] > 0 for d in details)
    assert details[0]["quantization"] != details[1]["quantization"]


def test_tflite_runner_refuses_an_image_in_nhwc(compiled):
    runner = backends.get("tflite").load(compiled("tflite", "two_outputs", "fp32"))
    with pytest.raises(ValueError, match="NCHW batches of"):
        runner({"image": np.zeros((2, 8, 8, 3), np.float32)})
    with pytest.raises(ValueError, match="inputs are image; got feeds for x"):
        runner({"x": np.zeros((2, 3, 8, 8), np.float32)})


# ---------------------------------------------------------------------------------------------------------
# OpenVINO: shapes per input, accuracy control only where top-1 applies


def test_openvino_fixes_dynamic_dimensions_to_the_targets_shape(tmp_path):
    if not backends.get("openvino").check().compile:
        pytest.skip("openvino is not installed")
    onnx.save(audio(np.random.default_rng(0), length="time"), str(tmp_path / "audio.onnx"))
    m = onnx_model(tmp_path / "audio.onnx")
    assert m.signature.inputs[0].shape == ("batch", 1, "time")
    t = Target(name="ov-audio", backend="openvino", precision="fp32", input_shape=(1, 1, 64))
    art = backends.get("openvino").compile(m, t, CalibrationSet(np.zeros((0, 1, 64), np.float32)), tmp_path / "out")
    runner = backends.get("openvino").load(art)
    assert runner.inputs[0].shape == (None, 1, 64)  # the batch stays dynamic, the length is the target's
    x = samples(Signature((TensorSpec("audio", (None, 1, 64), "float32"),)), 3, seed=4)
    np.testing.assert_allclose(runner(x)[0], ORT.load(Artifact("onnxruntime", "fp32", m.path))(x)[0], atol=1e-4)
    with pytest.raises(ConfigError, match="input 'audio' the shape \\[1, 64\\]"):
        backends.get("openvino").compile(m, t.with_input_shape((1, 64)), CalibrationSet(np.zeros((0, 64), np.float32)),
                                         tmp_path / "bad")


def test_openvino_accuracy_control_is_skipped_with_a_note_beyond_classifiers(models, tmp_path):
    if not backends.get("openvino").check().compile:
        pytest.skip("openvino is not installed")
    m = models["two_outputs"]
    t = _target("openvino", "int8", m.signature, options={"accuracy_control": True})
    art = backends.get("openvino").compile(m, t, calibration_of(m), tmp_path)
    note = art.metadata["quantization"]["accuracy_control"]
    assert set(note) == {"skipped"} and "heat [" in note["skipped"] and "logits [" in note["skipped"]


# ---------------------------------------------------------------------------------------------------------
# TensorRT: a profile per input (plan and trtexec line, no TensorRT needed)


def test_tensorrt_plan_has_a_profile_per_input(models):
    sig = models["two_inputs"].signature
    t = _target("tensorrt", "int8", sig, options={"max_batch": 8})
    plan = plan_for(t, t.options, sig.inputs)
    assert [(p.name, p.min_shape, p.opt_shape, p.max_shape) for p in plan.profiles] == [
        ("image", (1, 3, 8, 8), (1, 3, 8, 8), (8, 3, 8, 8)), ("vector", (1, 4), (1, 4), (8, 4))]
    argv = plan.trtexec_argv()
    assert "--minShapes=image:1x3x8x8,vector:1x4" in argv
    assert "--optShapes=image:1x3x8x8,vector:1x4" in argv
    assert "--maxShapes=image:8x3x8x8,vector:8x4" in argv
    d = plan.to_dict()
    assert "input_name" not in d and [p["name"] for p in d["inputs"]] == ["image", "vector"]
    assert EnginePlan.from_dict(d) == plan


def test_tensorrt_one_input_plan_is_written_as_before():
    t = Target(name="t", backend="tensorrt", precision="fp16")
    plan = plan_for(t, t.options, "input", ("batch", 1, 32, 32))
    d = plan.to_dict()
    assert list(d) == ["onnx", "engine", "precision", "input_name", "min_shape", "opt_shape", "max_shape", "dynamic",
                       "typing", "workspace_mb", "dla_core", "gpu_fallback", "optimization_level", "timing_cache"]
    assert d["input_name"] == "input" and d["max_shape"] == (32, 1, 32, 32)
    assert EnginePlan.from_dict(d) == plan and plan.input_name == "input"
    assert "--minShapes=input:1x1x32x32" in plan.trtexec_argv()


def test_tensorrt_static_batch_inputs_need_no_profile():
    a, b = TensorSpec("a", (2, 3, 8, 8), "float32"), TensorSpec("b", (2, 4), "int64")
    t = Target(name="t", backend="tensorrt", precision="fp32", input_shape={"a": (2, 3, 8, 8), "b": (2, 4)})
    plan = plan_for(t, t.options, [a, b])
    assert not plan.dynamic and [p.max_shape for p in plan.profiles] == [(2, 3, 8, 8), (2, 4)]
    assert not any(f.startswith(("--minShapes", "--maxShapes")) for f in plan.trtexec_argv())


def test_tensorrt_bundle_records_every_input_and_output(compiled, models):
    import json

    art = compiled("tensorrt", "two_inputs", "fp32")
    bundle = json.loads((art.path.parent / "tensorrt-bundle.json").read_text())
    assert [i["name"] for i in bundle["inputs"]] == ["image", "vector"]
    assert [p["name"] for p in bundle["plan"]["inputs"]] == ["image", "vector"]
    assert "--minShapes=image:1x3x8x8,vector:1x4" in (art.path.parent / "trtexec.sh").read_text()
    heads = compiled("tensorrt", "two_outputs", "fp32")
    assert heads.metadata["outputs"] == ["heat", "logits"]  # the runner returns the engine's outputs in this order


def test_tensorrt_needs_a_shape_per_input_before_any_work(models, tmp_path):
    t = Target(name="t", backend="tensorrt", precision="fp32", input_shape=(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="the model has 2 inputs"):
        backends.get("tensorrt").compile(models["two_inputs"], t, calibration_of(models["two_inputs"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_signature_of_reads_a_model_without_one(models):
    m = models["two_outputs"]
    bare = OnnxModel(m.path, m.input_name, m.input_shape, m.sha256)  # as stages made before signatures did
    assert signature_of(bare) == m.signature
