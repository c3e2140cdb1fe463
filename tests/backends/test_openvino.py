"""The OpenVINO backend: IR per precision, NNCF int8 (plain and accuracy-controlled), runner, no telemetry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgepipe import api, backends
from edgepipe.config import target_from_dict
from edgepipe.errors import ConfigError
from edgepipe.evaluate import predict, top1
from edgepipe.types import Artifact, CalibrationSet

# find_spec, not importorskip: importing nncf here, before edgepipe's telemetry opt-out, would write ~/intel/
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("openvino", "nncf")),
    reason="openvino and nncf are not installed: pip install 'edgepipe[openvino]'",
)
ROOT = Path(__file__).resolve().parents[2]


def _target(precision: str, **kw):
    return target_from_dict({"name": "t", "backend": "openvino", "precision": precision, **kw}, "test")


@pytest.fixture(scope="module")
def int8(example_onnx, splits, tmp_path_factory):
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    return backends.get("openvino").compile(example_onnx, _target("int8"), calib, tmp_path_factory.mktemp("int8"))


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 0.5)])
def test_float_irs_match_onnxruntime(precision, atol, example_onnx, calibration, splits, tmp_path):
    be = backends.get("openvino")
    art = be.compile(example_onnx, _target(precision), calibration, tmp_path)
    assert [p.name for p in art.files] == ["model.xml", "model.bin"] and all(p.is_file() for p in art.files)
    runner = be.load(art)
    assert runner.config["INFERENCE_PRECISION_HINT"] == ("bf16" if precision == "bf16" else "f32")
    x = splits.test.x[:64]
    ov_logits = predict(runner, x)
    ort_logits = predict(backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", example_onnx.path)), x)
    assert np.abs(ov_logits - ort_logits).max() < atol
    assert (ov_logits.argmax(1) == ort_logits.argmax(1)).mean() >= (1.0 if precision == "fp32" else 0.98)
    fp32_bin = example_onnx.path.stat().st_size
    if precision == "fp16":
        assert (tmp_path / "model.bin").stat().st_size < 0.6 * fp32_bin


def test_int8_keeps_top1_within_one_point(int8, example_onnx, splits):
    be = backends.get("openvino")
    fp32 = top1(backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", example_onnx.path)),
                splits.test.x, splits.test.y)
    acc = top1(be.load(int8), splits.test.x, splits.test.y)
    assert acc >= 0.95 and fp32 - acc <= 0.01
    q = int8.metadata["quantization"]
    assert len(q["quantized_layers"]) == 16  # 15 convolutions and the linear head
    assert q["activation_range"] == "minmax -> nncf MINMAX" and q["calibration"]["samples"] == len(splits.calibration)
    assert (int8.path.parent / "model.bin").stat().st_size < example_onnx.path.stat().st_size / 3


def test_int8_build_is_deterministic(int8, example_onnx, splits, tmp_path):
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    again = backends.get("openvino").compile(example_onnx, _target("int8"), calib, tmp_path)
    assert [p.read_bytes() for p in again.files] == [p.read_bytes() for p in int8.files]


def test_runner_never_changes_its_inputs_or_earlier_outputs(int8, splits):
    """A shared input array stays bound to the compiled model, and a later copying inference writes into it."""
    runner = backends.get("openvino").load(int8)
    name = runner.inputs[0].name
    big = splits.test.x[:40]
    feeds = [big[:8], big[8:9], np.asfortranarray(big[9:13]), big[13:21].astype(np.float64), big[::5],
             big[:8].copy()]
    originals = [f.copy() for f in feeds]
    outputs, kept = [], []
    for f in feeds:
        out = runner({name: f})[0]
        assert not np.shares_memory(runner.request.get_input_tensor(0).data, f)  # never bound to the caller
        outputs.append(out)
        kept.append(out.copy())
    for f in reversed(feeds):  # the same inputs again, in another order
        runner({name: f})
    for f, orig in zip(feeds, originals, strict=True):
        assert np.array_equal(f, orig)
    for o, k in zip(outputs, kept, strict=True):
        assert np.array_equal(o, k)
    assert np.array_equal(outputs[0], outputs[-1])
    outputs[0][:] = 0  # the caller owns what it got back
    assert np.array_equal(runner({name: feeds[0]})[0], kept[0])


OUTLIER_HEAD = """
import torch
from torch import nn
from edgepipe.models.example import digits_resnet


