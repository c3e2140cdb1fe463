"""Quantization-aware fine-tuning on the calibration samples, on the ONNX graph, before any backend's quantizer.

Post-training int8 leaves an error that no choice of scales removes: every activation is rounded to 256
levels and every weight to 255. Fine-tuning with that rounding simulated (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"; on unlabelled
calibration data as in Hubara et al. 2021, "Accurate Post Training Quantization With Small Calibration
Sets") moves the float weights to where int8 rounding costs the least: the network learns to live with the
noise. Here it needs no labels: the loss is the distance of the simulated-int8 model's outputs to the
*original* fp32 model's outputs on the calibration samples (a distillation from fp32 to int8): the MSE of
each float output over its fp32 mean square, averaged over the float outputs (a detector's boxes and scores
weigh the same whatever their scales).

**What is simulated** is what every backend edgepipe drives does: weights symmetric per output channel
(axis 0 of a Conv's or transposed Gemm's weight, axis 1 of a MatMul's or plain Gemm's, as onnxruntime
quantizes them), scale = the channel's largest ``|w|`` / 127 (recomputed at every step, straight-through
gradient); activations asymmetric per tensor on the min/max range seen on the calibration samples, at the
tensors the backends quantize: each Conv/Gemm/MatMul float input (both of a MatMul of two activations, as in
attention) and each Add input, each Relu/Clip output (fused with the layer before it), each Add and Gemm
output, and a layer's output where no activation follows. Integer tensors (token ids, shapes, indices) are
never quantized: they pass through as they are. Layers kept in float (mixed precision) get neither. The
result is a float ONNX graph of the same shape with new weights: each backend then calibrates and quantizes
it as it would any model (its own ranges may differ a little from the simulated ones; the weights' scales
are the same).

The graph runs in torch through a small interpreter of the operators edgepipe's exporter emits for the
models it ships (:data:`SUPPORTED_OPS`: convolutions (also transposed) and pooling of any rank, Gemm/MatMul, BatchNormalization,
Resize, the common activations, elementwise arithmetic, reshaping, Concat, Gather, Softmax, LayerNormalization; any number of
inputs and outputs); another operator stops the fine-tune in one line naming it and its node.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError
from edgepipe.types import ONNX_DTYPES, CalibrationSet, Samples, TensorSpec, sample_count

#: the interpreter's operators (see the module docstring)
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Sigmoid", "Tanh", "Erf", "Softmax", "Add", "Sub", "Mul",
                 "Div", "ReduceMean", "GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "Reshape",
                 "Flatten", "Concat", "Transpose", "Unsqueeze", "Squeeze", "Shape", "Slice", "Gather",
                 "LayerNormalization", "Identity", "Cast", "Constant", "BatchNormalization", "HardSigmoid",
                 "HardSwish", "Pow", "Sqrt", "Resize", "ConvTranspose")
#: layers whose weights are trained and fake-quantized
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: samples per step
BATCH = 16
#: ONNX element types as torch dtype names (``Cast``)
_CAST = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
         11: "float64"}


def _weight_axis(node: Any, attrs: dict[str, Any]) -> int:
    """The weight's output-channel axis, as onnxruntime quantizes it per channel."""
    if node.op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    return 1 if node.op_type in ("MatMul", "ConvTranspose") else 0


