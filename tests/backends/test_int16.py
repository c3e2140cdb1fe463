"""16-bit activations where the runtime executes them: onnxruntime's 16-bit Q/DQ (``activation_type =
"uint16"``) and TFLite's 16x8 mode (``activations = "int16"``); refused at load, naming the backend, where a
backend has none. Real conversions of a toy detector head whose output joins boxes (0-640) and scores (0-1)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from edgepipe import backends
from edgepipe.config import target_from_dict
from edgepipe.errors import ConfigError
from edgepipe.evaluate import outputs

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def toolchain() -> None:
    from edgepipe import toolchains

    st = toolchains.status("tflite")
    if not st.installed:
        if IN_CI:
            pytest.fail(f"the tflite converter toolchain is not installed ({st.reason}): CI must install it")
        pytest.skip(f"the tflite converter toolchain is not installed ({st.reason})")


SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def head(detector_head):
    return detector_head


def _target(backend: str, **options):
    return target_from_dict({"name": f"t-{backend}", "backend": backend, "precision": "int8",
                             "input_shape": list(SHAPE), "options": options}, "test")


def _score_error(art, x, ref):
    got = outputs(backends.get(art.backend).load(art, threads=1), x)[0]
    return float(np.abs(got[..., 4:] - ref[..., 4:]).max())


def test_onnxruntime_uint16_activations_keep_the_scores(head, tmp_path):
    model, calib, x, ref = head
    be = backends.get("onnxruntime")
    a8 = be.compile(model, _target("onnxruntime"), calib, tmp_path / "8")
    a16 = be.compile(model, _target("onnxruntime", activation_type="uint16"), calib, tmp_path / "16")
    assert a16.metadata["activation_type"] == "uint16"
    q = onnx.load(str(a16.path))
    zero_points = {i.data_type for i in q.graph.initializer if i.name.endswith("_zero_point") and not i.dims}
    assert onnx.TensorProto.UINT16 in zero_points  # activations on 16-bit Q/DQ
    e8, e16 = _score_error(a8, x, ref), _score_error(a16, x, ref)
    assert e8 > 0.3 and e16 < 0.02, (e8, e16)


def test_tflite_16x8_activations_keep_the_scores(toolchain, head, tmp_path):
    model, calib, x, ref = head
    be = backends.get("tflite")
    art = be.compile(model, _target("tflite", activations="int16"), calib, tmp_path / "16")
    assert art.metadata["variant"] == "integer_quant_with_int16_act"
    assert art.metadata["quantization"]["kind"].startswith("16x8")
    runner = be.load(art, threads=1)
    dtypes = {d["dtype"] for d in runner.interpreter.get_tensor_details()}
    assert np.int16 in dtypes and np.int8 in dtypes  # int16 activations, int8 weights
    assert _score_error(art, x, ref) < 0.02


@pytest.mark.parametrize("backend, key", [("openvino", "activation_type"), ("tensorrt", "activations")])
def test_a_backend_without_16_bit_activations_refuses_them_at_load(backend, key):
    with pytest.raises(ConfigError, match=f"backend {backend}: unknown key .*{backend}.* have none"):
        _target(backend, **{key: "int16"})