class OutlierHead(nn.Module):
    \"\"\"The trained example with one extra pooled feature ~10^4 times larger than the rest.

    Its head weight is 0, so fp32 is unchanged; but int8 gives the head's input one scale, and the
    real features round to nothing: only this layer needs float, the convolutions quantize well.
    \"\"\"

    def __init__(self):
        super().__init__()
        self.base = digits_resnet()
        fc = self.base.fc
        self.fc = nn.Linear(fc.in_features + 1, fc.out_features)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, : fc.in_features] = fc.weight
            self.fc.bias.copy_(fc.bias)

    def forward(self, x):
        b = self.base
        f = torch.flatten(b.pool(b.layer3(b.layer2(b.layer1(b.stem(x))))), 1)
        return self.fc(torch.cat([f, 1e4 + 1e3 * f.sum(1, keepdim=True)], 1))


def make():
    return OutlierHead().eval()
"""


@pytest.mark.slow
def test_accuracy_control_reverts_the_layer_that_plain_int8_ruins(splits, tmp_path, monkeypatch):
    from edgepipe.export import export

    (tmp_path / "outlier_head.py").write_text(OUTLIER_HEAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    from outlier_head import make

    onnx = export(make(), (1, 1, 32, 32), tmp_path / "outlier.onnx")
    calib = CalibrationSet(splits.calibration.x, "digits:calibration", splits.validation.x,
                           splits.validation.y, "digits:validation")  # choices on validation, never on test
    be = backends.get("openvino")
    t = _target("int8", budgets={"max_accuracy_drop": 1.0}, options={"accuracy_control": True})
    art = be.compile(onnx, t, calib, tmp_path / "ac")
    ac = art.metadata["quantization"]["accuracy_control"]
    assert ac["needed"] and ac["plain_int8_drop_points"] > 1.0  # plain int8 misses the budget
    assert len(ac["reverted"]) >= 1
    still = art.metadata["quantization"]["quantized_layers"]
    assert len(still) >= 10 and not set(still) & set(ac["reverted"])  # the convolutions stay int8
    runner = be.load(art)
    val = top1(runner, splits.validation.x, splits.validation.y)
    assert (ac["fp32_top1"] - val) * 100 <= 1.0 and val == pytest.approx(ac["top1"])  # measured on validation
    fp32 = top1(backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", onnx.path)), splits.test.x,
                splits.test.y)
    assert (fp32 - top1(runner, splits.test.x, splits.test.y)) * 100 <= 1.0  # and it holds on the held-out test


def test_options_that_make_no_sense_are_refused():
    be = backends.get("openvino")
    with pytest.raises(ConfigError, match="entropy.*no NNCF counterpart"):
        be.validate(_target("int8", calibration={"method": "entropy"}))
    with pytest.raises(ConfigError, match="accuracy_control applies to int8 only"):
        be.validate(_target("fp32", options={"accuracy_control": True}))
    with pytest.raises(ConfigError, match="needs budgets.max_accuracy_drop"):
        be.validate(_target("int8", budgets={"max_accuracy_drop": None}, options={"accuracy_control": True}))
    with pytest.raises(ConfigError, match="preset"):
        be.validate(_target("int8", options={"preset": "fast"}))


def test_ignored_scope_keeps_layers_in_float_and_unknown_names_are_named(example_onnx, calibration, tmp_path):
    be = backends.get("openvino")
    keep = "node_linear/WithoutBiases"
    art = be.compile(example_onnx, _target("int8", options={"ignored_scope": [keep],
                                                            "ignored_patterns": ["node_Conv_22[24].*"]}),
                     calibration, tmp_path)
    q = art.metadata["quantization"]["quantized_layers"]
    assert keep not in q and "node_Conv_222/WithoutBiases" not in q and len(q) == 13
    with pytest.raises(ConfigError, match="'nope'.*its layers are: node_Conv_222/WithoutBiases"):
        be.compile(example_onnx, _target("int8", options={"ignored_scope": ["nope"]}), calibration, tmp_path)


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("OPENVINO_TELEMETRY_DISABLE", None)  # not a switch openvino-telemetry knows; prove it is not needed
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_missing_openvino_is_a_clear_error_before_any_work(tmp_path):
    """openvino and nncf made unimportable in a fresh interpreter: check() and build say how to install them."""
    proc = _run(f"""
        import sys
        sys.modules["openvino"] = None
        sys.modules["nncf"] = None
        from pathlib import Path
        from edgepipe import api, backends
        from edgepipe.errors import BackendUnavailable
        avail = backends.get("openvino").check()
        print("check", avail.compile, avail.run, avail.reason)
        try:
            api.build(None, ["intel-cpu-int8"], out={str(tmp_path / 'dist')!r})
        except BackendUnavailable as e:
            print("build", e)
        print("out_exists", Path({str(tmp_path / 'dist')!r}).exists())
    """)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["check"] == "False False openvino, nncf not installed: pip install 'edgepipe[openvino]'"
    assert "intel-cpu-int8" in lines["build"] and "pip install 'edgepipe[openvino]'" in lines["build"]
    assert lines["out_exists"] == "False"


def test_compiling_int8_sends_no_telemetry_and_writes_nothing_under_home(example_onnx, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = _run(f"""
        import sys
        import numpy as np
        from pathlib import Path
        from edgepipe import backends
        from edgepipe.types import CalibrationSet
        from edgepipe.config import target_from_dict
        from edgepipe.export import onnx_model
        t = target_from_dict({{"name": "t", "backend": "openvino", "precision": "int8"}}, "test")
        x = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)
        backends.get("openvino").compile(onnx_model(Path({str(example_onnx.path)!r})), t, CalibrationSet(x),
                                         Path({str(tmp_path / 'ir')!r}))
        import nncf.telemetry.wrapper as w
        print(type(w.telemetry).__name__, sys.modules["openvino_telemetry"])
    """, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ir" / "model.xml").is_file()
    assert not list(home.iterdir())  # no ~/intel/ (client id, usage stats)
    assert proc.stdout.split() == ["MagicMock", "None"]  # NNCF's no-op stub; the telemetry package blocked


def test_targets_show_what_openvino_reports_about_this_cpu():
    rows = {r.name: r for r in api.targets()}
    for name in ("intel-cpu-int8", "intel-cpu-fp32", "intel-cpu-fp16"):
        assert rows[name].backend == "openvino" and rows[name].can_compile and rows[name].can_run
    device = rows["intel-cpu-int8"].device
    assert device["device"].startswith("CPU: ") and "INT8" in device["capabilities"].split(", ")
    assert rows["cpu-int8"].device == {}  # onnxruntime reports nothing more


@pytest.mark.slow
def test_build_intel_cpu_int8_end_to_end(tmp_path):
    result = api.build(None, ["intel-cpu-int8"], out=tmp_path, iterations=20)
    d = tmp_path / "intel-cpu-int8"
    assert {"calibration.json", "manifest.json", "model.bin", "model.xml", "source.onnx"} <= {p.name for p in d.iterdir()}
    m = json.loads((d / "manifest.json").read_text())
    assert m["artifact"]["backend"] == "openvino" and [f["name"] for f in m["artifact"]["files"]] == ["model.xml",
                                                                                                        "model.bin"]
    assert m["artifact"]["metadata"]["runtime"]["inference_precision"] == "f32"
    assert m["accuracy"]["value"] >= 95 and m["accuracy"]["drop"] <= 1.0
    assert m["latency"]["iterations"] == 20 and m["latency"]["p50_ms"] > 0
    assert m["tools"]["openvino"] and m["tools"]["nncf"]
    assert result.results[0].release_dir == d
    # the released IR runs again from its directory alone, as it was built (f32, not the CPU's bf16)
    art = api.resolve_artifact(d)
    assert backends.get("openvino").load(art).config["INFERENCE_PRECISION_HINT"] == "f32"
    bare = backends.get("openvino").load(Artifact("openvino", "", d / "model.xml"))
    assert bare.config["INFERENCE_PRECISION_HINT"] == "f32"  # read from the IR's rt_info
