"""The release search: per target, run candidates (recipe × quantization settings), keep the best.

A candidate qualifies when it meets every budget of its target (accuracy drop on the validation split
against the original model, latency, memory, size). The choice is the fastest qualifying candidate on
the target's own runtime; candidates whose p50 is within ``noise`` (a fraction, 5 % by default) of the
fastest tie, and ties go to the smaller artifact (sizes within 1 % tie), then the more accurate on
validation, then the lower candidate id, so the same measurements always choose the same candidate. A list-only space is run
exhaustively; a space with ranges, or more combinations than ``max_trials``, is sampled by Optuna
(seeded TPE or NSGA-II over validation accuracy, latency and size), its study kept in a journal file so
a killed release resumes.

Where the candidates run is an :mod:`executor <edgepipe.pipeline.executors>` (in this process by default,
or a Ray cluster); the sampler stays here, asking for ``executor.batch_size`` trials before telling, so
the same batch size chooses the same candidates on any executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe import backends
from edgepipe.config import Target
from edgepipe.config.recipe import Recipe, load_recipe
from edgepipe.config.search import TARGET_KEYS, Range, SearchSpace
from edgepipe.errors import ConfigError, EdgepipeError
from edgepipe.pipeline.candidate import CandidateResult, Session
from edgepipe.pipeline.executors import Executor, Job, LocalExecutor


@dataclass
class Candidate:
    """One point of the search space for one target."""

    id: str
    recipe: str
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        return " ".join([f"recipe={self.recipe}", *(f"{k}={v}" for k, v in sorted(self.settings.items()))])

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "recipe": self.recipe, "settings": self.settings}


@dataclass
class Tried:
    """A candidate and what became of it: its result, or why it could not be built."""

    candidate: Candidate
    result: CandidateResult | None = None
    error: str | None = None
    pareto: bool = False
    host: str | None = field(default=None, compare=False)  # the machine it ran on (not in released files)
    node: str | None = field(default=None, compare=False)  # the executor's node id ("local" here)

    @property
    def qualifies(self) -> bool:
        return self.result is not None and self.result.qualifies

    @property
    def p50_ms(self) -> float | None:
        lat = self.result.manifest.latency if self.result else None
        return lat.p50_ms if lat is not None else None

    @property
    def size_bytes(self) -> int | None:
        return self.result.artifact.size_bytes if self.result else None

    @property
    def validation(self) -> float | None:
        """The metric on the validation split, in its units."""
        return self.result.manifest.accuracy.validation_value if self.result else None

    @property
    def goodness(self) -> float:
        """The validation metric with higher always better (for choosing); -inf when not built."""
        if self.result is None or self.validation is None:
            return float("-inf")
        return self.validation if self.result.manifest.accuracy.higher_is_better else -self.validation

    def misses(self) -> dict[str, dict[str, float]]:
        if self.result is None:
            return {}
        return {k: {"value": b.value, "limit": b.limit} for k, b in self.result.manifest.budgets.items() if not b.ok}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {**self.candidate.to_dict(), "qualifies": self.qualifies, "pareto": self.pareto}
        if self.result is None:
            return {**d, "error": self.error}
        acc = self.result.manifest.accuracy
        lat = self.result.manifest.latency
        fid = self.result.manifest.fidelity or {}
        return {**d, "validation": acc.validation_value, "validation_drop": acc.validation_drop,
                "test": acc.value, "test_drop": acc.drop, "sqnr_db": fid.get("sqnr_db"),
                "flip_rate": fid.get("flip_rate"), "p50_ms": lat.p50_ms if lat else None,
                "peak_memory_mb": lat.peak_rss_above_baseline_mb if lat else None, "size_bytes": self.size_bytes,
                # "qemu-user": timed under emulation, which proves function only (never a board's latency)
                "emulated": lat.emulated if lat else None,
                "missed": self.misses()}


@dataclass
class TargetOutcome:
    """What the search found for one target."""

    target: Target
    status: str  # "released", "failed" (no candidate meets the budgets) or "skipped" (cannot build here)
    tried: list[Tried] = field(default_factory=list)
    chosen: Tried | None = None
    reason: str | None = None
    release_dir: Path | None = None
    #: the finalists re-timed together before the choice (a Retiming), or why they were not
    retiming: Any = None
    retime_skipped: str | None = None


#: Called as a candidate moves on: (target name, candidate id, label, status, detail).
Progress = Callable[[str, str, str, str, str], None]


def candidate_target(target: Target, settings: dict[str, Any]) -> Target:
    """``target`` with a candidate's settings applied; ``ConfigError`` when the backend refuses them."""
    kw: dict[str, Any] = {}
    calib: dict[str, Any] = {}
    opts: dict[str, Any] = {}
    for k, v in settings.items():
        if k not in TARGET_KEYS:
            opts[k] = tuple(v) if isinstance(v, list) else v
            continue
        tp, where, name = TARGET_KEYS[k]
        value = tp(v) if tp in (int, bool) else v
        (kw if where == "target" else calib)[name] = value
    if calib:
        kw["calibration"] = dataclasses.replace(target.calibration, **calib)
    if opts:
        kw["options"] = dataclasses.replace(target.options, **opts)
    t = dataclasses.replace(target, **kw) if kw else target
    backends.get(t.backend).validate(t)
    return t


