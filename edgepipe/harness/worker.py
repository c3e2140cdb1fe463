"""The measuring worker: load one artifact in a fresh process, warm up, time, print one JSON line.

Run as ``python -m edgepipe.harness.worker '<json settings>'``. It imports only numpy, the standard
library and the artifact's own runtime (through its backend), so the same worker runs on a board and as
the entrypoint of a runtime image (``--release DIR [--eval FILE.npz]``: the artifact a release's
manifest names).

With ``"eval": {"path": "eval.npz"}`` in the settings it also runs every sample of the file (each input under its
name) and returns every output (name, shape, dtype, base64 bytes; as many samples as fit the reply limit): the
driver scores them with the release's metric and compares them with its own run, so accuracy is measured by the
board's own runtime. While it times it
prints ``{"partial": ...}`` lines, so a board that drops mid-run still leaves the figures so far. It
reports the machine, and whether this process runs under qemu-user emulation (then its latency proves
function only, never speed).
"""

from __future__ import annotations

import base64
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


def _input(shape: tuple[Any, ...], batch: int, seed: int, dtype: str = "float32",
           given: list[int] | None = None) -> np.ndarray:
    """One input's timing sample: the target's concrete shape where given (a model with dynamic height and
    width gets the sizes it was built for), else the model's static sizes (1 for a dynamic one); random floats,
    or zeros for integer inputs (token ids: index 0 is valid in any vocabulary)."""
    if given:
        dims = [batch, *[int(d) for d in given[1:]]]
    else:
        dims = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        dims[0] = shape[0]
    kind = dtype.replace("tensor(", "").rstrip(")")
    if kind in ("float", "float32", "float16", "double", "float64", "bfloat16", ""):
        return np.random.default_rng(seed).random(dims, dtype=np.float32).astype(
            np.float16 if kind == "float16" else np.float64 if kind in ("double", "float64") else np.float32)
    if kind == "bool":
        return np.zeros(dims, dtype=bool)
    return np.zeros(dims, dtype=np.dtype(kind if kind.startswith(("int", "uint")) else "int64"))


def feeds_for(inputs: list[Any], shapes: dict[str, list[int]] | None, batch: int, seed: int) -> dict[str, np.ndarray]:
    """A sample for every input of a runner (``inputs``: its TensorSpecs), at ``shapes`` (by input name; ``""``:
    a one-input model's) where given."""
    shapes = shapes or {}
    return {spec.name: _input(tuple(spec.shape), batch, seed + i, str(spec.dtype),
                              shapes.get(spec.name) or (shapes.get("") if len(inputs) == 1 else None))
            for i, spec in enumerate(inputs)}


#: the Python modules a backend's runtime can be imported from (any one will do)
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "tflite": ("ai_edge_litert", "tflite_runtime"), "tensorrt": ("tensorrt",)}
_X86 = ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


def emulation() -> str | None:
    """``"qemu-user"`` when this process is a foreign binary run by qemu-user (binfmt), else ``None``.

    qemu-user answers ``/proc/self/exe`` with the guest binary, but not ``/proc/thread-self/exe``, which
    the kernel resolves to the interpreter (``qemu-aarch64-static``). As a second sign, an ARM process
    that reads an x86 vendor in ``/proc/cpuinfo`` (qemu-user passes the host's through) is emulated.
    """
    import os

    try:
        if "qemu-" in os.path.basename(os.readlink("/proc/thread-self/exe")):
            return "qemu-user"
    except OSError:
        pass
    machine = platform.machine().lower()
    if not (machine.startswith("arm") or machine.startswith("aarch")):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(65536)
    except OSError:
        return None
    return "qemu-user" if any(v in info for v in _X86) else None


def host_info() -> dict[str, Any]:
    return {"machine": platform.machine(), "system": platform.system(), "node": platform.node(),
            "processor": platform.processor(), "python": platform.python_version(), "emulated": emulation()}


def _partial(phase: str, **figures: Any) -> None:
    sys.stdout.write(json.dumps({"partial": {"phase": phase, **figures}}) + "\n")
    sys.stdout.flush()


def _stats(ms: Any) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "mean_ms": float(ms.mean()), "iterations": int(len(ms))}


#: the dtypes an output may come back as (what the reply schema accepts)
OUTPUT_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "bool")
#: what one output's record adds to the reply besides its base64 (name, shape, dtype, JSON punctuation)
_RECORD_OVERHEAD = 512


