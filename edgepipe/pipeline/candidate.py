"""One candidate on one target: the stages composed, and the manifest assembled from their records.

``build`` runs one candidate per target; ``release`` runs many per target and keeps the best; both call
:func:`run` and write what it returns with :func:`edgepipe.release.write_release`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe._progress import NullReporter, Reporter
from edgepipe.config import Target
from edgepipe.data import Splits
from edgepipe.errors import BenchmarkError
from edgepipe.harness import Measurement
from edgepipe.models import ModelSource
from edgepipe.pipeline import stages
from edgepipe.pipeline.cache import Cache
from edgepipe.pipeline.options import BuildOptions
from edgepipe.pipeline.stages import Compressed
from edgepipe.types import Accuracy, Artifact, CalibrationSet, Manifest, OnnxModel, StageRecord
from edgepipe.versions import tool_versions


@dataclass
class Reference:
    """The original (uncompressed) model in fp32 on onnxruntime: what every budget is measured against."""

    validation: float
    test: float
    latency: Measurement | None
    predictions: stages.Predictions | None = None


@dataclass
class CandidateResult:
    target: Target
    manifest: Manifest
    artifact: Artifact
    onnx: OnnxModel
    calibration: CalibrationSet
    measurement: Measurement | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def qualifies(self) -> bool:
        return self.manifest.budgets_ok


@dataclass
class Session:
    """What the candidates of one build or release share: the source, options, cache, progress, scratch."""

    source: ModelSource
    options: BuildOptions
    cache: Cache
    scratch: Path
    reporter: Reporter = field(default_factory=NullReporter)
    #: held around every measurement: a process pool's workers share one lock, so a machine times one thing
    #: at a time while the other workers compress and compile (default: no lock)
    bench_lock: contextlib.AbstractContextManager[Any] = field(default_factory=contextlib.nullcontext)
    #: the wall-clock (start, end) of each measurement this session made, when noted (a pool worker's)
    bench_spans: list[tuple[float, float]] | None = None
    _compressed: dict[tuple[str, str], tuple[Compressed, StageRecord]] = field(default_factory=dict)
    _references: dict[tuple[Any, ...], Reference] = field(default_factory=dict)
    _scorers: dict[str, stages.Scorer] = field(default_factory=dict)

    def splits(self, target: Target) -> Splits:
        """The data for this target's input shapes and calibration settings."""
        return stages.load_splits(self.options.data, target, self.source)

    def scorer(self, onnx: OnnxModel, splits: Splits) -> stages.Scorer:
        """The model's metric (``--metric``, else top-1 for a classifier), resolved once per output signature."""
        outs = list(onnx.signature.outputs) if onnx.signature is not None else []
        key = repr([o.shape for o in outs])
        if key not in self._scorers:
            self._scorers[key] = stages.resolve_scorer(self.options, outs, splits)
        return self._scorers[key]

    def compressed(self, recipe: Any, splits: Splits) -> tuple[Compressed, StageRecord]:
        key = (recipe.sha256 if recipe else "", stages.data_sha256(splits))
        if key not in self._compressed:
            with self.reporter.stage(f"compress ({recipe.name if recipe else 'none'})"):
                scorer = stages.compress_scorer(self.options, self.source.module, splits) if recipe else None
                self._compressed[key] = stages.compress(self.source, recipe, splits, self.cache, self.reporter,
                                                        scorer=scorer)
        return self._compressed[key]

    def reference(self, target: Target, splits: Splits) -> Reference:
        """The original model's fp32 figures for this target's input, threads and bench settings."""
        key = (repr(target.input_shape), target.dynamic_batch, target.runtime, stages.data_sha256(splits),
               self.options.bench, self.options.iterations, None if self.options.local_bench else target.board)
        if key not in self._references:
            ref_target = dataclasses.replace(target, name=f"{target.name}-reference", backend="onnxruntime",
                                             precision="fp32", options={}, board=None)
            work = self.scratch / f"reference-{len(self._references)}"
            with self.reporter.stage(f"{target.name}: export fp32 reference"):
                onnx, _ = stages.export(stages.original(self.source), ref_target, splits, work, self.cache,
                                        self.options.parity_atol)
            art = Artifact("onnxruntime", "fp32", onnx.path)
            ev, _ = stages.evaluate(art, ref_target, splits, self.cache, self.reporter,
                                    scorer=self.scorer(onnx, splits))
            m = None
            if self.options.bench:
                # a board target's reference is timed on that board, so a speed-up compares like with like
                board = target.board if not self.options.local_bench else None
                where = f"board {board.host}" if board else "here"
                with self.reporter.stage(f"{target.name}: bench fp32 reference ({where})"):
                    try:
                        m, _ = stages.bench(art, dataclasses.replace(ref_target, board=board),
                                            stages.bench_settings(target, self.options.iterations), self.cache,
                                            on_board=board is not None, lock=self.bench_lock,
                                            spans=self.bench_spans)
                    except BenchmarkError as e:
                        if board is None:
                            raise
                        self.reporter.note(f"{target.name}: no speed-up: the fp32 reference (onnxruntime) could not "
                                           f"be timed on the board: {e}")
            self._references[key] = Reference(ev.validation, ev.test, m, ev.predictions)
        return self._references[key]


