"""Latency and memory measurement in a fresh worker process (local), or on a board over SSH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepipe._telemetry import NO_TELEMETRY_ENV
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.types import Artifact


@dataclass(frozen=True)
class BenchSettings:
    threads: int | None = None
    batch: int = 1
    warmup: int = 20
    iterations: int = 200
    duration_s: float | None = None  # time-boxed instead of a fixed count
    seed: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        import math

        def bad(name: str, value: Any, rule: str) -> ConfigError:
            return ConfigError(f"bench {name} = {value!r}: {rule}")

        for name in ("iterations", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, v, "must be an integer >= 1")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise bad("warmup", self.warmup, "must be an integer >= 0")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise bad("threads", self.threads, "must be an integer >= 1, or left out for the runtime's default")
        if self.duration_s is not None and not (isinstance(self.duration_s, int | float)
                                                and math.isfinite(self.duration_s) and self.duration_s > 0):
            raise bad("duration", self.duration_s, "must be a number of seconds > 0")
        if not (isinstance(self.timeout_s, int | float) and self.timeout_s > 0):
            raise bad("timeout", self.timeout_s, "must be a number of seconds > 0")


@dataclass(frozen=True)
class Measurement:
    """What the worker measured for one artifact."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float
    load_ms: float
    baseline_rss_mb: float
    peak_rss_mb: float
    peak_rss_above_baseline_mb: float
    iterations: int
    warmup: int
    batch: int
    threads: int | None
    size_bytes: int = 0
    device_memory_mb: float | None = None  # GPU memory the runner took (GPU backends only)
    backend: str = ""
    precision: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    #: with ``verify``: top-1 measured by the runtime where it ran, and its logits (see ``worker.evaluate``)
    eval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["eval"] is None:
            del d["eval"]
        return d

    @property
    def emulated(self) -> str | None:
        """``"qemu-user"`` when the worker ran under emulation: its latency proves function, never speed."""
        return self.host.get("emulated")

    @property
    def where(self) -> str:
        """Where it was measured, in words: ``node (machine)``, with ``, emulated by qemu-user`` if so."""
        h = self.host
        return f"{h.get('node', '?')} ({h.get('machine', '?')}" + (f", emulated by {h['emulated']})"
                                                                  if h.get("emulated") else ")")


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(NO_TELEMETRY_ENV)  # a bench must not phone home (onnxruntime reads this when it loads)
    return env


def _settings(artifact: Artifact, s: BenchSettings, eval_path: Path | str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "backend": artifact.backend, "precision": artifact.precision, "path": str(artifact.path),
        "files": [str(p) for p in artifact.files], "metadata": artifact.metadata,
        "threads": s.threads, "batch": s.batch, "warmup": s.warmup, "iterations": s.iterations,
        "duration_s": s.duration_s, "seed": s.seed,
    }
    if eval_path is not None:
        out["eval"] = {"path": str(eval_path), "logits": True}
    return out


def same_machine(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two measurements (``Measurement.to_dict()``) were taken on the same machine, the same way
    (emulated or not): only then is a ratio of their latencies a speed-up."""
    if not a or not b:
        return False
    ha, hb = a.get("host") or {}, b.get("host") or {}
    return all(ha.get(k) == hb.get(k) for k in ("node", "machine", "emulated"))


def speedup(reference: dict[str, Any] | None, measured: dict[str, Any] | None) -> float | None:
    """Reference p50 / measured p50, or ``None`` unless both were timed on the same machine the same way
    (an fp32 reference timed on this host says nothing about an int8 artifact timed on a board)."""
    if not same_machine(reference, measured) or not measured or not measured.get("p50_ms"):
        return None
    assert reference is not None
    return float(reference["p50_ms"]) / float(measured["p50_ms"])


def where(measured: dict[str, Any] | None) -> str:
    """Where a measurement was taken, in words, with emulation said."""
    h = (measured or {}).get("host") or {}
    out = f"{h.get('node', '?')} ({h.get('machine', '?')})"
    return out + (f", emulated by {h['emulated']}: proves function, not speed" if h.get("emulated") else "")


#: the distribution to pip-install for a module the worker could not import
MODULE_DISTS = {"numpy": "numpy", "onnxruntime": "onnxruntime", "openvino": "openvino",
                "ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "tensorrt": "tensorrt"}


def pip_line(module: str, python: str = "python3") -> str:
    """The command that installs ``module``'s distribution, pinned to the version edgepipe used here."""
    from edgepipe.versions import tool_versions

    dist = MODULE_DISTS.get(module, module)
    version = tool_versions().get(dist)
    return f"{python} -m pip install '{dist}=={version}'" if version else f"{python} -m pip install {dist}"


def partial_figures(stdout: str) -> dict[str, Any] | None:
    """The last ``{"partial": ...}`` line the worker printed (what it had measured so far), if any."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith('{"partial"'):
            try:
                return dict(json.loads(line)["partial"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def parse_worker_output(stdout: str, what: str, python: str = "python3", where: str = "this machine") -> dict[str, Any]:
    """The worker's last JSON line; ``BenchmarkError`` if it failed or printed none."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and not line.startswith('{"partial"'):
            result = json.loads(line)
            if not result.pop("ok", False):
                if result.get("missing"):
                    raise BenchmarkError(
                        f"benchmark of {what}: the Python on {where} ({python}) has no {result['missing']!r} "
                        f"module; install it there: {pip_line(result['missing'], python)}")
                raise BenchmarkError(f"benchmark of {what} failed in the worker: {result.get('error')}")
            return {k: v for k, v in result.items() if k != "partial"}
    raise BenchmarkError(f"benchmark of {what}: the worker printed no result")


def measure(artifact: Artifact, settings: BenchSettings | None = None, eval_path: Path | None = None) -> Measurement:
    """Measure ``artifact`` in a fresh local worker process (and, with ``eval_path``, its top-1 there)."""
    s = settings or BenchSettings()
    cmd = [sys.executable, "-m", "edgepipe.harness.worker", json.dumps(_settings(artifact, s, eval_path))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout_s, env=_worker_env())
    except subprocess.TimeoutExpired as e:
        raise BenchmarkError(
            f"benchmark of {artifact.path.name} ran past {s.timeout_s:.0f} s; lower --iterations"
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"benchmark worker for {artifact.path.name} exited with {proc.returncode}: {tail}")
    result = parse_worker_output(proc.stdout, artifact.path.name, sys.executable)
    return Measurement(**result, size_bytes=artifact.size_bytes, backend=artifact.backend,
                       precision=artifact.precision)
