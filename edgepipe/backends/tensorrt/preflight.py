"""Preflight for TensorRT: an ONNX model is checked against what TensorRT's ONNX parser supports, and
against the rules of explicit (Q/DQ) quantization, before anything is shipped to a board.

The operator table is data: the operators that onnx-tensorrt's ``docs/operators.md`` lists as supported
for TensorRT 10.x, minus those its changelog records as added after 10.3 (the TensorRT of JetPack 6, the
oldest TensorRT the shipped targets name). A model that passes here parses on every TensorRT the
targets name; an operator missing from the table fails with the node's name and the rule.

Explicit-quantization rules (TensorRT's "Q/DQ" networks):
  * opset >= 13 (per-channel QuantizeLinear/DequantizeLinear);
  * int8 only, symmetric: every zero point is 0 and of type int8 (TensorRT has no uint8 or asymmetric
    int8 on the GPU);
  * scales are build-time constants, finite and > 0;
  * activations are quantized per tensor (scalar scale); weights may be per channel, along the output
    channel axis of the layer that consumes them (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB=1 else 1,
    MatMul: the last axis), with one scale per channel;
  * every QuantizeLinear feeds DequantizeLinear nodes only (Q/DQ pairs);
  * the input's dimensions other than the batch are static (the engine's optimization profile varies only
    the batch).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepipe.errors import CompileError

TENSORRT_BASELINE = "10.3"
OPSET_MIN = 9
# Newest default-domain opset accepted: what edgepipe exports (20); TensorRT 10.15's operators.md reads 9-24,
# and JetPack 6's 10.3 is older, so the baseline stays at the exporter's opset.
OPSET_MAX = 20
QDQ_MIN_OPSET = 13

# onnx-tensorrt docs/operators.md (TensorRT 10.x), "Supported: Y" rows, without BlackmanWindow,
# HammingWindow, HannWindow (added in 10.4), STFT (10.5), Attention (10.14), RMSNormalization,
# RotaryEmbedding, TensorScatter (10.15).
SUPPORTED_OPS: frozenset[str] = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike",
    "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop",
    "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor",
})

_DEFAULT_DOMAINS = ("", "ai.onnx")
_WEIGHT_AXIS_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INT8 = 3  # onnx.TensorProto.INT8
_MIN_GEMM_DIM = 16  # modelopt / TensorRT: int8 GEMM kernels need K and N >= 16


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.rule}"


class _Graph:
    """Producers, consumers and constant values of one ONNX graph."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.const_types: dict[str, int] = {i.name: i.data_type for i in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                        self.const_types[n.output[0]] = a.t.data_type
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def from_dq(self, tensor: str) -> Any | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def is_weight_dq(self, dq: Any) -> bool:
        """A DequantizeLinear of a constant (int8 weights), or of Q(constant) (fp32 weights kept)."""
        src = dq.input[0]
        if src in self.consts:
            return True
        q = self.producer.get(src)
        return q is not None and q.op_type == "QuantizeLinear" and q.input[0] in self.consts


def opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


def _weight_axis(g: _Graph, consumer: Any, weight_rank: int) -> int | None:
    op = consumer.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if g.attr(consumer, "transB", 0) else 1
    if op == "MatMul":
        return weight_rank - 1
    return None


