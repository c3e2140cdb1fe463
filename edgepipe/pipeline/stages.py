"""The stages: plain functions from typed values to a typed value and a :class:`StageRecord`.

load → compress → export → compile → evaluate → bench. Each stage that costs time looks itself up in the
verified cache first (key: the hash of everything that went in), so a rerun, a second target or another
search candidate that shares a prefix reuses its work. ``build``, ``release``, the api, the bench scripts
and the cluster executors all compose these; none of them re-implements one.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe import backends
from edgepipe._hashing import sha256_arrays, sha256_file, sha256_json
from edgepipe._progress import NullReporter, Reporter
from edgepipe.config import Target, load_target
from edgepipe.config.recipe import Recipe
from edgepipe.data import Dataset, Splits, load_data, split
from edgepipe.errors import BackendUnavailable, ConfigError, EdgepipeError
from edgepipe.harness import BenchSettings, Measurement
from edgepipe.models import ModelSource, load_model
from edgepipe.pipeline.cache import Cache
from edgepipe.pipeline.options import BuildOptions
from edgepipe.types import (
    Artifact,
    Budget,
    CalibrationSet,
    OnnxModel,
    StageRecord,
    StandIn,
    TensorSpec,
    sample_count,
)
from edgepipe.versions import tool_versions

if TYPE_CHECKING:
    from torch import nn

    from edgepipe.metrics import Metric


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------------------
# inputs


def resolve_targets(specs: list[str] | list[str | Target], input_shape: tuple[int, ...] | None = None,
                    max_metric_drop: float | None = None) -> list[Target]:
    """Load and validate targets, and check that this machine can compile each, before any work.

    ``input_shape`` and ``max_metric_drop`` (``--max-metric-drop``) override every target's."""
    import dataclasses

    if not specs:
        raise ConfigError("no target given: pass --target NAME (see `edgepipe targets`)")
    if max_metric_drop is not None and not (math.isfinite(max_metric_drop) and max_metric_drop >= 0):
        raise ConfigError(f"--max-metric-drop {max_metric_drop}: give a budget >= 0 in the metric's units")
    out = []
    for spec in specs:
        t = spec if isinstance(spec, Target) else load_target(spec)
        if input_shape is not None:
            t = t.with_input_shape(input_shape)
        if max_metric_drop is not None:
            t = dataclasses.replace(t, budgets=dataclasses.replace(t.budgets, max_metric_drop=float(max_metric_drop)))
        backend = backends.get(t.backend)
        backend.validate(t)
        avail = backend.check_target(t)
        if not avail.compile:
            raise BackendUnavailable(f"target {t.name!r} needs backend {t.backend!r}, which cannot compile here: {avail.reason}")
        out.append(t)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"target given twice: {names}")
    return out


_DATASETS: dict[tuple[Any, ...], Dataset] = {}


def input_specs(source: ModelSource | None, target: Target) -> list[TensorSpec]:
    """The model's inputs at the target's shapes (see :func:`shape_specs`)."""
    return shape_specs(source, target.input_shape, f"target {target.name!r}: input_shape")


def shape_specs(source: ModelSource | None, shape: tuple[int, ...] | dict[str, tuple[int, ...]],
                where: str) -> list[TensorSpec]:
    """The model's inputs at ``shape`` (batch first; one shape, or a table by input name): names and dtypes
    from the ONNX graph, or, for a torch module, the ``forward`` argument names when ``shape`` is a table
    (dtype ``""``: the data's). ``where`` names the shapes' origin in an error (see :func:`match_shapes`)."""
    from edgepipe.config.target import match_shapes

    if source is not None and source.is_onnx and source.onnx_path is not None:
        from edgepipe.export import onnx_model

        sig = onnx_model(source.onnx_path).signature
        assert sig is not None
        if len(sig.inputs) == 1 and not isinstance(shape, dict):
            return [TensorSpec(sig.inputs[0].name, tuple(shape), sig.inputs[0].dtype)]
        shapes = match_shapes(shape, sig.input_names, where)
        return [TensorSpec(t.name, shapes[t.name], t.dtype) for t in sig.inputs]
    if isinstance(shape, dict):
        if source is not None and source.module is not None:
            from edgepipe.export import forward_input_names

            names = forward_input_names(source.module)
            shapes = match_shapes(shape, names, where)
            return [TensorSpec(n, shapes[n], "") for n in names]
        return [TensorSpec(n, v, "") for n, v in shape.items()]
    name = "input"  # what a one-input module's ONNX input is called; its data may use the forward's name
    if source is not None and source.module is not None:
        from edgepipe.export import forward_input_names

        names = []
        with contextlib.suppress(EdgepipeError):
            names = forward_input_names(source.module)
        if len(names) > 1:
            match_shapes(shape, names, where)  # one shape for several inputs: refused, naming them
        name = names[0] if names else name
    return [TensorSpec(name, tuple(shape), "")]


def data_splits(data: str, input_shape: tuple[int, ...] | list[TensorSpec], calibration_samples: int = 256,
                calibration_seed: int = 0) -> Splits:
    """The dataset ``data`` for the model's inputs and split (train, calibration, validation, test).

    ``input_shape``: a one-input model's shape (N, C, H, W for the image datasets), or every input's
    :class:`TensorSpec` (see :func:`input_specs`). Datasets are kept in memory per (spec, inputs) for the life of
    the process: a search over many candidates reads and resizes its data once.
    """
    specs = input_shape if isinstance(input_shape, list) else [TensorSpec("input", tuple(input_shape), "")]
    key = (data, tuple((t.name if len(specs) > 1 else "", tuple(t.shape[1:]), t.dtype) for t in specs))
    if key not in _DATASETS:
        _DATASETS[key] = load_data(data, specs)
    return split(_DATASETS[key], calibration_samples, calibration_seed)


