"""``build``: one candidate (the given recipe, each target's own settings) for N targets, released."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgepipe._fs import scratch_dir
from edgepipe._progress import NullReporter, Reporter
from edgepipe.config.recipe import Recipe, load_recipe
from edgepipe.errors import BudgetError
from edgepipe.pipeline import candidate, stages
from edgepipe.pipeline.cache import Cache
from edgepipe.pipeline.options import BuildOptions
from edgepipe.types import Manifest


@dataclass
class TargetResult:
    release_dir: Path
    manifest: Manifest

    @property
    def score(self) -> float:
        """The artifact's metric on the test split, in the metric's units."""
        return self.manifest.accuracy.value


@dataclass
class BuildResult:
    model: str
    results: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build(model: str | None, targets: list[str], options: BuildOptions | None = None,
          reporter: Reporter | None = None) -> BuildResult:
    """Build release artifacts of ``model`` for each target into ``options.out/<target>/``.

    A target directory appears only when its build completed; a failure leaves nothing that looks finished.
    """
    from edgepipe.release import write_release

    opts, rep = options or BuildOptions(), reporter or NullReporter()
    with rep.stage("load model"):
        src = stages.source(model, opts.weights)
    tgts = stages.resolve_targets(targets, opts.input_shape or stages.own_input_shape(src), opts.max_metric_drop)
    recipe = opts.recipe if isinstance(opts.recipe, Recipe | None) else load_recipe(opts.recipe)
    result = BuildResult(model=src.spec)
    with scratch_dir("build") as scratch:
        session = candidate.Session(src, opts, Cache(None, enabled=opts.cache), Path(scratch), rep)
        for t in tgts:
            c = candidate.run(session, t, recipe)
            result.notes += c.notes
            drop = c.manifest.budgets.get("max_metric_drop")
            if drop is not None and not drop.ok and not opts.allow_accuracy_drop:
                acc = c.manifest.accuracy
                raise BudgetError(
                    f"target {t.name!r}: {acc.metric} {acc.format(acc.validation_value)} on the validation split is "
                    f"{drop.value:.2f} {acc.unit if acc.unit != '%' else 'points'} worse than the original model's fp32 "
                    f"{acc.format(acc.validation_reference)}, over the budget of {drop.limit}; nothing was released "
                    "(pass --allow-accuracy-drop to release anyway)")
            for key, b in c.manifest.budgets.items():
                if not b.ok and key != "max_metric_drop":
                    result.notes.append(f"{t.name}: {key} budget missed ({b.value:.2f} > {b.limit}) on this machine")
                    rep.note(result.notes[-1])
            with rep.stage(f"{t.name}: release"):
                out = write_release(opts.out / t.name, c.artifact, c.onnx, c.calibration, c.manifest)
            result.results.append(TargetResult(out, Manifest.read(out)))
    return result
