"""The library entry points. The CLI calls these and nothing else; so can you.

>>> import edgepipe
>>> result = edgepipe.build(targets=["cpu-int8"], out="dist")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepipe import backends
from edgepipe._fs import check_file_out
from edgepipe._progress import Reporter
from edgepipe.config import Board, Target, load_target, target_files
from edgepipe.config.recipe import Recipe
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.harness import BenchSettings, Measurement, measure
from edgepipe.pipeline import BuildOptions, BuildResult
from edgepipe.pipeline import build as _build
from edgepipe.types import DEFAULT_INPUT_SHAPE, Artifact, OnnxModel

if TYPE_CHECKING:
    from edgepipe.pipeline.executors import Executor
    from edgepipe.pipeline.search import ReleaseResult
    from edgepipe.toolchains import ToolchainStatus


@contextlib.contextmanager
def _writing(out: str | Path, trust_code: bool = False) -> Iterator[Path]:
    """Check that ``out`` can be a directory we write, and hold its lock (one run per output directory)
    while the block runs, trusting code files only if the user said so."""
    from edgepipe._fs import check_dir_out, dir_lock
    from edgepipe.models import trusting

    out = check_dir_out(Path(out))
    with dir_lock(out, wait=False, what=f"--out {str(out)!r}"), trusting(trust_code):
        yield out


def _options(out: str | Path, options: dict[str, Any]) -> BuildOptions:
    try:
        opts = BuildOptions(out=Path(out), **options)
    except TypeError as e:
        raise ConfigError(f"unknown build option: {e}") from None
    if opts.iterations is not None and (isinstance(opts.iterations, bool) or opts.iterations < 1):
        raise ConfigError(f"--iterations {opts.iterations}: must be >= 1")
    return opts


def build(
    model: str | None = None,
    targets: list[str] | tuple[str, ...] = ("cpu-int8",),
    *,
    out: str | Path = "dist",
    reporter: Reporter | None = None,
    **options: Any,
) -> BuildResult:
    """Compress, export, compile, evaluate, bench and release ``model`` for each target.

    Args:
        model: ``package.module:factory``, ``.pt2``, TorchScript or ``.onnx``; ``None`` for the example.
        targets: target names (``edgepipe targets``) or paths to target TOML files.
        out: release root; each target lands in ``out/<target name>/``.
        reporter: progress reporting (the CLI passes a rich one).
        **options: fields of :class:`edgepipe.pipeline.BuildOptions` (data, recipe, weights, ...;
            ``trust_code=True`` to load a ``.pt2``/TorchScript model or ``.pt2`` weights, which can run code).

    Returns:
        One result per target, with its release directory and manifest.

    Raises:
        ConfigError: ``out`` is a file or not writable, or another run is writing into it.
    """
    opts = _options(out, options)
    with _writing(opts.out, opts.trust_code):
        return _build(model, list(targets), opts, reporter)


def release(
    model: str | None = None,
    targets: list[str] | tuple[str, ...] = ("cpu-int8",),
    *,
    out: str | Path = "release",
    search: str | Path | None = None,
    max_trials: int | None = None,
    reporter: Reporter | None = None,
    progress: Callable[[str, str, str, str, str], None] | None = None,
    cluster: str | Executor | None = None,
    workers: int | None = None,
    insecure_cluster: bool = False,
    **options: Any,
) -> ReleaseResult:
    """For every target, search the candidates (recipe × quantization settings), keep the best that meets
    the target's budgets, and write ``out/<target>/``, ``index.json``, ``SHA256SUMS`` and ``report.html``.

    Args:
        model: as for :func:`build`; ``None`` for the bundled example.
        targets: target names or paths; ``["all"]`` for every target found.
        out: the release root.
        search: a search-space TOML (``None``: the shipped default space).
        max_trials: caps candidates per target (overrides the file's ``max_trials``).
        reporter: stage progress; ``progress`` is called as each candidate moves on.
        cluster: ``None`` (default): candidates run in a local process pool of ``workers`` processes
            (default: the cores of this machine; 1: in this process), one bench at a time. ``"auto"`` or a Ray address
            (``HOST:PORT``): they run as Ray tasks on that cluster (see :mod:`edgepipe.pipeline.executors`);
            the cluster is checked (reachable, board resources, versions) before any work. An
            executor object (:class:`edgepipe.pipeline.executors.RayExecutor`, ...) is used as given
            and left open.
        insecure_cluster: allow a cluster at a non-loopback address without Ray's token authentication
            (refused otherwise, before anything is sent to it: whoever reaches such a cluster runs code on
            every node; see :func:`edgepipe.pipeline.executors.check_cluster_trust`).
        **options: fields of :class:`edgepipe.pipeline.BuildOptions` (data, weights, iterations, cache, ...).

    Returns:
        One outcome per target (released, failed with the closest candidate's misses, or skipped).

    Raises:
        ConfigError: an unknown build option or ``iterations`` < 1, a bad search file, an unknown or repeated
            target, ``workers`` with a cluster or ``insecure_cluster`` without one, or ``out`` is a file, not
            writable or being written by another run.
        ClusterError: the cluster is unreachable, untrusted, lacks a resource the targets need or its nodes'
            versions differ.
        ModelLoadError: the model (or its weights) cannot be found or loaded.
    """
    import dataclasses as dc

    from edgepipe.config.search import load_search
    from edgepipe.pipeline.search import release as _release

    opts = _options(out, options)
    space = load_search(search)
    if max_trials is not None:
        space = dc.replace(space, max_trials=max_trials)
    from edgepipe.pipeline.executors import executor

    if cluster is not None and not isinstance(cluster, str):  # an executor object: used as given, left open
        with _writing(opts.out, opts.trust_code):
            return _release(model, list(targets), space, Path(out), opts, reporter, progress, executor=cluster)
    # a cluster is connected and its nodes checked first: a bad address, or an untrusted one, starts nothing
    ex = executor(cluster, workers, insecure_cluster)
    try:
        with _writing(opts.out, opts.trust_code):
            return _release(model, list(targets), space, Path(out), opts, reporter, progress, executor=ex)
    finally:
        ex.close()


def export(
    model: str | None = None,
    out: str | Path = "model.onnx",
    *,
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    weights: Path | None = None,
    dynamic_batch: bool = True,
    data: str = "digits",
    parity_atol: float = 1e-3,
    trust_code: bool = False,
) -> tuple[OnnxModel, dict[str, Any]]:
    """Export a torch model to ONNX and check parity against torch on evaluation samples.

    Args:
        model: a model spec (``pkg.mod:factory``, ``.pt2``, TorchScript); ``None`` for the bundled example.
        out: the ``.onnx`` file to write (atomically).
        input_shape: the input's shape, batch first.
        weights: weights to load into the model first.
        dynamic_batch: export the batch dimension as dynamic.
        data: the dataset whose validation split the parity is checked on.
        parity_atol: the largest absolute difference between torch's and ONNX's outputs that passes.
        trust_code: load a ``.pt2``/TorchScript model or ``.pt2`` weights (they can run code when loaded).

    Returns:
        The ONNX model and the parity figures (``samples``, ``max_abs_error``, ``top1_agreement``).

    Raises:
        ConfigError: ``out`` is a directory or cannot be written, the model is already ONNX, or a bad
            ``input_shape``.
        ModelLoadError: the model or its weights cannot be loaded (or are code and ``trust_code`` is off).
        DataError: the data cannot be read or split.
        ExportError: the export fails, or the ONNX outputs differ from torch's by more than ``parity_atol``
            (or agree on top-1 for under 99% of samples).
    """
    import shutil
    import tempfile

    from edgepipe import export as ex
    from edgepipe._fs import atomic_path
    from edgepipe.models import load_model
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    check_file_out(out)
    src = load_model(model, weights, trust_code=trust_code)
    if src.is_onnx:
        raise ConfigError(f"model {src.spec!r} is already ONNX; nothing to export")
    shape = Target(name="export", backend="onnxruntime", precision="fp32", input_shape=tuple(input_shape),
                   dynamic_batch=dynamic_batch)
    with tempfile.TemporaryDirectory(prefix="edgepipe-export-") as tmp:
        onnx, rec = stages.export(stages.original(src), shape, stages.load_splits(data, shape, src), Path(tmp), Cache(),
                                  parity_atol)
        with atomic_path(Path(out)) as dest:
            shutil.copyfile(onnx.path, dest)
    return ex.onnx_model(Path(out)), rec.details["parity"]


def sensitivity(
    model: str | None = None,
    target: str = "cpu-int8",
    *,
    weights: Path | None = None,
    data: str = "digits",
    input_shape: tuple[int, ...] | None = None,
    equalize: bool | None = None,
    samples: int = 32,
    trust_code: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer sensitivity to int8 of ``model`` for ``target``: every layer quantized alone, its output
    error against fp32 on calibration samples, most sensitive first (see :mod:`edgepipe.quantize`).

    No float layers, fine-tune or keep-float list apply: every layer is measured.

    Args:
        model: a model spec (``pkg.mod:factory``, a file); ``None`` for the bundled example.
        target: a target name or TOML path; its calibration method is the one measured.
        weights: weights to load into the model first.
        data: the dataset whose calibration split is used.
        input_shape: overrides the target's input shape.
        equalize: measure on the equalized, bias-corrected model (``None``: as the target says).
        samples: how many calibration samples are run per layer (all of them calibrate).
        trust_code: load a ``.pt2``/TorchScript model or ``.pt2`` weights (they can run code).
        progress: called with 1 after each layer.

    Returns:
        ``{"model", "target", "method", "equalized", "samples", "layers": [LayerError dicts]}``; each layer's
        ``name``, ``op``, ``nmse`` and top-1 ``agreement`` with fp32 (``None`` unless output 0 is class scores).

    Raises:
        ConfigError: an unknown or invalid target.
        BackendUnavailable: the target's backend cannot compile here.
        ModelLoadError: the model or its weights cannot be loaded.
        DataError: the data cannot be read or split.
        ExportError: a torch model does not export to ONNX matching torch.
    """
    import dataclasses as dc
    import tempfile

    from edgepipe.models import load_model
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache
    from edgepipe.quantize import layer_sensitivity

    src = load_model(model, weights, trust_code=trust_code)
    t = stages.resolve_targets([target], input_shape)[0]
    if equalize is not None:
        t = dc.replace(t, calibration=dc.replace(t.calibration, equalize=equalize))
    splits = stages.load_splits(data, t, src)
    calib = stages.calibration_set(splits)
    with tempfile.TemporaryDirectory(prefix="edgepipe-sensitivity-") as tmp:
        onnx, _ = stages.export(stages.original(src), t, splits, Path(tmp), Cache())
        # the model int8 would quantize, equalized when asked; no float layers or fine-tune: every layer is measured
        plain = dc.replace(t, precision="int8", calibration=dc.replace(t.calibration, float_layers=0, keep_float=(),
                                                                       finetune=0))
        onnx, _, _ = stages.prepare_int8(onnx, plain, calib, Path(tmp), Cache())
        errors = layer_sensitivity(onnx, calib.x, t.calibration.method, samples=samples, progress=progress)
    return {"model": src.spec, "target": t.name, "method": t.calibration.method, "equalized": t.calibration.equalize,
            "samples": min(samples, len(calib.x)), "layers": [e.to_dict() for e in errors]}


def compile(model: str, target: str, *, out: str | Path = "dist", data: str = "digits",
            reporter: Reporter | None = None, **options: Any) -> BuildResult:
    """Compile an ONNX (or torch) model for one target, evaluate it, and write its release directory (no bench).

    Args:
        model: ``.onnx``, or a torch model spec as for :func:`build`.
        target: a target name or TOML path.
        out: release root; the target lands in ``out/<target name>/``.
        data: the calibration and evaluation data.
        reporter: progress reporting.
        **options: other fields of :class:`edgepipe.pipeline.BuildOptions` (``bench`` is always off).

    Returns:
        The build result, with the one target's release directory and manifest.

    Raises:
        ConfigError: an unknown option, an unknown target, or ``out`` is a file, not writable or being written
            by another run.
        BackendUnavailable: the target's backend cannot compile here.
        ModelLoadError: the model cannot be loaded.
        CompileError: the backend cannot compile the model for the target.
        BudgetError: the validation metric drop is over the target's budget (unless ``allow_accuracy_drop``);
            nothing is released.
    """
    opts = _options(out, {"data": data, "bench": False, **options})
    with _writing(opts.out, opts.trust_code):
        return _build(model, [target], opts, reporter)


def compress(
    model: str | None = None,
    recipe: str | Path | Recipe = "",
    *,
    out: str | Path = "model.pt2",
    weights: Path | None = None,
    data: str = "digits",
    input_shape: tuple[int, ...] | dict[str, tuple[int, ...]] = DEFAULT_INPUT_SHAPE,
    reporter: Reporter | None = None,
    trust_code: bool = False,
    metric: str | None = None,
    postprocess: str | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Apply a compression recipe to a torch model and save it as a ``.pt2`` ExportedProgram.

    Args:
        model: a model spec (``pkg.mod:factory``, a file); ``None`` for the bundled example.
        recipe: a recipe name, path or object.
        out: the ``.pt2`` to write (atomically: nothing is left there on a failure).
        weights: weights to load into the model first.
        data: the samples (any model: an ``.npz`` with one array per input, by name, and its targets).
        input_shape: one input's shape (batch first, any rank), or a shape per input by name.
        reporter: stage progress.
        trust_code: load a ``.pt2``/TorchScript model, ``.pt2`` weights or teacher (they can run code).
        metric, postprocess: how a step's fine-tune is judged (as for :func:`build`; default: top-1 for a
            classifier, else the SQNR against the original model).

    Returns:
        The written path (a program taking every input at its dtype, the batch dynamic) and one record per
        step (params, non-zero params, MACs, the measure before and after).

    Raises:
        ConfigError: an unknown or invalid recipe, ``out`` cannot be written, or the model is ONNX or a saved
            program (``.pt2``/TorchScript), which cannot be compressed.
        ModelLoadError: the model or its weights cannot be loaded, or the result does not ``torch.export``.
        DataError: the data cannot be read or split.
        CompressionError: a recipe step cannot be applied.
    """
    from edgepipe.config.recipe import load_recipe
    from edgepipe.models import load_model, trusting
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_file_out(out)
    shape = {k: tuple(v) for k, v in input_shape.items()} if isinstance(input_shape, dict) else tuple(input_shape)
    with trusting(trust_code):
        src = load_model(model, weights)
        if src.module is None:
            raise ConfigError(f"model {src.spec!r} is ONNX; compression needs the torch model")
        # the data read as a build reads it: by the model's input names, at these shapes
        splits = stages.data_splits(data, stages.shape_specs(src, shape, "--input-shape"))
        opts = BuildOptions(data=data, metric=metric, postprocess=postprocess)
        scorer = stages.compress_scorer(opts, src.module, splits)
        compressed, _ = stages.compress(src, rec, splits, Cache(), reporter, scorer=scorer)
        out = stages.save_compressed(compressed.module, splits, Path(out))
    return out, compressed.records


def resolve_artifact(path: str | Path) -> Artifact:
    """An artifact from a release directory, a file in one, or a bare file recognised by its suffix.

    Args:
        path: a release directory or its main artifact file (the artifact its manifest names, with every
            file it lists), or any other artifact file (that file alone).

    Returns:
        The artifact; a bare file's has the backend its suffix belongs to and precision ``""``.

    Raises:
        ConfigError: ``path`` does not exist, is a directory without a ``manifest.json``, its manifest is
            damaged or names files outside the directory, or no backend runs a file with its suffix.
    """
    from edgepipe.release import artifact_from_release

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"artifact {str(p)!r} not found")
    art = artifact_from_release(p)
    if art is not None and (p.is_dir() or p == art.path):
        return art
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a directory without a manifest.json; give the artifact file itself")
    backend = backends.for_artifact(p)
    return Artifact(backend.name, "", p)


def resolve_board(spec: str) -> Board:
    """A board from a target name whose file has a ``[board]`` table, or from ``[user@]host[:port]``.

    Args:
        spec: a target name (looked up first), else ``[user@]host[:port]`` (port 22 by default).

    Returns:
        The target's board, or a board with the defaults for everything but host, user and port.

    Raises:
        ConfigError: the target has no ``[board]`` table or its file is invalid, or ``spec`` is not
            ``[user@]host[:port]`` or names an invalid host, user or port.
    """
    if spec in target_files():
        t = load_target(spec)
        if t.board is None:
            raise ConfigError(f"target {spec!r} has no [board] table; add one (host, user, port) or give user@host")
        return t.board
    return Board.parse(spec)


def bench(artifact: str | Path, *, threads: int | None = None, batch: int = 1, warmup: int = 20,
          iterations: int = 200, duration_s: float | None = None, device: str | Board | None = None,
          verify: bool = False, data: str | None = None, metric: str | None = None,
          postprocess: str | None = None) -> Measurement:
    """Measure an artifact's latency and memory in a fresh worker process, here or on a board over SSH.

    Args:
        artifact: a release directory or an artifact file.
        threads: the runtime's threads (``None``: its default).
        batch: the batch size timed.
        warmup: untimed calls before timing.
        iterations: timed calls (ignored with ``duration_s``).
        duration_s: time for this many seconds instead of a fixed count.
        device: ``None`` for this machine; a board (``[user@]host[:port]``, a target name with a
            ``[board]`` table, or a :class:`Board`) to measure there.
        verify: also run the release's test split where it runs (the board's own runtime), score its outputs
            with the release's metric here, and compare them with this host's run of the same file, output by
            output: the measurement's ``eval`` holds the metric, the release's value and the comparison (see
            :func:`edgepipe.ship.verify.verified`; needs a release directory).
        data: the evaluation data, when not the source the release records.
        metric: with ``verify``, the metric to score with (a user metric is code: the manifest's is computed
            only when it is passed here).
        postprocess: with ``verify``, the postprocess to run before the metric (likewise code).

    Returns:
        The measurement: latency percentiles (ms), throughput (samples/s), memory (MiB), size and where it ran.

    Raises:
        ConfigError: the artifact is not found or of no known kind, a bench setting is out of range,
            ``metric``/``postprocess`` without ``verify``, a bad board, or (with ``verify``) no manifest, an
            unknown metric or evaluation data that is not the release's.
        BenchmarkError: the worker failed, ran past its timeout, or sent a reply that is not the worker's.
    """
    art = resolve_artifact(artifact)
    settings = BenchSettings(threads=threads, batch=batch, warmup=warmup, iterations=iterations, duration_s=duration_s)
    board = None if device is None else device if isinstance(device, Board) else resolve_board(device)
    if not verify:
        if metric or postprocess:
            raise ConfigError("--metric and --postprocess score the outputs of --verify; add --verify")
        if board is None:
            return measure(art, settings)
        from edgepipe.harness.remote import measure_remote

        return measure_remote(art, board, settings)
    import tempfile

    from edgepipe.ship import verify as ver
    from edgepipe.types import Manifest

    release = art.path.parent
    split = ver.eval_data(release, data)
    ver.choose_metric(Manifest.read(release), metric, postprocess)  # a bad --metric: one line before any work
    with tempfile.TemporaryDirectory(prefix="edgepipe-verify-") as tmp:
        npz = ver.save_eval(Path(tmp) / f"eval-{split.name.replace('/', '_')}.npz", split.x, split.y, split.targets)
        if board is None:
            m = measure(art, settings, eval_path=npz)
        else:
            from edgepipe.harness.remote import measure_remote

            m = measure_remote(art, board, settings, eval_path=npz)
    return ver.verified(m, release, split.x, split.all_targets, metric=metric, postprocess=postprocess)


def docker_context(release: str | Path, platform: str, out: str | Path, *, base_image: str | None = None,
                   python: str | None = None, data: str | None = None) -> Any:
    """Write the self-contained build context of ``release``'s runtime image for ``platform``
    (see :mod:`edgepipe.ship.context`); no Docker engine is needed.

    Args:
        release: the release directory.
        platform: ``linux/amd64`` or ``linux/arm64``.
        out: the context directory (replaced whole, atomically).
        base_image: the image to build from (default: the official Python or NVIDIA base for the backend).
        python: the base image's CPython as ``major.minor`` (the wheels' tag; default 3.11, or the NVIDIA
            base's).
        data: the evaluation data to bundle, when not the source the manifest records (not checked by hash).

    Returns:
        The :class:`edgepipe.ship.context.Context`: its directory, target, backend, precision, platform,
        Python, base image, Dockerfile template and the wheels' count and bytes.

    Raises:
        ConfigError: ``release`` is not a release directory or holds a link or special file, a bad platform or
            Python, evaluation data that is not the release's, or no wheel of a requirement for the platform.
    """
    from edgepipe.ship.context import write_context

    return write_context(Path(release), Path(out), platform, base_image=base_image, python=python, data=data)


def docker_build(release: str | Path, platform: str, tag: str, *, context: str | Path | None = None,
                 base_image: str | None = None, python: str | None = None, data: str | None = None,
                 no_cache: bool = False, context_only: bool = False) -> dict[str, Any]:
    """Write the context (default ``docker-context/<release>-<arch>``), then build it into image ``tag``
    with the local Docker engine (not with ``context_only``).

    Args:
        release: the release directory.
        platform: ``linux/amd64`` or ``linux/arm64``.
        tag: the image tag to build.
        context: where the context is written (default ``docker-context/<release name>-<arch>``).
        base_image, python, data: as for :func:`docker_context`.
        no_cache: build without the engine's layer cache.
        context_only: write the context and stop (no engine needed).

    Returns:
        ``{"context": ..., "image": ... or None}``: the context's record and the built image's (tag, image id,
        platform, builder, seconds, bytes); ``image`` is ``None`` with ``context_only``.

    Raises:
        ConfigError: as for :func:`docker_context`.
        DockerError: no Docker client or engine (the context is still written, and the message says where),
            or the build fails or runs past its timeout.
    """
    from edgepipe.errors import DockerError
    from edgepipe.ship.engine import ARCH, Docker

    release = Path(release)
    ctx_dir = Path(context) if context else Path("docker-context") / f"{release.name}-{ARCH.get(platform, 'x')}"
    ctx = docker_context(release, platform, ctx_dir, base_image=base_image, python=python, data=data)
    if context_only:
        return {"context": ctx.to_dict(), "image": None}
    try:
        engine = Docker()
    except DockerError as e:
        raise DockerError(f"{e}. The context is written: {ctx.directory}/ (docker build {ctx.directory})") from None
    built = engine.build(ctx.directory, tag, platform, base_image, no_cache=no_cache)
    return {"context": ctx.to_dict(), "image": built.to_dict()}


def docker_run(tag: str, *, verify: bool = False, iterations: int = 200, warmup: int = 20,
               threads: int | None = None, metric: str | None = None, postprocess: str | None = None) -> Measurement:
    """Run image ``tag``: it benchmarks its release (and with ``verify`` runs the release's test split with the
    image's runtime; its outputs are scored with the release's metric here and compared with this host's run
    of the same file, copied out of the image).

    The container runs without network; the release, its evaluation file and ``context.json`` are copied out.

    Args:
        tag: the image, built by :func:`docker_build`.
        verify: also run the release's test split in the image and score and compare its outputs here.
        iterations: timed calls.
        warmup: untimed calls before timing.
        threads: the runtime's threads (``None``: its default).
        metric, postprocess: with ``verify``, as for :func:`bench`.

    Returns:
        The measurement (as :func:`bench`'s); with ``verify`` its ``eval`` also names the ``image`` and its
        ``platform``.

    Raises:
        ConfigError: ``metric``/``postprocess`` without ``verify``, or an unknown metric.
        DockerError: no Docker client or engine, no image ``tag``, or running or copying out of it fails.
        BenchmarkError: the reply is over :data:`edgepipe.harness.MAX_REPLY_BYTES`, reports a failure, or is
            not what the worker sends.
    """
    import json as _json
    import tempfile

    from edgepipe.harness import MAX_REPLY_BYTES, parse_worker_output
    from edgepipe.ship.engine import Docker

    if (metric or postprocess) and not verify:
        raise ConfigError("--metric and --postprocess score the outputs of --verify; add --verify")
    engine = Docker()
    args = ["--iterations", str(iterations), "--warmup", str(warmup)]
    if threads:
        args += ["--threads", str(threads)]
    if verify:
        args += ["--eval", "/opt/edgepipe/eval.npz"]
    from edgepipe.ship import verify as ver
    from edgepipe.types import Manifest

    with tempfile.TemporaryDirectory(prefix="edgepipe-image-") as tmp:
        copied = False

        def copy_out() -> None:
            engine.copy_out(tag, {"/release": Path(tmp) / "release", "/opt/edgepipe/eval.npz": Path(tmp) / "eval.npz",
                                  "/opt/edgepipe/context.json": Path(tmp) / "context.json"})

        if verify and engine.image_arch(tag) is not None:  # (an absent image: `run` says what to do)
            copy_out()
            copied = True
            ver.choose_metric(Manifest.read(Path(tmp) / "release"), metric, postprocess)  # a bad --metric: before the run
        out = engine.run(tag, args)
        if not copied:
            copy_out()
        if len(out) > MAX_REPLY_BYTES:
            raise BenchmarkError(f"the reply of image {tag} is larger than {MAX_REPLY_BYTES / 2**20:.0f} MiB, far "
                                 "more than edgepipe's worker sends; it was refused: build the image again")
        result = parse_worker_output(out, f"the release in image {tag}", "/opt/venv/bin/python", f"image {tag}")
        art = resolve_artifact(Path(tmp) / "release")
        m = Measurement(**result, size_bytes=art.size_bytes, backend=art.backend, precision=art.precision)
        if not verify:
            return m
        x, targets = ver.read_eval(Path(tmp) / "eval.npz", Path(tmp) / "release")  # bounded before it is unpacked
        m = ver.verified(m, Path(tmp) / "release", x, targets, metric=metric, postprocess=postprocess)
        ctx = _json.loads((Path(tmp) / "context.json").read_text())
    import dataclasses

    return dataclasses.replace(m, eval={**(m.eval or {}), "image": tag, "platform": ctx.get("platform")})


def docker_base(platform: str, tag: str | None = None, *, packages: tuple[str, ...] = (),
                suite: str = "bookworm", mirror: str | None = None) -> Any:
    """A Debian base image of ``platform`` made from the package mirror (no registry), loaded as ``tag``.

    The root is made with ``mmdebstrap`` (or ``debootstrap``) and cached as a tar (see :mod:`edgepipe.ship.base`).

    Args:
        platform: ``linux/amd64`` or ``linux/arm64`` (another architecture than the host's needs QEMU's binfmt).
        tag: the image tag (default ``local/debian-<arch>:<suite>``).
        packages: Debian packages added to the defaults (Python, venv, the C++ and OpenMP runtimes).
        suite: the Debian suite.
        mirror: the package mirror (default: this machine's Debian mirror, else ``deb.debian.org``).

    Returns:
        The :class:`edgepipe.ship.base.Base` record: tag, platform, suite, packages, the root's tar, the
        seconds it took and whether it came from the cache.

    Raises:
        DockerError: a bad platform, no QEMU binfmt handler or ``mmdebstrap``/``debootstrap``, making the root
            fails, or the engine is missing or loads the image as another architecture.
    """
    from edgepipe.ship import base

    arch = base.ARCH.get(platform, "x")
    return base.build_base(platform, tag or f"local/debian-{arch}:{suite}",
                           tuple(dict.fromkeys([*base.DEFAULT_PACKAGES, *packages])), suite, mirror)


@dataclass(frozen=True)
class TargetInfo:
    """One row of :func:`targets`: a target found, and whether this machine can compile and run it.

    Attributes:
        name: the target's name (its file's stem).
        path: its TOML file.
        backend: its backend (``"?"`` when the file is invalid).
        precision: its precision (``"?"`` when the file is invalid).
        description: its description.
        can_compile: whether this machine can compile for it.
        can_run: whether this machine can run its artifacts.
        reason: why not (or ``"invalid: ..."`` for a file that does not load).
        target: the loaded target, or ``None`` when its file is invalid.
        device: what the backend's runtime reports about this machine's device (empty when it reports nothing).
    """

    name: str
    path: Path
    backend: str
    precision: str
    description: str
    can_compile: bool
    can_run: bool
    reason: str
    target: Target | None
    device: dict[str, str] = field(default_factory=dict)  # what the backend's runtime reports here

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-ready values.

        Returns:
            Every field but ``target``, with ``path`` as a string.
        """
        return {"name": self.name, "path": str(self.path), "backend": self.backend, "precision": self.precision,
                "description": self.description, "can_compile": self.can_compile, "can_run": self.can_run,
                "reason": self.reason, "device": self.device}


def targets() -> list[TargetInfo]:
    """Every target that can be found, whether this machine can compile and run it (and why not), and
    what each backend's runtime reports about this machine's device.

    Targets are looked up as :func:`edgepipe.config.target.targets_dirs` says; a file that does not load or
    validate is listed as invalid rather than raised.

    Returns:
        One :class:`TargetInfo` per target name, sorted by name.
    """
    rows = []
    devices: dict[str, dict[str, str]] = {}
    for name, path in sorted(target_files().items()):
        try:
            t = load_target(path)
            backend = backends.get(t.backend)
            backend.validate(t)
            avail = backend.check_target(t)
            if t.backend not in devices:
                devices[t.backend] = backend.describe()
            rows.append(TargetInfo(name, path, t.backend, t.precision, t.description, avail.compile, avail.run,
                                   avail.reason, t, devices[t.backend]))
        except ConfigError as e:
            rows.append(TargetInfo(name, path, "?", "?", "", False, False, f"invalid: {e}", None))
    return rows


def engine_build(bundle: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Turn a TensorRT build bundle into an engine on this machine (which needs TensorRT and a GPU).

    Args:
        bundle: a release directory of a tensorrt target (or its ``tensorrt-bundle.json``).
        out: where the engine goes; default ``model.<precision>.engine`` inside the bundle.

    Returns:
        The engine record, also written into the bundle's ``tensorrt-bundle.json``.

    Raises:
        ConfigError: ``bundle`` does not exist or is not a TensorRT build bundle, or its ``target.toml`` is invalid.
        CompileError: the bundle's ONNX is missing or changed since the bundle was made.
        BackendUnavailable: TensorRT, a usable NVIDIA GPU or CUDA from Python is missing here.
    """
    from edgepipe.backends.tensorrt import build_bundle_engine

    p = Path(bundle)
    if not p.exists():
        raise ConfigError(f"bundle {str(p)!r} not found")
    return build_bundle_engine(p, Path(out) if out else None)


def install_toolchain(name: str, *, force: bool = False, python: str | None = None,
                      progress: Callable[[str], None] | None = None) -> ToolchainStatus:
    """Create the isolated converter environment ``name`` (``tflite``); a no-op when it is complete.

    Args:
        name: the toolchain.
        force: reinstall even if a complete install is present.
        python: interpreter the toolchain's venv is made from (default: the running one).
        progress: called with one short line per step.

    Returns:
        The toolchain's status after the install.

    Raises:
        ConfigError: an unknown toolchain.
        BackendUnavailable: ``python`` cannot be run or is outside the toolchain's supported versions, or a step
            of the install fails (nothing that looks installed is left).
    """
    from edgepipe import toolchains

    return toolchains.install(name, force=force, python_exe=python, progress=progress)


def toolchains() -> list[ToolchainStatus]:
    """Every known converter toolchain and whether it is installed (read from its marker; nothing runs).

    Returns:
        One status per toolchain, sorted by name: its path, whether it is installed, its venv's Python, the
        versions it records and, if not usable, why and what to run.
    """
    from edgepipe import toolchains as tc

    return tc.statuses()


def remove_toolchain(name: str) -> bool:
    """Delete an installed toolchain.

    Args:
        name: the toolchain (``tflite``).

    Returns:
        Whether there was one to delete.

    Raises:
        ConfigError: an unknown toolchain.
    """
    from edgepipe import toolchains as tc

    return tc.remove(name)


def pack(
    model: str | None = None,
    *,
    out: str | Path = "model.epk",
    weights: Path | None = None,
    recipe: str | Path | Recipe | None = None,
    data: str = "digits",
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    reporter: Reporter | None = None,
    trust_code: bool = False,
) -> tuple[Any, list[dict[str, Any]]]:
    """Write a compact, Huffman-coded archive of a model's weights for over-the-air delivery.

    Args:
        model: the ``package.module:factory`` that builds the architecture (``None``: the example).
        out: the ``.epk`` file to write (atomically).
        weights: a ``.safetensors`` file, a state dict, or a ``.pt2`` (from ``edgepipe compress``) whose
            weights fit the factory's model.
        recipe: a compression recipe applied first (in-process, so hashed layers keep their seeds).
        data: fine-tuning and evaluation data for the recipe.
        input_shape: recorded in the archive, so ``unpack`` can write a ``.pt2``.
        trust_code: needed for ``.pt2`` weights (and a ``.pt2`` teacher), which can run code when loaded.

    Returns:
        The :class:`edgepipe.package.archive.PackReport` (bytes per stage and per tensor) and the
        recipe's step records (empty without a recipe).

    Raises:
        ConfigError: ``model`` is not ``package.module:factory``, ``out`` cannot be written, or a bad recipe.
        ModelLoadError: the factory or the weights cannot be loaded, or the weights do not fit its model.
        DataError: the recipe's data cannot be read or split.
        CompressionError: a recipe step cannot be applied.
    """
    from edgepipe.models import EXAMPLE, trusting

    spec = model or EXAMPLE
    if Path(spec).suffix in (".onnx", ".pt2", ".pt", ".ts", ".pth") or ":" not in spec:
        raise ConfigError(f"pack needs MODEL as package.module:factory (the archive names the factory that "
                          f"rebuilds the architecture), not {spec!r}; pass a compressed .pt2 as --weights")
    check_file_out(out)
    from edgepipe.package import files

    with trusting(trust_code):
        return files.pack(spec, Path(out), weights, recipe, data, input_shape, reporter)


def unpack(archive: str | Path, out: str | Path, *, factory: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Restore an archive's exact weights (checked by hash) as a ``.pt2`` program or a ``.safetensors`` file.

    Args:
        archive: the ``.epk`` file.
        out: ``.pt2`` (a model) or ``.safetensors`` (weights for the factory).
        factory: the ``package.module:factory`` that rebuilds the architecture (default: the bundled
            example's). The archive's header only says which factory it was packed for; that is compared
            with this one (a mismatch is an error) and never imported.

    Returns:
        The written path and what was restored (factory, tensors, hash).

    Raises:
        ConfigError: ``factory`` is not ``package.module:factory``, ``out`` is neither ``.pt2`` nor
            ``.safetensors`` or cannot be written, a ``.safetensors`` for an archive with structural edits, or a
            ``.pt2`` for one that records no input shape.
        ModelLoadError: the archive is missing, not an edgepipe archive, corrupted or malformed, was packed for
            another factory, its weights do not fit the factory's model or hash to what it records, or the
            model does not ``torch.export`` to a ``.pt2``.
    """
    from edgepipe.models import CODE_SUFFIXES, EXAMPLE
    from edgepipe.package import files

    factory = factory or EXAMPLE
    if Path(factory).suffix in (*CODE_SUFFIXES, ".onnx", ".pth") or ":" not in factory:
        raise ConfigError(f"unpack --factory {factory!r}: give the package.module:factory that rebuilds the "
                          f"architecture (e.g. {EXAMPLE})")
    out = Path(out)
    if out.suffix not in (".pt2", ".safetensors"):
        raise ConfigError(f"unpack --out {str(out)!r}: give a .pt2 (a model) or a .safetensors (weights) path")
    check_file_out(out)
    return files.unpack(Path(archive), out, factory)