def _recipes(space: SearchSpace) -> dict[str, Recipe | None]:
    return {name: (None if name == "none" else load_recipe(name)) for name in space.all_recipes}


def _job(target: Target, c: Candidate, recipes: dict[str, Recipe | None], space: SearchSpace,
         workroot: Path) -> Job | Tried:
    """The candidate as a job for an executor, or a failed try when the backend refuses its settings."""
    try:
        t = candidate_target(target, c.settings)
    except EdgepipeError as e:
        return Tried(c, error=str(e))
    info = {**c.to_dict(), "search": space.name, "search_sha256": space.sha256}
    return Job(t, recipes[c.recipe], info, workroot / target.name / c.id)


def _run_batch(session: Session, target: Target, cs: list[Candidate], recipes: dict[str, Recipe | None],
               space: SearchSpace, workroot: Path, executor: Executor) -> list[Tried]:
    """Run candidates ``cs`` with ``executor``; their tries in the same order."""
    pre = [_job(target, c, recipes, space, workroot) for c in cs]
    jobs = [p for p in pre if isinstance(p, Job)]
    results = iter(executor.run(session, jobs) if jobs else [])
    out = []
    for c, p in zip(cs, pre, strict=True):
        if isinstance(p, Tried):
            out.append(p)
        else:
            r = next(results)
            out.append(Tried(c, r.result, r.error, host=r.host, node=r.node))
    return out


def _run(session: Session, target: Target, c: Candidate, recipes: dict[str, Recipe | None],
         space: SearchSpace, workroot: Path, executor: Executor | None = None) -> Tried:
    return _run_batch(session, target, [c], recipes, space, workroot, executor or LocalExecutor())[0]


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i:i + n] for i in range(0, len(items), max(1, n))]


def _grid(space: SearchSpace, backend: str) -> list[Candidate]:
    return [Candidate(f"c{i:02d}", r, s) for i, (r, s) in enumerate(space.grid(backend))]


