"""torch -> ONNX, checked: the current (dynamo) exporter, onnx.checker, and a parity check against torch.

Layout: one self-contained ``.onnx`` file (weights inside, ``external_data=False``). Edge models are far
below protobuf's 2 GB limit, and one file is simpler to hash, cache and ship.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe._fs import atomic_path
from edgepipe._hashing import sha256_file
from edgepipe.errors import ExportError
from edgepipe.types import ONNX_DTYPES, OnnxModel, Signature, TensorSpec

if TYPE_CHECKING:
    from torch import nn

DEFAULT_OPSET = 20


@dataclass(frozen=True)
class Parity:
    """How far the ONNX model's outputs are from torch's on the same samples."""

    samples: int
    max_abs_error: float
    top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress lines and warnings meant for its own developers; keep them out."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def _spec(value: Any) -> TensorSpec:
    tt = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(value.name, dims, ONNX_DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"))


def signature(model: Any) -> Signature:
    """The signature of an ONNX ``ModelProto``: every graph input that is not an initializer, every output."""
    initializers = {i.name for i in model.graph.initializer}
    return Signature(tuple(_spec(i) for i in model.graph.input if i.name not in initializers),
                     tuple(_spec(o) for o in model.graph.output))


def onnx_model(path: Path) -> OnnxModel:
    """Describe an ONNX file: its signature (inputs and outputs: names, shapes, dtypes) and its hash."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    sig = signature(model)
    if not sig.inputs:
        raise ExportError(f"{path}: the model has no inputs")
    return OnnxModel(path=path, input_name=sig.inputs[0].name, input_shape=sig.inputs[0].shape,
                     sha256=sha256_file(path), signature=sig)


def strip_metadata(model: Any) -> None:
    """Remove per-node/per-tensor metadata (the exporter's stack traces, FX node text, source paths).

    They make the bytes depend on where the code was installed and leak local paths into releases;
    model-level metadata (producer, opset) stays.
    """

    def graph(g: Any) -> None:
        for n in g.node:
            del n.metadata_props[:]
            n.doc_string = ""
            for a in n.attribute:
                if a.HasField("g"):
                    graph(a.g)
                for sub in a.graphs:
                    graph(sub)
        for coll in (g.input, g.output, g.value_info, g.initializer):
            for item in coll:
                del item.metadata_props[:]
        del g.metadata_props[:]

    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            del n.metadata_props[:]
        del f.metadata_props[:]


def export(
    module: nn.Module,
    input_shape: tuple[int, ...],
    out: Path,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
) -> OnnxModel:
    """Export ``module`` to a single-file ONNX at ``out`` and check it with ``onnx.checker``.

    Args:
        module: the model, in eval mode.
        input_shape: N C H W of one input batch.
        out: where the ``.onnx`` file goes (written atomically).
        dynamic_batch: make the batch dimension symbolic (``batch``).
        opset: ONNX opset (18 or newer).
        optimize: let the exporter fold constants and simplify the graph.
    """
    import onnx
    import torch

    if opset < 18:
        raise ExportError(f"opset {opset}: the dynamo exporter needs opset 18 or newer")
    batch = max(2, input_shape[0]) if dynamic_batch else input_shape[0]
    example = torch.zeros((batch, *input_shape[1:]))
    _check_runs(module, example, input_shape)
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with atomic_path(out) as tmp, _quiet() as log:
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=opset, optimize=optimize,
                input_names=["input"], output_names=["logits"], external_data=False, **kwargs,
            )
            proto = program.model_proto
            strip_metadata(proto)
            onnx.save_model(proto, str(tmp))
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            tail = log.getvalue().strip().splitlines()[-1:] if log.getvalue().strip() else []
            raise ExportError(f"ONNX export failed: {detail} {' '.join(tail)}".strip()) from e
    return onnx_model(out)


def _check_runs(module: nn.Module, example: Any, input_shape: tuple[int, ...]) -> None:
    import torch

    try:
        with torch.no_grad():
            module(example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"the model does not accept input of shape {list(input_shape)}: {first}; "
            "set the target's input_shape or pass --input-shape to match the model"
        ) from e


def parity(module: nn.Module, onnx: OnnxModel, x: np.ndarray, batch: int = 64) -> Parity:
    """Run torch and onnxruntime (fp32, CPU) on the same samples and compare their outputs."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    static = onnx.input_shape[0] if isinstance(onnx.input_shape[0], int) else None
    step = static or batch
    n = len(x) if static is None else len(x) // static * static
    if n == 0:
        raise ExportError(f"parity check needs at least {step} samples, got {len(x)}")
    max_err, agree = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, step):
            xb = x[i : i + step]
            ref = module(torch.from_numpy(xb)).numpy()
            got = sess.run(None, {onnx.input_name: xb})[0]
            max_err = max(max_err, float(np.abs(ref - got).max()))
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
    return Parity(samples=n, max_abs_error=max_err, top1_agreement=agree / n)


def check_parity(p: Parity, atol: float = 1e-3, min_agreement: float = 0.99) -> None:
    """Raise ``ExportError`` with the numbers when the ONNX model drifts from torch."""
    if p.max_abs_error > atol or p.top1_agreement < min_agreement:
        raise ExportError(
            f"ONNX output differs from torch on {p.samples} samples: max abs error {p.max_abs_error:.3g} "
            f"(tolerance {atol:g}), top-1 agreement {p.top1_agreement:.2%} (need {min_agreement:.0%}); "
            "check for train-mode layers (call model.eval()) or ops the exporter rewrites"
        )
