"""OpenVINO for Intel (x86-64) CPUs: the float ONNX -> IR (``model.xml`` + ``model.bin``).

fp32 and bf16 keep fp32 weights, fp16 stores compressed fp16 weights, int8 is NNCF post-training
quantization of the OpenVINO model on the target's own calibration set (optionally with accuracy
control: layers that cost accuracy are reverted to float until the target's budget is met).

Two traps measured on this kind of machine shape the code:

- The CPU plugin runs **bf16** by default on CPUs that have it. Every precision but bf16 is compiled
  with ``INFERENCE_PRECISION_HINT=f32``; the precision to run at is written into the IR's ``rt_info``
  (section ``edgepipe``) so that ``edgepipe bench model.xml`` runs it as it was built.
- ``compiled_model(array)`` shares the caller's array with the infer request; a later copying call
  writes into it. The Runner uses its own infer request and copies inputs and outputs.

Any signature: every input keeps its dtype (integer token ids stay integers, and NNCF calibrates on them as
they are), dynamic dimensions other than the batch are fixed to the target's shapes, and the Runner returns
every output in the ONNX model's order.

OpenVINO's converter and NNCF send usage telemetry and write ids under ``~/intel/`` unless opted out:
edgepipe opts out for its users (see :func:`_no_telemetry`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.backends import register
from edgepipe.backends.base import Backend, Capabilities, calibration_feeds, check_feeds, signature_of
from edgepipe.config import Target
from edgepipe.config.options import OpenVinoOptions
from edgepipe.errors import CompileError, ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Signature, TensorSpec, feeds_of

if TYPE_CHECKING:
    import openvino as ov

DEVICE = "CPU"
RT_INFO = "edgepipe"  # rt_info section of the IR holding how it is meant to run
# The target's calibration.method -> NNCF's activation range estimator. Weights are always min/max
# (per channel). "entropy" (KL divergence) has no NNCF counterpart and is refused in validate().
_RANGE_ESTIMATORS = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE"}
_INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}
_LAYER_TYPES = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
                "MatMul"}
_LOW_PRECISION = {"i8", "u8", "i4", "u4"}


def _no_telemetry() -> None:
    """Keep OpenVINO's converter and NNCF from sending usage telemetry and writing ``~/intel/``: see
    :func:`edgepipe._telemetry.block_openvino` (the package they report through made unimportable)."""
    from edgepipe._telemetry import block_openvino

    block_openvino()


def _openvino() -> Any:
    _no_telemetry()
    import openvino

    return openvino


def _nncf() -> Any:
    _no_telemetry()
    import nncf

    return nncf


@contextlib.contextmanager
def _quiet() -> Any:
    """NNCF logs INFO lines and draws progress bars; keep them out of edgepipe's output."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _is_quantized_input(out: Any, depth: int = 0) -> bool:
    """Does this input come from a FakeQuantize or a low-precision constant (through casts and scales)?"""
    node = out.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_output_element_type(0).get_type_name() in _LOW_PRECISION
    if depth >= 4 or kind not in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "Unsqueeze"):
        return False
    return any(_is_quantized_input(i.get_source_output(), depth + 1) for i in node.inputs())


def quantized_layers(model: ov.Model) -> list[str]:
    """Names of the convolutions and matrix multiplications that run in int8 in ``model``."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in _LAYER_TYPES and any(_is_quantized_input(i.get_source_output())
                                                           for i in op.inputs())]


def _layers(model: ov.Model) -> list[str]:
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in _LAYER_TYPES]


def _onnx_names(path: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    return names | {o for n in graph.node for o in n.output}


def _output_names(path: Path) -> dict[str, tuple[str, ...]]:
    """Each ONNX node's output tensor names, by node name."""
    import onnx

    return {n.name: tuple(n.output) for n in onnx.load(str(path), load_external_data=False).graph.node}


def _stable_names(model: ov.Model, source_names: set[str]) -> None:
    """Rename the operations OpenVINO named from a process-wide counter (``Reshape_27152``).

    They get their type and position instead, so that the same inputs give a byte-identical IR
    whatever else the process converted before. Names that came from the ONNX model are kept.
    """
    ops = model.get_ordered_ops()

    def counted(name: str) -> bool:
        return name not in source_names and re.fullmatch(r"[A-Z][A-Za-z0-9]*_\d+", name) is not None

    taken = {op.get_friendly_name() for op in ops if not counted(op.get_friendly_name())}
    for i, op in enumerate(ops):
        if counted(op.get_friendly_name()):
            name = f"{op.get_type_name()}_{i}"
            while name in taken:
                name += "_"
            taken.add(name)
            op.set_friendly_name(name)


