"""The ``edgepipe`` command: parse, call :mod:`edgepipe.api`, render. No logic of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgepipe import __version__
from edgepipe import _render as render
from edgepipe.errors import EdgepipeError
from edgepipe.types import DEFAULT_INPUT_SHAPE

_STATE = {"debug": False}
_DEFAULT_SHAPE = ",".join(map(str, DEFAULT_INPUT_SHAPE))
MODEL_HELP = ("MODEL is package.module:factory, a .pt2 ExportedProgram, a TorchScript .pt, or an .onnx "
              "file; without it, the bundled digits example is used.")
TRUST_HELP = ("Load a .pt2 or TorchScript MODEL (or .pt2 --weights): these files are code and can do anything "
              "when loaded, so they are refused unless you trust whoever wrote them.")


def _trust_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--trust-code", is_flag=True, help=TRUST_HELP)(f)


_RUN_OPTIONS = (
    click.option("-w", "--weights", type=click.Path(path_type=Path),
                 help="Weights for a module:factory model (.safetensors, a state dict, or a .pt2 with --trust-code)."),
    click.option("-d", "--data", default="digits", show_default=True,
                 help="'digits', 'mnist5k' (5,000 real MNIST digits, 1,000 test), 'photos', 'text-lines', 'text-pages', 'char-scenes' (rendered for the zoo's OCR and detectors), an .npz with x and y, or an image folder (one sub-folder per class); split into "
                      "calibration, validation (choices) and test (reported figures)."),
    click.option("--input-shape", multiple=True, metavar="[NAME=]D0,D1,...",
                 help="The model's input shape, batch first, overriding the targets': 1,3,224,224 (any rank), or "
                      "NAME=1,3,320,320 once per input of a model with several."),
    click.option("--metric", metavar="NAME|pkg.mod:obj",
                 help="How the model is judged: top1, top5, miou, map, map50, agreement, sqnr, exact_match, cer, or your own "
                      "(a Metric or a function (outputs, targets) -> float, higher is better). Default: top1 for a "
                      "classifier ([N, C] scores and integer labels 'y'); any other model must name one."),
    click.option("--postprocess", metavar="pkg.mod:fn",
                 help="Runs on the model's outputs before the metric (e.g. a detector's decode + NMS)."),
    click.option("--max-metric-drop", type=float, metavar="X",
                 help="Every target's metric budget, overriding its [budgets]: how much worse than the original "
                      "model in fp32 an artifact may be on the validation split, in the metric's units (1.0: one "
                      "point of exact match, of mAP, ...)."),
    click.option("--iterations", type=int, help="Timed iterations per benchmark (default: the target's)."),
    click.option("--local-bench", is_flag=True, help="Measure on this machine even when a target names a [board]."),
    click.option("--no-cache", is_flag=True, help="Recompute every stage instead of reusing cached outputs."),
    _trust_option,
)


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options `build` and `release` share: model weights, data, shape, bench, cache and trust."""
    for option in reversed(_RUN_OPTIONS):
        f = option(f)
    return f


def _dims(value: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give the sizes as integers, batch first: 1,3,224,224 (an image), "
                                 "1,1,16000 (audio), 1,16 (tokens); NAME=... for one input of several") from None
    if not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"{value!r}: every size must be >= 1")
    return shape


def _shape(value: str | tuple[str, ...] | None) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """``--input-shape``: ``d0,d1,...`` for a one-input model, or ``NAME=d0,d1,...`` once per input."""
    values = (value,) if isinstance(value, str) else tuple(value or ())
    if not values:
        return None
    named = [v for v in values if "=" in v]
    if not named:
        if len(values) > 1:
            raise click.BadParameter(f"{list(values)}: several shapes need names: NAME=d0,d1,... once per input")
        return _dims(values[0])
    if len(named) != len(values):
        raise click.BadParameter(f"{list(values)}: name every input's shape (NAME=d0,d1,...) or give one bare shape")
    out: dict[str, tuple[int, ...]] = {}
    for v in values:
        name, _, dims = v.partition("=")
        if not name or name in out:
            raise click.BadParameter(f"{v!r}: give NAME=d0,d1,... with each input named once")
        out[name] = _dims(dims)
    return out


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgepipe")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
def cli(debug: bool) -> None:
    """Take a trained PyTorch model to fast, small, verified release artifacts for edge hardware.

    \b
    The pipeline:  compress -> export (ONNX, parity-checked) -> compile (per target)
                   -> evaluate (accuracy) -> bench (latency, memory) -> release (manifest)

    \b
    Start here:
      edgepipe targets                           what exists, and what this machine can do
      edgepipe build --target cpu-int8           the whole pipeline on the bundled example
      edgepipe release --targets cpu-int8,intel-cpu-int8 --out release/v1/
                                                 search every target's candidates, release the best
    """
    _STATE["debug"] = debug