def load_splits(data: str, target: Target, source: ModelSource | None = None) -> Splits:
    """:func:`data_splits` for the target's input shapes (and the model's input names) and calibration settings."""
    return data_splits(data, input_specs(source, target), target.calibration.samples, target.calibration.seed)


def calibration_set(splits: Splits, scorer: Scorer | None = None,
                    reference: list[np.ndarray] | None = None) -> CalibrationSet:
    """Calibration samples, with the validation split for backends that check accuracy while compiling and,
    given the model's ``scorer``, its metric on validation outputs (float layers are then ranked by it;
    ``reference``: the fp32 outputs on the validation split, for a metric that compares with them)."""
    score, key = None, ""
    if scorer is not None:
        val = splits.validation
        sign = 1.0 if scorer.metric.higher_is_better else -1.0

        def score(outputs: list[np.ndarray]) -> float:
            return sign * scorer(outputs, val, reference)

        key = sha256_json([scorer.key, val.sha256])
    return CalibrationSet(splits.calibration.x, splits.calibration.name, validation_x=splits.validation.x,
                          validation_y=splits.validation.y, validation_source=splits.validation.name,
                          validation_score=score, validation_score_key=key)


def data_sha256(splits: Splits) -> str:
    return sha256_json({k: getattr(splits, k).sha256 for k in ("train", "calibration", "validation", "test")})


# ---------------------------------------------------------------------------------------------------------
# compress


@dataclass
class Compressed:
    """The model the rest of the flow sees: the source itself, or the source after a recipe.

    ``sha256`` names it for every later cache key; the torch module is loaded only when a stage needs it
    (a cached export never does).
    """

    source: ModelSource
    sha256: str
    recipe: Recipe | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    fp32_validation_top1: float | None = None  # a classifier's top-1 after the recipe (validation, 0..1)
    # any other model's: {"measure": metric name or "sqnr_db", "value": ..., "unit": ...}
    fp32_validation: dict[str, Any] | None = None
    _module: nn.Module | None = None
    _loader: Callable[[], nn.Module] | None = None

    @property
    def is_onnx(self) -> bool:
        return self.source.is_onnx

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            if self._loader is None:
                assert self.source.module is not None
                self._module = self.source.module
            else:
                self._module = self._loader()
        return self._module


def original(src: ModelSource) -> Compressed:
    """The uncompressed model as a :class:`Compressed` (no recipe)."""
    return Compressed(src, sha256_json({"weights": src.weights_sha256, "spec": src.spec}), _module=src.module)


def compress(src: ModelSource, recipe: Recipe | None, splits: Splits, cache: Cache,
             reporter: Reporter | None = None, scorer: Scorer | None = None) -> tuple[Compressed, StageRecord]:
    """Apply ``recipe`` to the source model (cached by source, recipe and data), any signature.

    A one-output classifier with integer labels records its validation top-1 (``fp32_validation_top1``); any other
    model records ``fp32_validation``: ``scorer``'s metric (the build's, see :func:`compress_scorer`) or, without
    one, the SQNR of each output against the original model. The ``.pt2`` is saved for every input's shape and
    dtype (token ids stay integers)."""
    rep = reporter or NullReporter()
    timer = _Timer()
    base = original(src)
    if recipe is None:
        return base, StageRecord("compress", {"model": src.weights_sha256}, base.sha256, skipped="no recipe")
    if not src.is_onnx and Path(src.spec).suffix in (".pt2", ".pt", ".ts"):
        raise ConfigError(f"model {src.spec!r} is a saved program (torch.export or TorchScript): its layers are one "
                          "flattened graph, which no compression technique can take apart; compress the model it came "
                          f"from (pkg.mod:factory --weights {Path(src.spec).name}"
                          + (" --trust-code" if Path(src.spec).suffix == ".pt2" else "") + "), or build it without a recipe")
    if src.is_onnx:
        return base, StageRecord("compress", {"model": src.weights_sha256}, base.sha256,
                                 skipped="model is already ONNX")
    inputs = {"model": base.sha256, "recipe": recipe.sha256, "data": data_sha256(splits),
              "tools": sha256_json(tool_versions())}
    classifier = _is_classifier(src.module, splits)  # type: ignore[arg-type]
    if scorer is not None and not classifier:  # its records hold the metric: another metric, another entry
        inputs["metric"] = scorer.key
    key = sha256_json(inputs)
    hit = cache.get("compress", key)
    entry = hit
    if hit is None:
        import copy
        import tempfile

        from edgepipe.compress import apply_recipe

        # on a copy: the source module stays the original, which the reference and other recipes need
        module, steps = apply_recipe(copy.deepcopy(src.module), recipe, splits, rep,  # type: ignore[arg-type]
                                     scorer=None if classifier else scorer)
        last = steps[-1]["after"] if steps else {}
        record: dict[str, Any] = {"steps": steps}
        if classifier:
            record["fp32_validation_top1"] = last.get("top1")
        else:
            measure = last.get("measure", "sqnr_db")
            record["fp32_validation"] = {"measure": measure, "value": last.get(measure),
                                         "unit": last.get("unit") if measure != "sqnr_db" else "dB"}
        out = Compressed(src, key, recipe, steps, record.get("fp32_validation_top1"),
                         fp32_validation=record.get("fp32_validation"), _module=module)
        with tempfile.TemporaryDirectory(prefix="edgepipe-compress-") as tmp:
            pt2 = save_compressed(module, splits, Path(tmp) / "model.pt2")
            stored = cache.put("compress", key, [pt2], record)
        if stored is not None and not stored.mine:  # another run stored this key first: everyone uses that one
            entry = stored
    if entry is not None:
        out = Compressed(src, key, recipe, entry.record["steps"], entry.record.get("fp32_validation_top1"),
                         fp32_validation=entry.record.get("fp32_validation"),
                         _loader=lambda: _load_cached_program(entry))
    return out, StageRecord("compress", inputs, key, timer.seconds, hit is not None,
                            {"recipe": recipe.name, "steps": len(recipe.steps)})