def _sampled(session: Session, target: Target, space: SearchSpace, recipes: dict[str, Recipe | None],
             workroot: Path, progress: Progress, executor: Executor) -> list[Tried]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space_b = space.for_backend(target.backend)
    journal = workroot / f"optuna-{target.name}.log"
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    sampler = (optuna.samplers.NSGAIISampler(seed=space.seed) if space.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=space.seed))
    study = optuna.create_study(study_name=f"{target.name}-{space.sha256[:12]}", storage=storage, sampler=sampler,
                                directions=["maximize", "minimize", "minimize"], load_if_exists=True)

    def suggest(trial: Any) -> Candidate:
        settings: dict[str, Any] = {}
        for k, v in sorted(space_b.items()):
            if isinstance(v, Range):
                if v.integer:
                    settings[k] = trial.suggest_int(k, int(v.low), int(v.high), step=int(v.step or 1), log=v.log)
                else:
                    settings[k] = trial.suggest_float(k, v.low, v.high, step=v.step, log=v.log)
            else:
                settings[k] = v[trial.suggest_categorical(k, list(range(len(v))))]
        names = space.recipes_for(target.backend)
        recipe = names[trial.suggest_categorical("recipe", list(range(len(names))))]
        return Candidate(f"t{trial.number:02d}", recipe, settings)

    def figures(t: Tried) -> tuple[float, float, float]:
        if t.result is None:
            return (0.0, float("inf"), float("inf"))
        return (t.goodness, t.p50_ms if t.p50_ms is not None else 0.0, float(t.size_bytes or 0))

    tried: list[Tried] = []
    # trials a killed run finished are replayed through the stage cache (seconds), not re-measured
    done = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                  key=lambda x: x.number)
    for chunk in _chunks([suggest(optuna.trial.FixedTrial(ft.params, ft.number)) for ft in done],
                         executor.batch_size):
        for c in chunk:
            progress(target.name, c.id, c.label, "running", "resumed")
        for t in _run_batch(session, target, chunk, recipes, space, workroot, executor):
            tried.append(t)
            _report(progress, target, t)
    while len(tried) < space.max_trials:
        # ask a batch, run it (in parallel where the executor can), tell each: the sampler stays here
        trials = [study.ask() for _ in range(min(executor.batch_size, space.max_trials - len(tried)))]
        cs = [suggest(trial) for trial in trials]
        for c in cs:
            progress(target.name, c.id, c.label, "running", "")
        for trial, t in zip(trials, _run_batch(session, target, cs, recipes, space, workroot, executor),
                            strict=True):
            study.tell(trial, list(figures(t)))
            tried.append(t)
            _report(progress, target, t)
    return tried


def _report(progress: Progress, target: Target, t: Tried) -> None:
    if t.result is None:
        progress(target.name, t.candidate.id, t.candidate.label, "error", t.error or "")
        return
    acc = t.result.manifest.accuracy
    lat = f", {t.p50_ms:.3f} ms" if t.p50_ms is not None else ""
    detail = f"val {acc.metric} drop {acc.validation_drop or 0.0:+.2f}{lat}, {(t.size_bytes or 0) / 1024:.0f} KiB"
    progress(target.name, t.candidate.id, t.candidate.label, "ok" if t.qualifies else "misses", detail)


def pareto_front(tried: list[Tried]) -> None:
    """Mark the candidates no other candidate beats on the validation metric, latency and size at once."""
    pts = [(t, (-t.goodness, t.p50_ms if t.p50_ms is not None else 0.0, float(t.size_bytes or 0)))
           for t in tried if t.result is not None]
    for t, a in pts:
        t.pareto = not any(all(x <= y for x, y in zip(b, a, strict=True)) and b != a for _, b in pts)


SIZE_TIE = 0.01  # sizes within 1 % tie (a few bytes of Q/DQ metadata are not a reason to lose accuracy)


def choose(tried: list[Tried], noise: float, speed: dict[str, float] | None = None) -> Tried | None:
    """The fastest qualifying candidate; within ``noise`` of it: the smaller (within 1 %), then the more
    accurate on validation, then the lower id.

    Args:
        tried: every candidate of one target.
        noise: latencies within this fraction of the fastest tie.
        speed: the finalists' figures from re-timing them together (:meth:`Retiming.score`, lower is faster),
            by candidate id: then only they compete, on these figures instead of their own p50.
    """
    ok = [t for t in tried if t.qualifies]
    if speed:
        ok = [t for t in ok if t.candidate.id in speed] or ok
    if not ok:
        return None

    def figure(t: Tried) -> float | None:
        return speed[t.candidate.id] if speed and t.candidate.id in speed else t.p50_ms

    timed = [f for f in map(figure, ok) if f is not None]
    if timed:
        fastest = min(timed)
        ok = [t for t in ok if (f := figure(t)) is not None and f <= fastest * (1 + noise)]
    smallest = min(t.size_bytes or 0 for t in ok)
    ok = [t for t in ok if (t.size_bytes or 0) <= smallest * (1 + SIZE_TIE)]
    return min(ok, key=lambda t: (-t.goodness, t.size_bytes or 0, t.candidate.id))


