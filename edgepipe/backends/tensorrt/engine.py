"""TensorRT engines: the build plan (as data and as a ``trtexec`` line), the engine build on the real
``tensorrt`` API, and a Runner over CUDA buffers.

Precision lives in the ONNX graph (Q/DQ for int8, AutoCast fp16 types for fp16) and the network is built
**strongly typed**: that is the only mode TensorRT 11 has, and TensorRT 10.x has it behind
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` / ``trtexec --stronglyTyped``. ``typing = "weak"`` keeps
TensorRT 10.x's builder precision flags (``--fp16``, ``--int8``) for setups that need them, such as DLA on
JetPack 6; on TensorRT 11 the build is strongly typed regardless (the flags are gone there), and the
engine record says which mode was used.

Everything here that touches ``tensorrt`` or CUDA runs only where they exist; on other machines
:func:`runtime_problem` says exactly what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe._fs import write_bytes_atomic
from edgepipe.backends.base import check_feeds
from edgepipe.errors import BackendUnavailable, BenchmarkError, CompileError
from edgepipe.types import TensorSpec


@dataclass(frozen=True)
class InputProfile:
    """One input's shapes in the engine's optimization profile (the batch varies; the rest is fixed)."""

    name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputProfile:
        return cls(str(d["name"]), tuple(d["min_shape"]), tuple(d["opt_shape"]), tuple(d["max_shape"]))


_SHAPES = ("input_name", "min_shape", "opt_shape", "max_shape")  # a one-input plan's keys, as bundles record them


@dataclass(frozen=True)
class EnginePlan:
    """Everything the engine build needs besides the ONNX file; the same plan drives the Python build
    and the ``trtexec`` line, so the two cannot drift apart."""

    onnx: str  # file names, relative to the bundle directory
    engine: str
    precision: str
    profiles: tuple[InputProfile, ...]  # one per ONNX input, in the model's order
    dynamic: bool  # False: the ONNX inputs are static and no optimization profile is needed
    typing: str = "strong"
    workspace_mb: int = 1024
    dla_core: int | None = None
    gpu_fallback: bool = True
    optimization_level: int = 3
    timing_cache: str = "timing.cache"

    # the first (a one-input model's only) input's profile, under the names plans have always had
    @property
    def input_name(self) -> str:
        return self.profiles[0].name

    @property
    def min_shape(self) -> tuple[int, ...]:
        return self.profiles[0].min_shape

    @property
    def opt_shape(self) -> tuple[int, ...]:
        return self.profiles[0].opt_shape

    @property
    def max_shape(self) -> tuple[int, ...]:
        return self.profiles[0].max_shape

    def to_dict(self) -> dict[str, Any]:
        """As a dict: a one-input plan as plans have always been written (``input_name``, ``min_shape``, ...),
        so its bundle is byte for byte what it was; several inputs as ``inputs``, a list of profiles."""
        d = asdict(self)
        profiles = d.pop("profiles")
        head = {k: d.pop(k) for k in ("onnx", "engine", "precision")}
        if len(profiles) == 1:
            p = profiles[0]
            shapes: dict[str, Any] = {"input_name": p["name"], "min_shape": p["min_shape"],
                                      "opt_shape": p["opt_shape"], "max_shape": p["max_shape"]}
        else:
            shapes = {"inputs": profiles}
        return {**head, **shapes, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnginePlan:
        d = dict(d)
        if "inputs" in d:
            profiles = tuple(InputProfile.from_dict(p) for p in d.pop("inputs"))
        else:
            name, lo, opt, hi = (d.pop(k) for k in _SHAPES)
            profiles = (InputProfile(name, tuple(lo), tuple(opt), tuple(hi)),)
        return cls(profiles=profiles, **d)

    def trtexec_argv(self) -> list[str]:
        """The ``trtexec`` command that builds the same engine (run inside the bundle directory)."""
        argv = ["trtexec", f"--onnx={self.onnx}", f"--saveEngine={self.engine}"]
        if self.typing == "strong":
            argv.append("--stronglyTyped")
        else:
            argv += {"fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}.get(self.precision, [])
        if self.dynamic:  # --minShapes=a:1x3x8x8,b:1x4 (every input, in the model's order)
            def shapes(which: str) -> str:
                return ",".join(f"{p.name}:{'x'.join(map(str, getattr(p, which)))}" for p in self.profiles)

            argv += [f"--minShapes={shapes('min_shape')}", f"--optShapes={shapes('opt_shape')}",
                     f"--maxShapes={shapes('max_shape')}"]
        argv += [f"--memPoolSize=workspace:{self.workspace_mb}M",
                 f"--builderOptimizationLevel={self.optimization_level}",
                 f"--timingCacheFile={self.timing_cache}"]
        if self.dla_core is not None:
            argv.append(f"--useDLACore={self.dla_core}")
            if self.gpu_fallback:
                argv.append("--allowGPUFallback")
        argv.append("--skipInference")
        return argv

    def trtexec_command(self) -> str:
        return shlex.join(self.trtexec_argv())


# ---------------------------------------------------------------------------------------------------------
# what this machine has


def _gpu_device_nodes() -> bool:
    """An NVIDIA GPU's device node: /dev/nvidia0 (discrete GPUs) or /dev/nvhost-* / nvgpu (Jetson)."""
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl"))


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _cuda_device_count() -> tuple[int | None, str]:
    """Devices the CUDA runtime reports, through cuda-python or torch; ``None`` when neither can tell."""
    try:
        cudart = _cudart()
        err, n = cudart.cudaGetDeviceCount()
        return (int(n) if err == cudart.cudaError_t.cudaSuccess else 0), "cuda-python"
    except ImportError:
        pass
    try:
        import torch

        if torch.version.cuda:
            return torch.cuda.device_count(), "torch"
    except ImportError:
        pass
    return None, ""


