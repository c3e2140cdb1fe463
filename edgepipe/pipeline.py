"""Sequence the stages: load -> compress -> export -> compile -> evaluate -> bench -> release.

Every stage is a plain function elsewhere; this module orders them, caches export and compile outputs
by content hash, checks budgets, and records what happened in the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe import backends
from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file, sha256_json
from edgepipe._progress import NullReporter, Reporter
from edgepipe.backends.base import Artifact, CalibrationSet, OnnxModel, StandIn
from edgepipe.config import Target, load_target
from edgepipe.data import Dataset, Splits, load_dataset, split
from edgepipe.errors import BackendUnavailable, BudgetError, ConfigError
from edgepipe.harness import BenchSettings, Measurement, measure
from edgepipe.models import ModelSource, load_model, state_dict_sha256
from edgepipe.versions import tool_versions

MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class BuildOptions:
    """How a build runs, beyond the model and the targets."""

    out: Path = Path("dist")
    data: str = "digits"
    input_shape: tuple[int, ...] | None = None
    recipe: str | None = None
    weights: Path | None = None
    bench: bool = True
    iterations: int | None = None
    allow_accuracy_drop: bool = False
    cache: bool = True
    parity_atol: float = 1e-3
    local_bench: bool = False  # measure here even when the target names a [board]


@dataclass
class TargetResult:
    target: Target
    release_dir: Path
    manifest: dict[str, Any]

    @property
    def top1(self) -> float:
        return self.manifest["accuracy"]["top1"]


@dataclass
class BuildResult:
    model: str
    reference: dict[str, Any]
    results: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# the content-addressed cache


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPIPE_CACHE_DIR") or Path.home() / ".cache" / "edgepipe")


class Cache:
    """Directories of stage outputs, keyed by the hash of everything that went into them."""

    def __init__(self, root: Path | None, enabled: bool = True) -> None:
        self.root = (root or cache_dir()) / "stages"
        self.enabled = enabled

    def get(self, kind: str, key: str) -> Path | None:
        d = self.root / kind / key
        return d if self.enabled and (d / "record.json").is_file() else None

    def put(self, kind: str, key: str, files: list[Path], record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with atomic_dir(self.root / kind / key) as tmp:
            for f in files:
                shutil.copy2(f, tmp / f.name)
            (tmp / "record.json").write_text(json.dumps(record, sort_keys=True, indent=1))


# ---------------------------------------------------------------------------------------------------------
# stages


def resolve_targets(specs: list[str], input_shape: tuple[int, ...] | None = None) -> list[Target]:
    """Load and validate targets, and check that this machine can compile each, before any work."""
    if not specs:
        raise ConfigError("no target given: pass --target NAME (see `edgepipe targets`)")
    out = []
    for spec in specs:
        t = load_target(spec)
        if input_shape is not None:
            t = t.with_input_shape(tuple(input_shape))
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


def _export_stage(src: ModelSource, target: Target, workdir: Path, cache: Cache, opts: BuildOptions,
                  data: Splits, recipe_sha: str | None) -> tuple[OnnxModel, dict[str, Any]]:
    from edgepipe import export as ex

    if src.is_onnx:
        assert src.onnx_path is not None
        onnx = ex.onnx_model(src.onnx_path)
        _check_onnx_shape(onnx, target)
        dest = workdir / "source.onnx"
        shutil.copyfile(src.onnx_path, dest)
        return ex.onnx_model(dest), {"name": "export", "skipped": "model is already ONNX", "output_sha256": onnx.sha256}
    assert src.module is not None
    key = sha256_json({
        "weights": state_dict_sha256(src.module), "spec": src.spec, "shape": target.input_shape,
        "dynamic": target.dynamic_batch, "opset": ex.DEFAULT_OPSET, "tools": tool_versions(), "recipe": recipe_sha,
    })
    t0 = time.perf_counter()
    dest = workdir / "source.onnx"
    hit = cache.get("export", key)
    if hit:
        shutil.copyfile(hit / "source.onnx", dest)
        record = json.loads((hit / "record.json").read_text())
        onnx = ex.onnx_model(dest)
    else:
        onnx = ex.export(src.module, target.input_shape, dest, dynamic_batch=target.dynamic_batch)
        p = ex.parity(src.module, onnx, data.evaluation.x)
        ex.check_parity(p, atol=opts.parity_atol)
        record = {"parity": p.to_dict(), "opset": ex.DEFAULT_OPSET, "dynamic_batch": target.dynamic_batch}
        cache.put("export", key, [dest], record)
    return onnx, {"name": "export", "output_sha256": onnx.sha256, "cached": bool(hit),
                  "seconds": round(time.perf_counter() - t0, 3), **record}


def _check_onnx_shape(onnx: OnnxModel, target: Target) -> None:
    for want, have in zip(target.input_shape[1:], onnx.input_shape[1:], strict=False):
        if isinstance(have, int) and have > 0 and have != want:
            raise ConfigError(
                f"input shape {list(target.input_shape)} does not match the ONNX model's input "
                f"{list(onnx.input_shape)}; set the target's input_shape or pass --input-shape"
            )


def _compile_stage(onnx: OnnxModel, target: Target, calib: CalibrationSet, workdir: Path,
                   cache: Cache) -> tuple[Artifact, dict[str, Any]]:
    backend = backends.get(target.backend)
    key = sha256_json({"onnx": onnx.sha256, "target": target.sha256, "calibration": calib.sha256,
                       "validation": calib.validation_sha256, "tools": tool_versions()})
    t0 = time.perf_counter()
    out = workdir / "artifact"
    out.mkdir(parents=True, exist_ok=True)
    hit = cache.get(f"compile-{target.backend}", key)
    if hit:
        rec = json.loads((hit / "record.json").read_text())
        for name in rec["files"]:
            shutil.copy2(hit / name, out / name)
        artifact = Artifact(backend.name, rec["precision"], out / rec["path"], [out / n for n in rec["files"]],
                            rec["metadata"])
    else:
        artifact = backend.compile(onnx, target, calib, out)
        rec = {"precision": artifact.precision, "path": artifact.path.name,
               "files": [p.name for p in artifact.files], "metadata": artifact.metadata}
        cache.put(f"compile-{target.backend}", key, artifact.files, rec)
    files = {p.name: sha256_file(p) for p in artifact.files}
    return artifact, {"name": "compile", "backend": backend.name, "output_sha256": sha256_json(files),
                      "cached": bool(hit), "seconds": round(time.perf_counter() - t0, 3)}


def _bench_settings(target: Target, opts: BuildOptions) -> BenchSettings:
    r = target.runtime
    return BenchSettings(threads=r.threads, batch=r.batch, warmup=r.warmup,
                         iterations=opts.iterations or r.iterations)


def _budgets(target: Target, drop: float, m: Measurement | None) -> dict[str, Any]:
    b = target.budgets
    out: dict[str, Any] = {}
    if b.max_accuracy_drop is not None:
        out["max_accuracy_drop"] = {"limit": b.max_accuracy_drop, "value": drop, "ok": drop <= b.max_accuracy_drop}
    if m is not None and b.max_latency_ms is not None:
        out["max_latency_ms"] = {"limit": b.max_latency_ms, "value": m.p50_ms, "ok": m.p50_ms <= b.max_latency_ms}
    if m is not None and b.max_memory_mb is not None:
        v = m.peak_rss_above_baseline_mb
        out["max_memory_mb"] = {"limit": b.max_memory_mb, "value": v, "ok": v <= b.max_memory_mb}
    return out


def _evaluable(artifact: Artifact) -> tuple[Artifact, StandIn | None]:
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


# ---------------------------------------------------------------------------------------------------------
# the whole build


def build(
    model: str | None,
    targets: list[str],
    options: BuildOptions | None = None,
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build release artifacts of ``model`` for each target into ``options.out/<target>/``.

    A target directory appears only when its build completed; a failure leaves nothing that looks finished.
    """
    from edgepipe.evaluate import top1

    opts = options or BuildOptions()
    rep = reporter or NullReporter()
    tgts = resolve_targets(targets, opts.input_shape)
    cache = Cache(None, enabled=opts.cache)
    with rep.stage("load model"):
        src = load_model(model, opts.weights)
    result = BuildResult(model=src.spec, reference={})

    def note(message: str) -> None:
        result.notes.append(message)
        rep.note(message)

    recipe_sha = None
    datasets: dict[tuple[int, int, int], Dataset] = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-") as scratch_str:
        scratch = Path(scratch_str)
        for t in tgts:
            if t.chw not in datasets:
                with rep.stage(f"load data ({opts.data})"):
                    datasets[t.chw] = load_dataset(opts.data, t.chw)
        if opts.recipe:
            if src.is_onnx:
                note("model is ONNX: compression recipe skipped (compress the torch model instead)")
            else:
                from edgepipe.compress import apply_recipe, load_recipe

                recipe = load_recipe(opts.recipe)
                recipe_sha = recipe.sha256
                splits0 = split(datasets[tgts[0].chw], tgts[0].calibration.samples, tgts[0].calibration.seed)
                src.module, compression = apply_recipe(src.module, recipe, splits0, rep)
                result.reference["compression"] = compression
        references: dict[tuple[Any, ...], dict[str, Any]] = {}
        for t in tgts:
            splits = split(datasets[t.chw], t.calibration.samples, t.calibration.seed)
            work = scratch / t.name
            work.mkdir()
            with rep.stage(f"{t.name}: export"):
                onnx, export_rec = _export_stage(src, t, work, cache, opts, splits, recipe_sha)
            ref_key = (onnx.sha256, t.runtime.threads)
            if ref_key not in references:
                ref_art = Artifact("onnxruntime", "fp32", onnx.path)
                with rep.stage(f"{t.name}: evaluate fp32 reference", total=len(splits.evaluation)) as adv:
                    ref_top1 = top1(backends.get("onnxruntime").load(ref_art, t.runtime.threads),
                                    splits.evaluation.x, splits.evaluation.y, adv)
                ref_m = None
                if opts.bench:
                    with rep.stage(f"{t.name}: bench fp32 reference"):
                        ref_m = measure(ref_art, _bench_settings(t, opts))
                references[ref_key] = {"top1": ref_top1, "latency": ref_m.to_dict() if ref_m else None}
            ref = references[ref_key]
            result.reference = {**result.reference, **ref}
            calib = CalibrationSet(splits.calibration.x, t.calibration.method, splits.calibration.name,
                                   validation_x=splits.evaluation.x, validation_y=splits.evaluation.y,
                                   validation_source=splits.evaluation.name)
            with rep.stage(f"{t.name}: compile ({t.backend} {t.precision})"):
                artifact, compile_rec = _compile_stage(onnx, t, calib, work, cache)
            evaluated, stand_in = _evaluable(artifact)
            with rep.stage(f"{t.name}: evaluate", total=len(splits.evaluation)) as adv:
                runner = backends.get(evaluated.backend).load(evaluated, t.runtime.threads)
                acc = top1(runner, splits.evaluation.x, splits.evaluation.y, adv)
            drop = round((ref["top1"] - acc) * 100, 4)
            m = None
            if stand_in is not None:
                note(f"{t.name}: top-1 measured on {stand_in.evaluates}")
                if opts.bench:
                    note(f"{t.name}: not benchmarked: {stand_in.bench}")
            elif opts.bench:
                where = f"board {t.board.host}" if t.board and not opts.local_bench else "here"
                with rep.stage(f"{t.name}: bench ({where})"):
                    if t.board and not opts.local_bench:
                        from edgepipe.harness.remote import measure_remote

                        m = measure_remote(artifact, t.board, _bench_settings(t, opts))
                    else:
                        m = measure(artifact, _bench_settings(t, opts))
            budgets = _budgets(t, drop, m)
            if not budgets.get("max_accuracy_drop", {"ok": True})["ok"] and not opts.allow_accuracy_drop:
                raise BudgetError(
                    f"target {t.name!r}: top-1 {acc:.2%} is {drop:.2f} points below the fp32 reference "
                    f"({ref['top1']:.2%}), over the budget of {t.budgets.max_accuracy_drop} points; "
                    "nothing was released (pass --allow-accuracy-drop to release anyway)"
                )
            for key, b in budgets.items():
                if not b["ok"] and key != "max_accuracy_drop":
                    note(f"{t.name}: {key} budget missed ({b['value']:.2f} > {b['limit']}) on this machine")
            from edgepipe.release import write_release

            manifest = {
                "schema": MANIFEST_SCHEMA,
                "target": {**t.to_dict(), "sha256": t.sha256},
                "inputs": {
                    "model": {"spec": src.spec, "kind": src.kind, "sha256": src.weights_sha256},
                    "data": {"name": opts.data, "sha256": datasets[t.chw].sha256,
                             "evaluation_samples": len(splits.evaluation),
                             "calibration_samples": len(splits.calibration)},
                    "target": t.sha256,
                    "recipe": recipe_sha,
                },
                "tools": tool_versions(),
                "stages": [export_rec, compile_rec],
                "accuracy": {"top1": acc, "reference_top1": ref["top1"], "drop_points": drop,
                             "dataset": splits.evaluation.name, "samples": len(splits.evaluation),
                             "evaluated_on": stand_in.evaluates if stand_in else None},
                "latency": m.to_dict() if m else None,
                "bench_skipped": stand_in.bench if stand_in and opts.bench else None,
                "reference_latency": ref["latency"],
                "budgets": budgets,
                "compression": result.reference.get("compression"),
            }
            with rep.stage(f"{t.name}: release"):
                release_dir = write_release(opts.out / t.name, artifact, onnx, calib, manifest)
            result.results.append(TargetResult(t, release_dir, json.loads((release_dir / "manifest.json").read_text())))
    return result
