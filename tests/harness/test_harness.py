from __future__ import annotations

import pytest

from edgepipe.errors import BenchmarkError
from edgepipe.harness import BenchSettings, measure
from edgepipe.types import Artifact


def test_measure_reports_sane_figures(example_onnx):
    m = measure(Artifact("onnxruntime", "fp32", example_onnx.path), BenchSettings(threads=1, warmup=3, iterations=30))
    assert m.iterations == 30 and m.batch == 1
    assert 0 < m.min_ms <= m.p50_ms <= m.p90_ms <= m.p99_ms <= m.max_ms
    assert m.throughput_per_s == pytest.approx(1e3 / m.mean_ms)
    # the worker is a fresh process: its memory is the runtime and the model, not this test process
    assert 1 < m.peak_rss_above_baseline_mb < 400
    assert m.size_bytes == example_onnx.path.stat().st_size


def test_batch_and_duration(example_onnx):
    m = measure(Artifact("onnxruntime", "fp32", example_onnx.path),
                BenchSettings(batch=8, warmup=1, duration_s=0.3))
    assert m.batch == 8 and m.iterations >= 2
    assert m.throughput_per_s == pytest.approx(8e3 / m.mean_ms)


def test_broken_artifact_is_a_benchmark_error(tmp_path):
    f = tmp_path / "broken.onnx"
    f.write_bytes(b"nope")
    with pytest.raises(BenchmarkError, match="failed in the worker"):
        measure(Artifact("onnxruntime", "fp32", f), BenchSettings(iterations=1, warmup=0))
