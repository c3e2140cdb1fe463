"""Cross-layer equalization and bias correction (Nagel et al., "Data-Free Quantization", 2019), on the ONNX
graph, once, before any backend's quantizer: onnxruntime, OpenVINO, TFLite and TensorRT all get the
equalized model.

**Equalization.** For two layers ``A -> act -> B`` (Conv, then Relu or ReLU6, then a Conv or depthwise
Conv that reads only that tensor), output channel ``i`` of ``A`` is divided by ``s_i`` and input
channel ``i`` of ``B`` multiplied by it, with ``s_i = sqrt(r_A,i / r_B,i)`` (``r``: the channel's
largest absolute weight), so both layers' per-channel weight ranges meet in the middle: a depthwise
channel whose few weights span a wide range no longer puts its rounding noise into a next layer that
amplifies it. ReLU is positively homogeneous, so this is exact. ReLU6 is not (``clip(z/s, 0, 6) * s``
clips at ``6 s``): a channel is rescaled only when its pre-activation never reached ``6 * min(1, s)``
on the calibration samples, where both agree, with ``s`` raised to at least ``max z / 6``; other
channels keep ``s = 1``. (AIMET swaps ReLU6 for ReLU before equalizing; on EfficientNet-Lite0 that alone
flips 69 % of the top-1 answers, so edgepipe keeps the model's function instead.)

**Bias correction.** int8 rounding of a layer's weights shifts its output by ``dW E[x]`` on average
(``dW``: the rounding error of symmetric per-channel int8, what every backend here does to weights;
``E[x]``: the mean of the layer's input per channel, measured on the calibration samples). The bias is
lowered by that amount, so the layer's expected output is the float one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.types import Samples, feeds_of, sample_count

#: a channel's largest |weight| below this is treated as dead (no rescaling, no division by ~0)
_TINY = 1e-8


def fake_int8(w: np.ndarray, qmax: int = 127) -> np.ndarray:
    """``w`` rounded as symmetric per-output-channel int8 (scale: the channel's largest |weight| / ``qmax``;
    ``qmax`` 64: onnxruntime's 7-bit ``reduce_range``)."""
    a = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s = (np.maximum(a, _TINY) / float(qmax)).reshape(-1, *([1] * (w.ndim - 1)))
    return (np.clip(np.round(w / s), -qmax, qmax) * s).astype(w.dtype)


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.nodes = list(model.graph.node)
        self.inits = {i.name: i for i in model.graph.initializer}
        self.arrays = {k: numpy_helper.to_array(v) for k, v in self.inits.items()}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in model.graph.output}

    def only_consumer(self, tensor: str) -> Any | None:
        c = self.consumers.get(tensor, [])
        return c[0] if len(c) == 1 and tensor not in self.outputs else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def const(self, name: str) -> np.ndarray | None:
        if name in self.arrays:
            return self.arrays[name]
        for n in self.nodes:  # a Constant node
            if n.op_type == "Constant" and n.output[0] == name:
                from onnx import numpy_helper

                return numpy_helper.to_array(self.attr(n, "value"))
        return None

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.arrays[name] = value
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def conv_weight(self, node: Any) -> np.ndarray | None:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in self.inits:
            return None
        return self.arrays[node.input[1]]

    def bias(self, node: Any) -> np.ndarray:
        """The Conv's bias, added as an initializer (zeros) when it has none."""
        from onnx import numpy_helper

        if len(node.input) >= 3 and node.input[2] in self.inits:
            return self.arrays[node.input[2]]
        w = self.arrays[node.input[1]]
        name = f"{node.name or node.output[0]}_edgepipe_bias"
        b = np.zeros(w.shape[0], dtype=w.dtype)
        self.model.graph.initializer.append(numpy_helper.from_array(b, name))
        self.inits[name] = self.model.graph.initializer[-1]
        self.arrays[name] = b
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        return b