def _runtime_config(precision: str, hint: str, threads: int | None) -> dict[str, Any]:
    from edgepipe._threads import work_threads

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint.upper()}
    threads = threads or work_threads()  # a benchmark gives its target's threads; other work $EDGEPIPE_THREADS
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class OpenVinoRunner:
    """One compiled model and one infer request of its own; inputs and outputs are copied.

    Each input is copied into a tensor that OpenVINO allocated for this request (re-made when the
    shape changes), so the caller's array is never bound to the compiled model, and each output is
    copied out, so the next inference cannot overwrite what a caller holds. The runtime settings
    (inference precision, performance hint) come from the IR's ``rt_info``, written at compile time;
    an IR made elsewhere runs at f32 with the latency hint.
    """

    def __init__(self, path: Path, threads: int | None) -> None:
        ov = self._ov = _openvino()
        core = ov.Core()
        model = core.read_model(str(path))
        precision = _rt_info(model, "inference_precision", "f32")
        hint = _rt_info(model, "performance_hint", "latency")
        self.config = _runtime_config(precision, hint, threads)
        self.compiled = core.compile_model(model, DEVICE, self.config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [
            TensorSpec(p.get_any_name(), tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape()),
                       np.dtype(p.get_element_type().to_dtype()).name)
            for p in self.compiled.inputs
        ]
        self._types = {t.name: p.get_element_type() for t, p in zip(self.inputs, self.compiled.inputs, strict=True)}
        self._n_outputs = len(self.compiled.outputs)
        self._tensors: dict[str, tuple[Any, np.ndarray]] = {}  # input name -> (its tensor, a view of its memory)

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        for spec in self.inputs:
            x = np.asarray(feeds[spec.name], dtype=spec.dtype)
            held = self._tensors.get(spec.name)
            if held is None or held[1].shape != x.shape:
                tensor = self._ov.Tensor(self._types[spec.name], self._ov.Shape(list(x.shape)))
                self.request.set_tensor(spec.name, tensor)
                held = self._tensors[spec.name] = (tensor, tensor.data)
            np.copyto(held[1], x)
        self.request.infer()
        return [self.request.get_output_tensor(i).data.copy() for i in range(self._n_outputs)]


def _rt_info(model: ov.Model, key: str, default: str) -> str:
    if model.has_rt_info([RT_INFO, key]):
        return str(model.get_rt_info([RT_INFO, key]).astype(str))
    return default


