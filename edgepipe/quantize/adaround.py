"""AdaRound: learned rounding of int8 weights, layer by layer, on the calibration samples (Nagel et al. 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization"; AIMET's ``Adaround`` is the reference read).

Rounding every weight to its nearest int8 level is not what keeps a layer's output closest: for each
Conv/ConvTranspose/Gemm/MatMul layer edgepipe quantizes, AdaRound learns, per weight, whether to round down or
up, by minimising the layer's output error on the calibration samples (its input and its fp32 output, through
the Relu/Clip that alone follows it, as AIMET does) plus a regulariser that drives each soft rounding to 0 or 1
(its exponent annealed from 20 to 2 after a warm-up). The result is a float ONNX graph whose weights lie
exactly on the int8 grid each backend then computes (per output channel, symmetric, ``max |w| / 127``; the
largest weight of a channel is kept, so the backend's scale is the one AdaRound rounded to): any backend's
quantizer reproduces AdaRound's integers, so it is one setting for every backend
(``[calibration] adaround = ITERATIONS``).

The layers run in torch through the fine-tune's ONNX interpreter (:mod:`edgepipe.quantize.finetune`), so the
same operators are supported. Inputs are the fp32 model's (the paper's layer-wise form); layers are read in
groups that fit :data:`CAPTURE_BYTES`, one pass over the samples per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import CompileError
from edgepipe.types import Samples, sample_count

#: the rectified sigmoid's stretch (the paper's and AIMET's zeta, gamma)
ZETA, GAMMA = 1.1, -0.1
#: AIMET's defaults: regularisation weight, annealed exponent range, warm-up share; Adam's learning rate is
#: AIMET's 1e-3 x 10: AIMET takes 10,000 steps, edgepipe a few hundred, and at 1e-3 a rounding variable moves
#: too little in 200 steps to flip any weight not already near a half (a small CNN: layer error -10 % at 1e-3
#: and 300 steps, -28 % at 1e-2 and 100 steps)
REG, BETA, WARMUP, LR = 0.01, (20.0, 2.0), 0.2, 1e-2
#: samples per step, and at most this many samples are used
BATCH, MAX_SAMPLES = 8, 128
#: bytes of captured layer inputs and outputs held at once
CAPTURE_BYTES = 1 << 30


def _rect_sigmoid(v: Any) -> Any:
    import torch

    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround(src: Path, out: Path, x: Samples, *, iterations: int, keep_float: tuple[str, ...] = (),
             weight_qmax: int = 127, seed: int = 0, samples: int = MAX_SAMPLES,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``src`` with AdaRound's int8-grid weights to ``out``; returns what was done, for the manifest.

    Args:
        src: the float ONNX model the backend will quantize (equalized, fine-tuned or not).
        out: where the rounded float ONNX goes (written atomically).
        x: the calibration samples (one array, or one per input name).
        iterations: optimisation steps per layer (AIMET's default is 10,000; a few hundred keep most of the gain).
        keep_float: layers mixed precision keeps in float (left as they are).
        weight_qmax: the largest weight level the backend uses (127; 64 with onnxruntime's ``reduce_range``).
        seed: the order of the samples.
        samples: at most this many calibration samples are used.
        progress: called with 1 after each layer.
    """
    import torch

    from edgepipe.quantize.finetune import _feeds, _torch_graph

    if iterations < 1:
        raise CompileError(f"calibration.adaround = {iterations}: give the iterations per layer (e.g. 500), or 0")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        net = _torch_graph(src, keep_float)
        feeds = _feeds(net, x)
        n = min(sample_count(feeds), samples)
        feeds = {k: v[:n] for k, v in feeds.items()}
        layers = [(j, node) for j, node in enumerate(net.nodes)
                  if node.input[1:2] and node.input[1] in net.weight_quantized]
        if not layers:
            raise CompileError(f"calibration.adaround: {src.name} has no int8 layer with float weights to round")
        readers: dict[str, list[Any]] = {}
        for node in net.nodes:
            for i in node.input:
                readers.setdefault(i, []).append(node)
        rounded, errors = {}, []
        for group in _groups(net, feeds, layers):
            captured = _capture(net, feeds, [node for _, node in group])
            for j, node in group:
                xin, yout = captured[node.name]
                w, stats = _round_layer(net, j, node, xin, yout, readers, iterations, weight_qmax, seed)
                rounded[node.input[1]] = w
                errors.append(stats)
                if progress:
                    progress(1)
            del captured
        for name, w in rounded.items():
            net.params[net.trained[name]].copy_(w)
        net.write(out)
    before = float(np.mean([e["nearest"] for e in errors]))
    after = float(np.mean([e["adaround"] for e in errors]))
    return {"method": "AdaRound (Nagel et al. 2020): per-weight rounding up or down learned layer by layer on the "
                      "calibration samples; weights written on the per-channel symmetric int8 grid",
            "iterations": iterations, "samples": n, "layers": len(rounded), "weight_levels": 2 * weight_qmax + 1,
            "layer_output_nmse": {"nearest": float(f"{before:.4g}"), "adaround": float(f"{after:.4g}")},
            "rounded_up_fraction": round(float(np.mean([e["up"] for e in errors])), 4)}