def _activation(g: _Graph, node: Any) -> float | None:
    """``inf`` for Relu, the upper bound for Clip(0, hi), ``None`` for anything else."""
    if node.op_type == "Relu":
        return float("inf")
    if node.op_type != "Clip":
        return None
    lo = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else g.attr(node, "min", None)
    hi = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else g.attr(node, "max", None)
    if lo is None or hi is None or float(np.asarray(lo)) != 0.0:
        return None
    return float(np.asarray(hi))


def _pairs(g: _Graph) -> list[tuple[Any, Any, Any, float]]:
    """(A, activation, B, clip bound) for every equalizable pair, in graph order."""
    out = []
    for a in g.nodes:
        wa = g.conv_weight(a)
        if wa is None or wa.ndim != 4 or g.attr(a, "group", 1) != 1 and g.attr(a, "group", 1) != wa.shape[0]:
            continue
        act = g.only_consumer(a.output[0])
        if act is None:
            continue
        bound = _activation(g, act)
        if bound is None:
            continue
        b = g.only_consumer(act.output[0])
        wb = g.conv_weight(b) if b is not None else None
        if wb is None or b.input[0] != act.output[0]:
            continue
        group = g.attr(b, "group", 1)
        if not (group == 1 and wb.shape[1] == wa.shape[0]) and not (group == wa.shape[0] == wb.shape[0] and wb.shape[1] == 1):
            continue
        out.append((a, act, b, bound))
    return out