def _check_qdq(g: _Graph, n: Any, out: list[Violation]) -> None:
    name, op = n.name or n.output[0], n.op_type
    if len(n.input) < 2 or n.input[1] not in g.consts:
        out.append(Violation(name, op, "the scale must be a build-time constant (an initializer)"))
        return
    scale = g.consts[n.input[1]]
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        out.append(Violation(name, op, "scales must be finite and > 0"))
    if g.attr(n, "block_size", 0):
        out.append(Violation(name, op, "block quantization is for int4/fp4 weights; int8 needs per-tensor "
                                       "or per-channel scales"))
    zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if zp_name is None:
        if op == "QuantizeLinear" and g.attr(n, "output_dtype", 0) != _INT8:
            out.append(Violation(name, op, "no int8 zero point: without one, QuantizeLinear produces uint8; "
                                           "TensorRT needs int8 (add an int8 zero point of 0)"))
        if op == "DequantizeLinear" and g.const_types.get(n.input[0], _INT8) != _INT8:
            out.append(Violation(name, op, "dequantizes a constant that is not int8: TensorRT quantizes to int8 "
                                           "only (signed, symmetric)"))
    elif zp_name not in g.consts:
        out.append(Violation(name, op, "the zero point must be a build-time constant (an initializer)"))
    else:
        zp = g.consts[zp_name]
        if g.const_types.get(zp_name) != _INT8:
            out.append(Violation(name, op, f"zero point of type {zp.dtype}: TensorRT quantizes to int8 only "
                                           "(signed, symmetric)"))
        if np.any(zp != 0):
            bad = zp.flat[int(np.flatnonzero(zp)[0])]
            out.append(Violation(name, op, f"zero point {bad}: TensorRT supports symmetric quantization only "
                                           "(every zero point must be 0)"))
        elif zp.shape != scale.shape:
            out.append(Violation(name, op, f"zero point shape {list(zp.shape)} differs from the scale's "
                                           f"{list(scale.shape)}"))
    if scale.size <= 1:
        return
    # per-channel: weights only, along the consumer's output-channel axis
    weight = g.is_weight_dq(n) if op == "DequantizeLinear" else n.input[0] in g.consts
    if not weight:
        out.append(Violation(name, op, f"per-channel scale ({scale.size} values) on an activation: TensorRT "
                                       "quantizes activations per tensor (one scalar scale)"))
        return
    if scale.ndim != 1:
        out.append(Violation(name, op, f"scale of shape {list(scale.shape)}: per-channel scales are 1-D"))
        return
    if op == "QuantizeLinear":
        w = g.consts[n.input[0]]
        dq = next((c for c in g.consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"), None)
    else:
        dq = n
        src = n.input[0]
        w = g.consts[src] if src in g.consts else g.consts[g.producer[src].input[0]]
    axis = g.attr(n, "axis", 1) % w.ndim
    if w.shape[axis] != scale.size:
        out.append(Violation(name, op, f"{scale.size} scales for axis {axis} of a weight of shape "
                                       f"{list(w.shape)}: per-channel needs one scale per channel"))
    for c in g.consumers.get(dq.output[0], []) if dq is not None else []:
        want = _weight_axis(g, c, w.ndim)
        if want is not None and c.op_type in _WEIGHT_AXIS_OPS and c.input[1] == dq.output[0] and axis != want:
            out.append(Violation(name, op, f"per-channel axis {axis} for the weight of {c.op_type} "
                                           f"{c.name!r}: TensorRT needs the output-channel axis {want}"))


def violations(model: Any) -> list[Violation]:
    """Every rule ``model`` breaks, in graph order; empty when TensorRT will accept it."""
    g = _Graph(model)
    out: list[Violation] = []
    v = opset(model)
    if not OPSET_MIN <= v <= OPSET_MAX:
        out.append(Violation("(model)", "opset", f"opset {v}: TensorRT {TENSORRT_BASELINE}'s parser reads "
                                                  f"opsets {OPSET_MIN} to {OPSET_MAX}; export with opset {OPSET_MAX}"))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.nodes)
    if has_qdq and v < QDQ_MIN_OPSET:
        out.append(Violation("(model)", "opset", f"opset {v}: TensorRT explicit quantization needs opset >= "
                                                  f"{QDQ_MIN_OPSET} (per-channel QuantizeLinear/DequantizeLinear)"))
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for k, d in enumerate(dims):
            if k > 0 and not d.HasField("dim_value"):
                out.append(Violation(inp.name, "input", f"dimension {k} is dynamic ({d.dim_param or '?'}): the "
                                                        "engine's optimization profile varies only the batch; "
                                                        "export with fixed C, H, W"))
    for n in g.nodes:
        name = n.name or (n.output[0] if n.output else "?")
        if n.domain not in _DEFAULT_DOMAINS:
            out.append(Violation(name, f"{n.domain}.{n.op_type}", "custom-domain operator: TensorRT's parser "
                                                                   "needs a plugin for it"))
            continue
        if n.op_type not in SUPPORTED_OPS:
            out.append(Violation(name, n.op_type, f"operator not supported by TensorRT {TENSORRT_BASELINE}'s "
                                                  "ONNX parser; rewrite the model without it or add a plugin"))
            continue
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(g, n, out)
        if n.op_type == "QuantizeLinear":
            bad = [c for c in g.consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(Violation(name, n.op_type, f"feeds {bad[0].op_type} {bad[0].name!r}: TensorRT needs "
                                                      "every QuantizeLinear followed by DequantizeLinear"))
    return out


def check(model: Any, what: str) -> None:
    """Raise ``CompileError`` naming the node and the rule for everything TensorRT would reject."""
    found = violations(model)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise CompileError(f"{what} would not build with TensorRT: " + "; ".join(map(str, found[:3])) + more)


def describe(model: Any) -> dict[str, Any]:
    """What the Q/DQ placement looks like: counts, and which compute layers stay in high precision and why."""
    g = _Graph(model)
    ops = Counter(n.op_type for n in g.nodes)
    quantized: Counter[str] = Counter()
    kept: list[dict[str, Any]] = []
    for n in g.nodes:
        if n.op_type not in _WEIGHT_AXIS_OPS:
            continue
        if all(g.from_dq(i) is not None for i in n.input[:2]):
            quantized[n.op_type] += 1
            continue
        entry: dict[str, Any] = {"node": n.name, "op": n.op_type}
        w = g.consts.get(n.input[1]) if len(n.input) > 1 else None
        if n.op_type in ("Gemm", "MatMul") and w is not None and w.ndim == 2:
            trans_b = n.op_type == "Gemm" and g.attr(n, "transB", 0)
            k, nn = (w.shape[1], w.shape[0]) if trans_b else (w.shape[0], w.shape[1])
            if min(k, nn) < _MIN_GEMM_DIM:
                entry["why"] = (f"K={k}, N={nn}: int8 GEMM kernels need K and N >= {_MIN_GEMM_DIM}; Q/DQ here "
                                "would make it slower than fp16 (modelopt's TensorRT rule)")
        kept.append(entry)
    residual = sum(1 for n in g.nodes if n.op_type == "Add" and any(g.from_dq(i) for i in n.input))
    return {
        "opset": opset(model),
        "quantize_nodes": ops["QuantizeLinear"],
        "dequantize_nodes": ops["DequantizeLinear"],
        "quantized_layers": dict(quantized),
        "high_precision_layers": kept,
        "residual_adds_with_qdq_input": residual,
    }