@cli.command()
@click.argument("model", required=False)
@click.option("-t", "--target", "targets", multiple=True, required=True,
              help="Target name (see `edgepipe targets`) or path to a target .toml. Repeat for several.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Release root; each target lands in OUT/<target>/.")
@click.option("-r", "--recipe", help="Compression recipe (.toml) applied before export.")
@_run_options
@click.option("--no-bench", is_flag=True, help="Skip latency and memory measurement.")
@click.option("--allow-accuracy-drop", is_flag=True, help="Release even when the metric drops more than the target's budget.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no progress bars).")
def build(model: str | None, targets: tuple[str, ...], out: Path, recipe: str | None, weights: Path | None,
          data: str, input_shape: tuple[str, ...], metric: str | None, postprocess: str | None,
          max_metric_drop: float | None, iterations: int | None, no_bench: bool, local_bench: bool, no_cache: bool, allow_accuracy_drop: bool, trust_code: bool,
          as_json: bool) -> None:
    """Run the whole pipeline for one or more targets.

    MODEL is package.module:factory, a .pt2 ExportedProgram, a TorchScript .pt, or an .onnx file;
    without it, the bundled digits example is used. Each target gets OUT/<target>/ with the artifact,
    the ONNX it came from, the calibration record and manifest.json. A failed build leaves no
    target directory behind.
    """
    from edgepipe import api

    with render.RichReporter(quiet=as_json) as rep:
        result = api.build(model, targets, out=out, reporter=rep, recipe=recipe, weights=weights, data=data,
                           input_shape=_shape(input_shape), iterations=iterations, bench=not no_bench,
                           cache=not no_cache, allow_accuracy_drop=allow_accuracy_drop, local_bench=local_bench,
                           trust_code=trust_code, metric=metric, postprocess=postprocess,
                           max_metric_drop=max_metric_drop)
    if as_json:
        _emit_json({"model": result.model, "notes": result.notes,
                    "targets": {r.manifest.name: {"release_dir": str(r.release_dir), **r.manifest.to_dict()}
                                for r in result.results}})
        return
    render.build_table(result)


@cli.command()
@click.argument("model", required=False)
@click.option("-t", "--targets", "targets", required=True, metavar="T1,T2|all",
              help="Comma-separated target names or .toml paths, or `all` (targets this machine cannot build are skipped).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("release"), show_default=True,
              help="Release root: OUT/<target>/, OUT/index.json, OUT/SHA256SUMS, OUT/report.html.")
@click.option("-s", "--search", "search", type=click.Path(path_type=Path),
              help="Search space TOML (recipes x per-backend settings); default: the shipped space.")
@click.option("--max-trials", type=int, help="Cap candidates per target (sampled with Optuna beyond it).")
@_run_options
@click.option("--cluster", metavar="ADDRESS|auto",
              help="Run the candidates as tasks on the Ray cluster at HOST:PORT ('auto': the one this machine "
                   "is in); a target with a [board] is benchmarked on the node declaring board:<target>.")
@click.option("--insecure-cluster", is_flag=True,
              help="Allow --cluster at a non-loopback address without Ray's token authentication (RAY_AUTH_MODE="
                   "token and a token): whoever reaches such a cluster runs code on every node. Refused otherwise.")
@click.option("--workers", type=click.IntRange(min=1), metavar="N",
              help="Without --cluster: run candidates in N local processes, one bench at a time "
                   "(default: the cores here; 1: one after another in this process).")
