"""Latency and memory measurement in a fresh worker process (local), or on a board over SSH."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe._telemetry import NO_TELEMETRY_ENV
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.types import Artifact, Measurement


@dataclass(frozen=True)
class BenchSettings:
    """How an artifact is timed in the bench worker.

    Attributes:
        threads: the runtime's threads (``None``: its default).
        batch: the batch size timed (a model with a static batch is timed at its own).
        warmup: untimed calls before timing.
        iterations: timed calls (ignored with ``duration_s``).
        duration_s: time for this many seconds instead of a fixed count.
        seed: the seed of the random timing inputs.
        timeout_s: seconds the worker may run before it is stopped.
        shapes: each input's shape (batch first) by name, ``""`` for a one-input model's; ``None``: the model's
            static sizes (1 for a dynamic dimension).

    Raises:
        ConfigError: on construction, ``iterations`` or ``batch`` not an integer >= 1, ``warmup`` not an
            integer >= 0, ``threads`` not ``None`` or an integer >= 1, or ``duration_s``/``timeout_s`` not a
            number of seconds > 0.
    """

    threads: int | None = None
    batch: int = 1
    warmup: int = 20
    iterations: int = 200
    duration_s: float | None = None  # time-boxed instead of a fixed count
    seed: int = 0
    timeout_s: float = 600.0
    #: each input's shape (batch first) by name, ``""`` for a one-input model's; None: the model's static sizes
    shapes: dict[str, tuple[int, ...]] | None = None

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
    if s.shapes:
        out["shapes"] = {k: list(v) for k, v in s.shapes.items()}
    if eval_path is not None:
        out["eval"] = {"path": str(eval_path), "max_bytes": EVAL_REPLY_BYTES}
    return out


def same_machine(a: Measurement | None, b: Measurement | None) -> bool:
    """Whether two measurements were taken on the same machine, the same way (emulated or not): only then
    is a ratio of their latencies a speed-up.

    Args:
        a, b: the measurements (``None``: not measured).

    Returns:
        True when both exist and their hosts' ``node``, ``machine`` and ``emulated`` agree.
    """
    if a is None or b is None:
        return False
    return all(a.host.get(k) == b.host.get(k) for k in ("node", "machine", "emulated"))


def speedup(reference: Measurement | None, measured: Measurement | None) -> float | None:
    """Reference p50 / measured p50, or ``None`` unless both were timed on the same machine the same way
    (an fp32 reference timed on this host says nothing about an int8 artifact timed on a board).

    Args:
        reference: the fp32 reference's measurement.
        measured: the artifact's measurement.

    Returns:
        The speed-up (above 1: the artifact is faster), or ``None`` when either is missing, the measured p50 is
        0, or they were not timed alike (see :func:`same_machine`).
    """
    if reference is None or measured is None or not measured.p50_ms or not same_machine(reference, measured):
        return None
    return float(reference.p50_ms) / float(measured.p50_ms)


def where(measured: Measurement | None) -> str:
    """Where a measurement was taken, in words, with emulation said (``"?"`` when nothing was measured).

    Args:
        measured: the measurement, or ``None``.

    Returns:
        ``node (machine)``; ``node (machine, emulated by qemu-user): proves function, not speed`` when
        emulated; ``? (?)`` for ``None``.
    """
    h = measured.host if measured is not None else {}
    out = f"{h.get('node', '?')} ({h.get('machine', '?')})"
    return out + (f", emulated by {h['emulated']}: proves function, not speed" if h.get("emulated") else "")


#: the distribution to pip-install for a module the worker could not import
MODULE_DISTS = {"numpy": "numpy", "onnxruntime": "onnxruntime", "openvino": "openvino",
                "ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime", "tensorrt": "tensorrt"}


def pip_line(module: str, python: str = "python3") -> str:
    """The command that installs ``module``'s distribution, pinned to the version edgepipe used here.

    Args:
        module: the module the worker could not import (mapped to its distribution by :data:`MODULE_DISTS`).
        python: the interpreter the command runs pip with.

    Returns:
        ``<python> -m pip install '<dist>==<version>'``; unpinned when edgepipe's tool versions here lack it.
    """
    from edgepipe.versions import tool_versions

    dist = MODULE_DISTS.get(module, module)
    version = tool_versions().get(dist)
    return f"{python} -m pip install '{dist}=={version}'" if version else f"{python} -m pip install {dist}"


#: the most a board's reply may be (bytes of the worker's stdout); more is refused unread
MAX_REPLY_BYTES = 16 << 20
#: what the outputs of ``--verify`` may take of a reply (the rest: the figures, and the partial lines while timing)
EVAL_REPLY_BYTES = MAX_REPLY_BYTES - (1 << 20)
#: the most outputs, and dimensions per output, a reply may hold
MAX_OUTPUTS = 256
MAX_RANK = 8
_MAX_TEXT = 256  # a host field or dataset name
_MAX_ERROR = 1000  # the worker's error message, as echoed
#: a PEP 508 project name: what a `missing` module may be before it is echoed into a pip line
_PROJECT = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")
_HOST_KEYS = ("machine", "system", "node", "processor", "python", "emulated")


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError("expected a finite number")
    return float(v)


def _count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 40:
        raise ValueError("expected an integer >= 0")
    return v


def _text(v: Any, limit: int = _MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > limit or not v.isprintable():
        raise ValueError(f"expected printable text of at most {limit} characters")
    return v


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _keys(d: Any, allowed: dict[str, Callable[[Any], Any]], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError("expected an object")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key {unknown[0][:40]!r}; the worker sends only {', '.join(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"no {missing[0]!r}")
    out = {}
    for k, v in d.items():
        try:
            out[k] = allowed[k](v)
        except ValueError as e:  # a container is not echoed: its own check names the part that is wrong
            shown = "{...}" if isinstance(v, dict) else "[...]" if isinstance(v, list) else repr(v)[:60]
            raise ValueError(f"{k} = {shown}: {e}") from None
    return out


def _choice(v: Any, values: tuple[Any, ...]) -> Any:
    if not any(v == c and type(v) is type(c) for c in values):
        raise ValueError(f"expected one of {', '.join(map(json.dumps, values))}")
    return v


def _host(v: Any) -> dict[str, Any]:
    """The worker's ``host_info()``: short printable strings; ``emulated`` only null or ``qemu-user``."""
    return _keys(v, {k: (lambda e: _choice(e, (None, "qemu-user"))) if k == "emulated" else _text
                     for k in _HOST_KEYS})


