"""Runs onnx2tf inside the isolated tflite toolchain (``edgepipe toolchain install tflite``), offline.

    <toolchain python> _tflite_driver.py request.json

This file is executed by the toolchain's interpreter, not imported by edgepipe: it uses only the standard
library, numpy and onnx2tf. Before onnx2tf is imported, an audit hook refuses every attempt to open an
internet socket or resolve a host name, and records it; the result (files produced, tool versions,
refused network attempts) is written to the request's ``result`` path as JSON. The caller prepares the
working directory (the NHWC calibration array and the sample file onnx2tf would otherwise download).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                  "socket.sendto", "socket.sendmsg")
ATTEMPTS: list[dict[str, Any]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in NETWORK_EVENTS:
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock = args[0]
        if getattr(sock, "family", None) == socket.AF_UNIX:
            return  # local IPC, not the network
        where = args[1] if len(args) > 1 else None
    else:
        where = args[0] if args else None
    frames = [f for f in traceback.extract_stack(limit=60)[:-1] if "_tflite_driver" not in f.filename]
    ours = [f for f in frames if "onnx2tf" in f.filename] or frames  # name onnx2tf's line when it is the caller
    caller = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
    ATTEMPTS.append({"event": event, "address": repr(where)[:200], "caller": caller})
    raise PermissionError(f"edgepipe: network access is blocked during conversion ({event} {where!r} from {caller})")


def install_network_guard() -> None:
    """From now on, any internet socket or DNS lookup in this process raises and is recorded."""
    sys.addaudithook(_audit)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for d in ("onnx2tf", "tensorflow", "onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[d] = metadata.version(d)
    return out


def convert(req: dict[str, Any]) -> dict[str, Any]:
    """Call onnx2tf's Python API as its CLI would be called for this request."""
    import numpy as np
    import onnx2tf

    channels = int(req["channels"])
    mean = np.asarray(req["mean"], dtype=np.float32).reshape(1, 1, 1, channels)
    std = np.asarray(req["std"], dtype=np.float32).reshape(1, 1, 1, channels)
    kwargs: dict[str, Any] = {
        "input_onnx_file_path": req["onnx"],
        "output_folder_path": req["out"],
        # -cind: our own samples for onnx2tf's dummy inference and, with -oiqt, for calibration
        "custom_input_op_name_np_data_path": [[req["input_name"], req["calibration"], mean, std]],
        "non_verbose": not req.get("verbose", False),
    }
    if req["precision"] == "int8":
        kwargs.update(
            output_integer_quantized_tflite=True,  # -oiqt
            quant_type=req.get("quant_type", "per-channel"),  # -qt
            input_quant_dtype=req.get("io_dtype", "int8"),  # -iqd
            output_quant_dtype=req.get("io_dtype", "int8"),  # -oqd
        )
    onnx2tf.convert(**kwargs)
    out = Path(req["out"])
    chosen = out / f"model_{req['variant']}.tflite"
    return {"files": sorted(p.name for p in out.glob("*.tflite")),
            "details": _details(chosen) if chosen.is_file() else {}}


def _details(path: Path) -> dict[str, Any]:
    """Shapes, dtypes and quantization of the converted model's inputs and outputs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))

    def one(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"name": d["name"], "shape": [int(v) for v in d["shape_signature"]],
                "dtype": d["dtype"].__name__, "scale": float(scale), "zero_point": int(zero)}

    return {"inputs": [one(d) for d in it.get_input_details()],
            "outputs": [one(d) for d in it.get_output_details()]}


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    install_network_guard()
    os.chdir(req["workdir"])  # onnx2tf looks for its sample data file in the working directory
    t0 = time.perf_counter()
    result: dict[str, Any] = {"ok": False}
    try:
        result.update(convert(req), ok=True)
    except BaseException as e:  # SystemExit too: onnx2tf calls sys.exit(1) on conversion errors
        result["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    result.update(seconds=round(time.perf_counter() - t0, 2), versions=_versions(), network_attempts=ATTEMPTS)
    Path(req["result"]).write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