@register
class OpenVinoBackend(Backend):
    name = "openvino"
    capabilities = Capabilities(
        precisions=("fp32", "fp16", "bf16", "int8"),
        calibration_methods=tuple(_RANGE_ESTIMATORS),
        extra="openvino",
        modules=("openvino", "nncf"),
        run_modules=("openvino",),  # nncf quantizes; running an IR needs only the runtime
        artifact_suffixes=(".xml",),
        platforms=("x86-64 CPU (OpenVINO CPU plugin)",),
    )
    Options = OpenVinoOptions

    def validate(self, target: Target) -> None:
        if target.precision == "int8" and target.calibration.method == "entropy":
            raise ConfigError(
                f"target {target.name!r}: calibration.method = 'entropy' (KL divergence) has no NNCF "
                "counterpart; use 'minmax' (global min/max of activations) or 'percentile' (NNCF's mean "
                "quantile estimator, which drops outliers)"
            )
        super().validate(target)
        opts: OpenVinoOptions = self.options(target)
        if target.precision != "int8":
            for key in ("accuracy_control", "ignored_scope", "ignored_patterns"):
                if getattr(opts, key):
                    raise ConfigError(
                        f"target {target.name!r}: options.{key} applies to int8 only, and this target is "
                        f"{target.precision}; remove it or set precision = 'int8'"
                    )
        if opts.accuracy_control and target.budgets.metric_drop is None:
            raise ConfigError(
                f"target {target.name!r}: options.accuracy_control needs budgets.max_accuracy_drop "
                "(top-1 points) to know how much accuracy int8 may cost"
            )

    def describe(self) -> dict[str, str]:
        """What this machine's OpenVINO reports about its CPU device."""
        if not self.check().run:
            return {}
        ov = _openvino()
        core = ov.Core()
        if DEVICE not in core.available_devices:
            return {"device": f"no {DEVICE} device (available: {', '.join(core.available_devices) or 'none'})"}
        default = core.get_property(DEVICE, "INFERENCE_PRECISION_HINT")
        return {
            "device": f"{DEVICE}: {core.get_property(DEVICE, 'FULL_DEVICE_NAME')}",
            "capabilities": ", ".join(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")),
            "default precision": f"{default.get_type_name()} (edgepipe runs fp32/fp16/int8 targets at f32)",
            "openvino": ov.get_version().split("-")[0],
        }

    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        ov = _openvino()
        opts: OpenVinoOptions = self.options(target)
        try:
            model = ov.convert_model(str(onnx.path))
        except Exception as e:  # the converter raises plain exceptions of many kinds
            raise CompileError(f"OpenVINO could not convert {onnx.path.name}: {e}") from e
        _fix_shapes(model, target)
        runtime = {"inference_precision": _INFERENCE_PRECISION[target.precision],
                   "performance_hint": opts.performance_hint}
        metadata: dict[str, Any] = {
            "runtime": {**runtime, "device": DEVICE},
            "weights": {"fp16": "fp16 (compressed)", "int8": "int8"}.get(target.precision, "fp32"),
        }
        if target.precision == "int8":
            model, metadata["quantization"] = self._quantize(model, signature_of(onnx), target, calibration, opts,
                                                             onnx.path)
        for key, value in runtime.items():
            model.set_rt_info(value, [RT_INFO, key])
        _stable_names(model, _onnx_names(onnx.path))
        xml, bins = workdir / "model.xml", workdir / "model.bin"
        with tempfile.TemporaryDirectory(dir=workdir, prefix=".ir-") as tmp:
            ov.save_model(model, str(Path(tmp) / xml.name), compress_to_fp16=target.precision == "fp16")
            os.replace(Path(tmp) / bins.name, bins)  # the .xml last: a complete .xml means a complete IR
            os.replace(Path(tmp) / xml.name, xml)
        return Artifact(self.name, target.precision, xml, [xml, bins], metadata)

    def _ignored_scope(self, model: ov.Model, target: Target, opts: OpenVinoOptions,
                       onnx_path: Path | None = None) -> Any:
        nncf = _nncf()
        names = {op.get_friendly_name() for op in model.get_ordered_ops()}
        # mixed precision (calibration.keep_float, ONNX node names): OpenVINO splits a Conv with a bias into
        # "<name>/WithoutBiases" (the convolution, what int8 runs) and "<name>" (the Add)
        # an op that writes a graph output takes that output's name: a node kept float by name is looked up
        # by its output tensor's name too
        outputs = _output_names(onnx_path) if onnx_path is not None else {}
        keep = [f"{n}/WithoutBiases" if f"{n}/WithoutBiases" in names else
                n if n in names else next((o for o in outputs.get(n, ()) if o in names), n)
                for n in target.calibration.keep_float]
        for n in keep:
            if n not in names:
                raise ConfigError(f"target {target.name!r}: calibration.keep_float names {n!r}, which is not an "
                                  "operation of this model")
        if not (opts.ignored_scope or opts.ignored_patterns or keep):
            return None
        layers = _layers(model)
        hint = ", ".join(layers[:8]) + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")
        for n in opts.ignored_scope:
            if n not in names:
                raise ConfigError(f"target {target.name!r}: options.ignored_scope names {n!r}, which is not an "
                                  f"operation of this model; its layers are: {hint}")
        for p in opts.ignored_patterns:
            if not any(re.fullmatch(p, n) for n in names):
                raise ConfigError(f"target {target.name!r}: options.ignored_patterns {p!r} matches no operation "
                                  f"of this model; its layers are: {hint}")
        return nncf.IgnoredScope(names=[*opts.ignored_scope, *keep], patterns=list(opts.ignored_patterns))

    def _quantize(self, model: ov.Model, signature: Signature, target: Target, calibration: CalibrationSet,
                  opts: OpenVinoOptions, onnx_path: Path | None = None) -> tuple[ov.Model, dict[str, Any]]:
        nncf = _nncf()
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        estimator = _RANGE_ESTIMATORS[target.calibration.method]
        kwargs = dict(
            subset_size=len(calibration),
            preset=nncf.QuantizationPreset.PERFORMANCE if opts.preset == "performance" else nncf.QuantizationPreset.MIXED,
            target_device=nncf.TargetDevice.CPU,
            ignored_scope=self._ignored_scope(model, target, opts, onnx_path),
            advanced_parameters=AdvancedQuantizationParameters(
                activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator)),
        )
        samples = nncf.Dataset(_calibration_items(calibration_feeds(signature.inputs, calibration), _batch(model)))
        try:
            with _quiet():
                quantized = nncf.quantize(model, samples, **kwargs)
        except Exception as e:  # NNCF raises plain exceptions of many kinds
            raise CompileError(f"NNCF int8 quantization for target {target.name!r} failed: {e}") from e
        record: dict[str, Any] = {
            "tool": "nncf.quantize (post-training)",
            "preset": opts.preset,
            "activation_range": f"{target.calibration.method} -> nncf {estimator}",
            "weights": "symmetric int8, per channel, min/max",
            "ignored_scope": list(opts.ignored_scope),
            "ignored_patterns": list(opts.ignored_patterns),
            "float_nodes": list(target.calibration.keep_float),
            "calibration": {**calibration.record(), "method": target.calibration.method},
            "quantized_layers": quantized_layers(quantized),
        }
        if opts.accuracy_control and not _classifier(signature):
            record["accuracy_control"] = {
                "skipped": f"accuracy control measures top-1 on a one-input model with one [N, C] output; this model "
                           f"has inputs {', '.join(signature.input_names)} and outputs "
                           f"{', '.join(f'{o.name} {list(o.shape)}' for o in signature.outputs)}: plain int8 is kept"}
        elif opts.accuracy_control:
            quantized, record["accuracy_control"] = self._accuracy_control(model, quantized, samples, target,
                                                                           calibration, kwargs)
            record["quantized_layers"] = quantized_layers(quantized)
        return quantized, record

    def _accuracy_control(self, model: ov.Model, quantized: ov.Model, samples: Any, target: Target,
                          calibration: CalibrationSet, kwargs: dict[str, Any]) -> tuple[ov.Model, dict[str, Any]]:
        """Plain int8 if it meets the budget on the validation data; else NNCF's accuracy-controlled int8."""
        nncf = _nncf()
        vx, vy = calibration.validation_x, calibration.validation_y
        if isinstance(vx, dict):  # the one input's samples, by its name
            vx = next(iter(feeds_of(vx, [model.inputs[0].get_any_name()]).values()))
        if vx is None or vy is None or len(vx) == 0:
            raise CompileError(
                f"target {target.name!r}: options.accuracy_control needs labelled validation data "
                "(CalibrationSet.validation_x/validation_y); the pipeline passes the validation split"
            )
        assert target.budgets.metric_drop is not None  # checked in validate()
        budget = target.budgets.metric_drop
        fp32, plain = _top1(model, vx, vy), _top1(quantized, vx, vy)
        record: dict[str, Any] = {
            "max_drop_points": budget,
            "validation": {"source": calibration.validation_source, "samples": len(vx),
                           "sha256": calibration.validation_sha256},
            "fp32_top1": fp32,
            "plain_int8_top1": plain,
            "plain_int8_drop_points": round((fp32 - plain) * 100, 4),
        }
        if (fp32 - plain) * 100 <= budget:
            return quantized, {**record, "needed": False, "top1": plain, "reverted": []}
        validation = nncf.Dataset(_labelled(vx, vy, _batch(model)), lambda item: item[0])
        try:
            with _quiet():
                args = {k: v for k, v in kwargs.items() if k != "advanced_parameters"}
                restored = nncf.quantize_with_accuracy_control(
                    model, samples, validation, _validate, max_drop=budget / 100,
                    drop_type=nncf.DropType.ABSOLUTE,
                    advanced_quantization_parameters=kwargs["advanced_parameters"], **args,
                )
        except Exception as e:  # NNCF raises plain exceptions of many kinds
            raise CompileError(f"NNCF accuracy-controlled int8 for target {target.name!r} failed: {e}") from e
        still = set(quantized_layers(restored))
        top1 = _top1(restored, vx, vy)
        return restored, {**record, "needed": True, "top1": top1,
                          "drop_points": round((fp32 - top1) * 100, 4),
                          "reverted": [n for n in quantized_layers(quantized) if n not in still]}

    def load(self, artifact: Artifact, threads: int | None = None) -> OpenVinoRunner:
        self.require("run")
        return OpenVinoRunner(artifact.path, threads)


