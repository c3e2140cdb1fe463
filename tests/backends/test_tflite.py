"""The tflite backend: onnx2tf in its own toolchain, offline; LiteRT runner taking NCHW.

Conversions need the toolchain (`edgepipe toolchain install tflite`). Without it these tests skip, except
in CI (CI=true), where a missing toolchain fails: the README's set-up line installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from edgepipe import backends, toolchains
from edgepipe.backends import tflite
from edgepipe.config import target_from_dict
from edgepipe.errors import BackendUnavailable, BudgetError, CompileError
from edgepipe.evaluate import predict
from edgepipe.types import Artifact, CalibrationSet

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _target(precision: str, **kw):
    return target_from_dict({"name": f"t-{precision}", "backend": "tflite", "precision": precision, **kw}, "test")


@pytest.fixture(scope="session")
def toolchain() -> None:
    st = toolchains.status("tflite")
    if not st.installed:
        msg = f"the tflite converter toolchain is not installed ({st.reason})"
        if IN_CI:
            pytest.fail(msg + ": CI must install it (the README's set-up line does)")
        pytest.skip(msg)


@contextlib.contextmanager
def listener() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A local TCP socket that records every connection made to it; yields (proxy URL, connections)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, addr = srv.accept()
                seen.append(addr)
                conn.close()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", seen
    finally:
        stop.set()
        t.join()
        srv.close()


@pytest.fixture(scope="session")
def converted(toolchain, example_onnx, splits, tmp_path_factory) -> dict[str, Artifact]:
    """The example converted once per session, fp32 and int8, with a recording proxy in place."""
    calib = CalibrationSet(splits.calibration.x, "digits:calibration")
    be = backends.get("tflite")
    out = {}
    with listener() as (proxy, seen):
        old = os.environ.get("EDGEPIPE_OFFLINE_PROXY")
        os.environ["EDGEPIPE_OFFLINE_PROXY"] = proxy
        try:
            for p in ("fp32", "int8"):
                out[p] = be.compile(example_onnx, _target(p), calib, tmp_path_factory.mktemp(f"tflite-{p}"))
        finally:
            if old is None:
                os.environ.pop("EDGEPIPE_OFFLINE_PROXY")
            else:
                os.environ["EDGEPIPE_OFFLINE_PROXY"] = old
    assert seen == [], f"the conversion connected to the proxy: {seen}"
    return out


@pytest.fixture(scope="session")
def reference(example_onnx, splits) -> np.ndarray:
    ort = backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", example_onnx.path))
    return predict(ort, splits.test.x)


def test_fp32_matches_onnxruntime(converted, reference, splits):
    art = converted["fp32"]
    assert art.path.name == "model.tflite" and art.metadata["variant"] == "float32"
    logits = predict(backends.get("tflite").load(art, threads=1), splits.test.x)
    assert np.abs(logits - reference).max() < 1e-4
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_int8_is_full_integer_and_keeps_top1_within_one_point(converted, reference, splits):
    art = converted["int8"]
    runner = backends.get("tflite").load(art, threads=2)
    (inp,), (out,) = runner.interpreter.get_input_details(), runner.interpreter.get_output_details()
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8  # int8 in and out
    assert inp["quantization"][0] > 0 and out["quantization"][0] > 0
    int8 = (predict(runner, splits.test.x).argmax(1) == splits.test.y).mean()
    fp32 = (reference.argmax(1) == splits.test.y).mean()
    assert fp32 - int8 <= 0.01 and int8 >= 0.95
    assert art.size_bytes < converted["fp32"].size_bytes / 3  # int8 weights
    q = art.metadata["quantization"]
    assert q["kind"] == "full-integer" and q["weights"] == "int8 per-channel"
    assert q["calibration"]["samples"] == len(splits.calibration)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_nchw_batches_give_the_same_predictions_as_onnxruntime(precision, converted, reference, splits):
    """The Runner takes NCHW like every backend, transposes to NHWC, and resizes the batch as it comes."""
    runner = backends.get("tflite").load(converted[precision])
    assert runner.inputs[0].shape == (None, 1, 32, 32)  # the model itself is NHWC (-1, 32, 32, 1)
    assert converted[precision].metadata["tensors"]["inputs"][0]["shape"] == [-1, 32, 32, 1]
    x = splits.test.x[:64]
    whole = runner({runner.inputs[0].name: x})[0]
    pieces = np.concatenate([runner({runner.inputs[0].name: x[i : i + n]})[0] for i, n in ((0, 1), (1, 7), (8, 56))])
    np.testing.assert_allclose(whole, pieces, atol=1e-5)
    agree = (whole.argmax(1) == reference[:64].argmax(1)).mean()
    assert agree == 1.0 if precision == "fp32" else agree >= 0.98
    with pytest.raises(ValueError, match="NCHW"):
        runner({runner.inputs[0].name: x.transpose(0, 2, 3, 1)})  # NHWC in: refused, not silently misread


def test_bench_worker_loads_only_the_runtime(converted):
    from edgepipe.harness import BenchSettings, measure

    m = measure(converted["int8"], BenchSettings(threads=1, warmup=2, iterations=20))
    assert m.backend == "tflite" and m.iterations == 20 and 0 < m.p50_ms < 1000
    assert m.peak_rss_above_baseline_mb < 300  # ai-edge-litert alone; tensorflow would be ~650 MB


def test_missing_toolchain_is_a_clear_error(example_onnx, calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_TOOLCHAINS_DIR", str(tmp_path / "toolchains"))
    (tmp_path / "toolchains" / "tflite" / "venv" / "bin").mkdir(parents=True)  # half-installed: no marker
    be = backends.get("tflite")
    avail = be.check()
    assert not avail.compile and avail.run
    assert "edgepipe toolchain install tflite" in avail.reason and "half-installed" in avail.reason
    with pytest.raises(BackendUnavailable, match="edgepipe toolchain install tflite"):
        be.compile(example_onnx, _target("int8"), calibration, tmp_path / "out")
    assert not (tmp_path / "out" / "model.tflite").exists()
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "build", "--target", "raspberry-pi-5", "--out",
                           str(tmp_path / "dist")], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 1 and "edgepipe toolchain install tflite" in proc.stderr
    assert not (tmp_path / "dist").exists()


def test_network_guard_blocks_before_connecting(tmp_path):
    """The driver's audit hook refuses a connection, and the listening socket never sees it."""
    code = ("import runpy, socket, sys; g = runpy.run_path(sys.argv[1]); g['install_network_guard']()\n"
            "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=2)\n"
            "except PermissionError as e:\n    print('BLOCKED', e)\n"
            "print('ATTEMPTS', len(g['ATTEMPTS']))")
    with listener() as (proxy, seen):
        port = proxy.rsplit(":", 1)[1]
        guarded = subprocess.run([sys.executable, "-c", code, str(tflite.DRIVER), port], capture_output=True, text=True)
        plain = subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}))"])
        for _ in range(20):  # the unguarded connection shows the listener works
            if seen:
                break
            threading.Event().wait(0.1)
    assert "BLOCKED" in guarded.stdout and "ATTEMPTS 1" in guarded.stdout, guarded.stderr
    assert plain.returncode == 0 and len(seen) == 1