def _torch_graph(path: Path, keep_float: tuple[str, ...] = ()) -> Any:
    """The ONNX model at ``path`` as a torch module (its layers' weights and biases as parameters).

    Called with one tensor per graph input (in the graph's order), it returns the output tensor, or a tuple of
    them when the graph has several outputs."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    unsupported = [n for n in graph.node if n.op_type not in SUPPORTED_OPS]
    if unsupported:
        first = unsupported[0]
        others = sorted({n.op_type for n in unsupported} - {first.op_type})
        more = f" (and {', '.join(others)})" if others else ""
        raise CompileError(f"calibration.finetune: {path.name} has operator {first.op_type} (node {first.name!r}){more}, "
                           f"which edgepipe's fine-tune cannot run (it runs {', '.join(SUPPORTED_OPS)}); "
                           "set finetune = 0 for this model")
    init_names = {t.name for t in graph.initializer}

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.weight_qmax = 127  # the largest weight level: 127 (8-bit), 64 (onnxruntime's reduce_range)
            self.nodes = list(graph.node)
            self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]
            self.inputs = tuple(TensorSpec(i.name, (), ONNX_DTYPES.get(i.type.tensor_type.elem_type, "float32"))
                                for i in graph.input if i.name not in init_names)
            self.input_names = [t.name for t in self.inputs]
            self.output_names = [o.name for o in graph.output]
            arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
            self.trained: dict[str, str] = {}  # initializer -> parameter name
            self.params = torch.nn.ParameterDict()
            for n in self.nodes:
                if n.op_type in _LAYERS:
                    for name in n.input[1:]:
                        if name in arrays and name not in self.trained and arrays[name].dtype == np.float32:
                            key = f"p{len(self.trained)}"
                            self.trained[name] = key
                            self.params[key] = torch.nn.Parameter(torch.from_numpy(arrays[name].copy()))
            self.consts = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k not in self.trained}
            readers: dict[str, list[Any]] = {}
            for n in self.nodes:
                for i in n.input:
                    readers.setdefault(i, []).append(n)
            floats = set(keep_float)
            self.weight_quantized = {n.input[1]: _weight_axis(n, a) for n, a in zip(self.nodes, self.attrs, strict=True)
                                     if n.op_type in _LAYERS and n.name not in floats and n.input[1] in self.trained}
            produced_q: set[str] = set()
            for n in self.nodes:
                r = readers.get(n.output[0], [])
                fused = n.op_type in _LAYERS and len(r) == 1 and r[0].op_type in ("Relu", "Clip")
                if n.name in floats:
                    continue
                if n.op_type in ("Relu", "Clip", "Add", "Gemm") or (n.op_type in _LAYERS and not fused):
                    produced_q.add(n.output[0])
            consumed_q = {n.input[i] for n in self.nodes if n.name not in floats
                          for i in ((0, 1) if n.op_type in ("MatMul", "Add") else (0,) if n.op_type in _LAYERS else ())
                          if n.input[i] not in self.trained and n.input[i] not in self.consts}
            self.qpoints = produced_q | consumed_q
            self.ranges: dict[str, tuple[float, int]] = {}
            self.quantize = False
            self._seen: dict[str, tuple[float, float]] | None = None
            #: called with (node, its inputs, its output) as each node runs (AdaRound reads layers' tensors)
            self.spy: Callable[[Any, list[Any], Any], None] | None = None

        def value(self, name: str) -> Any:
            return self.params[self.trained[name]] if name in self.trained else self.consts[name]

        def weight(self, name: str, w: Any) -> Any:
            if not self.quantize or name not in self.weight_quantized:
                return w
            axis = self.weight_quantized[name]
            flat = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1)
            q = self.weight_qmax
            s = (flat.abs().amax(1) / float(q)).clamp_min(1e-12)
            return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), axis, -q, q)

        def activation(self, name: str, x: Any) -> Any:
            if not x.is_floating_point():  # token ids, shapes, indices: never quantized
                return x
            if self._seen is not None:
                lo, hi = float(x.min()), float(x.max())
                old = self._seen.get(name, (0.0, 0.0))
                self._seen[name] = (min(old[0], lo), max(old[1], hi))
            if self.quantize and name in self.ranges:
                s, z = self.ranges[name]
                return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
            return x

        def forward(self, *xs: Any) -> Any:
            if len(xs) != len(self.input_names):
                raise CompileError(f"calibration.finetune: {path.name} takes {len(self.input_names)} input(s) "
                                   f"({', '.join(self.input_names)}); got {len(xs)}")
            env = {k: self.activation(k, x) if k in self.qpoints else x
                   for k, x in zip(self.input_names, xs, strict=True)}
            for n, a in zip(self.nodes, self.attrs, strict=True):
                i = [env[k] if k in env else self.value(k) if k else None for k in n.input]
                try:
                    y = _run(n.op_type, a, i, n, self, F, torch)
                except CompileError:
                    raise
                except (RuntimeError, ValueError, IndexError, TypeError) as e:
                    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise CompileError(f"calibration.finetune: node {n.name!r} ({n.op_type}) of {path.name} failed in "
                                       f"edgepipe's fine-tune ({text}); set finetune = 0 for this model") from e
                if self.spy is not None:
                    self.spy(n, i, y)
                if n.output[0] in self.qpoints:
                    y = self.activation(n.output[0], y)
                env[n.output[0]] = y
            outs = tuple(env[k] for k in self.output_names)
            return outs[0] if len(outs) == 1 else outs

        def run(self, feeds: dict[str, Any], idx: Any = None) -> list[Any]:
            """Every output on ``feeds`` (tensors by input name; the samples ``idx`` of each, or all)."""
            y = self(*(feeds[k] if idx is None else feeds[k][idx] for k in self.input_names))
            return list(y) if isinstance(y, tuple) else [y]

        def calibrate(self, feeds: dict[str, Any], batch: int) -> None:
            """Min/max ranges of the quantized tensors on ``feeds`` (as uint8 scale and zero point)."""
            self._seen, self.quantize = {}, False
            with torch.no_grad():
                for b in range(0, sample_count(feeds), batch):
                    self.run(feeds, slice(b, b + batch))
            for name, (lo, hi) in self._seen.items():
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                s = max((hi - lo) / 255.0, 1e-8)
                self.ranges[name] = (s, int(np.clip(round(-lo / s), 0, 255)))
            self._seen = None

        def write(self, out: Path) -> None:
            from edgepipe._fs import atomic_path

            for t in self.model.graph.initializer:
                if t.name in self.trained:
                    w = self.params[self.trained[t.name]].detach().numpy().astype(np.float32)
                    t.CopyFrom(numpy_helper.from_array(w, t.name))
            with atomic_path(out) as tmp:
                onnx.save(self.model, str(tmp))

    return Graph()


def _pads(x: Any, a: dict[str, Any], F: Any, value: float = 0.0) -> Any:
    """``x`` with the node's ``pads`` (begins of every spatial axis, then ends) applied explicitly."""
    k = x.dim() - 2
    p = list(a.get("pads", [0] * (2 * k)))
    if not any(p):
        return x
    flat: list[int] = []
    for d in reversed(range(k)):  # F.pad takes the last axis first
        flat += [int(p[d]), int(p[d + k])]
    return F.pad(x, tuple(flat), value=value)


