"""AdaRound: learned up/down rounding of int8 weights, layer by layer; the weights it writes lie on the int8
grid each backend computes, so a real backend's int8 weights are AdaRound's integers; and its layers' output
error is below rounding to nearest. A small seeded CNN, real onnxruntime int8."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgepipe import backends
from edgepipe.config import load_target
from edgepipe.errors import ConfigError
from edgepipe.pipeline import stages
from edgepipe.pipeline.cache import Cache
from edgepipe.quantize.adaround import adaround
from edgepipe.types import CalibrationSet

SHAPE = (1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    from edgepipe.export import export

    x = np.random.default_rng(0).normal(0, 1, (48, *SHAPE[1:])).astype(np.float32)
    return export(Net().eval(), SHAPE, tmp_path_factory.mktemp("ada") / "net.onnx"), x


def _weights(path):
    m = onnx.load(str(path))
    layers = {n.input[1] for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in layers}


def test_weights_land_on_the_int8_grid_and_the_layer_error_drops(net, tmp_path):
    model, x = net
    out = tmp_path / "ada.onnx"
    rec = adaround(model.path, out, x, iterations=100)
    assert rec["layers"] == 3 and rec["samples"] == 48
    assert rec["layer_output_nmse"]["adaround"] < rec["layer_output_nmse"]["nearest"]
    assert 0.05 < rec["rounded_up_fraction"] < 0.95  # it learned roundings, not all up or all down
    before, after = _weights(model.path), _weights(out)
    changed = 0
    for name, w in after.items():
        axis = 1 if w.ndim == 2 and name.endswith("weight") is False else 0
        flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = np.abs(np.moveaxis(before[name], axis, 0).reshape(w.shape[axis], -1)).max(1) / 127
        levels = flat / scale[:, None]
        assert np.allclose(levels, np.round(levels), atol=1e-3), name  # on the grid
        assert np.allclose(np.abs(flat).max(1), scale * 127, rtol=1e-6), name  # the scale is kept
        near = np.round(np.moveaxis(before[name], axis, 0).reshape(w.shape[axis], -1) / scale[:, None])
        changed += int((np.round(levels) != near).sum())
    assert changed > 0  # some weights were rounded the other way than nearest


def test_onnxruntime_int8_takes_adarounds_integers_as_they_are(net, tmp_path):
    model, x = net
    t = load_target("cpu-int8")
    t = dataclasses.replace(t, input_shape=SHAPE,
                            calibration=dataclasses.replace(t.calibration, equalize=False, adaround=20))
    calib = CalibrationSet(x, "noise")
    art, rec = stages.compile(model, t, calib, tmp_path / "w", Cache(None, enabled=False))
    assert rec.name == "compile" and art.metadata["adaround"]["iterations"] == 20
    ada = _weights(tmp_path / "w" / "adarounded" / model.path.name)
    q = onnx.load(str(art.path))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    deq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    seen = 0
    for n in q.graph.node:
        if n.op_type == "Conv" and n.input[1] in deq:
            d = deq[n.input[1]]
            wq, scale = inits[d.input[0]].astype(np.float32), inits[d.input[1]]
            w = next(v for k, v in ada.items() if v.shape == wq.shape)
            assert np.allclose(wq * scale.reshape(-1, *[1] * (w.ndim - 1)), w, atol=1e-6)
            seen += 1
    assert seen == 2
    from edgepipe.evaluate import outputs

    y = outputs(backends.get("onnxruntime").load(art), x[:8])[0]
    with torch.no_grad():
        ref = Net().eval()(torch.from_numpy(x[:8])).numpy()
    assert y.shape == (8, 5) and np.abs(y - ref).max() < 0.1 * np.abs(ref).max()


def test_negative_steps_are_refused_at_load():
    from edgepipe.config.target import Calibration

    with pytest.raises(ConfigError, match="calibration.adaround = -1"):
        Calibration(adaround=-1)
