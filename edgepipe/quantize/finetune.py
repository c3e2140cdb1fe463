"""Quantization-aware fine-tuning on the calibration samples, on the ONNX graph, before any backend's quantizer.

Post-training int8 leaves an error that no choice of scales removes: every activation is rounded to 256
levels and every weight to 255. Fine-tuning with that rounding simulated (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"; on unlabelled
calibration data as in Hubara et al. 2021, "Accurate Post Training Quantization With Small Calibration
Sets") moves the float weights to where int8 rounding costs the least: the network learns to live with the
noise. Here it needs no labels: the loss is the distance of the simulated-int8 model's logits to the
*original* fp32 model's logits on the calibration samples (a distillation from fp32 to int8).

**What is simulated** is what every backend edgepipe drives does: weights symmetric per output channel,
scale = the channel's largest ``|w|`` / 127 (recomputed at every step, straight-through gradient);
activations asymmetric per tensor on the min/max range seen on the calibration samples, at the tensors the
backends quantize: each Conv/Gemm/Add input, each Relu/Clip output (fused with the layer before it), each
Add and Gemm output, and a layer's output where no activation follows. Layers kept in float (mixed
precision) get neither. The result is a float ONNX graph of the same shape with new weights: each backend
then calibrates and quantizes it as it would any model (its own ranges may differ a little from the
simulated ones; the weights' scales are the same).

The graph runs in torch through a small interpreter of the operators edgepipe's exporter emits for
classifiers (Conv, Gemm/MatMul, Relu, Clip, Add, Sub, Mul, Div, ReduceMean, GlobalAveragePool, MaxPool,
AveragePool, Reshape, Flatten); another operator stops the fine-tune with its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError

#: the interpreter's operators (see the module docstring)
SUPPORTED_OPS = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Sub", "Mul", "Div", "ReduceMean",
                 "GlobalAveragePool", "MaxPool", "AveragePool", "Reshape", "Flatten")
#: layers whose weights are trained and fake-quantized
_LAYERS = ("Conv", "Gemm", "MatMul")
#: samples per step
BATCH = 16


def _torch_graph(path: Path, keep_float: tuple[str, ...] = ()) -> Any:
    """The ONNX model at ``path`` as a torch module (its layers' weights and biases as parameters)."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    bad = sorted({n.op_type for n in graph.node} - set(SUPPORTED_OPS))
    if bad:
        raise CompileError(f"calibration.finetune: {path.name} has operator(s) {', '.join(bad)}, which edgepipe's "
                           f"fine-tune cannot run (it runs {', '.join(SUPPORTED_OPS)}); set finetune = 0 for this model")
    if len(graph.input) - len({i.name for i in graph.initializer} & {i.name for i in graph.input}) != 1 \
            or len(graph.output) != 1:
        raise CompileError(f"calibration.finetune: {path.name} must have one input and one output")

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.nodes = list(graph.node)
            self.attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]
            self.input_name = next(i.name for i in graph.input if i.name not in {t.name for t in graph.initializer})
            self.output_name = graph.output[0].name
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
            self.weight_quantized = {n.input[1] for n in self.nodes
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
                          for i in ((0,) if n.op_type in _LAYERS else (0, 1) if n.op_type == "Add" else ())
                          if n.input[i] not in self.trained and n.input[i] not in self.consts}
            self.qpoints = produced_q | consumed_q
            self.ranges: dict[str, tuple[float, int]] = {}
            self.quantize = False
            self._seen: dict[str, tuple[float, float]] | None = None

        def value(self, name: str) -> Any:
            return self.params[self.trained[name]] if name in self.trained else self.consts[name]

        def weight(self, name: str, w: Any) -> Any:
            if not self.quantize or name not in self.weight_quantized:
                return w
            flat = w.detach().reshape(w.shape[0], -1)
            s = (flat.abs().amax(1) / 127.0).clamp_min(1e-12)
            return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0, -127, 127)

        def activation(self, name: str, x: Any) -> Any:
            if self._seen is not None:
                lo, hi = float(x.min()), float(x.max())
                old = self._seen.get(name, (0.0, 0.0))
                self._seen[name] = (min(old[0], lo), max(old[1], hi))
            if self.quantize and name in self.ranges:
                s, z = self.ranges[name]
                return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
            return x

        def forward(self, x: Any) -> Any:
            env = {self.input_name: self.activation(self.input_name, x) if self.input_name in self.qpoints else x}
            for n, a in zip(self.nodes, self.attrs, strict=True):
                i = [env[k] if k in env else self.value(k) if k else None for k in n.input]
                y = _run(n.op_type, a, i, n, self, F, torch)
                if n.output[0] in self.qpoints:
                    y = self.activation(n.output[0], y)
                env[n.output[0]] = y
            return env[self.output_name]

        def calibrate(self, x: np.ndarray, batch: int) -> None:
            """Min/max ranges of the quantized tensors on ``x`` (as uint8 scale and zero point)."""
            self._seen, self.quantize = {}, False
            with torch.no_grad():
                for b in range(0, len(x), batch):
                    self(torch.from_numpy(x[b:b + batch]))
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