def _axes(i: list[Any], a: dict[str, Any]) -> list[int] | None:
    """A node's axes: its second input (opset 13+) or its ``axes`` attribute; None when it has neither."""
    if len(i) > 1 and i[1] is not None:
        return [int(d) for d in i[1].reshape(-1)]
    return [int(d) for d in a["axes"]] if "axes" in a else None


def _run(op: str, a: dict[str, Any], i: list[Any], node: Any, g: Any, F: Any, torch: Any) -> Any:
    """One ONNX operator on torch tensors."""
    if op == "Conv":
        x = i[0]
        k = x.dim() - 2
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise CompileError(f"calibration.finetune: Conv {node.name!r} uses auto_pad, which the fine-tune does not run")
        if k not in (1, 2, 3):
            raise CompileError(f"calibration.finetune: Conv {node.name!r} is {k}-D; the fine-tune runs 1-D to 3-D")
        p = list(a.get("pads", [0] * (2 * k)))
        if p[:k] != p[k:]:  # asymmetric ("SAME") padding
            x, p = _pads(x, a, F), [0] * (2 * k)
        conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
        return conv(x, g.weight(node.input[1], i[1]), i[2] if len(i) > 2 else None, a.get("strides", 1),
                    tuple(p[:k]), a.get("dilations", 1), a.get("group", 1))
    if op == "Gemm":
        x = i[0].t() if a.get("transA", 0) else i[0]
        w = g.weight(node.input[1], i[1])
        y = x @ (w.t() if a.get("transB", 0) else w) * a.get("alpha", 1.0)
        return y + a.get("beta", 1.0) * i[2] if len(i) > 2 and i[2] is not None else y
    if op == "MatMul":
        return i[0] @ g.weight(node.input[1], i[1])
    if op == "Relu":
        return torch.relu(i[0])
    if op == "Clip":
        lo = float(i[1]) if len(i) > 1 and i[1] is not None else a.get("min", -math.inf)
        hi = float(i[2]) if len(i) > 2 and i[2] is not None else a.get("max", math.inf)
        return torch.clamp(i[0], lo, hi)
    if op == "BatchNormalization":  # inference form: the running statistics
        shape = (1, -1) + (1,) * (i[0].dim() - 2)
        scale = i[1] / torch.sqrt(i[4] + a.get("epsilon", 1e-5))
        return (i[0] - i[3].reshape(shape)) * scale.reshape(shape) + i[2].reshape(shape)
    if op == "HardSigmoid":
        return torch.clamp(i[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0.0, 1.0)
    if op == "HardSwish":
        return F.hardswish(i[0])
    if op == "Pow":
        return torch.pow(i[0], i[1])
    if op == "Sqrt":
        return torch.sqrt(i[0])
    if op == "ConvTranspose":
        x = i[0]
        k = x.dim() - 2
        p = list(a.get("pads", [0] * (2 * k)))
        if k not in (1, 2, 3) or p[:k] != p[k:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                or "output_shape" in a:
            raise CompileError(f"calibration.finetune: ConvTranspose {node.name!r} ({k}-D, asymmetric pads, auto_pad "
                               "or output_shape) is not run by the fine-tune")
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[k - 1]
        return conv(x, g.weight(node.input[1], i[1]), i[2] if len(i) > 2 else None, a.get("strides", 1),
                    tuple(p[:k]), tuple(a.get("output_padding", [0] * k)), a.get("group", 1), a.get("dilations", 1))
    if op == "Resize":
        mode = a.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        coord = a.get("coordinate_transformation_mode", b"half_pixel")
        coord = coord.decode() if isinstance(coord, bytes) else coord
        sizes = i[3] if len(i) > 3 and i[3] is not None and i[3].numel() else None
        scales = i[2] if len(i) > 2 and i[2] is not None and i[2].numel() else None
        size = ([int(d) for d in sizes[2:]] if sizes is not None
                else [int(math.floor(d * float(f))) for d, f in zip(i[0].shape[2:], scales[2:], strict=True)])
        if mode == "nearest" and coord == "asymmetric" and a.get("nearest_mode", b"floor") in (b"floor", "floor"):
            return F.interpolate(i[0], size=size, mode="nearest")
        if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and i[0].dim() == 4:
            return F.interpolate(i[0], size=size, mode="bilinear", align_corners=coord == "align_corners")
        raise CompileError(f"calibration.finetune: Resize {node.name!r} ({mode}, {coord}) is not run by the fine-tune")
    if op in ("Sigmoid", "Tanh", "Erf"):
        return {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf}[op](i[0])
    if op == "Softmax":
        return torch.softmax(i[0], int(a.get("axis", -1)))
    if op in ("Add", "Sub", "Mul", "Div"):
        if op == "Div" and not i[0].is_floating_point() and not i[1].is_floating_point():
            return torch.div(i[0], i[1], rounding_mode="trunc")  # ONNX's integer division
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](i[0], i[1])
    if op == "ReduceMean":
        axes = _axes(i, a)
        if axes is None:
            if a.get("noop_with_empty_axes", 0):
                return i[0]
            axes = list(range(i[0].dim()))
        return i[0].mean(dim=axes, keepdim=bool(a.get("keepdims", 1)))
    if op == "GlobalAveragePool":
        return i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)
    if op == "GlobalMaxPool":
        return i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)
    if op in ("MaxPool", "AveragePool"):
        x = i[0]
        k = x.dim() - 2
        if k not in (1, 2, 3) or any(d != 1 for d in a.get("dilations", [1])) or len(node.output) > 1:
            raise CompileError(f"calibration.finetune: {op} {node.name!r} ({k}-D, dilations, or indices) is not run "
                               "by the fine-tune")
        kernel, stride, ceil = a["kernel_shape"], a.get("strides", 1), bool(a.get("ceil_mode", 0))
        if op == "MaxPool":
            return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1](_pads(x, a, F, -math.inf), kernel, stride,
                                                                     ceil_mode=ceil)
        p = list(a.get("pads", [0] * (2 * k)))
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
        if any(p) and not a.get("count_include_pad", 0):  # the padding is not counted: torch's own padding
            if p[:k] != p[k:]:
                raise CompileError(f"calibration.finetune: AveragePool {node.name!r} has asymmetric pads that are not "
                                   "counted (count_include_pad = 0), which the fine-tune does not run")
            return pool(x, kernel, stride, tuple(p[:k]), ceil_mode=ceil, count_include_pad=False)
        return pool(_pads(x, a, F), kernel, stride, ceil_mode=ceil)
    if op == "Reshape":
        shape = [int(d) for d in i[1]]
        shape = [i[0].shape[j] if d == 0 and not a.get("allowzero", 0) else d for j, d in enumerate(shape)]
        return i[0].reshape(shape)
    if op == "Flatten":
        axis = int(a.get("axis", 1))
        axis = axis + i[0].dim() if axis < 0 else axis
        return i[0].reshape(int(np.prod(i[0].shape[:axis])), -1)
    if op == "Concat":
        return torch.cat([t for t in i if t is not None], dim=int(a["axis"]))
    if op == "Transpose":
        return i[0].permute(*(a["perm"] if "perm" in a else reversed(range(i[0].dim()))))
    if op == "Unsqueeze":
        rank = i[0].dim() + len(_axes(i, a) or [])
        y = i[0]
        for d in sorted(d % rank for d in _axes(i, a) or []):
            y = y.unsqueeze(d)
        return y
    if op == "Squeeze":
        axes = _axes(i, a)
        if axes is None:
            return i[0].squeeze()
        y = i[0]
        for d in sorted((d % i[0].dim() for d in axes), reverse=True):
            y = y.squeeze(d)
        return y
    if op == "Shape":
        dims = list(i[0].shape)[a.get("start", 0):a.get("end")]
        return torch.tensor(dims, dtype=torch.int64)
    if op == "Slice":
        x = i[0]
        starts, ends = [int(d) for d in i[1]], [int(d) for d in i[2]]
        axes = [int(d) for d in i[3]] if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = [int(d) for d in i[4]] if len(i) > 4 and i[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
            if st < 1:
                raise CompileError(f"calibration.finetune: Slice {node.name!r} has step {st}; the fine-tune runs "
                                   "positive steps")
            n = x.shape[ax]
            index[ax] = slice(max(-n, min(s, n)), max(-n, min(e, n)), st)
        return x[tuple(index)]
    if op == "Gather":
        x, idx = i[0], i[1].long()
        axis = int(a.get("axis", 0)) % x.dim()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        y = x.index_select(axis, idx.reshape(-1))
        return y.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])
    if op == "LayerNormalization":
        axis = int(a.get("axis", -1)) % i[0].dim()
        bias = i[2] if len(i) > 2 else None
        return F.layer_norm(i[0], tuple(i[0].shape[axis:]), i[1], bias, float(a.get("epsilon", 1e-5)))
    if op == "Identity":
        return i[0]
    if op == "Cast":
        to = _CAST.get(int(a["to"]))
        if to is None:
            raise CompileError(f"calibration.finetune: Cast {node.name!r} to ONNX type {a['to']} is not run by the "
                               "fine-tune")
        return i[0].to(getattr(torch, to))
    if op == "Constant":
        from onnx import numpy_helper

        if "value" not in a:
            raise CompileError(f"calibration.finetune: Constant {node.name!r} without a tensor value is not run")
        return torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))
    raise CompileError(f"calibration.finetune: operator {op} is not supported")  # pragma: no cover


