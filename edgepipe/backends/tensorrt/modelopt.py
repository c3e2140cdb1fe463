"""nvidia-modelopt's ONNX tools, run in a child process.

``modelopt.onnx.quantization`` monkeypatches onnxruntime's calibrators for the whole process
(``ort_patching.patch_ort_modules``): after it ran, onnxruntime's own ``quantize_static`` fails in that
process. edgepipe builds several targets in one process (say ``cpu-int8`` and a TensorRT target), so
modelopt runs in a fresh interpreter: ``python -m edgepipe.backends.tensorrt.modelopt SPEC.json``. The
child also keeps modelopt's GPU probes and progress output out of the build's terminal.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError


def _drop_unused_initializers(model: Any) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _int8(spec: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
    import onnx
    from modelopt.onnx.quantization import quantize

    out = Path(spec["workdir"]) / "model.qdq.onnx"
    quantize(onnx_path=spec["src"], quantize_mode="int8", calibration_data=feeds,
             calibration_method=spec["method"], calibration_eps=["cpu"], output_path=str(out),
             high_precision_dtype=spec["high_precision"], dq_only=True, log_level="ERROR",
             nodes_to_exclude=[f"^{re.escape(n)}$" for n in spec.get("keep_float", [])] or None)
    return onnx.load(str(out))


def _fp16(spec: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    data = Path(spec["workdir"]) / "calibration.npz"
    np.savez(data, **{k: v[:64] for k, v in feeds.items()})
    return convert_to_mixed_precision(onnx_path=spec["src"], low_precision_type="fp16", keep_io_types=True,
                                      calibration_data=str(data))


def _child(spec: dict[str, Any]) -> None:
    import onnx
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    with np.load(spec["calibration"], allow_pickle=False) as data:
        feeds = {k: data[k] for k in spec["inputs"]}
    with contextlib.redirect_stdout(io.StringIO()):
        model = _int8(spec, feeds) if spec["mode"] == "int8" else _fp16(spec, feeds)
    _drop_unused_initializers(model)
    onnx.save(model, spec["out"])


def convert(mode: str, src: Path, out: Path, feeds: dict[str, np.ndarray], *, method: str = "max",
            high_precision: str = "fp16", keep_float: tuple[str, ...] = (), timeout_s: float = 1800) -> None:
    """Write ``src`` converted by modelopt to ``out``: ``mode`` "int8" (Q/DQ PTQ) or "fp16" (AutoCast).

    ``feeds``: calibration samples of every input, by name, in its dtype (integer ids as they are)."""
    what = "int8 calibration (nvidia-modelopt ONNX PTQ)" if mode == "int8" else "fp16 conversion (nvidia-modelopt AutoCast)"
    with tempfile.TemporaryDirectory(prefix="edgepipe-modelopt-") as tmp:
        work = Path(tmp)
        model = work / "model.onnx"  # modelopt writes intermediate files beside its input: keep them in tmp
        model.write_bytes(Path(src).read_bytes())
        np.savez(work / "calibration.npz", **{k: np.ascontiguousarray(v) for k, v in feeds.items()})
        spec = {"mode": mode, "src": str(model), "out": str(out), "inputs": list(feeds),
                "calibration": str(work / "calibration.npz"), "method": method,
                "high_precision": high_precision, "keep_float": list(keep_float), "workdir": tmp}
        (work / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[3])  # the checkout or site-packages
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "edgepipe.backends.tensorrt.modelopt", str(work / "spec.json")],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired as e:
            raise CompileError(f"{what} of {Path(src).name} ran past {timeout_s:.0f} s") from e
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise CompileError(f"{what} of {Path(src).name} failed: {detail}")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        _child(spec)
    except Exception as e:  # reported to the parent as one line
        sys.stderr.write(f"\n{type(e).__name__}: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
