"""What every bench script shares: edgepipe's stages composed, and latency in interleaved rounds.

The scripts import it as ``_measure`` (run as ``python bench/bench_*.py``, their folder is first on
sys.path; no script in it is named like an importable package).

- :class:`Workspace` composes ``edgepipe.pipeline.stages``: ``export`` (torch → ONNX, parity-checked),
  ``compile`` (calibrated on the calibration split) and ``evaluate`` (top-1 on the held-out test split, or
  on the backend's stand-in where this machine cannot run the artifact). Every stage goes through
  edgepipe's verified stage cache (``$EDGEPIPE_CACHE_DIR``), so a rerun skips the compiles; ``--no-cache``
  recomputes everything. Nothing here re-implements a stage.
- :func:`interleave` times the compared artifacts with ``edgepipe.harness.measure`` (a fresh worker
  process per measurement, never cached): every round measures every artifact once, group by group, the
  members of a group one after the other and the order within the group rotating from round to round.
  :class:`Rounds` keeps every round's figures; :meth:`Rounds.ratio` divides two artifacts' figures
  *within each round* (measured side by side) and reports the median and the min-max of those ratios.
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.config import Target, target_from_dict
from edgepipe.data import Splits
from edgepipe.harness import BenchSettings, Measurement, measure
from edgepipe.models import ModelSource, state_dict_sha256
from edgepipe.pipeline import stages
from edgepipe.pipeline.cache import Cache
from edgepipe.pipeline.stages import Compressed, Evaluation
from edgepipe.types import Artifact, OnnxModel, StageRecord

# ---------------------------------------------------------------------------------------------------------
# command line


def add_arguments(ap: argparse.ArgumentParser, *, rounds: int, iterations: int | None = None,
                  quick: str = "a smoke run: fewer rounds and iterations") -> None:
    """The options every script takes: --rounds, --iterations (when given a default), --quick, --no-cache."""
    ap.add_argument("--rounds", type=int, default=rounds,
                    help=f"interleaved measurement rounds (default {rounds}); figures are medians over them")
    if iterations is not None:
        ap.add_argument("--iterations", type=int, default=iterations,
                        help=f"timed iterations per measurement (default {iterations})")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--no-cache", action="store_true",
                    help="recompute every stage instead of reusing edgepipe's stage cache ($EDGEPIPE_CACHE_DIR)")


# ---------------------------------------------------------------------------------------------------------
# stages


def target(name: str, backend: str, precision: str, shape: tuple[int, ...], **fields: Any) -> Target:
    """A target built in code (typed and validated like a TOML one): e.g. ``options={...}``,
    ``runtime={"threads": 1}``, ``calibration={"method": "entropy"}``."""
    return target_from_dict({"name": name, "backend": backend, "precision": precision,
                             "input_shape": list(shape), **fields}, f"bench target {name!r}")


def torch_source(module: Any, spec: str) -> ModelSource:
    """An in-memory torch module as a model source (named by ``spec``, hashed by its state dict)."""
    return ModelSource(spec, "torch", module=module.eval(), weights_sha256=state_dict_sha256(module))


def stored_params(model: Any) -> int:
    """Real parameters: a hashed layer counts its buckets (what the ``.epk`` stores), not its expanded weights."""
    n = 0
    for m in model.modules():
        spec = getattr(m, "edgepipe_hash", None)
        for name, p in m.named_parameters(recurse=False):
            n += spec.buckets if (spec is not None and name == "weight") else p.numel()
    return n


@dataclass
class Built:
    """One model compiled for one target: the stages' outputs and records."""

    name: str
    target: Target
    onnx: OnnxModel
    artifact: Artifact
    compile_record: StageRecord
    evaluation: Evaluation | None = None

    @property
    def top1(self) -> float | None:
        """Top-1 on the held-out test split (``None`` when not evaluated)."""
        return self.evaluation.test / 100 if self.evaluation else None

    @property
    def compile_seconds(self) -> float:
        return self.compile_record.seconds

    @property
    def compile_cached(self) -> bool:
        return self.compile_record.cached

    def compile_time(self, width: int = 0) -> str:
        """Compile seconds as printed in the tables: ``cached`` when the stage cache had it."""
        return ("cached" if self.compile_cached else f"{self.compile_seconds:.0f}").rjust(width)