@functools.cache
def tensorrt_version() -> tuple[str | None, str]:
    """(version, "") when ``import tensorrt`` works, else (None, why)."""
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        return None, ("the tensorrt Python package is not installed (on Jetson it comes with JetPack; on "
                      "x86-64 Linux: pip install tensorrt)")
    except (ImportError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"the tensorrt package is installed but does not import ({first}): its libraries are missing"
    version = getattr(trt, "__version__", None)
    if version is None:
        return None, f"the module imported as tensorrt is not TensorRT ({getattr(trt, '__file__', '?')})"
    return version, ""


@functools.cache
def runtime_problem() -> str | None:
    """Why this machine cannot build or run engines (TensorRT, GPU, or both), or ``None`` if it can."""
    problems = []
    version, why = tensorrt_version()
    if version is None:
        problems.append(why)
    if not _gpu_device_nodes():
        problems.append("there is no NVIDIA GPU (no /dev/nvidia0, and no Jetson /dev/nvhost-ctrl-gpu)")
    else:
        n, via = _cuda_device_count()
        if n is None:
            problems.append("a GPU is present but nothing here drives CUDA from Python: "
                            "pip install 'edgepipe[tensorrt-run]' (cuda-python)")
        elif n == 0:
            problems.append(f"the CUDA runtime ({via}) reports no usable GPU")
    return "; ".join(problems) if problems else None


def require_runtime(what: str) -> None:
    problem = runtime_problem()
    if problem:
        raise BackendUnavailable(f"cannot {what} here: {problem}")


# ---------------------------------------------------------------------------------------------------------
# engine build (tensorrt API)


def _trt_major(trt: Any) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: Path, plan: EnginePlan, engine_path: Path, timing_cache: Path | None) -> dict[str, Any]:
    """Parse ``onnx_path``, build a serialized engine per ``plan``, write it atomically; returns a record."""
    require_runtime("build a TensorRT engine")
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = plan.typing == "strong" or _trt_major(trt) >= 11  # 11.x: strongly typed always, no precision flags
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong and strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if plan.dla_core is not None and hasattr(trt, "OnnxParserFlag") and hasattr(trt.OnnxParserFlag, "ADJUST_FOR_DLA"):
        parser.set_flag(trt.OnnxParserFlag.ADJUST_FOR_DLA)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no detail"
        raise CompileError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mb << 20)
    config.builder_optimization_level = plan.optimization_level
    if not strong:
        if plan.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if plan.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if plan.dynamic or any(d < 0 for inp in inputs for d in inp.shape):
        profile = builder.create_optimization_profile()
        by_name = {p.name: p for p in plan.profiles}
        for inp in inputs:  # one profile entry per input
            p = by_name.get(inp.name)
            if p is None:
                raise CompileError(f"{onnx_path.name}: TensorRT's network has input {inp.name!r}, which the build "
                                   f"plan has no shapes for (it has {', '.join(by_name)}); recompile the bundle")
            profile.set_shape(inp.name, p.min_shape, p.opt_shape, p.max_shape)
        config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        if builder.num_DLA_cores <= plan.dla_core:
            raise CompileError(f"DLA core {plan.dla_core} asked for, but this device has {builder.num_DLA_cores} "
                               "DLA cores; remove dla_core from the target's [options] or pick another core")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        if plan.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    cache_blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}; "
                           "its log above names the layer")
    write_bytes_atomic(engine_path, bytes(serialized))
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "file": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "tensorrt": trt.__version__,
        "device": _device_name(),
        "typing": "strong" if strong else "weak",
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _device_name() -> str:
    try:
        cudart = _cudart()
        err, prop = cudart.cudaGetDeviceProperties(0)
        if err == cudart.cudaError_t.cudaSuccess:
            name = prop.name
            return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except ImportError:
        pass
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # no torch, or a CPU build
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# CUDA buffers: cuda-python where installed, else torch's CUDA tensors