def _fix_shapes(model: ov.Model, target: Target) -> None:
    """Give every dynamic dimension but the batch the size the target's shape gives that input.

    A dynamic batch stays dynamic; static dimensions are the model's. A model whose inputs have no dynamic
    dimension beyond the batch (every exported image classifier) is left exactly as converted."""
    ov = _openvino()
    names = [p.get_any_name() for p in model.inputs]
    loose = {n for n, p in zip(names, model.inputs, strict=True) if any(d.is_dynamic for d in p.get_partial_shape()[1:])}
    if not loose:
        return
    shapes = target.shapes(names)
    new = {}
    for name, port in zip(names, model.inputs, strict=True):
        ps, want = port.get_partial_shape(), shapes[name]
        if len(want) != ps.rank.get_length():
            raise ConfigError(f"target {target.name!r}: input_shape gives input {name!r} the shape {list(want)}, but the "
                              f"model's input has {ps.rank.get_length()} dimensions ({ps})")
        dims = [ps[0]] + [ov.Dimension(w) if ps[i].is_dynamic else ps[i] for i, w in enumerate(want) if i > 0]
        new[name] = ov.PartialShape(dims)
    try:
        model.reshape(new)
    except Exception as e:  # OpenVINO's shape inference raises plain exceptions
        raise CompileError(f"OpenVINO could not give the model the target's input shapes "
                           f"({', '.join(f'{k}: {v}' for k, v in new.items())}): {e}") from e