def _is_classifier(module: nn.Module, splits: Splits) -> bool:
    """A one-output ``[N, C]`` model whose data has integer labels ``y``: compressed against its labels."""
    from edgepipe.compress._inputs import is_classifier, predict
    from edgepipe.types import take

    return is_classifier(predict(module, take(splits.validation.x, slice(0, 2))), splits.validation.y)


def compress_scorer(options: BuildOptions, module: nn.Module | None, splits: Splits) -> Scorer | None:
    """The build's metric for the compress records of a model that is not a labelled classifier: ``--metric``
    (with its postprocess), else the default for the module's output shapes; None when there is none (the records
    then measure the fidelity to the original model)."""
    if module is None:
        return None
    from edgepipe.compress._inputs import predict
    from edgepipe.types import take

    shapes = [tuple(o.shape) for o in predict(module, take(splits.validation.x, slice(0, 2)))]
    try:
        return resolve_scorer(options, shapes, splits)
    except ConfigError:
        return None


def save_compressed(module: nn.Module, splits: Splits, path: Path) -> Path:
    """The compressed module as a ``.pt2`` taking every input at its shape and dtype (batch dynamic)."""
    from edgepipe.compress._inputs import arrays
    from edgepipe.models import save_program

    x = splits.validation.x
    if not isinstance(x, dict):
        dtypes = None if x.dtype.kind == "f" else {"input": str(x.dtype)}
        return save_program(module, (1, *x.shape[1:]), path, dtypes=dtypes)
    feeds = arrays(module, x)
    if len(feeds) == 1:  # one input, whatever the data calls it: the one-input program
        (arr,) = feeds.values()
        return save_program(module, (1, *arr.shape[1:]), path,
                            dtypes=None if arr.dtype.kind == "f" else {"input": str(arr.dtype)})
    return save_program(module, {k: (1, *v.shape[1:]) for k, v in feeds.items()}, path,
                        dtypes={k: str(v.dtype) for k, v in feeds.items()})


def _load_cached_program(entry: Any) -> nn.Module:
    """The compressed model of a signed compress entry. A ``.pt2`` is code (loading it unpickles), so it is
    loaded only from a private copy whose bytes match the digest the entry's signature covers."""
    import tempfile

    from edgepipe.models import load_model as _load

    with tempfile.TemporaryDirectory(prefix="edgepipe-cached-") as tmp:  # 0700: no one else can swap the copy
        path = entry.copy("model.pt2", Path(tmp) / "model.pt2")
        return _load(str(path), trust_code=True).module  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# export


def check_onnx_shape(onnx: OnnxModel, target: Target) -> None:
    """Every input's static sizes in the ONNX graph agree with the target's shape for it (named input, dimension,
    both values), before any work."""
    inputs = list(onnx.inputs)
    shapes = (target.shapes([t.name for t in inputs]) if isinstance(target.input_shape, dict) or len(inputs) > 1
              else {inputs[0].name: target.input_shape})
    for t in inputs:
        want = shapes[t.name]
        if len(want) != len(t.shape):
            raise ConfigError(f"input {t.name!r} of the ONNX model is {len(t.shape)}-D {list(t.shape)}, but the target's "
                              f"shape for it is {list(want)}; set the target's input_shape or pass --input-shape")
        for i, (w, have) in enumerate(zip(want, t.shape, strict=True)):
            if i > 0 and isinstance(have, int) and have > 0 and have != w:
                raise ConfigError(
                    f"input shape {list(want)} does not match the ONNX model's input {t.name!r} {list(t.shape)} "
                    f"(dimension {i}: {have} in the model, {w} given); set the target's input_shape or pass "
                    "--input-shape")