def _run(op: str, a: dict[str, Any], i: list[Any], node: Any, g: Any, F: Any, torch: Any) -> Any:
    """One ONNX operator on torch tensors."""
    if op == "Conv":
        p = list(a.get("pads", [0, 0, 0, 0]))
        x = i[0]
        if len(p) == 4 and (p[0] != p[2] or p[1] != p[3]):  # asymmetric ("SAME") padding
            x, p = F.pad(x, (p[1], p[3], p[0], p[2])), [0, 0, 0, 0]
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise CompileError(f"calibration.finetune: Conv {node.name!r} uses auto_pad, which the fine-tune does not run")
        return F.conv2d(x, g.weight(node.input[1], i[1]), i[2] if len(i) > 2 else None, a.get("strides", 1),
                        tuple(p[:2]), a.get("dilations", 1), a.get("group", 1))
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
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](i[0], i[1])
    if op == "ReduceMean":
        axes = [int(d) for d in (i[1] if len(i) > 1 and i[1] is not None else a.get("axes", range(i[0].dim())))]
        return i[0].mean(dim=axes, keepdim=bool(a.get("keepdims", 1)))
    if op == "GlobalAveragePool":
        return i[0].mean(dim=(2, 3), keepdim=True)
    if op in ("MaxPool", "AveragePool"):
        p = list(a.get("pads", [0, 0, 0, 0]))
        x = F.pad(i[0], (p[1], p[3], p[0], p[2]), value=-math.inf if op == "MaxPool" else 0.0)
        k, s = a["kernel_shape"], a.get("strides", 1)
        return F.max_pool2d(x, k, s) if op == "MaxPool" else F.avg_pool2d(x, k, s)
    if op == "Reshape":
        shape = [int(d) for d in i[1]]
        shape = [i[0].shape[j] if d == 0 and not a.get("allowzero", 0) else d for j, d in enumerate(shape)]
        return i[0].reshape(shape)
    if op == "Flatten":
        return torch.flatten(i[0], a.get("axis", 1))
    raise CompileError(f"calibration.finetune: operator {op} is not supported")  # pragma: no cover


def finetune(src: Path, out: Path, x: np.ndarray, reference: Path, *, epochs: int, lr: float = 2e-5,
             batch: int = BATCH, seed: int = 0, keep_float: tuple[str, ...] = (),
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``src`` fine-tuned for int8 to ``out``; returns what was done, for the manifest.

    Args:
        src: the float ONNX model the backend will quantize (equalized or not).
        out: where the fine-tuned float ONNX goes (written atomically).
        x: the calibration samples (NCHW float32): the ranges, and the fine-tune's data.
        reference: the original fp32 ONNX model; its logits on ``x`` are the targets.
        epochs: passes over ``x``.
        lr: Adam's learning rate at the start (cosine decay to 0 over the steps).
        batch: samples per step.
        seed: the order of the samples.
        keep_float: layers mixed precision keeps in float (not fake-quantized).
        progress: called with 1 after each step.
    """
    import torch
    import torch.nn.functional as F

    if epochs < 1:
        raise CompileError(f"calibration.finetune = {epochs}: give the number of epochs (1 or more), or 0 for none")
    if isinstance(x, dict):
        raise CompileError(f"calibration.finetune: the int8 fine-tune takes one-input models for now; "
                           f"{src.name} has inputs {', '.join(x)}: set finetune = 0")
    x = np.ascontiguousarray(x, dtype=np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref_graph = _torch_graph(reference)
        with torch.no_grad():
            target = torch.cat([ref_graph(torch.from_numpy(x[b:b + batch])) for b in range(0, len(x), batch)])
        del ref_graph
        net = _torch_graph(src, keep_float)
        net.calibrate(x, batch)
        net.quantize = True
        norm = float((target ** 2).mean()) or 1.0

        def nmse() -> float:
            with torch.no_grad():
                y = torch.cat([net(torch.from_numpy(x[b:b + batch])) for b in range(0, len(x), batch)])
            return float(((y - target) ** 2).mean()) / norm

        before = nmse()
        opt = torch.optim.Adam(net.params.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        steps, total = 0, epochs * -(-len(x) // batch)
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for b in range(0, len(x), batch):
                idx = order[b:b + batch]
                y = net(torch.from_numpy(x[idx.numpy()]))
                loss = F.mse_loss(y, target[idx]) / norm
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
    return {"method": "quantization-aware fine-tuning against the fp32 model's logits on the calibration samples "
                      "(simulated int8: per-channel symmetric weights, per-tensor min/max activations)",
            "epochs": epochs, "steps": steps, "samples": len(x), "lr": lr, "batch": batch,
            "layers_trained": len(net.weight_quantized), "activations_simulated": len(net.ranges),
            "simulated_int8_nmse": {"before": round(before, 6), "after": round(after, 6)}}