def _groups(net: Any, feeds: dict[str, Any], layers: list[tuple[int, Any]]) -> list[list[tuple[int, Any]]]:
    """The layers in order, in groups whose captured inputs and outputs fit :data:`CAPTURE_BYTES`, sized by one
    sample's pass."""
    one = _capture(net, {k: v[:1] for k, v in feeds.items()}, [node for _, node in layers])
    n = sample_count(feeds)
    groups: list[list[tuple[int, Any]]] = [[]]
    size = 0
    for j, node in layers:
        xin, yout = one[node.name]
        need = (xin.numel() + yout.numel()) * 4 * n
        if groups[-1] and size + need > CAPTURE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((j, node))
        size += need
    return groups


def _capture(net: Any, feeds: dict[str, Any], nodes: list[Any]) -> dict[str, tuple[Any, Any]]:
    """Each node's first input and output on every sample (fp32, batches of :data:`BATCH`)."""
    import torch

    wanted = {node.name for node in nodes}
    got: dict[str, tuple[list[Any], list[Any]]] = {k: ([], []) for k in wanted}

    def spy(node: Any, inputs: list[Any], y: Any) -> None:
        if node.name in wanted:
            got[node.name][0].append(inputs[0].detach().clone())
            got[node.name][1].append(y.detach().clone())

    n = sample_count(feeds)
    net.spy, net.quantize = spy, False
    try:
        for b in range(0, n, BATCH):
            net.run(feeds, slice(b, b + BATCH))
    finally:
        net.spy = None
    return {k: (torch.cat(xs), torch.cat(ys)) for k, (xs, ys) in got.items()}


def _round_layer(net: Any, j: int, node: Any, xin: Any, yout: Any, readers: dict[str, list[Any]],
                 iterations: int, qmax: int, seed: int) -> tuple[Any, dict[str, float]]:
    """The layer's weight on the int8 grid with learned rounding, and its output errors (nearest vs AdaRound)."""
    import torch
    import torch.nn.functional as F

    from edgepipe.quantize.finetune import _run

    attrs = net.attrs[j]
    w = net.params[net.trained[node.input[1]]].detach().clone()
    axis = net.weight_quantized[node.input[1]]
    rest = [net.value(k).detach() if k else None for k in node.input[2:]]
    after = readers.get(node.output[0], [])
    act = after[0] if len(after) == 1 and after[0].op_type in ("Relu", "Clip") else None

    def forward(weight: Any, x: Any) -> Any:
        y = _run(node.op_type, attrs, [x, weight, *rest], node, _Plain(), F, torch)
        if act is not None:
            k = net.nodes.index(act)
            y = _run(act.op_type, net.attrs[k], [y, *(net.value(i).detach() if i else None for i in act.input[1:])], act,
                     _Plain(), F, torch)
        return y

    target = forward(w, xin) if act is not None else yout
    shape = [1] * w.dim()
    shape[axis] = -1
    flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    scale = (flat.abs().amax(1) / float(qmax)).clamp_min(1e-12).reshape(shape)
    ratio = w / scale
    floor = torch.floor(ratio)
    rest_frac = (ratio - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest_frac - GAMMA) - 1.0)).requires_grad_(True)
    # the largest weight of each channel stays where it is: it fixes the scale the backend computes
    peak = (ratio.abs() >= float(qmax) - 1e-4)

    def weight_of(h: Any) -> Any:
        return torch.clamp(floor + h, -qmax, qmax) * scale

    nearest = torch.where(peak, w, torch.clamp(torch.round(ratio), -qmax, qmax) * scale)
    norm = float((target ** 2).mean()) or 1.0
    n = len(xin)
    gen = torch.Generator().manual_seed(seed + j)
    opt = torch.optim.Adam([v], lr=LR)
    warm = int(iterations * WARMUP)
    with torch.enable_grad():
        for it in range(iterations):
            idx = torch.randint(0, n, (min(BATCH, n),), generator=gen)
            h = _rect_sigmoid(v)
            wq = torch.where(peak, w, weight_of(h))
            loss = F.mse_loss(forward(wq, xin[idx]), target[idx]) / norm
            if it >= warm:
                t = (it - warm) / max(1, iterations - warm)
                beta = BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(t * math.pi))
                loss = loss + REG * (1 - (2 * h - 1).abs().pow(beta)).sum() / h.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
    hard = torch.where(peak, w, weight_of((v.detach() >= 0).to(w.dtype)))

    def err(weight: Any) -> float:
        total = 0.0
        for b in range(0, n, 32):
            total += float(((forward(weight, xin[b:b + 32]) - target[b:b + 32]) ** 2).sum())
        return total / target.numel() / norm

    up = float(((v.detach() >= 0) & ~peak).float().mean())
    return hard, {"nearest": err(nearest), "adaround": err(hard), "up": up}


class _Plain:
    """The interpreter's graph hooks with nothing simulated: a layer's weight as given."""

    @staticmethod
    def weight(name: str, w: Any) -> Any:
        return w