def export(model: Compressed, target: Target, splits: Splits, workdir: Path, cache: Cache,
           parity_atol: float = 1e-3) -> tuple[OnnxModel, StageRecord]:
    """Torch → ONNX for the target's input shape, parity-checked on the validation split (cached)."""
    from edgepipe import export as ex

    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / "source.onnx"
    timer = _Timer()
    if model.is_onnx:
        assert model.source.onnx_path is not None
        onnx = ex.onnx_model(model.source.onnx_path)
        check_onnx_shape(onnx, target)
        changed = ex.normalize_source(model.source.onnx_path, dest)
        out = ex.onnx_model(dest)
        return out, StageRecord("export", {"model": model.sha256}, out.sha256, details=changed,
                                skipped="model is already ONNX")
    shape = ({k: list(v) for k, v in target.input_shape.items()} if isinstance(target.input_shape, dict)
             else list(target.input_shape))
    inputs = {"model": model.sha256, "shape": sha256_json([shape, target.dynamic_batch]),
              "tools": sha256_json({"tools": tool_versions(), "opset": ex.DEFAULT_OPSET})}
    key = sha256_json(inputs)
    hit = cache.get("export", key)
    entry = hit
    if hit is None:
        x = splits.validation.x  # the data's dtypes are the inputs' (int64 token ids stay integers)
        names = list(target.input_shape) if isinstance(target.input_shape, dict) else ["input"]
        dtypes = {k: str(v.dtype) for k, v in (x if isinstance(x, dict) else {names[0]: x}).items()}
        onnx = ex.export(model.module, target.input_shape, dest, dynamic_batch=target.dynamic_batch, dtypes=dtypes)
        p = ex.parity(model.module, onnx, splits.validation.x)
        ex.check_parity(p, atol=parity_atol)
        record = {"parity": p.to_dict(), "opset": ex.DEFAULT_OPSET, "dynamic_batch": target.dynamic_batch}
        stored = cache.put("export", key, [dest], record)
        entry = stored if stored is not None and not stored.mine else None  # another writer's: use that one
    if entry is not None:
        entry.copy("source.onnx", dest)
        record = entry.record
        onnx = ex.onnx_model(dest)
    return onnx, StageRecord("export", inputs, onnx.sha256, timer.seconds, hit is not None, dict(record))


# ---------------------------------------------------------------------------------------------------------
# compile


def compile(onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path,
            cache: Cache, reporter: Reporter | None = None) -> tuple[Artifact, StageRecord]:
    """Compile for the target with its backend, calibrating on ``calibration`` (cached).

    For int8, the ONNX the backend quantizes is first equalized (``calibration.equalize``), has its float
    layers chosen (``float_layers``) and is fine-tuned with int8 simulated (``finetune``), as the target asks."""
    backend = backends.get(target.backend)
    inputs = {"onnx": onnx.sha256, "target": target.sha256, "calibration": calibration.sha256,
              "validation": calibration.validation_sha256, "tools": sha256_json(tool_versions()),
              **({"scorer": calibration.validation_score_key} if calibration.validation_score_key
                 and target.calibration.float_layers else {})}
    key = sha256_json(inputs)
    timer = _Timer()
    out = workdir / "artifact"
    out.mkdir(parents=True, exist_ok=True)
    kind = f"compile-{target.backend}"
    hit = cache.get(kind, key)
    if hit is not None:
        artifact = _cached_artifact(backend.name, hit, out)
    else:
        quantized_from, target, prepared = prepare_int8(onnx, target, calibration, workdir, cache, reporter)
        artifact = backend.compile(quantized_from, target, calibration, out)
        artifact.metadata.update(prepared)
        rec = {"precision": artifact.precision, "path": artifact.path.name,
               "files": [p.name for p in artifact.files], "metadata": artifact.metadata}
        stored = cache.put(kind, key, artifact.files, rec)
        if stored is not None and not stored.mine:  # another writer compiled this key first: use its bytes
            artifact = _cached_artifact(backend.name, stored, out)
    return artifact, StageRecord("compile", inputs, artifact_sha256(artifact), timer.seconds, hit is not None,
                                 {"backend": backend.name, "precision": artifact.precision})


def _cached_artifact(backend: str, entry: Any, out: Path) -> Artifact:
    rec = entry.record
    for name in rec["files"]:
        entry.copy(name, out / name)
    return Artifact(backend, rec["precision"], out / rec["path"], [out / n for n in rec["files"]], rec["metadata"])


def weight_qmax(target: Target) -> int:
    """The largest int8 weight level ``target``'s backend rounds to: 64 with onnxruntime's ``reduce_range``
    (7-bit weights, for CPUs without VNNI), else 127. Bias correction and the fine-tune simulate it."""
    return 64 if getattr(target.options, "reduce_range", False) else 127


def prepare_int8(onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path, cache: Cache,
                 reporter: Reporter | None = None) -> tuple[OnnxModel, Target, dict[str, Any]]:
    """What an int8 target's backend quantizes, and the target it quantizes for: the preparation stage.

    In order, each when the target's ``[calibration]`` asks: cross-layer equalization with bias correction
    (``equalize``; once, see :class:`~edgepipe.quantize.equalize.Equalizer`), float layers chosen by
    sensitivity on the equalized model (``float_layers``; their biases are then left uncorrected), and a
    quantization-aware fine-tune (``finetune`` epochs).

    Returns:
        The model to quantize (``onnx`` itself when nothing is asked or the target is not int8), the target
        with its float layers filled in, and the record of each step (``equalization``, ``mixed_precision``,
        ``finetune``: the artifact's metadata).
    """
    import dataclasses

    if target.precision != "int8":
        return onnx, target, {}
    record: dict[str, Any] = {}
    model, eq, written = onnx, None, target.calibration.keep_float
    if target.calibration.equalize:
        from edgepipe.quantize.equalize import Equalizer

        path = workdir / "equalized" / onnx.path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        eq = Equalizer(onnx.path, calibration.x, weight_qmax=weight_qmax(target))
        record["equalization"] = {**eq.write(path, written), "method": (
            "cross-layer equalization (ReLU6 kept exact on the calibration samples) and bias correction of int8 "
            "weight rounding, Nagel et al. 2019")}
        model = dataclasses.replace(onnx, path=path, sha256=sha256_file(path))
    target, plan = mixed_precision(model, target, calibration)
    if plan:
        record["mixed_precision"] = plan
    if eq is not None and target.calibration.keep_float != written:  # the float layers: biases uncorrected
        record["equalization"] = {**record["equalization"], **eq.write(path, target.calibration.keep_float)}
        model = dataclasses.replace(onnx, path=path, sha256=sha256_file(path))
    model, ft = finetuned(model, onnx, target, calibration, workdir, cache, reporter)
    if ft:
        record["finetune"] = ft
    model, ada = adarounded(model, target, calibration, workdir, cache, reporter)
    if ada:
        record["adaround"] = ada
    return model, target, record