class _CudaPython:
    """Device memory, one stream and copies through the CUDA runtime API (cuda-python)."""

    def __init__(self) -> None:
        self.rt = _cudart()
        self.stream = self._ok(self.rt.cudaStreamCreate())
        self.handle = int(self.stream)

    def _ok(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BenchmarkError(f"CUDA runtime call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> Any:
        return self._ok(self.rt.cudaMalloc(max(nbytes, 1)))

    def ptr(self, buf: Any) -> int:
        return int(buf)

    def htod(self, buf: Any, arr: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(buf, arr.ctypes.data, arr.nbytes, kind, self.stream))

    def dtoh(self, out: np.ndarray, buf: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(out.ctypes.data, buf, out.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))

    def mem_info(self) -> tuple[int, int]:
        free, total = self._ok(self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def free(self, buf: Any) -> None:
        self.rt.cudaFree(buf)


class _TorchCuda:
    """The same operations on torch CUDA tensors (byte buffers), for machines with a CUDA torch."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.handle = int(self.stream.cuda_stream)

    def alloc(self, nbytes: int) -> Any:
        return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")

    def ptr(self, buf: Any) -> int:
        return int(buf.data_ptr())

    def htod(self, buf: Any, arr: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            buf[: src.numel()].copy_(src, non_blocking=True)

    def dtoh(self, out: np.ndarray, buf: Any) -> None:
        self.stream.synchronize()
        out.reshape(-1).view(np.uint8)[:] = buf[: out.nbytes].cpu().numpy()

    def sync(self) -> None:
        self.stream.synchronize()

    def mem_info(self) -> tuple[int, int]:
        free, total = self.torch.cuda.mem_get_info()
        return int(free), int(total)

    def free(self, buf: Any) -> None:
        del buf


def _cuda() -> _CudaPython | _TorchCuda:
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchCuda()
    except ImportError:
        pass
    raise BackendUnavailable("cannot run a TensorRT engine: neither cuda-python nor a CUDA build of torch is "
                             "installed; pip install 'edgepipe[tensorrt-run]'")


# ---------------------------------------------------------------------------------------------------------
# the runner


class TrtRunner:
    """A deserialized engine with device buffers sized for its largest profile shapes.

    Each call copies every input to the GPU, enqueues the engine, copies every output back and synchronises
    the stream, so a wall-clock timing of a call is the complete host latency (like trtexec's "Host
    Latency"). Batches above the profile's maximum are run in chunks; a static-batch engine gets its last
    short chunk padded. Outputs come back in the ONNX model's order (``output_names``, when the bundle
    recorded them; else the engine's, which is the order TensorRT's ONNX parser marked them in).
    """

    def __init__(self, engine_path: Path, dla_core: int | None = None, output_names: list[str] | None = None) -> None:
        require_runtime("run a TensorRT engine")
        import tensorrt as trt

        self.cuda = _cuda()
        free_before, _ = self.cuda.mem_info()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self.runtime.DLA_core = dla_core
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendUnavailable(
                f"{Path(engine_path).name}: TensorRT {trt.__version__} on this GPU cannot load this engine; "
                "engines are specific to the GPU and TensorRT version that built them: rebuild it here with "
                "`edgepipe engine build BUNDLE`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_input[n]]
        self._outputs = [n for n in names if not is_input[n]]
        if output_names and sorted(output_names) == sorted(self._outputs):
            self._outputs = list(output_names)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in self._inputs}
        first = shapes[self._inputs[0]]
        if first[0] < 0:  # every input shares the batch dimension; the first one's profile bounds it
            lo, _, hi = self.engine.get_tensor_profile_shape(self._inputs[0], 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(first[0])
        self.sample_shapes = {n: shp[1:] for n, shp in shapes.items()}
        self.sample_shape = self.sample_shapes[self._inputs[0]]
        self.inputs = [TensorSpec(n, (None if shp[0] < 0 else shp[0], *shp[1:]), self.dtypes[n].name)
                       for n, shp in shapes.items()]
        for n in self._inputs:
            self.context.set_input_shape(n, (self.max_batch, *self.sample_shapes[n]))
        self._buffers: dict[str, Any] = {}
        for n in names:
            nbytes = int(np.prod(tuple(self.context.get_tensor_shape(n)))) * self.dtypes[n].itemsize
            self._buffers[n] = self.cuda.alloc(nbytes)
            self.context.set_tensor_address(n, self.cuda.ptr(self._buffers[n]))
        free_after, _ = self.cuda.mem_info()
        self._device_mb = (free_before - free_after) / 2**20

    def device_memory_mb(self) -> float:
        """GPU memory this runner took (engine, context, buffers), from cudaMemGetInfo around the load.

        On Jetson the GPU shares system memory, so this is also counted in the process's resident memory.
        """
        return self._device_mb

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name, x in feeds.items():
            self.context.set_input_shape(name, x.shape)
            self.cuda.htod(self._buffers[name], x)
        if not self.context.execute_async_v3(self.cuda.handle):
            raise BenchmarkError("TensorRT execute_async_v3 failed; its log above says why")
        outs = [np.empty(tuple(self.context.get_tensor_shape(n)), self.dtypes[n]) for n in self._outputs]
        for n, out in zip(self._outputs, outs, strict=True):
            self.cuda.dtoh(out, self._buffers[n])
        self.cuda.sync()
        return outs

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.inputs, feeds)
        xs = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self._inputs}
        total = len(xs[self._inputs[0]])
        chunks: list[list[np.ndarray]] = []
        for i in range(0, total, self.max_batch):
            parts = {k: x[i : i + self.max_batch] for k, x in xs.items()}
            n = len(parts[self._inputs[0]])
            if n < self.min_batch:
                parts = {k: np.concatenate([p, np.repeat(p[-1:], self.min_batch - n, axis=0)]) for k, p in parts.items()}
            chunks.append([o[:n] for o in self._run({k: np.ascontiguousarray(p) for k, p in parts.items()})])
        return [_host_output(np.concatenate([c[k] for c in chunks])) for k in range(len(chunks[0]))]

    def __del__(self) -> None:
        for buf in getattr(self, "_buffers", {}).values():
            with contextlib.suppress(Exception):  # at interpreter shutdown the driver frees it anyway
                self.cuda.free(buf)


def _host_output(a: np.ndarray) -> np.ndarray:
    """An output as the pipeline takes it: float outputs (fp16 too) as float32, integer ones as they are."""
    return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a