@pytest.fixture(scope="module")
def rgb_onnx(tmp_path_factory):
    """A tiny 3-channel static-batch model: the shape for which onnx2tf fetches its sample images."""
    import torch

    from edgepipe.export import export

    class Rgb(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    return export(Rgb().eval(), (1, 3, 16, 16), tmp_path_factory.mktemp("rgb") / "rgb.onnx", dynamic_batch=False)


@pytest.mark.slow
def test_conversion_never_touches_the_network(toolchain, rgb_onnx, tmp_path, monkeypatch):
    """onnx2tf asks the internet for sample images for this model; the build supplies them and stays offline.

    With the sample file withheld, the same conversion is stopped by the guard: the check can fail.
    """
    import onnxruntime as ort

    x = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    t = _target("fp32", input_shape=[1, 3, 16, 16], dynamic_batch=False)
    be = backends.get("tflite")
    with listener() as (proxy, seen):
        monkeypatch.setenv("EDGEPIPE_OFFLINE_PROXY", proxy)
        art = be.compile(rgb_onnx, t, CalibrationSet(x), tmp_path / "ok")
        monkeypatch.setattr(tflite, "SAMPLE_FILE", "withheld.npy")
        with pytest.raises(CompileError, match="tried to reach the network"):
            be.compile(rgb_onnx, t, CalibrationSet(x), tmp_path / "withheld")
    assert seen == []
    assert not (tmp_path / "withheld" / "model.tflite").exists()
    runner = be.load(art)
    assert runner.inputs[0].shape == (1, 3, 16, 16)  # static batch: the runner runs 5 samples as 5 batches of 1
    ref = ort.InferenceSession(str(rgb_onnx.path)).run(None, {rgb_onnx.input_name: x[:1]})[0]
    got = runner({"input": x})[0]
    assert got.shape == (5, 4) and np.abs(got[:1] - ref).max() < 1e-4


@pytest.mark.slow
def test_gpu_fp16_target_builds_and_records_what_the_board_runs(toolchain, tmp_path):
    from edgepipe import api

    if tflite.gpu_delegate_found():
        pytest.skip("this machine has the GPU delegate: the CPU fallback is not exercised here")
    with pytest.warns(RuntimeWarning, match="GPU delegate"):
        result = api.build(None, ["arm64-gpu-fp16"], out=tmp_path, bench=False)
    m = json.loads((tmp_path / "arm64-gpu-fp16" / "manifest.json").read_text())
    assert m["artifact"]["precision"] == "fp16" and m["artifact"]["file"] == "model.tflite"
    board = m["artifact"]["metadata"]["board"]
    assert board["runtime"] == "ai-edge-litert" and board["delegate"] == "gpu" and board["threads"] == 4
    assert "CPU" in m["artifact"]["metadata"]["evaluated_here_on"]
    acc = result.results[0].manifest.accuracy
    assert acc.drop <= 0.5 and acc.validation_drop <= 0.5
    (row,) = [r for r in api.targets() if r.name == "arm64-gpu-fp16"]
    assert row.can_compile and not row.can_run and "GPU delegate" in row.reason


@pytest.mark.slow
def test_int8_over_the_accuracy_budget_fails_the_build(toolchain, tmp_path):
    """Calibrated on one near-black image, int8 clips every bright input: the build stops, nothing released."""
    from edgepipe import api
    from edgepipe.data import digits, load_dataset, split

    d = digits((1, 32, 32))
    x = d.x.copy()
    x[::2] *= 0.02
    np.savez(tmp_path / "dim.npz", x=x, y=d.y)
    seed = next(s for s in range(100) if split(load_dataset(str(tmp_path / "dim.npz"), (1, 32, 32)), 1, s)
                .calibration.x.max() < 0.05)
    (tmp_path / "t.toml").write_text(f'backend = "tflite"\nprecision = "int8"\n[calibration]\nsamples = 1\n'
                                     f'seed = {seed}\n[budgets]\nmax_accuracy_drop = 1.0\n')
    with pytest.raises(BudgetError, match="allow-accuracy-drop"):
        api.build(None, [str(tmp_path / "t.toml")], out=tmp_path / "dist", data=str(tmp_path / "dim.npz"), bench=False)
    assert not (tmp_path / "dist" / "t").exists()
    result = api.build(None, [str(tmp_path / "t.toml")], out=tmp_path / "dist", data=str(tmp_path / "dim.npz"),
                       bench=False, allow_accuracy_drop=True)  # compile comes from the cache
    budget = result.results[0].manifest.budgets["max_metric_drop"]
    assert budget.ok is False and budget.value > 1.0
