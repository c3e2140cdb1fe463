"""Output heads that concatenate tensors of very different ranges, found on calibration samples.

A detector's single output often concatenates box coordinates (0-640) with class scores (0-1) along one
axis (YOLO's ``Concat`` head). int8 gives a tensor one scale: 640 / 127 = 5 per step, so every score
rounds to 0 or 5 and the detections are gone (TensorRT's YOLOv5s int8 PTQ: mAP 0.362 -> 0.054). Keeping
the ``Concat`` that joins them, and the data-movement ops between it and the output, in float lets each
part keep the scale of its own producer: boxes on theirs, scores on theirs.

:func:`mixed_range_heads` runs the fp32 model on calibration samples, takes each ``Concat``'s inputs'
largest magnitude, and reports those whose largest input is at least ``ratio`` times its smallest and from
which a graph output is reached through data-movement ops only (a head). A ``Concat`` inside the network is
left alone: keeping it float would keep everything after it float.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError
from edgepipe.types import OnnxModel, Samples

#: inputs of one Concat whose largest magnitudes differ by this factor or more share one int8 scale badly:
#: the smaller part keeps fewer than 127 / 32 ~ 4 levels
MIXED_RANGE_RATIO = 32.0
#: ops that move or reshape data without computing: what may lie between a head's Concat and the output
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat"})


@dataclass(frozen=True)
class MixedRange:
    """One head found: ``concat`` joins ``inputs`` whose largest magnitudes are ``absmax``; ``keep`` are the
    nodes that stay in float (the Concat and the data-movement ops after it up to the output)."""

    concat: str
    inputs: tuple[str, ...]
    absmax: tuple[float, ...]
    ratio: float
    keep: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"concat": self.concat, "inputs": list(self.inputs), "absmax": [round(a, 6) for a in self.absmax],
                "ratio": round(self.ratio, 2), "keep_float": list(self.keep)}


def _head_tail(graph: Any, concat: Any) -> tuple[str, ...] | None:
    """The Concat and every node after it, if all of them move data only and one output is reached; else None."""
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    keep, frontier, reaches = [concat.name], list(concat.output), False
    seen = {concat.name}
    while frontier:
        t = frontier.pop()
        reaches |= t in outputs
        for n in consumers.get(t, []):
            if n.op_type not in DATA_MOVEMENT:
                return None
            if n.name not in seen:
                seen.add(n.name)
                keep.append(n.name)
                frontier.extend(n.output)
    return tuple(keep) if reaches else None


def mixed_range_heads(onnx_model: OnnxModel, x: Samples, ratio: float = MIXED_RANGE_RATIO,
                      samples: int = 64) -> list[MixedRange]:
    """The output heads of ``onnx_model`` that concatenate parts of very different ranges (see the module).

    Args:
        onnx_model: the fp32 ONNX.
        x: calibration samples (one array, or one per input name).
        ratio: how many times the largest input's magnitude must exceed the smallest's.
        samples: how many of ``x`` are run.

    Returns:
        Each head found, in graph order; empty when there is none.

    Raises:
        CompileError: a head's Concat has no node name (int8 backends keep nodes float by name).
    """
    import onnx

    from edgepipe.backends.onnxruntime import OrtRunner
    from edgepipe.evaluate import outputs
    from edgepipe.quantize.sensitivity import _feeds

    model = onnx.load(str(onnx_model.path))
    graph = model.graph
    heads = [(n, tail) for n in graph.node if n.op_type == "Concat" and len(n.input) > 1
             for tail in [_head_tail(graph, n)] if tail is not None]
    if not heads:
        return []
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    wanted = [i for n, _ in heads for i in n.input if i and i not in consts]
    known = {o.name for o in graph.output}
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for name in dict.fromkeys(wanted):
        if name not in known:
            graph.output.append(inferred.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                                        None))
    feeds, _ = _feeds(onnx_model, {k: v[:samples] for k, v in x.items()} if isinstance(x, dict) else x[:samples])
    with tempfile.TemporaryDirectory(prefix="edgepipe-ranges-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="probe.onnx.data")
        runner = OrtRunner(path, None)
        got = outputs(runner, feeds)
        names = [o.name for o in runner.session.get_outputs()]
    values = dict(zip(names, got, strict=True)) | consts
    found = []
    for n, tail in heads:
        mags = []
        for i in n.input:
            v = values.get(i)
            if v is None or not np.issubdtype(np.asarray(v).dtype, np.floating):
                break  # an integer or absent part: not a scale problem
            mags.append(float(np.max(np.abs(v))) if np.asarray(v).size else 0.0)
        else:
            positive = [m for m in mags if m > 0]
            if len(positive) < 2:
                continue
            r = max(positive) / min(positive)
            if r >= ratio:
                if not n.name:
                    raise CompileError(f"{onnx_model.path.name}: the output head Concat producing {n.output[0]!r} "
                                       f"joins parts whose ranges differ {r:.0f}x but has no node name, so it cannot "
                                       "be kept in float; name the graph's nodes (torch.onnx.export does)")
                found.append(MixedRange(n.name, tuple(n.input), tuple(mags), r, tuple(k for k in tail if k)))
    return found