@click.option("--json", "as_json", is_flag=True, help="Print index.json and the run's figures as JSON.")
def release(model: str | None, targets: str, out: Path, search: Path | None, max_trials: int | None,
            weights: Path | None, data: str, input_shape: tuple[str, ...], metric: str | None,
            postprocess: str | None, max_metric_drop: float | None, iterations: int | None, local_bench: bool, no_cache: bool, trust_code: bool,
            cluster: str | None, insecure_cluster: bool, workers: int | None, as_json: bool) -> int:
    """Find the best artifact for every target, by measurement, under its budgets, and release it.

    For each target, every candidate of the search space (recipe x quantization settings) runs
    compress -> export -> compile -> evaluate -> bench; the fastest candidate that meets all of the
    target's budgets (accuracy drop on the validation split against the original model, latency,
    memory, size) is released to OUT/<target>/. A target that cannot meet its budgets fails with the
    closest candidate and how far it misses; the others are still released, and the exit status is 3.
    Every stage is cached: a rerun takes seconds, and a killed release resumes.

    \b
    Examples:
      edgepipe release --targets cpu-int8,intel-cpu-int8 --out release/v1/
      edgepipe release --targets all --search search.toml --max-trials 40 --out release/v1/
      edgepipe release --targets all --cluster auto --out release/v1/
    """
    from edgepipe import api

    specs = [t.strip() for t in targets.split(",") if t.strip()]
    # usage errors (exit 2) on the command line; executors.executor() refuses the same for API callers
    if cluster is not None and workers is not None:
        raise click.UsageError("--workers sizes the local pool; with --cluster the cluster's CPUs decide: "
                               "give one of them")
    if insecure_cluster and cluster is None:
        raise click.UsageError("--insecure-cluster only applies with --cluster")
    from edgepipe.pipeline.executors import executor as choose_executor

    # a cluster is connected (and its nodes checked) before the live display: a failure is one line
    executor = choose_executor(cluster, workers, insecure_cluster)
    try:
        with render.ReleaseLive(quiet=as_json) as live:
            result = api.release(model, specs, out=out, search=search, max_trials=max_trials, reporter=live,
                                 progress=live.progress, weights=weights, data=data,
                                 input_shape=_shape(input_shape), iterations=iterations, cache=not no_cache,
                                 local_bench=local_bench, trust_code=trust_code, cluster=executor,
                                 metric=metric, postprocess=postprocess, max_metric_drop=max_metric_drop)
    finally:
        executor.close()
    index = json.loads((out / "index.json").read_text())
    run = {"wall_seconds": round(result.wall_seconds, 1), "stages": result.stages_total,
           "stages_cached": result.stages_cached}
    if as_json:
        _emit_json({**index, "run": run})
    else:
        console = render.get_console()
        console.print()
        for o in result.outcomes:
            if o.status == "released" and o.chosen is not None:
                console.print(f"released [bold]{o.target.name}[/] {o.chosen.candidate.id} ({o.chosen.candidate.label}) "
                              f"-> {o.release_dir}/", highlight=False)
            elif o.status == "failed":
                console.print(f"[bold red]failed[/] {o.reason}", highlight=False)
            else:
                console.print(f"[dim]skipped {o.target.name}: {o.reason}[/]", highlight=False)
        console.print(f"{out}/index.json, {out}/SHA256SUMS, {out}/report.html written in {run['wall_seconds']} s; "
                      f"{result.stages_cached} of {result.stages_total} stages cached.", highlight=False)
    return 3 if result.failed else 0


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("model.onnx"), show_default=True)
@click.option("-w", "--weights", type=click.Path(path_type=Path), help="Weights for a module:factory model.")
@click.option("--input-shape", default=_DEFAULT_SHAPE, show_default=True, help="N,C,H,W of one input batch.")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension instead of making it dynamic.")
@click.option("-d", "--data", default="digits", show_default=True, help="Samples for the parity check.")
@click.option("--atol", type=float, default=1e-3, show_default=True, help="Largest allowed |torch - onnx| on the logits.")
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(model: str | None, out: Path, weights: Path | None, input_shape: str, static_batch: bool, data: str,
           atol: float, trust_code: bool, as_json: bool) -> None:
    """Export MODEL to a single-file ONNX and check it against torch.

    The parity check runs torch and onnxruntime on evaluation samples and fails (leaving no file) when
    the max abs error exceeds --atol or top-1 agreement is below 99 %.
    """
    from edgepipe import api

    shape = _shape(input_shape)
    assert shape is not None
    onnx, parity = api.export(model, out, input_shape=shape, weights=weights, dynamic_batch=not static_batch,
                              data=data, parity_atol=atol, trust_code=trust_code)
    if as_json:
        _emit_json({"path": str(onnx.path), "sha256": onnx.sha256, "input_shape": onnx.input_shape, "parity": parity})
    else:
        click.echo(f"wrote {onnx.path} (input {list(onnx.input_shape)}); parity on {parity['samples']} samples: "
                   f"max abs error {parity['max_abs_error']:.2e}"
                   + (f", top-1 agreement {parity['top1_agreement']:.2%}" if parity.get("top1_agreement") is not None
                      else ""))


@cli.command()
@click.argument("model", required=False)
@click.option("-r", "--recipe", help="Compression recipe: a .toml path or the name of a shipped recipe.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("model.pt2"), show_default=True,
              help="Where the compressed model goes (a torch.export .pt2 program).")
@click.option("-w", "--weights", type=click.Path(path_type=Path), help="Weights for a module:factory model.")
@click.option("-d", "--data", default="digits", show_default=True,
              help="Fine-tuning/evaluation data: 'digits', an .npz with one array per input (by name) and its "
                   "targets, an image folder, pkg.mod:fn.")
@click.option("--input-shape", multiple=True, metavar="[NAME=]D0,D1,...", default=(_DEFAULT_SHAPE,),
              show_default=True,
              help="One input's shape, batch first (any rank), or NAME=D0,D1,... once per input of a model with "
                   "several.")