class Workspace:
    """A scratch directory, edgepipe's stage cache and a dataset: export → compile → evaluate."""

    def __init__(self, root: Path, cache: Cache, data: str = "digits") -> None:
        self.root, self.cache, self.data = Path(root), cache, data
        self._names: set[str] = set()

    @classmethod
    @contextmanager
    def temporary(cls, no_cache: bool = False, data: str = "digits") -> Iterator[Workspace]:
        """A workspace in a temporary directory (removed afterwards), with the stage cache unless
        ``no_cache``."""
        with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
            yield cls(Path(tmp), Cache(enabled=not no_cache), data)

    def _dir(self, stage: str, name: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"
        base, n = f"{stage}/{slug}", 1
        while base in self._names:
            n += 1
            base = f"{stage}/{slug}-{n}"
        self._names.add(base)
        return self.root / base

    def splits(self, shape: tuple[int, ...], calibration_samples: int = 256, seed: int = 0,
               samples: int | None = None) -> Splits:
        """The data fitted to ``shape`` (N, C, H, W) and split train/calibration/validation/test.

        ``samples``: use a seeded subset of that many samples (digits: drawn at 8x8, then resized), so
        that large inputs (3x224x224) stay small in memory; the split is then of the subset.
        """
        if samples is None:
            return stages.data_splits(self.data, shape, calibration_samples, seed)
        import numpy as np

        from edgepipe.data import Dataset, digits, fit_to_shape, load_dataset, split

        chw = (int(shape[1]), int(shape[2]), int(shape[3]))
        base = digits((1, 8, 8)) if self.data == "digits" else load_dataset(self.data, chw)
        idx = np.sort(np.random.default_rng(seed).permutation(len(base))[:samples])
        return split(Dataset(f"{base.name}[{len(idx)}]", fit_to_shape(base.x[idx], chw), base.y[idx]),
                     calibration_samples, seed)

    def original(self, model: Any, spec: str = "") -> Compressed:
        """A torch module (or a model source) as the uncompressed model the stages take."""
        src = model if isinstance(model, ModelSource) else torch_source(model, spec or type(model).__name__)
        return stages.original(src)

    def compress(self, source: ModelSource, recipe: Any, splits: Splits,
                 cached: bool = True) -> tuple[Compressed, StageRecord]:
        """``stages.compress`` on a copy of the source's module (the stage changes the module it is given).

        A cache hit gives the model back as a torch.export program, without what techniques attach to
        modules (a hashed layer's seed): pass ``cached=False`` when the live module matters (packing).
        """
        src = copy.copy(source)
        if src.module is not None:
            src.module = copy.deepcopy(src.module)
        return stages.compress(src, recipe, splits, self.cache if cached else Cache(enabled=False))

    def export(self, model: Any, target: Target, splits: Splits, name: str) -> OnnxModel:
        """``stages.export`` of a torch module, a model source or a :class:`Compressed` for ``target``'s
        input shape and batch."""
        compressed = model if isinstance(model, Compressed) else self.original(model, name)
        onnx, _ = stages.export(compressed, target, splits, self._dir("export", name), self.cache)
        return onnx

    def compile(self, onnx: OnnxModel, target: Target, splits: Splits, name: str | None = None,
                evaluate: bool = True) -> Built:
        """``stages.compile`` (calibrated on ``splits``), then ``stages.evaluate`` unless ``evaluate`` is off."""
        name = name or target.name
        art, rec = stages.compile(onnx, target, stages.calibration_set(splits), self._dir("compile", name),
                                  self.cache)
        built = Built(name, target, onnx, art, rec)
        if evaluate:
            built.evaluation = self.evaluate(art, target, splits)
        return built

    def build(self, model: Any, target: Target, splits: Splits, name: str, evaluate: bool = True) -> Built:
        """Export, compile and evaluate in one call."""
        return self.compile(self.export(model, target, splits, name), target, splits, name, evaluate)

    def evaluate(self, artifact: Artifact, target: Target, splits: Splits) -> Evaluation:
        """``stages.evaluate``: top-1 on validation and test (``evaluated_on`` names a stand-in, if any)."""
        ev, _ = stages.evaluate(artifact, target, splits, self.cache)
        return ev

    def onnx_top1(self, onnx: OnnxModel | Path, splits: Splits, threads: int | None = 1) -> float:
        """Test top-1 of an fp32 ONNX file on onnxruntime (the float reference)."""
        path = onnx.path if isinstance(onnx, OnnxModel) else Path(onnx)
        shape = tuple(splits.test.x.shape[1:])
        ref = target("onnx-reference", "onnxruntime", "fp32", (1, *shape), runtime={"threads": threads})
        return self.evaluate(Artifact("onnxruntime", "fp32", path), ref, splits).test / 100


# ---------------------------------------------------------------------------------------------------------
# interleaved latency rounds


@dataclass(frozen=True)
class Subject:
    """One artifact to time: its key in the results, how to time it, and its group (compared members
    of a group are measured one right after the other in every round)."""

    key: Hashable
    artifact: Artifact
    settings: BenchSettings
    group: Hashable = None


#: An extra figure taken right after the harness measured ``subject`` in round ``round``.
Probe = Callable[[Subject, int], float]


@dataclass(frozen=True)
class Ratio:
    """A ratio of two artifacts' figures taken within each round (side by side)."""

    per_round: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.per_round) if self.per_round else float("nan")

    @property
    def min(self) -> float:
        return min(self.per_round) if self.per_round else float("nan")

    @property
    def max(self) -> float:
        return max(self.per_round) if self.per_round else float("nan")