def _channel_stats(path: Path, tensors: list[str], x: Samples, batch: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per channel (axis 1): the largest value and the mean of each tensor over the samples ``x``."""
    import onnx
    import onnxruntime as ort

    if not tensors:
        return {}
    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = feeds_of(x, [i.name for i in s.get_inputs()])  # every input (a dict by name for several)
    static = s.get_inputs()[0].shape[0]
    step = static if isinstance(static, int) and static > 0 else batch
    mx: dict[str, np.ndarray] = {}
    sm: dict[str, np.ndarray] = {}
    count = 0
    n = sample_count(feeds)
    for i in range(0, n, step):
        outs = s.run(tensors, {k: v[i:i + step] for k, v in feeds.items()})
        for t, v in zip(tensors, outs, strict=True):
            v = v.reshape(v.shape[0], v.shape[1], -1) if v.ndim > 2 else v[:, :, None]
            m = v.max(axis=(0, 2))
            mx[t] = np.maximum(mx[t], m) if t in mx else m
            sm[t] = sm.get(t, 0) + v.mean(axis=2).sum(axis=0)
        count += min(step, n - i)
    return {t: (mx[t], sm[t] / count) for t in tensors}


class Equalizer:
    """``src`` equalized once, written with bias correction for any set of float layers.

    Mixed precision chooses its float layers on the equalized model, and those layers must then not be
    bias-corrected (they are not rounded): equalizing again for that would repeat the same work. The
    equalization and every Conv's correction are computed here once; :meth:`write` applies the
    corrections of the layers that are quantized.

    Args:
        src: the fp32 ONNX model.
        x: calibration samples, for the pre-activation maxima and the layer input means.
        bias_correction: compute the corrections (else :meth:`write` writes the equalized model only).
        weight_qmax: the largest weight level the backend rounds to (127; 64 for onnxruntime's ``reduce_range``).
    """

    def __init__(self, src: Path, x: Samples, *, bias_correction: bool = True, weight_qmax: int = 127) -> None:
        import onnx

        self.model = onnx.load(str(src))
        g = _Graph(self.model)
        pairs = _pairs(g)
        stats = _channel_stats(src, sorted({a.output[0] for a, _, _, bound in pairs if np.isfinite(bound)}), x)
        scaled, kept = 0, 0
        for a, _, b, bound in pairs:
            wa, wb = g.arrays[a.input[1]], g.arrays[b.input[1]]
            r1 = np.abs(wa.reshape(wa.shape[0], -1)).max(axis=1)
            r2 = (np.abs(wb.reshape(wb.shape[0], -1)).max(axis=1) if g.attr(b, "group", 1) != 1
                  else np.abs(wb.transpose(1, 0, 2, 3).reshape(wb.shape[1], -1)).max(axis=1))
            live = (r1 > _TINY) & (r2 > _TINY)
            s = np.ones_like(r1)
            s[live] = np.sqrt(r1[live] / r2[live])
            if np.isfinite(bound):  # ReLU6: only channels that never saturated, and never below max z / bound
                zmax = stats[a.output[0]][0]
                ok = live & (zmax <= bound)
                s = np.where(ok, np.maximum(s, zmax / bound), 1.0)
            s = s.astype(wa.dtype)
            if np.all(s == 1.0):
                continue
            scaled += int(np.sum(s != 1.0))
            kept += int(np.sum(s == 1.0))
            g.set(a.input[1], wa / s.reshape(-1, 1, 1, 1))
            ba = g.bias(a)
            g.set(a.input[2], ba / s)
            if g.attr(b, "group", 1) != 1:
                g.set(b.input[1], wb * s.reshape(-1, 1, 1, 1))
            else:
                g.set(b.input[1], wb * s.reshape(1, -1, 1, 1))
        self.record: dict[str, Any] = {"equalized_pairs": len(pairs), "channels_rescaled": scaled,
                                       "channels_kept (saturating ReLU6 or dead)": kept}
        #: node index -> (node name, bias shift) for every Conv whose int8 rounding is corrected
        self.corrections = _bias_corrections(g, self.model, x, weight_qmax) if bias_correction else None

    def write(self, out: Path, keep_float: tuple[str, ...] | set[str] = ()) -> dict[str, Any]:
        """Write the equalized model to ``out`` (atomically), every Conv's bias corrected except the
        ``keep_float`` layers' (they stay in float: no rounding to correct for). Returns the record."""
        import onnx

        from edgepipe._fs import atomic_path

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        record = dict(self.record)
        if self.corrections is not None:
            g = _Graph(model)
            skip = set(keep_float)
            done = 0
            for i, (name, shift) in self.corrections.items():
                if name in skip:
                    continue
                n = g.nodes[i]
                b = g.bias(n)
                g.set(n.input[2], (b - shift).astype(b.dtype))
                done += 1
            record["bias_corrected_layers"] = done
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
        return record


def equalize(src: Path, out: Path, x: Samples, *, bias_correction: bool = True,
             keep_float: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write ``src`` equalized (and bias-corrected) to ``out``; returns what was done, for the manifest.

    ``x``: calibration samples (NCHW float32), for the pre-activation maxima and the layer input means.
    ``keep_float``: layers that stay in float (mixed precision): their biases are not corrected (there is
    no int8 rounding to correct for, and a correction would be an error of its own)."""
    return Equalizer(src, x, bias_correction=bias_correction).write(out, keep_float)


def _bias_corrections(g: _Graph, model: Any, x: Samples, qmax: int = 127) -> dict[int, tuple[str, np.ndarray]]:
    """Each Conv's bias shift: its int8 weight rounding error times the mean of its input (by node index)."""
    import tempfile

    import onnx

    convs = [(i, n) for i, n in enumerate(g.nodes) if g.conv_weight(n) is not None and g.conv_weight(n).ndim == 4]
    with tempfile.TemporaryDirectory(prefix="edgepipe-equalize-") as tmp:
        p = Path(tmp) / "eq.onnx"
        onnx.save(model, str(p))
        means = _channel_stats(p, sorted({n.input[0] for _, n in convs}), x)
    out: dict[int, tuple[str, np.ndarray]] = {}
    for i, n in convs:
        w = g.arrays[n.input[1]]
        dw = fake_int8(w, qmax) - w
        mean = means[n.input[0]][1].astype(w.dtype)
        if g.attr(n, "group", 1) == 1:
            shift = np.einsum("oikl,i->o", dw, mean)
        elif w.shape[1] == 1 and w.shape[0] == len(mean):
            shift = dw.sum(axis=(1, 2, 3)) * mean
        else:
            continue  # grouped convolutions other than depthwise: left as they are
        out[i] = (n.name, shift)
    return out