@click.option("--metric", metavar="NAME|pkg.mod:obj",
              help="How a fine-tuned step is judged (as for build). Default: top1 for a classifier, else the SQNR "
                   "against the original model.")
@click.option("--postprocess", metavar="pkg.mod:fn", help="Runs on the outputs before --metric.")
@click.option("--list", "list_", is_flag=True, help="List the compression techniques and exit.")
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the step records as JSON.")
def compress(model: str | None, recipe: str | None, out: Path, weights: Path | None, data: str,
             input_shape: tuple[str, ...], metric: str | None, postprocess: str | None, list_: bool,
             trust_code: bool, as_json: bool) -> None:
    """Apply a compression recipe to MODEL and save the result as a .pt2 program.

    A recipe is a TOML file of ordered [[steps]] (technique = "...", its parameters, finetune = true),
    sharing one [finetune] loop and an optional [distill] objective. Each step reports parameters,
    non-zero parameters, MACs and its measure before and after (top-1 for a classifier, the --metric, or
    the SQNR against the original model). Any model: every input is fed at its shape and dtype, and the
    .pt2 takes them all. `edgepipe build --recipe R` runs the same recipe before export.

    \b
    Examples:
      edgepipe compress --recipe structured-50 --out small.pt2
      edgepipe compress mypkg.nets:fusion --recipe structured-50 --data fusion.npz \\
        --input-shape image=1,3,64,64 --input-shape feats=1,16
    """
    from edgepipe import api

    if list_:
        from edgepipe.compress import techniques

        rows = {name: t.summary for name, t in techniques().items()}
        _emit_json(rows) if as_json else [click.echo(f"{n:24s} {s}") for n, s in rows.items()]
        return
    if not recipe:
        raise click.UsageError("give --recipe R (a .toml recipe), or --list to see the techniques")
    shape = _shape(input_shape)
    assert shape is not None
    with render.RichReporter(quiet=as_json) as rep:
        path, records = api.compress(model, recipe, out=out, weights=weights, data=data, input_shape=shape,
                                     reporter=rep, trust_code=trust_code, metric=metric, postprocess=postprocess)
    if as_json:
        _emit_json({"path": str(path), "steps": records})
        return
    render.compression_table(records)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("model", required=False)
@click.option("--analyze", is_flag=True, required=True,
              help="Measure every layer's sensitivity to int8 (the only mode today; required).")
@click.option("-t", "--target", default="cpu-int8", show_default=True,
              help="Target whose calibration method (and equalize setting) is used.")
@click.option("-w", "--weights", type=click.Path(path_type=Path), help="Weights for a module:factory model.")
@click.option("-d", "--data", default="digits", show_default=True, help="Samples: 'digits', 'mnist5k', 'photos', .npz, folder.")
@click.option("--input-shape", help="N,C,H,W (default: the target's).")
@click.option("--equalize/--no-equalize", default=None,
              help="Measure on the equalized, bias-corrected model (default: as the target says).")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Calibration samples each quantized copy runs.")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="Rows in the table.")
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print every layer as JSON.")
def quantize(model: str | None, analyze: bool, target: str, weights: Path | None, data: str, input_shape: str | None,
             equalize: bool | None, samples: int, top: int, trust_code: bool, as_json: bool) -> None:
    """Show which layers int8 hurts: each layer quantized alone, the rest in float.

    For every Conv/Gemm/MatMul, a copy of MODEL with only that layer int8 (weights per channel,
    its input activation calibrated with the target's method) runs on calibration samples; the table
    ranks layers by the normalised mean squared error of the logits against fp32 (and top-1 agreement).
    A target's `calibration.float_layers = k` keeps the k worst in float; `edgepipe release` can
    search k (`float_layers = [0, 2, 4]` in a search file's backend table).

    \b
    Examples:
      edgepipe quantize --analyze
      edgepipe quantize edgepipe.models.zoo:efficientnet_lite0 --analyze --data photos \\
        --input-shape 1,3,224,224 --equalize
    """
    from rich.progress import Progress

    from edgepipe import api

    with Progress(console=render.get_console(stderr=True), transient=True, disable=as_json) as bar:
        task = bar.add_task("quantizing one layer at a time", total=None)
        report = api.sensitivity(model, target, weights=weights, data=data, input_shape=_shape(input_shape),
                                 equalize=equalize, samples=samples, trust_code=trust_code,
                                 progress=lambda n: bar.advance(task, n))
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    t = Table(title=f"int8 sensitivity per layer: {report['model']} ({report['target']}, {report['method']} "
                    f"calibration{', equalized' if report['equalized'] else ''}, {report['samples']} samples)")
    for col in ("rank", "layer", "op", "logit NMSE", "top-1 agreement"):
        t.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for i, e in enumerate(report["layers"][:top], 1):
        t.add_row(str(i), e["name"], e["op"], f"{e['nmse']:.2e}", ("-" if e['agreement'] is None else f"{e['agreement']:.1%}"))
    render.get_console().print(t)
    n = len(report["layers"])
    click.echo(f"{n} layers; the {min(top, n)} most sensitive shown. Keep the worst k in float with "
               "calibration.float_layers = k in the target (or search it: float_layers = [0, 2, 4]).")


