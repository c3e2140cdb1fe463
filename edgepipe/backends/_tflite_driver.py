"""Runs onnx2tf inside the isolated tflite toolchain (``edgepipe toolchain install tflite``), offline.

    <toolchain python> _tflite_driver.py request.json

This file is executed by the toolchain's interpreter, not imported by edgepipe: it uses only the standard
library, numpy and onnx2tf. Before onnx2tf is imported, an audit hook refuses every attempt to open an
internet socket or resolve a host name, and records it; the result (files produced, tool versions,
refused network attempts, and which converted tensor is which ONNX input and output, in which layout) is
written to the request's ``result`` path as JSON. The caller prepares the working directory (one calibration
array per input, 4-D float inputs in NHWC, and the sample file onnx2tf would otherwise download).
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

    kwargs: dict[str, Any] = {
        "input_onnx_file_path": req["onnx"],
        "output_folder_path": req["out"],
        # -cind: our own samples (one file per input, in the converted model's layout) for onnx2tf's dummy
        # inference and, with -oiqt, for calibration; mean 0 and std 1: the samples are what the model takes
        "custom_input_op_name_np_data_path": [
            [i["name"], i["calibration"], np.asarray(i["mean"], dtype=np.float32), np.asarray(i["std"], dtype=np.float32)]
            for i in req["inputs"]],
        "non_verbose": not req.get("verbose", False),
    }
    if req.get("keep_as_is"):  # -k: 3-D and 5-D inputs (and integer 4-D ones) keep the ONNX layout
        kwargs["keep_ncw_or_nchw_or_ncdhw_input_names"] = list(req["keep_as_is"])
    if req.get("overwrite_input_shape"):  # -ois: dynamic dimensions beyond the batch, fixed to the target's
        kwargs["overwrite_input_shape"] = list(req["overwrite_input_shape"])
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
    result: dict[str, Any] = {"files": sorted(p.name for p in out.glob("*.tflite")),
                              "details": _details(chosen) if chosen.is_file() else {}}
    if chosen.is_file() and (out / "model_float32.tflite").is_file():
        result["io"] = match_io(req, out / "model_float32.tflite")
    return result


_CHANNELS_LAST = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def _plain(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _by_name(onnx_names: list[str], keys: list[str]) -> dict[str, str]:
    """ONNX name -> signature key, for the names onnx2tf kept (exactly, or with punctuation replaced)."""
    plain = {_plain(k): k for k in keys}
    return {n: n if n in keys else plain[_plain(n)] for n in onnx_names if n in keys or _plain(n) in plain}


def _real_onnxruntime() -> Any:
    """The toolchain's onnxruntime. This script's directory, first on ``sys.path``, is edgepipe's backends
    package, whose ``onnxruntime.py`` shadows it: onnx2tf's own ``import onnxruntime`` fails there and onnx2tf
    silently skips its onnxruntime checks. That is left as it is (conversions would change); this import
    looks past the shadow."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    try:
        import onnxruntime
    finally:
        sys.path[:] = saved
    return onnxruntime


def match_io(req: dict[str, Any], fp32_tflite: Path) -> dict[str, Any]:
    """Which tensor of the converted model is which ONNX input and output, and each output's layout.

    Inputs are matched by name (onnx2tf keeps ONNX input names as its signature's keys). Outputs are matched
    by running the ONNX model (onnxruntime) and the float32 conversion on the same calibration samples: each
    ONNX output is the converted output, as it is or channels-last (NHWC for 4-D, NWC for 3-D), that has its
    shape and is closest to it. The layout is a measured fact, not a guess from the rank.
    """
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    ort = _real_onnxruntime()
    it = Interpreter(model_path=str(fp32_tflite))
    runner = it.get_signature_runner()
    sig_in, sig_out = runner.get_input_details(), runner.get_output_details()
    ins = _by_name([i["name"] for i in req["inputs"]], list(sig_in))
    missing = [i["name"] for i in req["inputs"] if i["name"] not in ins]
    if missing and len(req["inputs"]) == 1 and len(sig_in) == 1:
        ins, missing = {missing[0]: next(iter(sig_in))}, []
    if missing:
        raise RuntimeError(f"onnx2tf's model has no input named {missing[0]!r} (its inputs: {', '.join(sig_in)})")
    session = ort.InferenceSession(req["onnx"], providers=["CPUExecutionProvider"])
    layouts = {i["name"]: i["layout"] for i in req["inputs"]}
    static = [d for d in (int(sig_in[ins[i["name"]]]["shape_signature"][0]) for i in req["inputs"]) if d > 0]
    n = static[0] if static else 2
    onnx_feeds, tf_feeds = {}, {}
    for i in req["inputs"]:
        x = np.load(i["calibration"])
        x = x[np.arange(n) % len(x)]
        tf_feeds[i["name"]] = x
        onnx_feeds[i["name"]] = x.transpose(0, 3, 1, 2) if layouts[i["name"]] == "NHWC" else x
    got = runner(**{ins[k]: np.ascontiguousarray(x, dtype=sig_in[ins[k]]["dtype"]) for k, x in tf_feeds.items()})
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, onnx_feeds), strict=True))
    outputs, free = [], dict(got)
    named = _by_name(list(want), list(got))
    for name, ref in want.items():
        choices = []
        for key, t in free.items():
            for layout, perm in (("as-is", None), (_CHANNELS_LAST.get(ref.ndim), (0, *range(2, ref.ndim), 1))):
                if layout is None:
                    continue
                r = ref if perm is None else ref.transpose(perm)
                if r.shape == t.shape:
                    err = float(np.abs(r.astype(np.float64) - t.astype(np.float64)).max()) if r.size else 0.0
                    choices.append((named.get(name) != key, err, layout != "as-is", key, layout))
        if not choices:
            raise RuntimeError(f"onnx2tf's model has no output of ONNX output {name!r}'s shape {list(ref.shape)} "
                               f"(as it is or channels-last); its outputs: "
                               f"{', '.join(f'{k} {list(v.shape)}' for k, v in free.items()) or 'none left'}")
        _, err, _, key, layout = min(choices)
        outputs.append({"onnx": name, "tflite": sig_out[key]["name"], "layout": layout, "fp32_max_abs_error": err})
        del free[key]
    return {"inputs": [{"onnx": i["name"], "tflite": sig_in[ins[i["name"]]]["name"], "layout": layouts[i["name"]]}
                       for i in req["inputs"]],
            "outputs": outputs}


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