def _numpy_dtype(dtype: str) -> np.dtype | None:
    kind = str(dtype).replace("tensor(", "").rstrip(")")
    kind = {"float": "float32", "double": "float64"}.get(kind, kind)
    try:
        return np.dtype(kind) if kind else None
    except TypeError:
        return None


def eval_feeds(inputs: list[Any], arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Every input of a runner (``inputs``: its TensorSpecs) from an evaluation file's arrays, by input name (a
    one-input model's may be ``x`` or ``input``, as files written before edgepipe named them), in the dtype the
    model takes (a float array for a float input, integers for an integer one)."""
    feeds = {}
    for spec in inputs:
        aliases = [spec.name] + (["x", "input"] if len(inputs) == 1 else [])
        key = next((a for a in aliases if a in arrays), None)
        if key is None:
            raise ValueError(f"{where} holds no array for the model's input {spec.name!r} (it holds "
                             f"{', '.join(sorted(arrays)) or 'nothing'})")
        a = arrays[key]
        want = _numpy_dtype(spec.dtype)
        if want is not None and a.dtype != want:
            if (a.dtype.kind == "f") != (want.kind == "f"):
                raise ValueError(f"{where}: input {spec.name!r} is {a.dtype} there but the model takes {want}")
            a = a.astype(want)
        feeds[spec.name] = a
    return feeds


def _fitting(outs: list[np.ndarray], budget: int) -> int:
    """How many samples' outputs fit in ``budget`` bytes of reply as base64 (the first ones)."""
    n = len(outs[0])
    row = sum(o[:1].nbytes for o in outs)

    def size(k: int) -> int:
        return sum(4 * -(-(o[:1].nbytes * k) // 3) + _RECORD_OVERHEAD for o in outs)

    k = min(n, max(0, (budget - _RECORD_OVERHEAD * len(outs)) * 3 // 4 // max(row, 1)))
    while k > 0 and size(k) > budget:
        k -= 1
    while k < n and size(k + 1) <= budget:
        k += 1
    return k


def evaluate(runner: Any, path: str, max_bytes: int | None = None, names: list[str] | None = None) -> dict[str, Any]:
    """Every output of ``runner`` on every sample of ``path`` (an .npz holding each input under its name, and the
    targets, which stay here: the driver scores), as base64 of the raw bytes with name, shape and dtype.

    The outputs of as many samples as fit ``max_bytes`` of reply (the first ones) are returned: ``samples`` says
    how many, ``of`` how many the file holds. Not even one sample's fitting is a ``ValueError`` naming both.
    """
    from edgepipe.evaluate import outputs
    from edgepipe.harness import EVAL_REPLY_BYTES

    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    feeds = eval_feeds(list(runner.inputs), arrays, Path(path).name)
    outs = [np.ascontiguousarray(o) for o in outputs(runner, feeds)]
    if not outs:
        raise ValueError(f"the model returned no outputs on {Path(path).name}")
    for i, o in enumerate(outs):
        if o.dtype.name not in OUTPUT_DTYPES:
            raise ValueError(f"output {i} is {o.dtype}; the worker returns only {', '.join(OUTPUT_DTYPES)}")
    total = len(outs[0])
    budget = max_bytes or EVAL_REPLY_BYTES
    k = _fitting(outs, budget)
    if k == 0:
        one = sum(4 * -(-o[:1].nbytes // 3) for o in outs)
        raise ValueError(f"the outputs of one sample take {one} bytes as base64, more than the {budget} bytes "
                         f"({budget / 2**20:.1f} MiB) of outputs a reply may hold: none of the {total} samples can "
                         "be verified there (the model's outputs are too large for a reply)")
    if not names or len(names) != len(outs):
        names = [f"output_{i}" for i in range(len(outs))]
    return {"samples": k, "of": total, "dataset": Path(path).name,
            "outputs": [{"name": "".join(c for c in str(name) if c.isprintable())[:256], "shape": list(o[:k].shape), "dtype": o.dtype.name,
                         "b64": base64.b64encode(o[:k].tobytes()).decode()} for name, o in zip(names, outs, strict=True)]}


def decode_outputs(record: dict[str, Any]) -> list[np.ndarray]:
    """The outputs of an ``evaluate`` record, in order (a reply from an image built before edgepipe returned every
    output holds only ``logits``: that one output)."""
    if "outputs" not in record:
        return [decode_logits(record)]
    return [np.frombuffer(base64.b64decode(o["b64"]), np.dtype(o["dtype"])).reshape(o["shape"])
            for o in record["outputs"]]


def decode_logits(record: dict[str, Any]) -> Any:
    """The first output of an ``evaluate`` record (its ``logits`` if it is an old image's reply)."""
    if "outputs" in record:
        return decode_outputs(record)[0]
    raw = base64.b64decode(record["logits"]["float32_b64"])
    return np.frombuffer(raw, np.float32).reshape(record["logits"]["shape"])


def measure(settings: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up and time one artifact; returns the figures as a dict."""
    import importlib.util

    from edgepipe import backends
    from edgepipe.types import Artifact

    wanted = RUNTIME_MODULES.get(settings["backend"], ())
    if wanted and not any(importlib.util.find_spec(m) for m in wanted):
        raise ModuleNotFoundError(f"No module named {wanted[0]!r} (the {settings['backend']} runtime)",
                                  name=wanted[0])
    baseline = _rss_mb()
    backend = backends.get(settings["backend"])
    artifact = Artifact(settings["backend"], settings.get("precision", ""), Path(settings["path"]),
                        [Path(p) for p in settings.get("files", [])] or [], settings.get("metadata", {}))
    t0 = time.perf_counter()
    runner = backend.load(artifact, settings.get("threads"))
    feeds = feeds_for(runner.inputs, settings.get("shapes"), settings.get("batch", 1), settings.get("seed", 0))
    x = next(iter(feeds.values()))
    runner(feeds)
    load_ms = (time.perf_counter() - t0) * 1e3
    _partial("loaded", load_ms=load_ms, host=host_info())
    for _ in range(settings.get("warmup", 20)):
        runner(feeds)
    times: list[float] = []
    duration = settings.get("duration_s")
    iterations = settings.get("iterations", 200)
    start = last = time.perf_counter()
    while len(times) < iterations if not duration else time.perf_counter() - start < duration:
        t = time.perf_counter()
        runner(feeds)
        times.append(time.perf_counter() - t)
        if t - last > 1.0:  # figures so far, about once a second
            last = t
            _partial("timing", of=None if duration else iterations, **_stats(np.array(times) * 1e3))
    ms = np.array(times) * 1e3
    peak = _peak_rss_mb()
    device_mb = getattr(runner, "device_memory_mb", None)  # GPU runners report the device memory they took
    result = {
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
        "host": host_info(),
    }
    ev = settings.get("eval")
    if ev:
        _partial("timed", **{k: result[k] for k in ("p50_ms", "mean_ms", "iterations", "load_ms")})
        result["eval"] = evaluate(runner, ev["path"], ev.get("max_bytes"), ev.get("outputs"))
    return result


def release_settings(release: str, argv: list[str]) -> dict[str, Any]:
    """Settings for the artifact a release directory's manifest names (the runtime images' entrypoint):
    ``--release DIR [--eval FILE.npz] [--iterations N] [--warmup N] [--threads N]``."""
    from edgepipe.harness._release import artifact_from_release
    from edgepipe.types import Manifest

    art = artifact_from_release(Path(release))
    if art is None:
        raise ValueError(f"{release!r} is not a release directory (no manifest.json naming an artifact)")
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    s: dict[str, Any] = {"backend": art.backend, "precision": art.precision, "path": str(art.path),
                         "files": [str(p) for p in art.files], "metadata": art.metadata,
                         "threads": int(opts["--threads"]) if "--threads" in opts else None,
                         "batch": 1, "warmup": int(opts.get("--warmup", 20)),
                         "iterations": int(opts.get("--iterations", 200)), "duration_s": None, "seed": 0}
    m = Manifest.read(Path(release))
    shape = m.target.input_shape  # the shapes it was built for
    if shape:
        s["shapes"] = {k: list(v) for k, v in shape.items()} if isinstance(shape, dict) else {"": list(shape)}
    if opts.get("--eval"):
        outs = (m.signature or {}).get("outputs") or []
        s["eval"] = {"path": opts["--eval"], "outputs": [str(o.get("name", "")) for o in outs] or None}
    return s


def main() -> None:
    try:
        args = sys.argv[1:]
        settings = release_settings(args[1], args[2:]) if args and args[0] == "--release" else json.loads(args[0])
        result = {"ok": True, **measure(settings)}
    except ModuleNotFoundError as e:  # the board or image lacks a package: the host names the pip line
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "missing": (e.name or "").split(".")[0],
                  "host": host_info()}
    except Exception as e:  # reported to the parent as data, not a traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "host": host_info()}
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