@cli.command("compile")
@click.argument("model")
@click.option("-t", "--target", required=True, help="Target name or .toml path.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@click.option("-d", "--data", default="digits", show_default=True, help="Calibration/evaluation data.")
@_RUN_OPTIONS[2]
@_RUN_OPTIONS[3]
@_RUN_OPTIONS[4]
@click.option("--allow-accuracy-drop", is_flag=True, help="Release even when the metric drops more than the budget.")
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_cmd(model: str, target: str, out: Path, data: str, input_shape: tuple[str, ...], metric: str | None,
                postprocess: str | None, allow_accuracy_drop: bool, trust_code: bool, as_json: bool) -> None:
    """Compile MODEL (usually an .onnx) for one target, calibrated on its own data, and evaluate it.

    Like `build` without the benchmark: writes OUT/<target>/ with the artifact and manifest.json.
    """
    from edgepipe import api

    with render.RichReporter(quiet=as_json) as rep:
        result = api.compile(model, target, out=out, data=data, reporter=rep, input_shape=_shape(input_shape),
                             allow_accuracy_drop=allow_accuracy_drop, trust_code=trust_code, metric=metric,
                             postprocess=postprocess)
    r = result.results[0]
    if as_json:
        _emit_json({"release_dir": str(r.release_dir), **r.manifest.to_dict()})
    else:
        render.build_table(result)


_verify_metric_option = click.option(
    "--metric", metavar="NAME|pkg.mod:obj",
    help="With --verify: score the outputs with this metric. Default: the release's, when it is built in; a user "
         "metric is code, which a manifest cannot choose: name it here to compute it (else fidelity only).")
_verify_postprocess_option = click.option(
    "--postprocess", metavar="pkg.mod:fn",
    help="With --verify: run this on the outputs before the metric (the one the release was built with: code, "
         "so never taken from the manifest).")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--threads", type=int, help="Runtime threads (default: the runtime's own).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--iterations", type=int, default=200, show_default=True)
@click.option("--duration", type=float, help="Time-box the timed loop to this many seconds instead.")
@click.option("--device", "device", metavar="BOARD",
              help="Measure on a board over SSH: [user@]host[:port], or a target name with a [board] table.")
@click.option("--verify", is_flag=True,
              help="Also run the release's test split where it runs (the board's own runtime), score its outputs "
                   "with the release's metric, and compare them, output by output, with this machine's run of the "
                   "same file.")
@click.option("-d", "--data", help="With --verify: the evaluation data, if not the source the release records.")
@_verify_metric_option
@_verify_postprocess_option
@click.option("--json", "as_json", is_flag=True, help="Print the measurement as JSON.")
def bench(artifact: Path, threads: int | None, batch: int, warmup: int, iterations: int,
          duration: float | None, device: str | None, verify: bool, data: str | None, metric: str | None,
          postprocess: str | None, as_json: bool) -> None:
    """Measure ARTIFACT's latency and memory in a fresh worker process.

    ARTIFACT is a release directory, or a model file (.onnx, ...). Reports p50/p90/p99/mean latency,
    throughput, load time and peak resident memory above the worker's baseline. With --device, the
    artifact and the worker (one zip file) are copied to the board over SSH (keys, no password) and
    run by its Python, which needs numpy and the artifact's runtime, not torch or edgepipe. The
    report says which machine measured, and when it ran under emulation (qemu-user): then the figures
    prove the artifact runs there, not how fast.

    \b
    Examples:
      edgepipe bench dist/cpu-int8
      edgepipe bench dist/raspberry-pi-5 --device raspberry-pi-5 --verify   # the target's [board]
      edgepipe bench dist/arm64-cpu-int8 --device pi@192.168.1.20:22 --json
    """
    from edgepipe import api
    from edgepipe.errors import BenchmarkError

    try:
        m = api.bench(artifact, threads=threads, batch=batch, warmup=warmup, iterations=iterations,
                      duration_s=duration, device=device, verify=verify, data=data, metric=metric,
                      postprocess=postprocess)
    except BenchmarkError as e:
        if as_json and e.partial is not None:  # a board dropped: keep what it measured
            _emit_json({"ok": False, "error": str(e), "partial": e.partial})
            sys.exit(1)
        raise
    if as_json:
        _emit_json(m.to_dict())
        return
    render.measurement_table(m, f"edgepipe bench: {artifact} ({m.backend} {m.precision})".replace(" )", ")"))


@cli.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets_cmd(as_json: bool) -> None:
    """List the targets, their backend, and whether this machine can compile and run them (and why not)."""
    from edgepipe import api

    rows = api.targets()
    if as_json:
        _emit_json([r.to_dict() for r in rows])
        return
    from rich.table import Table

    t = Table(title="edgepipe targets")
    for col in ("target", "backend", "precision", "compile", "run", "description / why not"):
        t.add_column(col)
    for r in rows:
        yes = lambda ok: "[green]yes[/]" if ok else "[red]no[/]"  # noqa: E731
        t.add_row(r.name, r.backend, r.precision, yes(r.can_compile), yes(r.can_run),
                  r.reason if r.reason else r.description)
    console = render.get_console()
    console.print(t)
    shown: set[str] = set()
    for r in rows:
        if r.device and r.backend not in shown:
            shown.add(r.backend)
            details = "; ".join(f"{k}: {v}" for k, v in r.device.items())
            console.print(f"[bold]{r.backend}[/] on this machine: {details}", highlight=False)


@cli.group("engine")
def engine_group() -> None:
    """TensorRT engines: finish a build bundle on the device it is for."""


@engine_group.command("build")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Engine file to write (default: model.<precision>.engine inside BUNDLE).")
@click.option("--json", "as_json", is_flag=True, help="Print the engine record as JSON.")
def engine_build(bundle: Path, out: Path | None, as_json: bool) -> None:
    """Build the TensorRT engine of BUNDLE here and record it in the bundle's manifest.

    BUNDLE is the release directory of a tensorrt target (it holds tensorrt-bundle.json). Run this on the
    Jetson or GPU machine the engine is for, with TensorRT installed; afterwards `edgepipe bench BUNDLE`
    times the engine. Without edgepipe there, the bundle's trtexec.sh builds the same engine.
    """
    from edgepipe import api

    record = api.engine_build(bundle, out)
    if as_json:
        _emit_json(record)
    else:
        click.echo(f"built {record['file']} ({record['bytes'] / 2**20:.1f} MiB) with TensorRT {record['tensorrt']} "
                   f"on {record['device']} in {record['seconds']:.1f} s ({record['typing']}ly typed); recorded in "
                   f"{Path(bundle) / 'tensorrt-bundle.json' if Path(bundle).is_dir() else bundle}")


@cli.group("docker")
def docker_group() -> None:
    """Runtime images of a release: build context, image, run (a Docker engine, or just the context).

    \b
    edgepipe docker base  --platform linux/arm64                      # a Debian base, no registry needed
    edgepipe docker build dist/arm64-cpu-int8 --platform linux/arm64 --tag edgepipe/pi5:1.0 \\
                          --base-image local/debian-arm64:bookworm
    edgepipe docker run   edgepipe/pi5:1.0 --verify                   # bench JSON; metric vs this host

    The context (Dockerfile, release, the platform's wheels pinned by sha256, the bench worker, the
    test split) builds offline; its Dockerfile defaults to the official python:3.11-slim base.
    """


@docker_group.command("build")
@click.argument("release", type=click.Path(path_type=Path))
@click.option("--platform", "platform", required=True, type=click.Choice(["linux/amd64", "linux/arm64"]),
              help="The image's platform (its wheels are downloaded for it).")
@click.option("-t", "--tag", required=True, help="Image name:tag, e.g. edgepipe/pi5:1.0.")
@click.option("--base-image", help="Base image (default: python:3.11-slim-bookworm; TensorRT: NVIDIA's).")
@click.option("--context", "context", type=click.Path(path_type=Path),
              help="Where to write the build context [default: docker-context/<release>-<arch>].")
@click.option("--python", "python", help="The base image's CPython, for the wheels' tag [default: 3.11; NVIDIA "
              "bases: theirs].")
@click.option("-d", "--data", help="Evaluation data, if not the source the release records.")
@click.option("--context-only", is_flag=True, help="Write the context and stop (no engine needed).")
@click.option("--no-cache", is_flag=True, help="Build every layer again (the engine's layer cache unused).")
@click.option("--json", "as_json", is_flag=True, help="Print the context and image records as JSON.")
def docker_build(release: Path, platform: str, tag: str, base_image: str | None, context: Path | None, python: str | None,
                 data: str | None, context_only: bool, no_cache: bool, as_json: bool) -> None:
    """Write RELEASE's image build context, then build the image with the local Docker engine.

    Without an engine (or with --context-only) the context is still written, ready for `docker build`
    elsewhere. With buildx the image is cross-built for --platform; without it the classic builder
    builds from a base image of that platform (make one with `edgepipe docker base`).
    """
    from edgepipe import api

    with render.status(as_json, f"writing the context and building {tag} ({platform})"):
        r = api.docker_build(release, platform, tag, context=context, base_image=base_image, python=python, data=data,
                             no_cache=no_cache, context_only=context_only)
    if as_json:
        _emit_json(r)
        return
    ctx, built = r["context"], r["image"]
    render.get_console().print(f"context: {ctx['directory']}/ ({ctx['wheels']} wheels, {ctx['wheels_bytes'] / 1e6:.1f} MB, "
                     f"base {ctx['base_image']})", highlight=False)
    if built:
        render.get_console().print(f"built [bold]{tag}[/] ({platform}, {built['builder']} builder) in {built['seconds']:.0f} s, "
                         f"{built['size_bytes'] / 1e6:.0f} MB" + (f"; {built['note']}" if built["note"] else ""),
                         highlight=False)


@docker_group.command("run")
@click.argument("image")
@click.option("--verify", is_flag=True, help="Also run the release's test split with the image's runtime, score its "
              "outputs with the release's metric, and compare them with this machine's run of the same file "
              "(copied out of the image).")
@click.option("--iterations", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads (default: the runtime's own).")
@_verify_metric_option
@_verify_postprocess_option
@click.option("--json", "as_json", is_flag=True, help="Print the measurement as JSON.")
def docker_run(image: str, verify: bool, iterations: int, warmup: int, threads: int | None, metric: str | None,
               postprocess: str | None, as_json: bool) -> None:
    """Run IMAGE (made by `edgepipe docker build`): it benchmarks its release and prints JSON.

    The container runs with no network. An arm64 image on an x86 host runs under QEMU emulation: the
    report says so, and its figures prove function, not speed.
    """
    from edgepipe import api

    m = api.docker_run(image, verify=verify, iterations=iterations, warmup=warmup, threads=threads, metric=metric,
                       postprocess=postprocess)
    if as_json:
        _emit_json(m.to_dict())
        return
    render.measurement_table(m, f"edgepipe docker run: {image} ({m.backend} {m.precision})")


@docker_group.command("base")
@click.option("--platform", "platform", required=True, type=click.Choice(["linux/amd64", "linux/arm64"]))
@click.option("-t", "--tag", help="Image name [default: local/debian-<arch>:<suite>].")
@click.option("--include", "include", multiple=True, metavar="PKG", help="Extra Debian packages (repeatable).")
@click.option("--suite", default="bookworm", show_default=True)
@click.option("--mirror", help="Debian mirror [default: this machine's apt source].")
@click.option("--json", "as_json", is_flag=True, help="Print the base record as JSON.")
def docker_base(platform: str, tag: str | None, include: tuple[str, ...], suite: str, mirror: str | None,
                as_json: bool) -> None:
    """Make a Debian base image (python3 + venv) of PLATFORM from the package mirror and load it.

    For machines that cannot pull from a registry. Needs root (or user namespaces) and mmdebstrap or
    debootstrap; an arm64 root on x86 is configured under QEMU (qemu-user-static + binfmt): about
    2 minutes with mmdebstrap. The root is cached under $EDGEPIPE_CACHE_DIR/bases.
    """
    from edgepipe import api

    with render.status(as_json, f"making a Debian {suite} root for {platform}"):
        b = api.docker_base(platform, tag, packages=include, suite=suite, mirror=mirror)
    if as_json:
        _emit_json(b.to_dict())
        return
    how = "from the cache" if b.cached else f"in {b.seconds:.0f} s"
    render.get_console().print(f"loaded [bold]{b.tag}[/] ({platform}, {', '.join(b.packages)}) {how}", highlight=False)


@cli.group()
def toolchain() -> None:
    """Isolated converter environments (a venv each, under ~/.cache/edgepipe/toolchains).

    \b
    Some converters pin their whole stack and cannot share edgepipe's environment: the tflite
    backend's onnx2tf pins tensorflow 2.19, onnx 1.19 and numpy 1.26. $EDGEPIPE_TOOLCHAINS_DIR
    moves them elsewhere.
    """


@toolchain.command("install")
@click.argument("name")
@click.option("--force", is_flag=True, help="Reinstall even when a complete install is present.")
@click.option("--python", "python_exe", help="Interpreter to make the venv from (default: the running one).")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting status as JSON.")
def toolchain_install(name: str, force: bool, python_exe: str | None, as_json: bool) -> None:
    """Create toolchain NAME (tflite): venv, pinned pip install, pip check, imports; idempotent.

    The install is marked complete only at its very end: an interrupted install is never used, and
    running the command again starts it over.
    """
    import time

    from edgepipe import api

    err = render.get_console(stderr=True)
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        if not as_json:
            err.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {line}", highlight=False, soft_wrap=True)

    st = api.install_toolchain(name, force=force, python=python_exe, progress=progress)
    if as_json:
        _emit_json(st.to_dict())


@toolchain.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the statuses as JSON.")
def toolchain_status(as_json: bool) -> None:
    """Show each toolchain: installed or not (and why), where, and its tool versions."""
    from edgepipe import api

    rows = api.toolchains()
    if as_json:
        _emit_json([r.to_dict() for r in rows])
        return
    from rich.table import Table

    t = Table(title="edgepipe toolchains")
    for col in ("toolchain", "installed", "path", "versions / why not"):
        t.add_column(col)
    for r in rows:
        detail = ", ".join(f"{k} {v}" for k, v in r.versions.items()) if r.installed else r.reason
        t.add_row(r.name, "[green]yes[/]" if r.installed else "[red]no[/]", str(r.path), detail)
    render.get_console().print(t)


@toolchain.command("remove")
@click.argument("name")
def toolchain_remove(name: str) -> None:
    """Delete toolchain NAME's environment."""
    from edgepipe import api

    click.echo(f"removed the {name} toolchain" if api.remove_toolchain(name) else f"no {name} toolchain installed")


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("model.epk"), show_default=True,
              help="The archive to write.")
@click.option("-w", "--weights", type=click.Path(path_type=Path),
              help="Weights for the factory: .safetensors, a state dict, or a compressed .pt2 (with --trust-code).")
@click.option("-r", "--recipe", help="Compression recipe applied before packing (e.g. prune + weight_share).")
@click.option("-d", "--data", default="digits", show_default=True, help="Fine-tuning/evaluation data for the recipe.")
@click.option("--input-shape", default=_DEFAULT_SHAPE, show_default=True, help="N,C,H,W recorded for unpack.")
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print sizes per stage and per tensor as JSON.")
def pack(model: str | None, out: Path, weights: Path | None, recipe: str | None, data: str, input_shape: str,
         trust_code: bool, as_json: bool) -> None:
    """Pack MODEL's weights into a compact archive for over-the-air delivery.

    MODEL is the package.module:factory that rebuilds the architecture (default: the example). Each
    tensor is stored losslessly in its smallest layout: shared values as a codebook plus Huffman-coded
    indices, pruned weights as Huffman-coded relative offsets, hashed layers as buckets plus a seed,
    the rest raw. The archive carries SHA-256 hashes; `edgepipe unpack` restores the exact weights.
    """
    from edgepipe import api

    shape = _shape(input_shape)
    assert shape is not None
    with render.RichReporter(quiet=as_json) as rep:
        report, records = api.pack(model, out=out, weights=weights, recipe=recipe, data=data, input_shape=shape,
                                   reporter=rep, trust_code=trust_code)
    if as_json:
        _emit_json({**report.to_dict(), "steps": records})
        return
    if records:
        render.compression_table(records)
    render.pack_table(report)
    click.echo(f"wrote {report.path} ({report.file_bytes:,} bytes)")


@cli.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="model.pt2 (a program for `edgepipe build`) or weights.safetensors (for the factory).")
@click.option("-f", "--factory", default="edgepipe.models.example:digits_resnet", show_default=True,
              help="The package.module:factory that rebuilds the architecture; must be the one the archive was "
                   "packed for (the archive's own is only compared, never imported).")
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as JSON.")
def unpack(archive: Path, out: Path, factory: str, as_json: bool) -> None:
    """Restore the exact weights of an archive written by `edgepipe pack`.

    The archive's hash is checked before anything is decoded, every size it states is checked against
    the file's length, and the restored weights' hash is checked after; a damaged, truncated or forged
    archive is refused and nothing is written. The architecture comes from --factory, which you name:
    an archive never chooses what code runs. Build the result like any model: `edgepipe build
    FACTORY --weights weights.safetensors`, or `edgepipe build model.pt2 --trust-code --target cpu-int8`.
    """
    from edgepipe import api

    path, info = api.unpack(archive, out, factory=factory)
    if as_json:
        _emit_json({"path": str(path), **info})
    else:
        click.echo(f"restored {info['tensors']} tensors of {info['spec']} (sha256 {info['sha256'][:12]}, "
                   f"bit-exact) -> {path}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: EdgepipeError becomes one red line and exit status 1."""
    try:
        rv = cli.main(args=argv, prog_name="edgepipe", standalone_mode=False)
        sys.exit(rv if isinstance(rv, int) else 0)
    except EdgepipeError as e:
        if _STATE["debug"]:
            raise
        from rich.markup import escape

        render.get_console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as e:  # the machine, not the input: a full disk, a permission, a vanished file
        if _STATE["debug"]:
            raise
        import errno

        from rich.markup import escape

        # a copy that filled the disk names its source first and the file it was writing second: name that one
        path = e.filename2 if e.errno == errno.ENOSPC and e.filename2 else e.filename
        where = f" ({path})" if path else ""
        render.get_console(stderr=True).print(f"[bold red]error:[/] {escape(str(e.strerror or e) + where)}; nothing was "
                                    "released (--debug shows where)", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