def closest_miss(tried: list[Tried]) -> str:
    """A line naming the candidate closest to qualifying and by how much it misses each budget."""
    built = [t for t in tried if t.result is not None]
    if not built:
        errors = sorted({t.error for t in tried if t.error})
        return "no candidate could be built: " + "; ".join(errors[:3])

    def score(t: Tried) -> float:
        return sum((m["value"] - m["limit"]) / (m["limit"] or 1.0) for m in t.misses().values())

    best = min(built, key=lambda t: (score(t), t.candidate.id))
    acc = best.result.manifest.accuracy if best.result else None
    units = {"max_metric_drop": f"{acc.metric} {'points' if acc.unit == '%' else acc.unit}".strip() if acc else "",
             "max_latency_ms": "ms", "max_memory_mb": "MB", "max_size_mb": "MB"}
    parts = [f"{k} by {m['value'] - m['limit']:.3g} {units.get(k, '')} ({m['value']:.3g} > {m['limit']})"
             for k, m in best.misses().items()]
    return f"no candidate meets the budgets; closest is {best.candidate.id} ({best.candidate.label}), which misses " \
           + ", ".join(parts)


def search_target(session: Session, target: Target, space: SearchSpace, workroot: Path,
                  progress: Progress, executor: Executor | None = None) -> TargetOutcome:
    """Run the search space for one target and choose; never raises for a candidate's failure.

    A grid goes to the executor whole when it runs candidates in parallel, else one at a time."""
    ex = executor or LocalExecutor()
    try:
        recipes = _recipes(space)
    except ConfigError as e:
        raise ConfigError(f"search {space.name!r}: {e}") from None
    if space.is_sampled(target.backend):
        tried = _sampled(session, target, space, recipes, workroot, progress, ex)
    else:
        tried = []
        grid = _grid(space, target.backend)
        for chunk in _chunks(grid, len(grid) if ex.batch_size > 1 else 1):
            for c in chunk:
                progress(target.name, c.id, c.label, "running", "")
            for t in _run_batch(session, target, chunk, recipes, space, workroot, ex):
                tried.append(t)
                _report(progress, target, t)
    pareto_front(tried)
    chosen = choose(tried, space.noise)
    if chosen is None:
        return TargetOutcome(target, "failed", tried, None, f"{target.name}: {closest_miss(tried)}")
    out = TargetOutcome(target, "released", tried, chosen)
    group = finalists(tried, space)
    if len(group) < 2:
        return out
    ids = [t.candidate.id for t in group]
    progress(target.name, "-", "", "running", f"re-timing the finalists together: {', '.join(ids)}")
    from edgepipe.pipeline import stages

    try:
        out.retiming, _ = stages.retime(ids, [t.result.artifact for t in group if t.result], target,
                                        stages.bench_settings(target, session.options.iterations), session.cache,
                                        space.retime_rounds, on_board=not session.options.local_bench,
                                        lock=session.bench_lock)
    except EdgepipeError as e:  # the choice stands on the candidates' own figures, and says why
        out.retime_skipped = f"the finalists could not be re-timed together: {e}"
        session.reporter.note(f"{target.name}: {out.retime_skipped}")
        return out
    out.chosen = choose(tried, space.noise, out.retiming.score()) or chosen
    return out


