"""float_mixed_ranges: an output head that concatenates box coordinates (0-640) and class scores (0-1) is
found on the calibration samples and kept in float, so int8 keeps the scores (one scale would round them
all to 0 or 2.5); real onnxruntime and OpenVINO int8, a toy one-stage detector head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgepipe import backends
from edgepipe.config import load_target
from edgepipe.errors import ConfigError
from edgepipe.pipeline import stages
from edgepipe.pipeline.cache import Cache

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def head(detector_head):
    return detector_head


def _target(name: str, mixed: bool):
    t = load_target(name)
    return dataclasses.replace(t, input_shape=SHAPE,
                               calibration=dataclasses.replace(t.calibration, float_mixed_ranges=mixed))


@pytest.mark.parametrize("name", ["cpu-int8", "intel-cpu-int8"])
def test_the_head_is_kept_float_and_the_scores_survive_int8(head, name, tmp_path):
    onnx_model, calib, x, ref = head
    err = {}
    for mixed in (False, True):
        art, _ = stages.compile(onnx_model, _target(name, mixed), calib, tmp_path / str(mixed), Cache(enabled=False))
        runner = backends.get(art.backend).load(art)
        y = np.concatenate([runner({runner.inputs[0].name: x[i:i + 1]})[0] for i in range(len(x))])
        err[mixed] = (float(np.abs(y[..., 4:] - ref[..., 4:]).max()), float(np.abs(y[..., :4] - ref[..., :4]).max()))
        if mixed:
            plan = art.metadata["mixed_precision"]
            (found,) = plan["mixed_ranges"]["heads"]
            assert found["ratio"] >= plan["mixed_ranges"]["ratio"] and found["concat"] in plan["kept_float"]
            assert min(found["absmax"]) <= 1.0 < 100 < max(found["absmax"])  # scores against pixels
        else:
            assert "mixed_precision" not in art.metadata
    (scores_plain, _), (scores_mixed, boxes_mixed) = err[False], err[True]
    if name == "cpu-int8":  # onnxruntime's QDQ quantizes the Concat and the Transpose after it: one scale
        assert scores_plain > 0.3, err  # for 0-640: a score rounds to 0 or 640/255
    else:  # NNCF quantizes the inputs of weighted ops only: OpenVINO's default leaves such a head in float
        assert scores_plain < 0.05, err
    assert scores_mixed < 0.05 and boxes_mixed < 640 * 0.05, err  # each part on its own scale


def test_a_model_without_such_a_head_is_left_as_it_is(example_onnx, splits):
    from edgepipe.quantize.ranges import mixed_range_heads

    assert mixed_range_heads(example_onnx, splits.calibration.x) == []


def test_tflite_refuses_it_at_load_and_the_search_can_try_it():
    from edgepipe.pipeline.search import candidate_target

    with pytest.raises(ConfigError, match=r"arm64-cpu-int8.*float_mixed_ranges.*not available for TFLite"):
        backends.get("tflite").validate(_target("arm64-cpu-int8", True))
    t = candidate_target(load_target("cpu-int8"), {"float_mixed_ranges": True})
    assert t.calibration.float_mixed_ranges and t.sha256 != load_target("cpu-int8").sha256
