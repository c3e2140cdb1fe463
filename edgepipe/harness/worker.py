"""The measuring worker: load one artifact in a fresh process, warm up, time, print one JSON line.

Run as ``python -m edgepipe.harness.worker '<json settings>'``. It imports only numpy, the standard
library and the artifact's own runtime (through its backend), so the same worker runs on a board.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MiB.

    VmHWM (peak RSS) belongs to this process image; ``getrusage``'s ru_maxrss is not used because it
    carries over the parent's peak across fork and exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _input(shape: tuple[Any, ...], batch: int, seed: int) -> np.ndarray:
    dims = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    if isinstance(shape[0], int) and shape[0] > 0:
        dims[0] = shape[0]
    return np.random.default_rng(seed).random(dims, dtype=np.float32)


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up and time one artifact; returns the figures as a dict."""
    from edgepipe import backends
    from edgepipe.types import Artifact

    baseline = _rss_mb()
    backend = backends.get(settings["backend"])
    artifact = Artifact(settings["backend"], settings.get("precision", ""), Path(settings["path"]),
                        [Path(p) for p in settings.get("files", [])] or [], settings.get("metadata", {}))
    t0 = time.perf_counter()
    runner = backend.load(artifact, settings.get("threads"))
    spec = runner.inputs[0]
    x = _input(spec.shape, settings.get("batch", 1), settings.get("seed", 0))
    feeds = {spec.name: x}
    runner(feeds)
    load_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(settings.get("warmup", 20)):
        runner(feeds)
    times: list[float] = []
    duration = settings.get("duration_s")
    iterations = settings.get("iterations", 200)
    start = time.perf_counter()
    while len(times) < iterations if not duration else time.perf_counter() - start < duration:
        t = time.perf_counter()
        runner(feeds)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    peak = _peak_rss_mb()
    device_mb = getattr(runner, "device_memory_mb", None)  # GPU runners report the device memory they took
    return {
        "iterations": len(ms),
        "warmup": settings.get("warmup", 20),
        "batch": int(x.shape[0]),
        "threads": settings.get("threads"),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_per_s": float(x.shape[0] * 1e3 / ms.mean()),
        "load_ms": load_ms,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_rss_above_baseline_mb": peak - baseline,
        "device_memory_mb": device_mb() if callable(device_mb) else None,
        "host": {"machine": platform.machine(), "system": platform.system(), "node": platform.node(),
                 "processor": platform.processor(), "python": platform.python_version()},
    }


def main() -> None:
    settings = json.loads(sys.argv[1])
    try:
        result = {"ok": True, **measure(settings)}
    except Exception as e:  # reported to the parent as data, not a traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