def finalists(tried: list[Tried], space: SearchSpace) -> list[Tried]:
    """The qualifying candidates worth re-timing together: timed where they run (not emulated), within
    ``space.finalist_margin`` of the fastest one's p50, the fastest ``space.finalists`` of them."""
    ok = [t for t in tried if t.qualifies and t.p50_ms is not None and t.result is not None
          and not (t.result.manifest.latency is not None and t.result.manifest.latency.emulated)]
    if space.finalists < 2 or len(ok) < 2:
        return []
    fastest = min(t.p50_ms for t in ok if t.p50_ms is not None)
    near = [t for t in ok if t.p50_ms is not None and t.p50_ms <= fastest * (1 + space.finalist_margin)]
    return sorted(near, key=lambda t: (t.p50_ms, t.candidate.id))[:space.finalists]


@dataclass
class ReleaseResult:
    """A whole release: one outcome per target, where it was written, and how long it took."""

    out: Path
    model: str
    space: SearchSpace
    outcomes: list[TargetOutcome]
    wall_seconds: float = 0.0
    stages_total: int = 0
    stages_cached: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TargetOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def _resolve(specs: list[str], input_shape: tuple[int, ...] | None,
             max_metric_drop: float | None = None) -> list[Target | TargetOutcome]:
    """Each target, or a skipped outcome saying why it cannot be built here (others go on)."""
    from edgepipe.config import load_target, target_files
    from edgepipe.pipeline.stages import resolve_targets

    names = sorted(target_files()) if specs == ["all"] else specs
    out: list[Target | TargetOutcome] = []
    for spec in names:
        t = load_target(spec)  # a bad target file or name stops the release: it is the user's typo
        try:
            out.append(resolve_targets([t], input_shape, max_metric_drop)[0])
        except EdgepipeError as e:
            out.append(TargetOutcome(t, "skipped", reason=str(e)))
    if len({(o.name if isinstance(o, Target) else o.target.name) for o in out}) != len(out):
        raise ConfigError(f"target given twice: {names}")
    return out


def release(model: str | None, targets: list[str], space: SearchSpace, out: Path, options: Any,
            reporter: Any = None, progress: Progress | None = None,
            executor: Executor | None = None) -> ReleaseResult:
    """Search every target, write each chosen candidate's release, then index.json, SHA256SUMS, report.

    ``executor``: where candidates run (default: here, one after another); it is checked against the
    targets (a board's resource, say) before any work. Only this process writes the release."""
    import time

    from edgepipe._fs import scratch_dir
    from edgepipe._progress import NullReporter
    from edgepipe.pipeline.cache import Cache
    from edgepipe.pipeline.stages import own_input_shape, source
    from edgepipe.release import write_release, write_release_index

    t0 = time.perf_counter()
    rep = reporter or NullReporter()
    prog = progress or (lambda *a: None)
    src = source(model, options.weights)
    resolved = _resolve(targets, options.input_shape or own_input_shape(src), options.max_metric_drop)
    ex = executor or LocalExecutor()
    ex.check([t for t in resolved if isinstance(t, Target)], options)
    outcomes: list[TargetOutcome] = []
    workroot = out / ".work"
    with scratch_dir("release") as scratch:
        session = Session(src, options, Cache(None, enabled=options.cache), Path(scratch), rep)
        for item in resolved:
            if isinstance(item, TargetOutcome):
                rep.note(f"{item.target.name}: skipped: {item.reason}")
                prog(item.target.name, "-", "", "skipped", item.reason or "")
                outcomes.append(item)
                continue
            o = search_target(session, item, space, workroot, prog, ex)
            if o.chosen is not None and o.chosen.result is not None:
                r = o.chosen.result
                o.release_dir = write_release(out / item.name, r.artifact, r.onnx, r.calibration, r.manifest)
            else:
                rep.note(o.reason or f"{item.name}: failed")
            outcomes.append(o)
    result = ReleaseResult(out, src.spec, space, outcomes, time.perf_counter() - t0)
    for o in outcomes:
        for t in o.tried:
            if t.result is not None:
                recs = t.result.manifest.stages
                result.stages_total += len(recs)
                result.stages_cached += sum(1 for s in recs if s.cached or s.skipped)
    write_release_index(result)
    return result
