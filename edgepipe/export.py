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
from edgepipe.types import ONNX_DTYPES, OnnxModel, Samples, Signature, TensorSpec, feeds_of, sample_count

if TYPE_CHECKING:
    from torch import nn

DEFAULT_OPSET = 20


@dataclass(frozen=True)
class Parity:
    """How far the ONNX model's outputs are from torch's on the same samples."""

    samples: int
    max_abs_error: float  # over every output
    top1_agreement: float | None  # None unless output 0 is [N, C] float scores (C >= 2)

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


#: the oldest opset an ONNX source is used at: per-axis Q/DQ (int8 per-channel weights and biases) needs 13
MIN_SOURCE_OPSET = 13


def normalize_source(src: Path, dest: Path) -> dict[str, Any]:
    """Copy the ONNX source ``src`` to ``dest`` in the form every stage after it reads; returns what changed.

    * each ``Constant`` node holding a float tensor becomes an initializer of the same name (what Paddle2ONNX
      and some other exporters write for every weight): quantizers, the equalizer, the fine-tune and AdaRound
      find a layer's weights among the initializers;
    * a graph below opset :data:`MIN_SOURCE_OPSET` is converted to it by ONNX's version converter
      (onnxruntime's int8 writes per-channel DequantizeLinear, which opset 12 cannot hold).

    With nothing to change, ``dest`` is a byte copy."""
    import shutil

    import onnx
    from onnx import numpy_helper, version_converter

    model = onnx.load(str(src))
    moved = []
    for node in model.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        t = node.attribute[0].t
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue  # shapes, axes, indices stay Constant nodes (shape inference reads them there)
        moved.append((node, numpy_helper.from_array(numpy_helper.to_array(t), node.output[0])))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_SOURCE_OPSET)
    if not moved and opset >= MIN_SOURCE_OPSET:
        shutil.copyfile(src, dest)
        return {}
    for node, init in moved:
        model.graph.node.remove(node)
        model.graph.initializer.append(init)
    done: dict[str, Any] = {"constants_as_initializers": len(moved)} if moved else {}
    if opset < MIN_SOURCE_OPSET:
        try:
            model = version_converter.convert_version(model, MIN_SOURCE_OPSET)
        except Exception as e:  # the converter raises plain errors of many kinds
            raise ExportError(f"{src.name} is at opset {opset}; int8 needs opset {MIN_SOURCE_OPSET} or newer and ONNX's "
                              f"version converter could not convert it ({str(e).splitlines()[0] if str(e) else e}); "
                              "export the model again at a newer opset") from e
        done["opset"] = {"from": opset, "to": MIN_SOURCE_OPSET}
    with contextlib.suppress(Exception):  # shapes again, where the changes left tensors unshaped (onnx2tf reads them)
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    with atomic_path(dest) as tmp:
        onnx.save(model, str(tmp))
    return done


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


#: what ``input_shape`` may be: one input's shape (batch first), or a shape per input by forward argument name
InputShape = tuple[int, ...] | dict[str, tuple[int, ...]]

_WRAP_HINT = ("wrap the model in a module whose forward names its inputs "
              "(def forward(self, image, feats): return model(image, feats))")


def forward_input_names(module: nn.Module) -> list[str]:
    """The names of ``module.forward``'s arguments, in order (``self`` left out).

    Raises:
        ExportError: forward takes ``*args``, ``**kwargs`` or keyword-only arguments, or has no readable
            signature, so its inputs have no names to export under.
    """
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError) as e:
        raise ExportError(f"{type(module).__name__}.forward has no readable signature ({e}); {_WRAP_HINT}") from None
    names = []
    for p in params:
        if p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
            what = {p.VAR_POSITIONAL: f"*{p.name}", p.VAR_KEYWORD: f"**{p.name}"}.get(p.kind, f"keyword-only {p.name}")
            raise ExportError(f"{type(module).__name__}.forward takes {what}, so its inputs have no positional "
                              f"names to export under; {_WRAP_HINT}")
        names.append(p.name)
    return names


@dataclass(frozen=True)
class _Inputs:
    """The inputs to export under: names (forward's order), one shape and numpy dtype each."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    single: bool  # given as one tuple: the one-input path (input named "input", dynamic_shapes a tuple)

    def describe(self) -> str:
        if self.single:
            return f"input of shape {list(self.shapes[0])}"
        return "inputs of shapes " + ", ".join(f"{n} {list(s)}" for n, s in zip(self.names, self.shapes, strict=True))

    def examples(self, batch: int | None) -> tuple[Any, ...]:
        """Zeros of each input's shape and dtype (zeros are valid token ids too); ``batch`` replaces dim 0."""
        import torch

        return tuple(torch.from_numpy(np.zeros((batch or s[0], *s[1:]), dtype=np.dtype(d)))
                     for s, d in zip(self.shapes, self.dtypes, strict=True))

    def dynamic_shapes(self) -> Any:
        """One ``batch`` dimension shared by dim 0 of every input (a tuple for the one-input path)."""
        import torch

        dim = torch.export.Dim("batch", min=1, max=4096)
        if self.single:
            return ({0: dim},)
        return {n: {0: dim} for n in self.names}