def adarounded(onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path, cache: Cache,
               reporter: Reporter | None = None) -> tuple[OnnxModel, dict[str, Any]]:
    """The model with AdaRound's learned weight rounding when the int8 target asks (``calibration.adaround``
    steps per layer), else ``onnx`` itself; and the record. Cached on its own (kind ``adaround``): every backend
    whose weights use the same int8 grid shares one."""
    import dataclasses

    cal = target.calibration
    if target.precision != "int8" or not cal.adaround:
        return onnx, {}
    from edgepipe.quantize.adaround import adaround

    qmax = weight_qmax(target)
    key = sha256_json({"onnx": onnx.sha256, "calibration": calibration.sha256, "iterations": cal.adaround,
                       "keep_float": list(cal.keep_float), "seed": cal.seed, "weight_qmax": qmax,
                       "tools": tool_versions()})
    path = workdir / "adarounded" / onnx.path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    hit = cache.get("adaround", key)
    if hit is not None:
        hit.copy(next(iter(hit.files or {})), path)
        record = dict(hit.record)
    else:
        rep = reporter or NullReporter()
        with rep.stage(f"AdaRound ({cal.adaround} steps per layer)") as advance:
            record = adaround(onnx.path, path, calibration.x, iterations=cal.adaround, keep_float=cal.keep_float,
                              weight_qmax=qmax, seed=cal.seed, progress=advance)
        stored = cache.put("adaround", key, [path], record)
        if stored is not None and not stored.mine:
            stored.copy(next(iter(stored.files or {})), path)
            record = dict(stored.record)
    return dataclasses.replace(onnx, path=path, sha256=sha256_file(path)), record


