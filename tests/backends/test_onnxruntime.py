from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepipe import backends
from edgepipe.types import Artifact
from edgepipe.config import target_from_dict
from edgepipe.evaluate import predict, top1


def _target(precision: str, **kw):
    return target_from_dict({"name": "t", "backend": "onnxruntime", "precision": precision, **kw}, "test")


def test_fp32_matches_the_exported_model(example_onnx, calibration, splits, tmp_path, example_model):
    import torch

    art = backends.get("onnxruntime").compile(example_onnx, _target("fp32"), calibration, tmp_path)
    logits = predict(backends.get("onnxruntime").load(art), splits.evaluation.x[:32])
    with torch.no_grad():
        ref = example_model(torch.from_numpy(splits.evaluation.x[:32])).numpy()
    assert np.abs(logits - ref).max() < 1e-4


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_int8_keeps_accuracy_within_one_point(method, example_onnx, calibration, splits, tmp_path):
    be = backends.get("onnxruntime")
    t = _target("int8", calibration={"method": method, "samples": 128})
    art = be.compile(example_onnx, t, calibration, tmp_path)
    fp32 = top1(be.load(Artifact("onnxruntime", "fp32", example_onnx.path)), splits.evaluation.x, splits.evaluation.y)
    int8 = top1(be.load(art), splits.evaluation.x, splits.evaluation.y)
    assert int8 >= 0.95 and fp32 - int8 <= 0.01
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert art.path.stat().st_size < example_onnx.path.stat().st_size / 2


def test_u8s8_fuses_every_conv(example_onnx, calibration, tmp_path):
    """U8S8 QDQ becomes QLinearConv for every Conv once onnxruntime optimizes the graph."""
    import onnxruntime as ort

    art = backends.get("onnxruntime").compile(example_onnx, _target("int8"), calibration, tmp_path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    n_convs = sum(1 for n in onnx.load(str(example_onnx.path)).graph.node if n.op_type == "Conv")
    assert ops.count("QLinearConv") == n_convs and "Conv" not in ops


def test_int8_build_is_deterministic(example_onnx, calibration, tmp_path):
    be = backends.get("onnxruntime")
    a = be.compile(example_onnx, _target("int8"), calibration, tmp_path / "a")
    b = be.compile(example_onnx, _target("int8"), calibration, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()


def test_runner_handles_static_batch_with_padding(tmp_path, example_model, splits):
    from edgepipe.export import export

    m = export(example_model, (4, 1, 32, 32), tmp_path / "s.onnx", dynamic_batch=False)
    runner = backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", m.path))
    assert predict(runner, splits.evaluation.x[:10]).shape == (10, 10)