def _feeds(net: Any, x: Samples) -> dict[str, Any]:
    """``x`` as torch tensors by the graph's input names, each in its input's dtype (integer inputs as given)."""
    import torch

    from edgepipe.backends.base import calibration_feeds

    try:
        feeds = calibration_feeds(net.inputs, CalibrationSet(x))
    except ValueError as e:  # samples that do not name the model's inputs
        raise CompileError(f"calibration.finetune: {e}") from None
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def finetune(src: Path, out: Path, x: Samples, reference: Path, *, epochs: int, lr: float = 2e-5,
             batch: int = BATCH, seed: int = 0, keep_float: tuple[str, ...] = (), weight_qmax: int = 127,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``src`` fine-tuned for int8 to ``out``; returns what was done, for the manifest.

    Args:
        src: the float ONNX model the backend will quantize (equalized or not).
        out: where the fine-tuned float ONNX goes (written atomically).
        x: the calibration samples: one array (a one-input model) or one array per input name (integer
            inputs such as token ids as the model takes them); the ranges, and the fine-tune's data.
        reference: the original fp32 ONNX model; its outputs on ``x`` are the targets.
        epochs: passes over ``x``.
        lr: Adam's learning rate at the start (cosine decay to 0 over the steps).
        batch: samples per step.
        seed: the order of the samples.
        keep_float: layers mixed precision keeps in float (not fake-quantized).
        weight_qmax: the largest weight level the backend uses: 127 (8-bit), 64 (7-bit: onnxruntime's
            ``reduce_range``, for CPUs without VNNI).
        progress: called with 1 after each step.
    """
    import torch

    if epochs < 1:
        raise CompileError(f"calibration.finetune = {epochs}: give the number of epochs (1 or more), or 0 for none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref_graph = _torch_graph(reference)
        feeds = _feeds(ref_graph, x)
        n = sample_count(feeds)
        with torch.no_grad():
            parts = [ref_graph.run(feeds, slice(b, b + batch)) for b in range(0, n, batch)]
        targets = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))] if parts else []
        del ref_graph, parts
        matched = [j for j, t in enumerate(targets) if t.is_floating_point()]
        if not matched:
            raise CompileError(f"calibration.finetune: {reference.name} has no float output to match; "
                               "set finetune = 0 for this model")
        net = _torch_graph(src, keep_float)
        net.weight_qmax = int(weight_qmax)
        if net.input_names != list(feeds):
            raise CompileError(f"calibration.finetune: {src.name} takes inputs {', '.join(net.input_names)}, the fp32 "
                               f"model {reference.name} takes {', '.join(feeds)}")
        net.calibrate(feeds, batch)
        net.quantize = True
        norms = [float((targets[j] ** 2).mean()) or 1.0 for j in matched]

        def loss_of(y: list[Any], idx: Any) -> Any:
            """The MSE of each float output over its fp32 mean square, averaged over the float outputs."""
            terms = [((y[j] - targets[j][idx]) ** 2).mean() / norm for j, norm in zip(matched, norms, strict=True)]
            return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

        def nmse() -> float:
            with torch.no_grad():
                parts = [net.run(feeds, slice(b, b + batch)) for b in range(0, n, batch)]
                y = [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
                return float(loss_of(y, slice(None)))

        if not len(net.params):
            raise CompileError(f"calibration.finetune: {src.name} has no layer with float weights among its "
                               "initializers to train; set finetune = 0 for this model")
        before = nmse()
        opt = torch.optim.Adam(net.params.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        steps, total = 0, epochs * -(-n // batch)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for b in range(0, n, batch):
                idx = order[b:b + batch]
                loss = loss_of(net.run(feeds, idx), idx)
                opt.zero_grad()
                loss.backward()
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * steps / total))
                opt.step()
                steps += 1
                if progress:
                    progress(1)
        after = nmse()
        net.write(out)
    return {"method": "quantization-aware fine-tuning against the fp32 model's outputs on the calibration samples "
                      "(simulated int8: per-channel symmetric weights, per-tensor min/max activations)"
                      + (f", weights on {2 * weight_qmax + 1} levels" if weight_qmax != 127 else ""),
            "epochs": epochs, "steps": steps, "samples": n, "lr": lr, "batch": batch,
            "inputs": list(net.input_names), "outputs_matched": len(matched),
            "layers_trained": len(net.weight_quantized), "activations_simulated": len(net.ranges),
            "simulated_int8_nmse": {"before": round(before, 6), "after": round(after, 6)}}
