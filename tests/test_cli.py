"""The command line as a user meets it: one red line and a non-zero exit per bad input, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from edgepipe.cli import cli; print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    r = run("--help")
    assert r.returncode == 0 and "build" in r.stdout and "targets" in r.stdout and "bench" in r.stdout


def test_targets_json():
    r = run("targets", "--json")
    rows = {t["name"]: t for t in json.loads(r.stdout)}
    assert rows["cpu-int8"]["can_compile"] is True and rows["cpu-fp32"]["backend"] == "onnxruntime"


def _bad_target(tmp_path: Path) -> str:
    f = tmp_path / "typo.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "int8"\n[calibraton]\nsamples = 8\n')
    return str(f)


def _empty_calibration(tmp_path: Path) -> str:
    f = tmp_path / "empty.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "int8"\n[calibration]\nsamples = 0\n')
    return str(f)


def _not_onnx(tmp_path: Path) -> str:
    f = tmp_path / "fake.onnx"
    f.write_text("hello")
    return str(f)


BAD = {
    "missing model file": (lambda p: [str(p / "missing.onnx"), "-t", "cpu-int8"], "not found"),
    "onnx that is not onnx": (lambda p: [_not_onnx(p), "-t", "cpu-int8"], "not a valid ONNX model"),
    "factory that does not import": (lambda p: ["nopkg.nomod:make", "-t", "cpu-int8"], "cannot import module"),
    "target with a typo'd key": (lambda p: ["-t", _bad_target(p)], "unknown key 'calibraton'"),
    "unknown target": (lambda p: ["-t", "cpu-int9"], "unknown target 'cpu-int9'"),
    "input shape that does not fit": (lambda p: ["-t", "cpu-int8", "--input-shape", "1,3,32,32"],
                                      "does not accept input of shape [1, 3, 32, 32]"),
    "empty calibration set": (lambda p: ["-t", _empty_calibration(p)], "calibration set would be empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_leaves_nothing(case, tmp_path):
    args, expected = BAD[case]
    out = tmp_path / "dist"
    r = run("build", *args(tmp_path), "--out", str(out), "--no-bench")
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.lstrip().startswith(("⠋", "⠙"))]
    error_lines = [ln for ln in lines if ln.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "build", "-t", "cpu-int9", "--out", str(tmp_path))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_build_json_and_bench(tmp_path):
    r = run("build", "-t", "cpu-int8", "--out", str(tmp_path), "--iterations", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["targets"]["cpu-int8"]
    assert res["accuracy"]["metric"] == "top1" and res["accuracy"]["value"] >= 95 and res["latency"]["iterations"] == 10
    b = run("bench", str(tmp_path / "cpu-int8"), "--iterations", "10", "--json")
    assert b.returncode == 0, b.stderr
    m = json.loads(b.stdout)
    assert m["backend"] == "onnxruntime" and m["precision"] == "int8" and m["p50_ms"] > 0
    e = run("export", "--out", str(tmp_path / "m.onnx"), "--json")
    assert e.returncode == 0 and json.loads(e.stdout)["parity"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("kw, message", [
    ({"workers": 2, "cluster": "127.0.0.1:1"}, "--workers (workers=N) sizes the local pool"),
    ({"insecure_cluster": True}, "--insecure-cluster (insecure_cluster=True) only applies with --cluster"),
])
def test_release_executor_options_that_contradict_are_refused_before_any_work(tmp_path, kw, message):
    """The API refuses what the CLI refuses as a usage error (tests/pipeline/test_pool.py), before any work."""
    from edgepipe import api
    from edgepipe.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.release(None, ["cpu-int8"], out=out, **kw)
    assert not out.exists()