def finetuned(onnx: OnnxModel, original: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path,
              cache: Cache, reporter: Reporter | None = None) -> tuple[OnnxModel, dict[str, Any]]:
    """The model the backend quantizes, fine-tuned with int8 simulated when the int8 target asks
    (``calibration.finetune`` epochs), else ``onnx`` itself; and the record of what was done.

    ``original``: the exported fp32 model, whose logits the fine-tune matches. Cached on its own (kind
    ``finetune``): targets of several backends that share the model, the calibration samples and the
    settings share one fine-tune."""
    import dataclasses

    cal = target.calibration
    if target.precision != "int8" or not cal.finetune:
        return onnx, {}
    from edgepipe.quantize.finetune import BATCH, finetune

    qmax = weight_qmax(target)
    key = sha256_json({"onnx": onnx.sha256, "original": original.sha256, "calibration": calibration.sha256,
                       "epochs": cal.finetune, "lr": cal.finetune_lr, "keep_float": list(cal.keep_float),
                       "seed": cal.seed, "weight_qmax": qmax, "tools": tool_versions()})
    path = workdir / "finetuned" / onnx.path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    hit = cache.get("finetune", key)
    if hit is not None:  # one .onnx, stored under the name of the model that was fine-tuned first
        hit.copy(next(iter(hit.files or {})), path)
        record = dict(hit.record)
    else:
        rep = reporter or NullReporter()
        steps = cal.finetune * -(-len(calibration) // BATCH)
        with rep.stage(f"fine-tune for int8 ({cal.finetune} epochs, {len(calibration)} samples)", steps) as advance:
            record = finetune(onnx.path, path, calibration.x, original.path, epochs=cal.finetune, lr=cal.finetune_lr,
                              seed=cal.seed, keep_float=cal.keep_float, weight_qmax=qmax, progress=advance)
        stored = cache.put("finetune", key, [path], record)
        if stored is not None and not stored.mine:  # another writer's fine-tune: everyone uses that one
            stored.copy(next(iter(stored.files or {})), path)
            record = dict(stored.record)
    return dataclasses.replace(onnx, path=path, sha256=sha256_file(path)), record


def mixed_precision(onnx: OnnxModel, target: Target, calibration: CalibrationSet) -> tuple[Target, dict[str, Any]]:
    """``target`` with ``calibration.keep_float`` filled from ``float_layers`` (the most sensitive layers,
    measured here) and from ``float_mixed_ranges`` (output heads joining parts of very different ranges,
    found here), and the plan's record; the target as it is when it asks for neither."""
    import dataclasses

    cal = target.calibration
    if target.precision != "int8" or not (cal.float_layers or cal.keep_float or cal.float_mixed_ranges):
        return target, {}
    plan: dict[str, Any]
    if cal.keep_float:
        keep, plan = cal.keep_float, {"float_layers": len(cal.keep_float), "chosen_by": "target"}
    elif cal.float_layers:
        from edgepipe.quantize import keep_float, layer_sensitivity

        if calibration.validation_score is not None and calibration.validation_x is not None:
            # ranked by the model's own metric on the validation split (the split every choice is made on); the
            # sensitivity's own calibration reads the validation and calibration samples
            x = _joined(calibration.validation_x, calibration.x)
            errors = layer_sensitivity(onnx, x, cal.method, samples=sample_count(calibration.validation_x),
                                       scorer=calibration.validation_score)
            how = "per-layer sensitivity: each layer int8 alone, the model's metric on the validation split"
        else:
            errors = layer_sensitivity(onnx, calibration.x, cal.method)
            how = "per-layer sensitivity: each layer int8 alone, logit NMSE on calibration samples"
        keep = keep_float(errors, cal.float_layers)
        plan = {"float_layers": cal.float_layers, "chosen_by": how,
                "sensitivity": [e.to_dict() for e in errors[: max(10, cal.float_layers)]]}
    else:
        keep, plan = (), {"float_layers": 0}
    if cal.float_mixed_ranges:
        from edgepipe.quantize.ranges import MIXED_RANGE_RATIO, mixed_range_heads

        heads = mixed_range_heads(onnx, calibration.x)
        keep = tuple(dict.fromkeys([*keep, *(n for h in heads for n in h.keep)]))
        plan["mixed_ranges"] = {"ratio": MIXED_RANGE_RATIO, "heads": [h.to_dict() for h in heads]}
    plan = {"float_layers": plan.pop("float_layers"), "kept_float": list(keep), **plan}
    return dataclasses.replace(target, calibration=dataclasses.replace(cal, keep_float=keep)), plan


def _joined(a: Any, b: Any) -> Any:
    """Two sample sets one after the other (one array each, or one per input name)."""
    if isinstance(a, dict):
        return {k: np.concatenate([a[k], b[k]]) for k in a}
    return np.concatenate([a, b])


def artifact_sha256(artifact: Artifact) -> str:
    return sha256_json({p.name: sha256_file(p) for p in artifact.files if p.is_file()})


# ---------------------------------------------------------------------------------------------------------
# evaluate


@dataclass(frozen=True)
class Predictions:
    """A model's outputs on the validation and test splits (every output, samples on axis 0)."""

    validation: list[np.ndarray]
    test: list[np.ndarray]

    @property
    def sha256(self) -> str:
        return sha256_arrays(*self.validation, *self.test, names=[f"v{i}" for i in range(len(self.validation))]
                             + [f"t{i}" for i in range(len(self.test))])


@dataclass(frozen=True)
class Scorer:
    """The model's metric (a registered name or ``pkg.mod:obj``) and the postprocess that runs before it."""

    spec: str
    postprocess: str | None = None

    @cached_property
    def metric(self) -> Metric:
        from edgepipe import metrics

        return metrics.get(self.spec)

    @property
    def key(self) -> str:
        """What names this scorer in a cache key: the specs, and the source of user code (which can change)."""
        return sha256_json([self.spec, self.postprocess, _source_sha256(self.spec), _source_sha256(self.postprocess)])

    def __call__(self, outputs: list[np.ndarray], split: Dataset, reference: list[np.ndarray] | None) -> float:
        from edgepipe import metrics

        targets = dict(split.all_targets)
        if self.metric.reference:
            if reference is None:
                raise ConfigError(f"metric {self.spec!r} compares with the fp32 model, which is not at hand here")
            targets.update({metrics.reference_key(i): r for i, r in enumerate(reference)})
        return metrics.score(self.metric, outputs, targets, self.postprocess)


def _source_sha256(spec: str | None) -> str | None:
    if not spec or ":" not in spec:
        return None
    import importlib.util

    found = importlib.util.find_spec(spec.partition(":")[0])
    origin = found.origin if found is not None else None
    return sha256_file(Path(origin)) if origin and Path(origin).is_file() else None


def resolve_scorer(options: BuildOptions, outputs: list[TensorSpec] | list[tuple[Any, ...]], splits: Splits) -> Scorer:
    """The build's metric: ``options.metric``, else ``top1`` for a one-output classifier with integer labels;
    anything else without a metric is refused in one line (no silent top-1)."""
    from edgepipe import metrics

    shapes = [o.shape if isinstance(o, TensorSpec) else o for o in outputs]
    if options.metric:
        found = Scorer(options.metric, options.postprocess)
        _ = found.metric  # an unknown metric or a user module that does not import: refused now, in one line
    elif options.postprocess:
        raise ConfigError("--postprocess needs --metric: name the metric its output is for")
    else:
        found = Scorer(metrics.default_for(shapes, splits.validation.all_targets))
    classes = shapes[0][-1] if shapes and len(shapes[0]) == 2 else None
    if found.spec in ("top1", "top5") and not found.postprocess and isinstance(classes, int) and classes > 0:
        from edgepipe.data import check_labels

        for part in (splits.validation, splits.test):  # before any work: the labels must name the model's classes
            if part.y is not None and part.y.ndim == 1:
                check_labels(part.y, classes, "the data's labels")
    return found


def predict(artifact: Artifact, target: Target, splits: Splits, cache: Cache,
            reporter: Reporter | None = None) -> tuple[Predictions, StandIn | None, dict[str, Any], bool]:
    """Every output of ``artifact`` on the validation and test splits (cached by artifact and data); the
    stand-in that ran in its place, if any; the cache's inputs; whether they came from the cache."""
    from edgepipe.evaluate import outputs

    rep = reporter or NullReporter()
    evaluated, stand_in = runnable(artifact)
    inputs = {"artifact": artifact_sha256(evaluated), "validation": splits.validation.sha256,
              "test": splits.test.sha256, "evaluator": EVALUATOR}
    key = sha256_json(inputs)
    hit = cache.get("predict", key)
    if hit is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgepipe-outputs-") as tmp:
            path = hit.copy("outputs.npz", Path(tmp) / "outputs.npz")
            with np.load(path, allow_pickle=False) as f:
                nv, nt = hit.record["validation_outputs"], hit.record["test_outputs"]
                pred = Predictions([f[f"v{i}"] for i in range(nv)], [f[f"t{i}"] for i in range(nt)])
                return pred, stand_in, inputs, True
    n = len(splits.validation) + len(splits.test)
    with rep.stage(f"{target.name}: evaluate {artifact.backend} {artifact.precision}", total=n) as adv:
        runner = backends.get(evaluated.backend).load(evaluated, target.runtime.threads)
        pred = Predictions(outputs(runner, splits.validation.x, progress=adv), outputs(runner, splits.test.x,
                                                                                     progress=adv))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgepipe-outputs-") as tmp:
        path = Path(tmp) / "outputs.npz"
        np.savez(path, **{f"v{i}": o for i, o in enumerate(pred.validation)},
                 **{f"t{i}": o for i, o in enumerate(pred.test)})
        cache.put("predict", key, [path], {"validation_outputs": len(pred.validation),
                                           "test_outputs": len(pred.test)})
    return pred, stand_in, inputs, False


@dataclass(frozen=True)
class Evaluation:
    """The model's metric on the validation split (for choices) and on the test split (for the report), and the
    artifact's fidelity to the fp32 reference on the test split."""

    metric: str
    validation: float
    test: float
    validation_samples: int
    test_samples: int
    unit: str = "%"
    higher_is_better: bool = True
    fidelity: dict[str, Any] | None = None
    evaluated_on: str | None = None  # what stood in for the artifact, when this machine cannot run it
    bench_skipped: str | None = None  # why the artifact itself cannot be benchmarked here
    predictions: Predictions | None = field(default=None, repr=False, compare=False)

    def drop(self, reference: float, value: float) -> float:
        """How much worse ``value`` is than ``reference`` in the metric's units (positive: worse)."""
        return round((reference - value) if self.higher_is_better else (value - reference), 6)


def runnable(artifact: Artifact) -> tuple[Artifact, StandIn | None]:
    """The artifact itself when this machine runs it; else its backend's stand-in (``BackendUnavailable``
    when it has none)."""
    backend = backends.get(artifact.backend)
    if backend.check().run:
        return artifact, None
    stand_in = backend.stand_in(artifact)
    if stand_in is None:
        backend.require("run")
    assert stand_in is not None
    return stand_in.artifact, stand_in


#: bumped when how artifacts are run for evaluation changes what they compute, so cached figures of the
#: old way are not reused (2: onnxruntime sessions without WeightBiasQuantization; 3: every output kept)
EVALUATOR = 3


def evaluate(artifact: Artifact, target: Target, splits: Splits, cache: Cache, reporter: Reporter | None = None,
             *, scorer: Scorer | None = None, reference: Predictions | None = None) -> tuple[Evaluation, StageRecord]:
    """The model's metric for ``artifact`` on validation and test, and its fidelity to ``reference`` (the fp32
    original's outputs; ``None``: the artifact is the reference). The outputs are cached (stage ``predict``); the
    metric is computed from them each time, so a new metric needs no new inference."""
    from edgepipe import metrics

    timer = _Timer()
    pred, stand_in, inputs, hit = predict(artifact, target, splits, cache, reporter)
    sc = scorer or Scorer("top1")
    ref_val = reference.validation if reference is not None else pred.validation
    ref_test = reference.test if reference is not None else pred.test
    val = sc(pred.validation, splits.validation, ref_val)
    test = sc(pred.test, splits.test, ref_test)
    fid = metrics.fidelity(pred.test, ref_test)
    ev = Evaluation(sc.spec, val, test, len(splits.validation), len(splits.test), sc.metric.unit,
                    sc.metric.higher_is_better, fid, stand_in.evaluates if stand_in else None,
                    stand_in.bench if stand_in else None, pred)
    record_inputs = {**inputs, "metric": sc.key, **({"reference": reference.sha256} if reference is not None else {})}
    return ev, StageRecord("evaluate", record_inputs, sha256_json([val, test, fid]), timer.seconds, hit,
                           {"metric": sc.spec, "validation": val, "test": test})


# ---------------------------------------------------------------------------------------------------------
# bench


def bench_settings(target: Target, iterations: int | None = None) -> BenchSettings:
    """How the target's artifacts are timed: its runtime settings, and its input shapes where they are not the
    one-input default (a model with dynamic dimensions is timed at the sizes it was built for)."""
    r = target.runtime
    shape = target.input_shape
    shapes = dict(shape) if isinstance(shape, dict) else {"": tuple(shape)}
    return BenchSettings(threads=r.threads, batch=r.batch, warmup=r.warmup, iterations=iterations or r.iterations,
                         shapes=shapes)


def bench(artifact: Artifact, target: Target, settings: BenchSettings, cache: Cache, *,
          on_board: bool = True, lock: contextlib.AbstractContextManager[Any] | None = None,
          spans: list[tuple[float, float]] | None = None) -> tuple[Measurement, StageRecord]:
    """Latency and memory in a fresh worker, here or on the target's board (cached per machine).

    Args:
        artifact, target, settings: what to time and how.
        cache: the stage cache (a hit is this machine's earlier figure for the same bytes and settings).
        on_board: time on the target's ``[board]`` when it names one.
        lock: held around the measurement (a process pool's workers share one, so this machine times one
            thing at a time while the others compress and compile); ``None``: none.
        spans: where to note the wall-clock start and end of the measurement; ``None``: not noted.

    Returns:
        The measurement and the stage's record.
    """
    from dataclasses import asdict

    from edgepipe.harness import measure

    board = target.board if on_board else None
    where = f"{board.user or ''}@{board.host}:{board.port}" if board else f"{platform.node()} {platform.machine()}"
    inputs = {"artifact": artifact_sha256(artifact), "settings": sha256_json(asdict(settings)), "where": where}
    key = sha256_json(inputs)
    timer = _Timer()
    hit = cache.get("bench", key)
    if hit is not None:
        m = Measurement.from_dict(hit.record["measurement"])
    else:
        with lock or contextlib.nullcontext():
            t0 = time.time()
            if board is not None:
                from edgepipe.harness.remote import measure_remote

                m = measure_remote(artifact, board, settings)
            else:
                m = measure(artifact, settings)
            if spans is not None:
                spans.append((t0, time.time()))
        stored = cache.put("bench", key, [], {"measurement": m.to_dict()})
        if stored is not None:  # another worker measured the same key first: everyone uses that figure
            m = Measurement.from_dict(stored.record["measurement"])
    return m, StageRecord("bench", inputs, sha256_json(m.to_dict()), timer.seconds, hit is not None,
                          {"where": "board " + board.host if board else "here", "p50_ms": m.p50_ms})


def retime(ids: list[str], artifacts: list[Artifact], target: Target, settings: BenchSettings, cache: Cache,
           rounds: int, *, on_board: bool = True,
           lock: contextlib.AbstractContextManager[Any] | None = None) -> tuple[Any, StageRecord]:
    """Re-time the finalists together, interleaved round by round in one worker (cached per machine).

    Returns a :class:`~edgepipe.harness.rounds.Retiming` and the stage's record. On a target with a board
    the rounds run on the board, else here; ``lock`` as for :func:`bench`."""
    from dataclasses import asdict

    from edgepipe.harness.rounds import Retiming, retime_here

    board = target.board if on_board else None
    where = f"{board.user or ''}@{board.host}:{board.port}" if board else f"{platform.node()} {platform.machine()}"
    inputs = {"artifacts": [artifact_sha256(a) for a in artifacts], "ids": list(ids), "rounds": rounds,
              "settings": sha256_json(asdict(settings)), "where": where}
    key = sha256_json(inputs)
    timer = _Timer()
    hit = cache.get("retime", key)
    if hit is not None:
        r = Retiming.from_dict(hit.record["retiming"])
    else:
        with lock or contextlib.nullcontext():
            if board is not None:
                from edgepipe.harness.remote import retime_remote

                r = retime_remote(ids, artifacts, board, settings, rounds)
            else:
                r = retime_here(ids, artifacts, settings, rounds)
        stored = cache.put("retime", key, [], {"retiming": r.to_dict()})
        if stored is not None:
            r = Retiming.from_dict(stored.record["retiming"])
    return r, StageRecord("retime", inputs, sha256_json(r.to_dict()), timer.seconds, hit is not None,
                          {"where": "board " + board.host if board else "here", "finalists": len(ids)})


# ---------------------------------------------------------------------------------------------------------
# budgets


def budgets(target: Target, drop: float, m: Measurement | None, size_bytes: int) -> dict[str, Budget]:
    """Each of the target's budgets against what was measured (``drop``: how much worse than the original model
    on the validation split, in the metric's units)."""
    b = target.budgets
    out: dict[str, Budget] = {}
    if b.metric_drop is not None:
        out["max_metric_drop"] = Budget(b.metric_drop, drop, drop <= b.metric_drop)
    if m is not None and b.max_latency_ms is not None and not m.emulated:  # emulated latency proves function only
        out["max_latency_ms"] = Budget(b.max_latency_ms, m.p50_ms, m.p50_ms <= b.max_latency_ms)
    if m is not None and b.max_memory_mb is not None:
        v = m.peak_rss_above_baseline_mb
        out["max_memory_mb"] = Budget(b.max_memory_mb, v, v <= b.max_memory_mb)
    if b.max_size_mb is not None:
        mb = size_bytes / 1e6
        out["max_size_mb"] = Budget(b.max_size_mb, mb, mb <= b.max_size_mb)
    return out


def source(model: str | None, weights: Path | None) -> ModelSource:
    """Load the model source (``None``: the bundled example)."""
    return load_model(model, weights)


def own_input_shape(src: ModelSource) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """An ONNX model's own input shapes (batch 1) when every size but the batch is fixed in the graph, so its
    targets need no ``--input-shape``; ``None`` for a torch module or a graph with other dynamic sizes."""
    if not (src.is_onnx and src.onnx_path is not None):
        return None
    from edgepipe.export import onnx_model

    sig = onnx_model(src.onnx_path).signature
    if sig is None or not sig.inputs:
        return None
    shapes = {}
    for t in sig.inputs:
        rest = list(t.shape[1:])
        if not all(isinstance(d, int) and d > 0 for d in rest):
            return None
        shapes[t.name] = (1, *rest)
    return next(iter(shapes.values())) if len(shapes) == 1 else shapes
