"""$EDGEPIPE_THREADS: the threads of edgepipe's own work (calibration, evaluation), never a benchmark's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgepipe._threads import work_threads
from edgepipe.errors import ConfigError


def test_sessions_take_edgepipe_threads_but_a_benchmark_keeps_its_targets(example_onnx, monkeypatch):
    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.backends.openvino import _runtime_config

    monkeypatch.setenv("EDGEPIPE_THREADS", "1")
    assert OrtRunner(example_onnx.path, None).session.get_session_options().intra_op_num_threads == 1
    assert OrtRunner(example_onnx.path, 2).session.get_session_options().intra_op_num_threads == 2
    assert _runtime_config("f32", "latency", None)["INFERENCE_NUM_THREADS"] == 1
    assert _runtime_config("f32", "latency", 2)["INFERENCE_NUM_THREADS"] == 2
    monkeypatch.delenv("EDGEPIPE_THREADS")
    assert work_threads() is None and "INFERENCE_NUM_THREADS" not in _runtime_config("f32", "latency", None)


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_a_bad_value_names_the_variable(bad, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_THREADS", bad)
    with pytest.raises(ConfigError, match=rf"\$EDGEPIPE_THREADS={bad!r}: give a whole number of threads"):
        work_threads()


def test_torch_gets_it_at_import_unless_omp_is_set():
    code = "import edgepipe, torch; print(torch.get_num_threads())"
    env = {"EDGEPIPE_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1"], r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.split() == ["2"], r.stderr[-2000:]
