"""Quantization-aware fine-tuning (``calibration.finetune``): the ONNX interpreter it trains is the model
onnxruntime runs, the fine-tune lowers the int8 error a real backend then gives, and the stage caches and
records it."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgepipe import backends
from edgepipe.config import load_target
from edgepipe.errors import CompileError, ConfigError
from edgepipe.export import export
from edgepipe.pipeline import stages
from edgepipe.pipeline.cache import Cache
from edgepipe.quantize.finetune import _torch_graph, finetune
from edgepipe.types import CalibrationSet


def _nmse(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean((y - ref) ** 2) / np.mean(ref ** 2))


def _ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


class _Padded(nn.Module):
    """ReLU6, a depthwise conv with TF's asymmetric "SAME" padding, max and average pooling, flatten:
    the operators real edge networks export beyond the example's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.c1(x), 0, 6)
        x = nn.functional.max_pool2d(x, 2)
        x = torch.clamp(self.dw(nn.functional.pad(x, (0, 1, 0, 1))), 0, 6)
        x = nn.functional.avg_pool2d(self.pw(x), 2)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("which", ["example", "padded"])
def test_the_interpreter_computes_what_onnxruntime_computes(which, example_onnx, splits, tmp_path):
    path = example_onnx.path if which == "example" else export(_Padded().eval(), (1, 1, 32, 32), tmp_path / "p.onnx").path
    x = splits.test.x[:16]
    with torch.no_grad():
        y = _torch_graph(path)(torch.from_numpy(x)).numpy()
    ref = _ort(path, x)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_finetune_lowers_the_int8_error_onnxruntime_then_gives(example_onnx, splits, tmp_path):
    """The fine-tuned float model, quantized by onnxruntime as any model is, is closer to fp32 than the
    model quantized without it (logit NMSE on the held-out test split, not the samples it trained on)."""
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    t = load_target("cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, equalize=False))
    tuned_t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, finetune=3))
    plain, _ = stages.compile(example_onnx, t, calib, tmp_path / "plain", Cache(enabled=False))
    tuned, _ = stages.compile(example_onnx, tuned_t, calib, tmp_path / "tuned", Cache(enabled=False))
    rec = tuned.metadata["finetune"]
    assert rec["epochs"] == 3 and rec["samples"] == len(calib.x) and rec["layers_trained"] > 5
    assert rec["simulated_int8_nmse"]["after"] < rec["simulated_int8_nmse"]["before"]
    ref = _ort(example_onnx.path, splits.test.x)
    ort = backends.get("onnxruntime")
    errs = {}
    for name, art in (("plain", plain), ("tuned", tuned)):
        run = ort.load(art)
        errs[name] = _nmse(run({run.inputs[0].name: splits.test.x})[0], ref)
    assert errs["tuned"] < 0.8 * errs["plain"], errs
    # the float graph keeps its shape: only initializers changed
    src = onnx.load(str(example_onnx.path))
    out = onnx.load(str(tmp_path / "tuned" / "finetuned" / example_onnx.path.name))
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in src.graph.node]
    changed = [i.name for i, j in zip(src.graph.initializer, out.graph.initializer, strict=True)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))]
    assert changed


def test_the_finetune_is_cached_once_for_every_backend_that_shares_it(example_onnx, splits, tmp_path, monkeypatch):
    import edgepipe.quantize.finetune as ft

    runs = []
    real = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: runs.append(1) or real(*a, **k))
    calib = CalibrationSet(splits.calibration.x[:32], "digits:calibration[:32]")
    cache = Cache(tmp_path / "cache")
    seen = []
    for name in ("cpu-int8", "intel-cpu-int8"):
        t = load_target(name)
        t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, finetune=1))
        onnx = example_onnx
        if name == "intel-cpu-int8":  # the same model under another file name still hits the cache
            (tmp_path / "renamed").mkdir()
            shutil.copy2(example_onnx.path, tmp_path / "renamed" / "other.onnx")
            onnx = dataclasses.replace(example_onnx, path=tmp_path / "renamed" / "other.onnx")
        art, _ = stages.compile(onnx, t, calib, tmp_path / name, cache)
        seen.append(art.metadata["finetune"])
    assert seen[0] == seen[1]
    assert len(runs) == 1  # OpenVINO's compile took onnxruntime's fine-tune from the cache
    assert len(list((tmp_path / "cache" / "stages" / "finetune").iterdir())) == 1


def test_finetune_names_an_operator_it_cannot_run(tmp_path, splits):
    class _Sin(nn.Module):  # (Sigmoid, the operator this used, is run since detectors' scores need it)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x).mean((2, 3))

    path = export(_Sin().eval(), (1, 1, 32, 32), tmp_path / "s.onnx").path
    with pytest.raises(CompileError, match=r"operator Sin \(node '[^']+'\).*finetune = 0") as e:
        finetune(path, tmp_path / "o.onnx", splits.calibration.x[:4], path, epochs=1)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


def test_finetune_settings_are_checked_and_searchable():
    from edgepipe.pipeline.search import candidate_target

    cal = load_target("cpu-int8").calibration
    with pytest.raises(ConfigError, match="calibration.finetune = -1"):
        dataclasses.replace(cal, finetune=-1)
    with pytest.raises(ConfigError, match="finetune_lr"):
        dataclasses.replace(cal, finetune_lr=0.0)
    t = candidate_target(load_target("intel-cpu-int8"), {"finetune": 4})
    assert t.calibration.finetune == 4 and t.sha256 != load_target("intel-cpu-int8").sha256
