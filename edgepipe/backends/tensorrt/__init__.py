"""TensorRT for NVIDIA Jetson boards and GPUs: the precision is put into the ONNX graph here, the engine
is built on the target.

TensorRT engines belong to one GPU and one TensorRT version, so ``compile`` does everything that does not
need them, on any machine, and writes a **build bundle**:

* ``model.<precision>.onnx``: the graph TensorRT builds from, with the precision in it. int8: explicit
  quantization by NVIDIA's own tool, nvidia-modelopt's ONNX PTQ (``modelopt.onnx.quantization``),
  calibrated on onnxruntime's CPU provider: symmetric int8 activations per tensor, symmetric int8 weights
  per output channel, zero points 0, Q/DQ placed the way TensorRT fuses them (inputs of Conv and large
  Gemm/MatMul, the skip input of residual Adds), everything not quantized in fp16. fp16: modelopt's
  AutoCast (fp16 with fp32 kept where values would overflow). fp32: the exported graph.
  modelopt was chosen over onnxruntime's quantizer because it *is* the TensorRT placement (it skips GEMMs
  too small for int8 kernels, which would otherwise make int8 slower than fp16); its ``[onnx]`` extra
  pins onnxruntime-gpu and cupy, so edgepipe installs the base package plus the few pure-Python modules
  its ONNX path imports (see the ``tensorrt`` extra).
* ``target.toml`` (the target it was made for), ``trtexec.sh`` and ``tensorrt-bundle.json`` (the plan,
  hashes, the Q/DQ summary and the exact commands to finish on the board: ``edgepipe engine build DIR``,
  or the equivalent ``trtexec`` line).

Every graph passes a preflight (:mod:`edgepipe.backends.tensorrt.preflight`) before it is written: the
operators TensorRT's parser supports and the explicit-quantization rules, with errors naming the node.

Where ``tensorrt`` imports and a GPU is present, ``compile`` also builds the engine (``.engine``) and
the artifact is the engine. Elsewhere the artifact is the bundle: the pipeline evaluates its ONNX on
onnxruntime (the accuracy the engine will have, up to kernel rounding) and leaves timing to the board.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_path, write_text_atomic
from edgepipe._hashing import sha256_file
from edgepipe.backends import register
from edgepipe.backends.base import Availability, Backend, Capabilities, calibration_feeds, signature_of
from edgepipe.backends.tensorrt import modelopt as modelopt
from edgepipe.backends.tensorrt import preflight as preflight
from edgepipe.backends.tensorrt.engine import (
    EnginePlan,
    InputProfile,
    TrtRunner,
    build_engine,
    runtime_problem,
)
from edgepipe.config import Target, load_target
from edgepipe.config.options import TrtOptions
from edgepipe.errors import BackendUnavailable, CompileError, ConfigError
from edgepipe.types import Artifact, CalibrationSet, OnnxModel, Signature, StandIn, TensorSpec

BUNDLE_MANIFEST = "tensorrt-bundle.json"
BUNDLE_SCHEMA = 1
_METHODS = {"minmax": "max", "entropy": "entropy"}  # edgepipe name -> modelopt name


def plan_for(target: Target, opts: TrtOptions, inputs: str | Sequence[TensorSpec],
             onnx_shape: tuple[Any, ...] | None = None) -> EnginePlan:
    """The engine build plan for ``target``: shapes of the optimization profile, pools, DLA, typing.

    Args:
        inputs: the model's inputs (a profile each, shapes beyond the batch from ``target.shapes``), or a
            one-input model's input name, with ``onnx_shape`` its ONNX shape (shapes from the target's one
            ``input_shape``).
    """
    if isinstance(inputs, str):
        specs = [TensorSpec(inputs, tuple(onnx_shape or ()), "float32")]
        rest = {inputs: tuple(int(d) for d in target.chw)}
    elif len(inputs) == 1:
        specs = list(inputs)
        rest = {specs[0].name: tuple(int(d) for d in target.chw)}
    else:
        specs = list(inputs)
        rest = {n: tuple(int(d) for d in shape[1:]) for n, shape in target.shapes([t.name for t in specs]).items()}
    batches = {t.shape[0] if t.shape else None for t in specs}
    dynamic = any(not (isinstance(b, int) and b > 0) for b in batches)
    if dynamic:
        opt = opts.opt_batch or min(max(target.runtime.batch, opts.min_batch), opts.max_batch)
        profiles = tuple(InputProfile(t.name, (opts.min_batch, *rest[t.name]), (opt, *rest[t.name]),
                                      (opts.max_batch, *rest[t.name])) for t in specs)
    else:
        profiles = tuple(InputProfile(t.name, *[(int(t.shape[0]), *rest[t.name])] * 3)  # type: ignore[arg-type]
                         for t in specs)
    name = f"model.{target.precision}"
    return EnginePlan(onnx=f"{name}.onnx", engine=f"{name}.engine", precision=target.precision,
                      profiles=profiles, dynamic=dynamic, typing=opts.typing, workspace_mb=opts.workspace_mb,
                      dla_core=opts.dla_core, gpu_fallback=opts.gpu_fallback,
                      optimization_level=opts.optimization_level)


def _toml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_ready(v) for v in value]
    return value


def _trtexec_script(plan: EnginePlan) -> str:
    return ("#!/bin/sh\n# Build the TensorRT engine of this bundle with trtexec (TensorRT's command-line tool).\n"
            "# Equivalent to: edgepipe engine build <this directory>\nset -e\ncd \"$(dirname \"$0\")\"\n"
            f"{plan.trtexec_command()}\n")


def read_bundle(path: Path) -> tuple[Path, dict[str, Any]]:
    """The bundle directory and its manifest, from the directory or the manifest file itself."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    mf = root / BUNDLE_MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{str(path)!r} is not a TensorRT build bundle: it has no {BUNDLE_MANIFEST}; give the "
                          "directory `edgepipe build/compile` wrote for a tensorrt target")
    return root, json.loads(mf.read_text())