def _shape(value: Any, what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(d < 1 for d in shape) or len(shape) != len(value):
        raise ExportError(f"{what} {value!r}: give positive sizes, batch first (e.g. [1, 3, 224, 224])")
    return shape


def _dtype(value: Any, name: str) -> str:
    """The example dtype of an input: integer and bool types as given (token ids, masks); every float type
    float32 (the data's float64 does not make a float64 model)."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.kind not in "biuf":
        raise ExportError(f"dtype {value!r} of input {name!r}: give a numpy type name "
                          "(float32, int64, int32, uint8, bool)")
    return "float32" if dt.kind == "f" else dt.name


def _resolve_inputs(module: nn.Module, input_shape: InputShape, dtypes: dict[str, str] | None) -> _Inputs:
    """Check ``input_shape`` (and ``dtypes``) against the module and name every input."""
    dtypes = dict(dtypes or {})
    if not isinstance(input_shape, dict):
        if len(dtypes) > 1:
            raise ExportError(f"dtypes {dtypes}: a single input_shape has one input; give at most one dtype")
        shape = _shape(input_shape, "input_shape")
        return _Inputs(["input"], [shape], [_dtype(next(iter(dtypes.values()), "float32"), "input")], True)
    if not input_shape:
        raise ExportError("input_shape is an empty table: give a shape per forward argument")
    names = forward_input_names(module)
    if set(input_shape) != set(names) or len(input_shape) != len(names):
        raise ExportError(f"input_shape names {list(input_shape)} are not the model's forward arguments {names}; "
                          "name each shape after the forward argument it feeds")
    unknown = sorted(set(dtypes) - set(names))
    if unknown:
        raise ExportError(f"dtypes name {unknown}, which are not inputs of the model (its inputs: {names})")
    return _Inputs(names, [_shape(input_shape[n], f"input_shape of {n!r}") for n in names],
                   [_dtype(dtypes.get(n, "float32"), n) for n in names], False)


def _output_names(result: Any) -> list[str]:
    """``logits`` for one output tensor, ``output_0``, ``output_1``, ... for several (a tuple or list)."""
    import torch
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves(result)
    bad = [type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)]
    if bad or not leaves:
        raise ExportError(f"the model's forward returns {type(result).__name__}"
                          f"{' holding ' + ', '.join(sorted(set(bad))) if bad else ' with no tensors'}; "
                          "return a tensor or a tuple of tensors")
    return ["logits"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]


def export(
    module: nn.Module,
    input_shape: InputShape,
    out: Path,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    dtypes: dict[str, str] | None = None,
) -> OnnxModel:
    """Export ``module`` to a single-file ONNX at ``out`` and check it with ``onnx.checker``.

    Args:
        module: the model, in eval mode.
        input_shape: one input's shape, batch first, any rank (the ONNX input is named ``input``); or a
            shape per input, by forward argument name (the ONNX inputs take those names, in forward's order).
        out: where the ``.onnx`` file goes (written atomically).
        dynamic_batch: make dim 0 of every input one symbolic dimension (``batch``).
        opset: ONNX opset (18 or newer).
        optimize: let the exporter fold constants and simplify the graph.
        dtypes: numpy dtype by input name (``"int64"`` for token ids); integer and bool types are kept,
            float types and inputs not named are float32. With a single shape, at most one entry (any key).

    Returns:
        The exported model; its outputs are ``logits`` (one output) or ``output_0``, ``output_1``, ...
    """
    import onnx
    import torch

    if opset < 18:
        raise ExportError(f"opset {opset}: the dynamo exporter needs opset 18 or newer")
    spec = _resolve_inputs(module, input_shape, dtypes)
    batches = {s[0] for s in spec.shapes}
    if dynamic_batch and len(batches) > 1:
        raise ExportError(f"{spec.describe()}: a dynamic batch is shared by every input, so their first "
                          "dimensions must agree; give one batch size or set dynamic_batch off")
    # an example batch of 1 lets torch.export specialise the batch dimension to 1: trace with at least 2
    examples = spec.examples(max(2, batches.pop()) if dynamic_batch else None)
    output_names = _output_names(_check_runs(module, examples, spec))
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = spec.dynamic_shapes()
    with atomic_path(out) as tmp, _quiet() as log:
        try:
            program = torch.onnx.export(
                module, examples, dynamo=True, opset_version=opset, optimize=optimize,
                input_names=spec.names, output_names=output_names, external_data=False, **kwargs,
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


def _check_runs(module: nn.Module, examples: tuple[Any, ...], spec: _Inputs) -> Any:
    """Run the module once on the example inputs; a model that rejects them fails here, in one line."""
    import torch

    try:
        with torch.no_grad():
            return module(*examples)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"the model does not accept {spec.describe()}: {first}; "
            "set the target's input_shape or pass --input-shape to match the model"
        ) from e


def _abs_error(ref: np.ndarray, got: np.ndarray) -> float:
    """Largest ``|ref - got|`` in float64; equal values (infinities, NaN in both) count 0, NaN in one inf."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    if ref.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        diff = np.abs(ref - got)
    diff[(ref == got) | (np.isnan(ref) & np.isnan(got))] = 0.0
    return float(np.nan_to_num(diff, nan=np.inf).max())


def parity(module: nn.Module, onnx: OnnxModel, x: Samples, batch: int = 64) -> Parity:
    """Run torch and onnxruntime (CPU) on the same samples and compare every output.

    Args:
        module: the torch model the ONNX was exported from.
        onnx: the exported model.
        x: samples: one array (a one-input model) or one array per input, by input name.
        batch: samples per run (a static-batch model runs in its own batch size).

    Returns:
        The largest absolute difference over all outputs, and the top-1 agreement when output 0 is
        ``[N, C]`` float scores with ``C >= 2`` (else ``None``).
    """
    import onnxruntime as ort
    import torch
    from torch.utils._pytree import tree_leaves

    specs = onnx.inputs
    names = [t.name for t in specs]
    try:
        feeds = feeds_of(x, names)
        total = sample_count(feeds)
    except ValueError as e:
        raise ExportError(f"parity check: {e}") from None
    for t in specs:  # integer inputs as their dtype, floats as the model's (numpy knows bfloat16 not)
        with contextlib.suppress(TypeError):
            feeds[t.name] = np.asarray(feeds[t.name], dtype=np.dtype(t.dtype))
    sess = ort.InferenceSession(str(onnx.path), providers=["CPUExecutionProvider"])
    static = specs[0].shape[0] if specs[0].shape and isinstance(specs[0].shape[0], int) else None
    step = static or batch
    n = total if static is None else total // static * static
    if n == 0:
        raise ExportError(f"parity check needs at least {step} samples, got {total}")
    max_err, agree, scores = 0.0, 0, None
    with torch.no_grad():
        for i in range(0, n, step):
            fb = {k: v[i : i + step] for k, v in feeds.items()}
            ref = [t.detach().cpu().numpy() for t in tree_leaves(module(*(torch.from_numpy(fb[k]) for k in names)))]
            got = sess.run(None, fb)
            if len(ref) != len(got):
                raise ExportError(f"parity check: torch gives {len(ref)} outputs, the ONNX model {len(got)}")
            for j, (r, g) in enumerate(zip(ref, got, strict=True)):
                if r.shape != g.shape:
                    raise ExportError(f"parity check: output {j} has shape {list(g.shape)} in ONNX, "
                                      f"{list(r.shape)} in torch")
                max_err = max(max_err, _abs_error(r, g))
            if scores is None:
                scores = ref[0].ndim == 2 and ref[0].dtype.kind == "f" and ref[0].shape[1] >= 2
            if scores:
                agree += int((ref[0].argmax(1) == got[0].argmax(1)).sum())
    return Parity(samples=n, max_abs_error=max_err, top1_agreement=agree / n if scores else None)


def check_parity(p: Parity, atol: float = 1e-3, min_agreement: float = 0.99) -> None:
    """Raise ``ExportError`` with the numbers when the ONNX model drifts from torch (the top-1 agreement is
    checked only where :func:`parity` measured one)."""
    low = p.top1_agreement is not None and p.top1_agreement < min_agreement
    if p.max_abs_error > atol or low:
        agreement = ("" if p.top1_agreement is None else
                     f", top-1 agreement {p.top1_agreement:.2%} (need {min_agreement:.0%})")
        raise ExportError(
            f"ONNX output differs from torch on {p.samples} samples: max abs error {p.max_abs_error:.3g} "
            f"(tolerance {atol:g}){agreement}; "
            "check for train-mode layers (call model.eval()) or ops the exporter rewrites"
        )