def side_by_side(a: Iterable[float], b: Iterable[float]) -> Ratio:
    """``a / b`` round by round (the two series must come from the same rounds)."""
    return Ratio(tuple(x / y for x, y in zip(a, b, strict=True)))


@dataclass
class Rounds:
    """Every round's figures per subject key: the harness's :class:`Measurement` and any probes."""

    rounds: int
    measurements: dict[Hashable, list[Measurement]] = field(default_factory=dict)
    probes: dict[Hashable, dict[str, list[float]]] = field(default_factory=dict)

    def series(self, key: Hashable, metric: str = "p50_ms") -> list[float]:
        """One figure per round: a probe's, or a :class:`Measurement` field (``p50_ms``, ``min_ms``,
        ``peak_rss_above_baseline_mb``, ``device_memory_mb``, ...)."""
        if metric in self.probes.get(key, {}):
            return self.probes[key][metric]
        return [getattr(m, metric) for m in self.measurements[key]]

    def median(self, key: Hashable, metric: str = "p50_ms") -> float:
        return statistics.median(self.series(key, metric))

    def min(self, key: Hashable, metric: str = "p50_ms") -> float:
        return min(self.series(key, metric))

    def max(self, key: Hashable, metric: str = "p50_ms") -> float:
        return max(self.series(key, metric))

    def ratio(self, a: Hashable, b: Hashable, metric: str = "p50_ms") -> Ratio:
        """``a``'s figure over ``b``'s, round by round. Speed-up of ``key`` over ``base``:
        ``ratio(base, key)``."""
        return side_by_side(self.series(a, metric), self.series(b, metric))


def _groups(subjects: list[Subject]) -> list[list[Subject]]:
    order: dict[Hashable, list[Subject]] = {}
    for s in subjects:
        order.setdefault(s.group, []).append(s)
    return list(order.values())


def interleave(subjects: Iterable[Subject], rounds: int, probes: dict[str, Probe] | None = None,
               label: str = "latency") -> Rounds:
    """Time every subject once per round, in a fresh worker each (``edgepipe.harness.measure``).

    Groups come in the order of their first subject; within a group the order rotates by one each round,
    so no artifact always goes first. ``probes`` are called right after each harness measurement and
    their figures kept per round under their names.
    """
    subs = list(subjects)
    keys = [s.key for s in subs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"subject keys must be unique: {keys}")
    out = Rounds(rounds)
    t0 = time.perf_counter()
    for r in range(rounds):
        for group in _groups(subs):
            k = r % len(group)
            for s in group[k:] + group[:k]:
                out.measurements.setdefault(s.key, []).append(measure(s.artifact, s.settings))
                for name, probe in (probes or {}).items():
                    out.probes.setdefault(s.key, {}).setdefault(name, []).append(probe(s, r))
        print(f"  {label}: round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)
    return out