def _classifier(signature: Signature) -> bool:
    """One input and one [N, C] output: what top-1 (accuracy control's metric here) applies to."""
    return len(signature.inputs) == 1 and len(signature.outputs) == 1 and signature.outputs[0].rank == 2


def _batch(model: ov.Model) -> int:
    """The model's fixed batch size, or 1 when the batch is dynamic."""
    dim = model.inputs[0].get_partial_shape()[0]
    return dim.get_length() if dim.is_static else 1


def _chunks(x: np.ndarray, n: int) -> list[np.ndarray]:
    """``x`` in batches of ``n``; a short last batch is padded with copies of its last sample. Float samples are
    float32; integer ones (token ids) keep their values and dtype."""
    out = []
    for i in range(0, len(x), n):
        xb = x[i : i + n]
        if len(xb) < n:
            xb = np.concatenate([xb, np.repeat(xb[-1:], n - len(xb), axis=0)])
        out.append(np.ascontiguousarray(xb, dtype=np.float32 if xb.dtype.kind == "f" else xb.dtype))
    return out


def _calibration_items(feeds: dict[str, np.ndarray], n: int) -> list[Any]:
    """NNCF's calibration items: batches of the one input's array, or dicts of batches by input name (what an
    OpenVINO infer request takes)."""
    if len(feeds) == 1:
        return _chunks(next(iter(feeds.values())), n)
    chunks = {k: _chunks(v, n) for k, v in feeds.items()}
    return [dict(zip(chunks, batch, strict=True)) for batch in zip(*chunks.values(), strict=True)]


def _validate(compiled: Any, items: Any) -> tuple[float, list[float]]:
    """NNCF's validation function: top-1 (the metric registry's, as a fraction) over (samples, labels) items,
    and each item's."""
    from edgepipe import metrics

    request = compiled.create_infer_request()
    outs, labels, per_item = [], [], []
    for xb, yb in items:
        logits = np.asarray(request.infer({0: xb}, share_inputs=False)[0][: len(yb)])
        outs.append(logits)
        labels.append(yb)
        per_item.append(metrics.score("top1", [logits], {"y": yb}) / 100)
    return metrics.score("top1", [np.concatenate(outs)], {"y": np.concatenate(labels)}) / 100, per_item


def _labelled(x: np.ndarray, y: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(zip(_chunks(x, n), [y[i : i + n] for i in range(0, len(y), n)], strict=True))


def _top1(model: ov.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 of an in-memory OpenVINO model at f32 (as NNCF's accuracy control measures it)."""
    ov = _openvino()
    compiled = ov.Core().compile_model(model, DEVICE, {"INFERENCE_PRECISION_HINT": "f32"})
    n = _batch(model)
    return _validate(compiled, _labelled(x, y, n if n > 1 else 64))[0]


__all__ = ["OpenVinoBackend", "OpenVinoOptions", "OpenVinoRunner", "quantized_layers"]