def _b64_size(data: Any) -> int:
    """How many bytes base64 text ``data`` decodes to; -1 if it is not base64."""
    import base64
    import binascii

    if not isinstance(data, str):
        return -1
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return -1


def _shape(v: Any) -> list[int]:
    if not (isinstance(v, list) and 1 <= len(v) <= MAX_RANK
            and all(not isinstance(n, bool) and isinstance(n, int) and 0 <= n <= 1 << 31 for n in v)):
        raise ValueError(f"expected a list of 1 to {MAX_RANK} sizes, samples first")
    return v


def _output(v: Any) -> dict[str, Any]:
    """One output as ``worker.evaluate`` sends it: its bytes must be exactly what its shape and dtype say."""
    import numpy as np

    from edgepipe.harness.worker import OUTPUT_DTYPES

    d = _keys(v, {"name": _text, "shape": _shape, "dtype": lambda t: _choice(t, OUTPUT_DTYPES), "b64": lambda s: s},
              ("name", "shape", "dtype", "b64"))
    count = math.prod(d["shape"])
    if _b64_size(d["b64"]) != count * np.dtype(d["dtype"]).itemsize:
        raise ValueError(f"b64: expected base64 of {' x '.join(map(str, d['shape']))} {d['dtype']} values")
    return d


def _outputs(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_OUTPUTS:
        raise ValueError(f"expected a list of 1 to {MAX_OUTPUTS} outputs")
    out = []
    for i, o in enumerate(v):
        try:
            out.append(_output(o))
        except ValueError as e:
            raise ValueError(f"output {i}: {e}") from None
    return out


def _logits(v: Any) -> dict[str, Any]:
    """An image built before edgepipe returned every output: its one ``[samples, classes]`` float32 output."""
    d = _keys(v, {"shape": lambda s: s, "float32_b64": lambda s: s}, ("shape", "float32_b64"))
    shape, data = d["shape"], d["float32_b64"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(not isinstance(n, bool) and isinstance(n, int)
                                                                and 0 <= n <= 1 << 31 for n in shape)):
        raise ValueError("shape: expected [samples, classes]")
    if _b64_size(data) != shape[0] * shape[1] * 4:
        raise ValueError(f"float32_b64: expected base64 of {shape[0]} x {shape[1]} float32 values")
    return d


def _top1(v: Any) -> float:
    if not 0.0 <= _finite(v) <= 1.0:
        raise ValueError("expected a fraction in 0..1")
    return float(v)


def _project(v: Any) -> str:
    if not isinstance(v, str) or not _PROJECT.fullmatch(v):
        raise ValueError("expected a Python package name (letters, digits, '.', '_', '-')")
    return v


def _error(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected text")
    return _one_line(v)


def _one_line(text: str) -> str:
    """``text`` as one line of printable characters (others escaped), at most ``_MAX_ERROR`` long."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:_MAX_ERROR])
    return out + (" ..." if len(text) > _MAX_ERROR else "")


_EVAL = {"samples": _count, "of": _count, "dataset": _text, "outputs": _outputs,
         "top1": _top1, "logits": _logits}  # the last two: what images built before every output was returned send


def _eval(v: Any) -> dict[str, Any]:
    """The outputs of ``--verify``: every output holds ``samples`` samples, of the ``of`` the file held."""
    d = _keys(v, _EVAL, ("samples",))
    if "outputs" not in d and "logits" not in d:
        raise ValueError("no 'outputs'")
    n = d["samples"]
    if "of" in d and d["of"] < n:
        raise ValueError(f"of = {d['of']}: fewer than the {n} samples returned")
    for i, o in enumerate(d.get("outputs") or [d["logits"]]):
        if o["shape"][0] != n:
            raise ValueError(f"output {i} holds {o['shape'][0]} samples, not the {n} the reply says")
    return d

#: what a worker's result holds, each field with its check (see ``worker.measure``)
_RESULT: dict[str, Callable[[Any], Any]] = {
    **{k: _finite for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms",
                            "throughput_per_s", "load_ms", "baseline_rss_mb", "peak_rss_mb",
                            "peak_rss_above_baseline_mb")},
    "iterations": _count, "warmup": _count, "batch": _count, "threads": _optional(_count),
    "device_memory_mb": _optional(_finite), "host": _host,
    "eval": _eval,
}
_REQUIRED = tuple(k for k in _RESULT if k not in ("device_memory_mb", "host", "eval"))
_FAILURE: dict[str, Callable[[Any], Any]] = {"error": _error,
                                             "missing": lambda v: v if v == "" else _project(v), "host": _host}
_PARTIAL_NEEDS = {"loaded": ("load_ms",), "timing": ("p50_ms", "mean_ms", "iterations"),
                  "timed": ("p50_ms", "mean_ms", "iterations", "load_ms")}
_PARTIAL: dict[str, Callable[[Any], Any]] = {
    "phase": lambda v: _choice(v, tuple(_PARTIAL_NEEDS)), "host": _host,
    "of": _optional(_count), "iterations": _count, "p50_ms": _finite, "mean_ms": _finite, "load_ms": _finite}


def partial_figures(stdout: str) -> dict[str, Any] | None:
    """The last ``{"partial": ...}`` line the worker printed (what it had measured so far), if any and
    well formed.

    Args:
        stdout: the worker's standard output.

    Returns:
        The checked figures (``phase``: ``loaded``, ``timing`` or ``timed``, with the figures that phase has),
        or ``None`` when there is no such line or it is not what the worker sends.
    """
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith('{"partial"'):
            try:
                p = _keys(json.loads(line)["partial"], _PARTIAL, ("phase",))
            except (ValueError, KeyError, TypeError, RecursionError):
                return None
            return p if all(k in p for k in _PARTIAL_NEEDS[p["phase"]]) else None
    return None


def parse_worker_output(stdout: str, what: str, python: str = "python3", where: str = "this machine") -> dict[str, Any]:
    """The worker's last JSON line, checked against what the worker sends (types, finite numbers, bounded
    text, no unknown keys).

    Args:
        stdout: the worker's standard output (partial-figure lines are skipped).
        what: how the error names the artifact.
        python: the interpreter the worker ran with, as the error's hints name it.
        where: how the error names the machine (``this machine``, a board, an image).

    Returns:
        The checked result without ``ok``: the fields of :class:`edgepipe.types.Measurement` the worker
        sends (latency, memory, host and, with ``--verify``, ``eval``).

    Raises:
        BenchmarkError: the worker reported a failure (a missing module: with the pip line that installs it),
            printed no result, or sent something that is not what the worker sends.
    """
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{") and not line.startswith('{"partial"'):
            try:
                result = json.loads(line)
                if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
                    raise ValueError("expected an object with 'ok': true or false")
                ok = result.pop("ok")
                result = _keys(result, _RESULT, _REQUIRED) if ok else _keys(result, _FAILURE, ("error",))
            except (ValueError, RecursionError) as e:
                raise BenchmarkError(f"benchmark of {what}: the reply from {where} is not what edgepipe's worker "
                                     f"sends ({_one_line(str(e))[:200]}); it was refused: check that {python} "
                                     "there is a plain Python and nothing else prints on its stdout") from None
            if not ok:
                if result.get("missing"):
                    raise BenchmarkError(
                        f"benchmark of {what}: the Python on {where} ({python}) has no {result['missing']!r} "
                        f"module; install it there: {pip_line(result['missing'], python)}")
                raise BenchmarkError(f"benchmark of {what} failed in the worker: {result.get('error')}")
            return result
    raise BenchmarkError(f"benchmark of {what}: the worker printed no result")


def measure(artifact: Artifact, settings: BenchSettings | None = None, eval_path: Path | None = None) -> Measurement:
    """Measure ``artifact`` in a fresh local worker process.

    Args:
        artifact: the artifact to time.
        settings: how to time it (default: :class:`BenchSettings`'s defaults).
        eval_path: an evaluation ``.npz``; the worker also runs its samples and returns every output in the
            measurement's ``eval``.

    Returns:
        The measurement, with the artifact's size, backend and precision.

    Raises:
        BenchmarkError: the worker ran past ``settings.timeout_s``, exited with an error, reported a failure,
            or sent a reply that is not the worker's.
    """
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