@register
class TensorRTBackend(Backend):
    name = "tensorrt"
    capabilities = Capabilities(
        precisions=("fp32", "fp16", "int8"),
        calibration_methods=tuple(_METHODS),
        extra="tensorrt",
        modules=("modelopt", "onnx_graphsurgeon", "onnxslim", "polygraphy", "lief"),
        needs_gpu=True,
        artifact_suffixes=(".engine", BUNDLE_MANIFEST),
        platforms=("NVIDIA Jetson (JetPack 6+)", "NVIDIA GPU (TensorRT 10+)"),
    )
    Options = TrtOptions

    def check(self) -> Availability:
        """Compile (calibrate, preflight, bundle) needs modelopt; running engines needs TensorRT and a GPU."""
        base = super().check()
        problem = runtime_problem()
        if not base.compile:
            return Availability(False, False, base.reason + (f"; and to run engines: {problem}" if problem else ""))
        if problem:
            return Availability(True, False, "compiles to a build bundle here (finish it on the board with "
                                             f"`edgepipe engine build`); cannot run engines here: {problem}")
        return Availability(True, True)

    def validate(self, target: Target) -> None:
        super().validate(target)
        opts: TrtOptions = self.options(target)
        if opts.dla_core is not None:
            if target.precision == "fp32":
                raise ConfigError(f"target {target.name!r}: DLA runs fp16 and int8 only; set precision to fp16 "
                                  "or int8, or remove options.dla_core")
            if target.dynamic_batch and opts.min_batch != opts.max_batch:
                raise ConfigError(f"target {target.name!r}: DLA runs static shapes only; set dynamic_batch = "
                                  "false, or min_batch = opt_batch = max_batch")
        if target.dynamic_batch and target.runtime.batch > opts.max_batch:
            raise ConfigError(f"target {target.name!r}: runtime.batch = {target.runtime.batch} is above "
                              f"options.max_batch = {opts.max_batch}; the engine could not run it")

    def check_signature(self, signature: Signature, target: Target) -> None:
        """The optimization profile needs every input's shape: with several inputs, the target must give one
        per input name (``input_shape = { name = [...] }``)."""
        if len(signature.inputs) > 1:
            target.shapes(signature.input_names)

    def _compile(self, onnx: OnnxModel, target: Target, calibration: CalibrationSet, workdir: Path) -> Artifact:
        import onnx as onnx_lib
        import tomli_w

        opts: TrtOptions = self.options(target)
        signature = signature_of(onnx)
        one = len(signature.inputs) == 1
        plan = plan_for(target, opts, onnx.input_name, onnx.input_shape) if one else \
            plan_for(target, opts, signature.inputs)
        preflight.check(onnx_lib.load(str(onnx.path)), f"{onnx.path.name}")
        quantization: dict[str, Any] = {"precision": target.precision}
        model = self._precision_graph(onnx, signature, target.precision, calibration, target.calibration.method,
                                      opts, target.calibration.keep_float)
        if target.precision == "int8":
            quantization.update({
                "tool": "nvidia-modelopt ONNX PTQ (modelopt.onnx.quantization), onnxruntime CPU calibration",
                "method": _METHODS[target.calibration.method], "activations": "int8, per tensor, symmetric",
                "weights": "int8, per output channel, symmetric", "zero_points": 0,
                "unquantized_layers": opts.high_precision, "float_nodes": list(target.calibration.keep_float),
                "calibration": {**calibration.record(), "method": target.calibration.method},
            })
        elif target.precision == "fp16":
            quantization["tool"] = "nvidia-modelopt AutoCast (fp16, fp32 inputs and outputs)"
        preflight.check(model, f"{plan.onnx} (made from {onnx.path.name})")
        onnx_path = workdir / plan.onnx
        with atomic_path(onnx_path) as tmp:
            onnx_lib.save(model, str(tmp))
        target_toml = workdir / "target.toml"
        write_text_atomic(target_toml, tomli_w.dumps(_toml_ready(target.to_dict())))
        script = workdir / "trtexec.sh"
        write_text_atomic(script, _trtexec_script(plan))
        script.chmod(0o755)
        manifest = {
            "schema": BUNDLE_SCHEMA,
            "kind": "edgepipe TensorRT build bundle",
            "target": target.name,
            "precision": target.precision,
            "onnx": {"file": plan.onnx, "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size},
            "input": {"name": onnx.input_name, "shape": list(onnx.input_shape)},
            # several inputs or outputs: each, in the ONNX model's order (a one-input, one-output bundle is as
            # bundles always were)
            **({"inputs": [t.to_dict() for t in signature.inputs]} if not one else {}),
            **({"outputs": signature.output_names} if len(signature.outputs) > 1 else {}),
            "plan": plan.to_dict(),
            "quantization": quantization,
            "qdq": preflight.describe(model) if target.precision == "int8" else None,
            "preflight": f"passed: TensorRT {preflight.TENSORRT_BASELINE} operators, explicit-quantization rules",
            "commands": {
                "edgepipe": "edgepipe engine build .",
                "trtexec": plan.trtexec_command(),
                "where": "on the target device (or its JetPack container), inside this directory",
            },
            "engine": None,
        }
        files = [onnx_path, target_toml, script, workdir / BUNDLE_MANIFEST]
        path = workdir / BUNDLE_MANIFEST
        if runtime_problem() is None:  # TensorRT and a GPU here: build the engine now
            manifest["engine"] = self._build(workdir, plan, workdir / plan.engine)
            files += [workdir / plan.engine, workdir / plan.timing_cache]
            path = workdir / plan.engine
        write_text_atomic(workdir / BUNDLE_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        metadata = {"bundle": BUNDLE_MANIFEST, "onnx": plan.onnx, "plan": plan.to_dict(),
                    "quantization": quantization, "qdq": manifest["qdq"], "engine": manifest["engine"],
                    **({"outputs": signature.output_names} if len(signature.outputs) > 1 else {})}
        return Artifact(self.name, target.precision, path, files, metadata)

    @staticmethod
    def _precision_graph(onnx: OnnxModel, signature: Signature, precision: str, calibration: CalibrationSet,
                         method: str, opts: TrtOptions, keep_float: tuple[str, ...] = ()) -> Any:
        """The graph with the precision in it: Q/DQ int8, AutoCast fp16, or the fp32 export as it is."""
        import onnx as onnx_lib

        if precision == "fp32":
            return onnx_lib.load(str(onnx.path))
        with tempfile.TemporaryDirectory(prefix="edgepipe-trt-") as tmp:
            out = Path(tmp) / "converted.onnx"
            modelopt.convert(precision, onnx.path, out, calibration_feeds(signature.inputs, calibration),
                             method=_METHODS[method], high_precision=opts.high_precision, keep_float=keep_float)
            return onnx_lib.load(str(out))

    @staticmethod
    def _build(root: Path, plan: EnginePlan, engine: Path) -> dict[str, Any]:
        record = build_engine(root / plan.onnx, plan, engine, root / plan.timing_cache)
        record["sha256"] = sha256_file(engine)
        record["file"] = engine.name if engine.parent.resolve() == root.resolve() else str(engine.resolve())
        return record

    def stand_in(self, artifact: Artifact) -> StandIn | None:
        """The bundle's ONNX on onnxruntime: the graph the engine is built from, so its accuracy is the
        engine's up to kernel rounding. ``None`` for a bare ``.engine`` (nothing to stand in with)."""
        try:
            root, manifest = read_bundle(artifact.path)
        except ConfigError:
            return None
        onnx_path = root / manifest["onnx"]["file"]
        return StandIn(
            artifact=Artifact("onnxruntime", manifest["precision"], onnx_path),
            evaluates=(f"{onnx_path.name} on onnxruntime (CPU): the graph TensorRT builds the engine from, so "
                       "the accuracy the engine will have, up to kernel rounding"),
            bench=("TensorRT engines are timed on the device they are built for: copy the release directory "
                   "to the board, then `edgepipe engine build DIR` and `edgepipe bench DIR`"),
        )

    def load(self, artifact: Artifact, threads: int | None = None) -> TrtRunner:
        """A runner over the engine (threads do not apply to TensorRT)."""
        self.require("run")
        path = Path(artifact.path)
        plan = artifact.metadata.get("plan")
        outputs = artifact.metadata.get("outputs")
        if path.name.endswith(BUNDLE_MANIFEST):
            root, manifest = read_bundle(path)
            plan, outputs = manifest["plan"], manifest.get("outputs")
            if not manifest.get("engine"):
                raise BackendUnavailable(f"bundle {str(root)!r} has no engine yet: run `edgepipe engine build "
                                         f"{root}` on this machine first")
            path = root / manifest["engine"]["file"]
        return TrtRunner(path, plan.get("dla_core") if plan else None, outputs)


def build_bundle_engine(bundle: Path, out: Path | None = None) -> dict[str, Any]:
    """Turn a build bundle into a TensorRT engine on this machine and record it in the bundle's manifest.

    Args:
        bundle: the bundle directory (a release directory of a tensorrt target) or its manifest file.
        out: where the engine goes; default: ``model.<precision>.engine`` inside the bundle.

    Returns:
        The engine record written to the manifest (file, sha256, bytes, TensorRT version, device, seconds).
    """
    root, manifest = read_bundle(bundle)
    onnx_path = root / manifest["onnx"]["file"]
    if not onnx_path.is_file() or sha256_file(onnx_path) != manifest["onnx"]["sha256"]:
        raise CompileError(f"{onnx_path} is missing or changed since the bundle was made; recompile with "
                           "`edgepipe compile` or `edgepipe build`")
    target = load_target(root / "target.toml")
    backend = TensorRTBackend()
    backend.validate(target)
    opts: TrtOptions = backend.options(target)
    if "inputs" in manifest:
        plan = plan_for(target, opts, [TensorSpec.from_dict(t) for t in manifest["inputs"]])
    else:
        plan = plan_for(target, opts, manifest["input"]["name"], tuple(manifest["input"]["shape"]))
    problem = runtime_problem()
    if problem:
        raise BackendUnavailable(f"cannot build a TensorRT engine here: {problem}; run `edgepipe engine build` "
                                 f"on the target device, or `sh {root / 'trtexec.sh'}` there")
    engine = Path(out) if out else root / plan.engine
    record = backend._build(root, plan, engine)
    record["plan"] = plan.to_dict()
    manifest["engine"] = record
    write_text_atomic(root / BUNDLE_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return record