def run(session: Session, target: Target, recipe: Any = None, candidate: dict[str, Any] | None = None,
        workdir: Path | None = None) -> CandidateResult:
    """Compress → export → compile → evaluate → bench one candidate for ``target``; budgets checked."""
    opts, cache, rep = session.options, session.cache, session.reporter
    work = workdir or session.scratch / target.name
    splits = session.splits(target)
    compressed, compress_rec = session.compressed(recipe, splits)
    ref = session.reference(target, splits)
    with rep.stage(f"{target.name}: export"):
        onnx, export_rec = stages.export(compressed, target, splits, work, cache, opts.parity_atol)
    scorer = session.scorer(onnx, splits)
    calib = stages.calibration_set(splits, scorer, ref.predictions.validation if ref.predictions else None)
    with rep.stage(f"{target.name}: compile ({target.backend} {target.precision})"):
        artifact, compile_rec = stages.compile(onnx, target, calib, work, cache, rep)
    ev, eval_rec = stages.evaluate(artifact, target, splits, cache, rep, scorer=scorer,
                                   reference=ref.predictions)
    notes = []
    if recipe is not None and compressed.is_onnx:
        notes.append(f"{target.name}: model is ONNX: compression recipe skipped (compress the torch model instead)")
    m, records = None, [compress_rec, export_rec, compile_rec, eval_rec]
    if ev.evaluated_on:
        notes.append(f"{target.name}: {ev.metric} measured on {ev.evaluated_on}")
        if opts.bench:
            notes.append(f"{target.name}: not benchmarked: {ev.bench_skipped}")
    elif opts.bench:
        on_board = target.board is not None and not opts.local_bench
        with rep.stage(f"{target.name}: bench ({'board ' + target.board.host if on_board and target.board else 'here'})"):
            m, bench_rec = stages.bench(artifact, target, stages.bench_settings(target, opts.iterations), cache,
                                        on_board=on_board, lock=session.bench_lock, spans=session.bench_spans)
        records.append(bench_rec)
    if m is not None and m.emulated:
        notes.append(f"{target.name}: measured on {m.where}: emulation proves function, not speed"
                     + (" (its latency is not checked against max_latency_ms)" if target.budgets.max_latency_ms else ""))
    for n in notes:
        rep.note(n)
    val_drop, test_drop = ev.drop(ref.validation, ev.validation), ev.drop(ref.test, ev.test)
    budgets = stages.budgets(target, val_drop, m, artifact.size_bytes)
    compressed_score = None
    if recipe is not None and compressed.fp32_validation_top1 is not None and ev.metric == "top1":
        compressed_score = compressed.fp32_validation_top1 * 100
    elif recipe is not None and compressed.fp32_validation and compressed.fp32_validation["measure"] == ev.metric:
        compressed_score = compressed.fp32_validation["value"]
    manifest = Manifest(
        target=target,
        inputs={
            "model": {"spec": session.source.spec, "kind": session.source.kind,
                      "sha256": session.source.weights_sha256},
            "data": {"name": opts.data, "sha256": stages.data_sha256(splits), "splits": splits.counts()},
            "target": target.sha256,
            "recipe": recipe.sha256 if recipe is not None and not session.source.is_onnx else None,
            "calibration_method": target.calibration.method,
        },
        tools=tool_versions(),
        stages=records,
        accuracy=Accuracy(
            metric=ev.metric, value=ev.test, reference=ref.test, drop=test_drop, dataset=splits.test.name,
            samples=ev.test_samples, unit=ev.unit, higher_is_better=ev.higher_is_better,
            compressed=compressed_score, validation_value=ev.validation, validation_reference=ref.validation,
            validation_drop=val_drop, validation_samples=ev.validation_samples, evaluated_on=ev.evaluated_on,
        ),
        budgets=budgets,
        latency=m,
        reference_latency=ref.latency,
        bench_skipped=ev.bench_skipped if opts.bench else None,
        compression=compressed.records if compressed.recipe is not None else None,
        candidate=candidate,
        signature=onnx.signature.to_dict() if onnx.signature is not None else None,
        fidelity=ev.fidelity,
    )
    return CandidateResult(target, manifest, artifact, onnx, calib, m, notes)

