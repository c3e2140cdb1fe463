"""Accuracy measured where an artifact runs (a board, an image), compared with this host's run of the same file on
the same samples.

The worker there feeds every input of the release's test split and returns every output (it stays numpy-only);
here, the outputs are scored with the release's metric through :mod:`edgepipe.metrics` and compared, output by
output, with this host's run of the same artifact: SQNR (dB) there against here, the largest and mean absolute
difference, and for class scores ``[N, C]`` how often the top-1 classes agree.

Trust. A manifest names its metric but cannot choose code: a built-in metric is used directly; a user metric
(``pkg.mod:obj``), or a postprocess the release was scored after, is computed only when the caller passes it
(``metric=``, ``postprocess=``; ``--metric``, ``--postprocess``), else the report holds fidelity only and says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.errors import BackendUnavailable, ConfigError
from edgepipe.types import Samples

if TYPE_CHECKING:
    from edgepipe.data import Dataset
    from edgepipe.harness import Measurement
    from edgepipe.types import Manifest, TensorSpec

EVAL_FILE = "eval.npz"


def _manifest(release: Path) -> tuple[Manifest, Path]:
    from edgepipe.release import MANIFEST
    from edgepipe.types import Manifest

    mf = Path(release) / MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{str(release)!r} is not a release directory (no {MANIFEST}); give a directory "
                          "written by `edgepipe build` or `edgepipe release`")
    return Manifest.read(mf), mf


def input_names(m: Manifest) -> list[str]:
    """The release's input names, in order (from its signature; a manifest without one: a one-input model)."""
    return [str(t["name"]) for t in (m.signature or {}).get("inputs") or []] or ["input"]


def _input_specs(m: Manifest, target: Any) -> list[TensorSpec]:
    """The inputs the release was evaluated with: its signature's names and dtypes at the target's shapes."""
    from edgepipe.pipeline import stages
    from edgepipe.types import TensorSpec

    sig = [t for t in (m.signature or {}).get("inputs") or [] if isinstance(t, dict) and t.get("name")]
    if not sig:
        return stages.input_specs(None, target)
    names = [str(t["name"]) for t in sig]
    if len(sig) == 1 and not isinstance(target.input_shape, dict):
        shapes = {names[0]: tuple(target.input_shape)}
    else:
        shapes = target.shapes(names)
    return [TensorSpec(n, tuple(shapes[n]), str(t.get("dtype") or "")) for n, t in zip(names, sig, strict=True)]


def eval_data(release: Path, data: str | None = None) -> Dataset:
    """The test split a release's metric was measured on: every input by name, and every target.

    Rebuilt from the manifest (data source, the model's inputs at the target's shapes, split seed) and checked
    against the data hash it records, so a board is verified on exactly the samples the release was judged on. A
    manifest that names its data but records no sha256 of it is refused: whatever that name means on this
    machine (any dataset, folder or file here) would be read and bundled. ``data`` overrides the source (e.g.
    the release was built from a file that is elsewhere now): the caller's choice, not checked.
    """
    from edgepipe.pipeline import stages

    m, mf = _manifest(release)
    recorded = m.inputs.get("data") if isinstance(m.inputs, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    source, want = data or recorded.get("name"), recorded.get("sha256")
    if not source:
        raise ConfigError(f"{mf} records no data source; pass the evaluation data explicitly")
    if data is None and not (isinstance(source, str) and isinstance(want, str) and want):
        raise ConfigError(f"{mf} names the data {source!r} but records no sha256 of it, so nothing ties that name "
                          "to the samples the release was evaluated on (here it could read any data on this "
                          "machine); pass the evaluation data explicitly (--data)")
    target = m.target
    splits = stages.data_splits(source, _input_specs(m, target), target.calibration.samples, target.calibration.seed)
    if data is None and stages.data_sha256(splits) != want:
        raise ConfigError(f"the data {source!r} here is not the data {release} was evaluated on (its sha256 "
                          "differs from the manifest's); pass the data it was built from (--data)")
    return splits.test


def eval_split(release: Path, data: str | None = None) -> tuple[Samples, np.ndarray | None, str]:
    """:func:`eval_data` as ``(x, y, name)``: the inputs (one array, or arrays by input name) and labels ``y``."""
    split = eval_data(release, data)
    return split.x, split.y, split.name


def save_eval(dest: Path, x: Samples, y: np.ndarray | None = None,
              targets: dict[str, np.ndarray] | None = None) -> Path:
    """Samples and targets as the .npz the worker evaluates, written atomically: a one-input model's array as
    ``x``, several inputs each under its name, the labels as ``y`` and every other target under its name."""
    import io

    from edgepipe._fs import write_bytes_atomic

    arrays = dict(x) if isinstance(x, dict) else {"x": np.asarray(x)}
    tg = {**({"y": y} if y is not None else {}), **(targets or {})}
    clash = sorted(set(arrays) & set(tg))
    if clash:
        raise ConfigError(f"the evaluation data has an input and a target both named {clash[0]!r}; rename the target")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in {**arrays, **tg}.items()})
    write_bytes_atomic(dest, buf.getvalue())
    return dest


def write_eval(release: Path, dest: Path, data: str | None = None) -> Path:
    """The release's evaluation split (:func:`eval_data`) as that .npz at ``dest``."""
    split = eval_data(release, data)
    return save_eval(dest, split.x, split.y, split.targets)


def read_eval(path: Path, release: Path) -> tuple[Samples, dict[str, np.ndarray]]:
    """An evaluation .npz (:func:`save_eval`) back as ``(inputs, targets)`` for ``release``'s inputs: bounded
    before anything is unpacked (:func:`edgepipe.data.check_npz`); a one-input model's array may be ``x``."""
    from edgepipe.data import check_npz

    check_npz(Path(path))
    m, _ = _manifest(release)
    names = input_names(m)
    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    x: dict[str, np.ndarray] = {}
    for n in names:
        key = next((a for a in [n] + (["x", "input"] if len(names) == 1 else []) if a in arrays), None)
        if key is None:
            raise ConfigError(f"{path} holds no array for the release's input {n!r} (it holds "
                              f"{', '.join(sorted(arrays)) or 'nothing'}); build the image again")
        x[n] = arrays.pop(key)
    return (x[names[0]] if len(names) == 1 else x), arrays


# ---------------------------------------------------------------------------------------------------------
# the comparison: the same artifact on the same samples, here and there


def _class_scores(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] >= 2 and np.issubdtype(a.dtype, np.floating)


@dataclass(frozen=True)
class OutputComparison:
    """One output there against the same output here."""

    name: str
    shape: list[int]
    sqnr_db: float | None  # there against here (here is the reference); None where undefined (nan or inf)
    max_abs_diff: float
    mean_abs_diff: float
    agreement: float | None = None  # class scores [N, C]: share of samples whose top-1 class is the same


@dataclass(frozen=True)
class Comparison:
    """The same artifact on the same samples, here and there, output by output.

    ``agreement``, ``max_abs_logit_diff`` and ``mean_abs_logit_diff`` are the first class-score output's (any
    output's for the differences); ``here_top1`` and ``there_top1`` are set for a classifier with labels ``y``.
    """

    samples: int
    here: str
    there: str
    outputs: list[OutputComparison] = field(default_factory=list)
    agreement: float | None = None
    max_abs_logit_diff: float = 0.0
    mean_abs_logit_diff: float = 0.0
    here_top1: float | None = None
    there_top1: float | None = None

    @property
    def min_sqnr_db(self) -> float | None:
        known = [o.sqnr_db for o in self.outputs if o.sqnr_db is not None]
        return min(known) if known else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_sqnr_db": self.min_sqnr_db}

    def summary(self) -> str:
        parts = [f"{self.there} vs {self.here} on {self.samples} samples:"]
        if self.here_top1 is not None and self.there_top1 is not None:
            parts.append(f"top-1 {self.there_top1:.2%} vs {self.here_top1:.2%},")
        if self.agreement is not None:
            parts.append(f"answers agree on {self.agreement:.2%},")
        if self.min_sqnr_db is not None:
            parts.append(f"SQNR {self.min_sqnr_db:.1f} dB (worst output),")
        parts.append(f"largest difference {self.max_abs_logit_diff:.4g}")
        return " ".join(parts)


def _as_list(a: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in a] if isinstance(a, list | tuple) else [np.asarray(a)]


def _top1(scores: np.ndarray, targets: dict[str, np.ndarray]) -> float | None:
    """Top-1 (0..1) of class scores against integer labels ``y``, through the registry; None without them."""
    from edgepipe import metrics

    y = targets.get("y")
    if y is None or np.asarray(y).ndim != 1 or not _class_scores(scores):
        return None
    try:
        return metrics.score("top1", [scores], {"y": y}) / 100
    except ConfigError:  # not labels of these classes
        return None


def compare(here: np.ndarray | list[np.ndarray], there: np.ndarray | list[np.ndarray],
            targets: dict[str, np.ndarray] | np.ndarray | None, here_name: str, there_name: str,
            names: list[str] | None = None) -> Comparison:
    """Compare two runs' outputs (in the model's order; one array: a one-output model's) on the same samples.

    Args:
        here: this host's outputs (the reference of the SQNR).
        there: the outputs where it ran.
        targets: the split's targets by name (or the labels ``y`` alone); only ``y`` is read, for top-1.
        here_name: where ``here`` ran, in words.
        there_name: where ``there`` ran, in words.
        names: the outputs' names (default ``output_0``, ...).
    """
    from edgepipe import metrics

    hs, ts = _as_list(here), _as_list(there)
    tg = targets if isinstance(targets, dict) else ({} if targets is None else {"y": np.asarray(targets)})
    if len(hs) != len(ts) or any(h.shape != t.shape for h, t in zip(hs, ts, strict=False)):
        shapes = [list(o.shape) for o in hs], [list(o.shape) for o in ts]
        raise ConfigError(f"cannot compare outputs {shapes[0]} ({here_name}) with {shapes[1]} ({there_name}): not the "
                          "same model on the same samples")
    names = names if names and len(names) == len(hs) else [f"output_{i}" for i in range(len(hs))]
    per: list[OutputComparison] = []
    for name, h, t in zip(names, hs, ts, strict=True):
        d = np.abs(h.astype(np.float64) - t.astype(np.float64))
        try:
            sqnr: float | None = metrics.sqnr_per_output([t], [h])[0]
        except ConfigError:  # nan or inf in either
            sqnr = None
        agree = (metrics.score("agreement", [t], {metrics.reference_key(0): h}) / 100
                 if _class_scores(h) and len(h) else None)
        per.append(OutputComparison(name, list(h.shape), sqnr, float(np.nanmax(d)) if d.size else 0.0,
                                    float(np.nanmean(d)) if d.size else 0.0, agree))
    first = next((o for o in per if o.agreement is not None), None)
    return Comparison(
        samples=int(len(hs[0])) if hs else 0, here=here_name, there=there_name, outputs=per,
        agreement=first.agreement if first else None,
        max_abs_logit_diff=max((o.max_abs_diff for o in per), default=0.0),
        mean_abs_logit_diff=first.mean_abs_diff if first else (per[0].mean_abs_diff if per else 0.0),
        here_top1=_top1(hs[0], tg) if len(hs) == 1 else None, there_top1=_top1(ts[0], tg) if len(ts) == 1 else None)


def local_outputs(release: Path, x: Samples) -> tuple[list[np.ndarray], str]:
    """This host's outputs for the release's artifact (its own runtime, here), and where they came from."""
    import platform

    from edgepipe import backends
    from edgepipe.evaluate import outputs
    from edgepipe.release import artifact_from_release

    art = artifact_from_release(Path(release))
    if art is None:
        raise ConfigError(f"{str(release)!r} is not a release directory (no manifest.json naming an artifact)")
    runner = backends.get(art.backend).load(art, 1)
    return outputs(runner, x), f"{platform.node()} ({platform.machine()})"


def local_logits(release: Path, x: Samples) -> tuple[np.ndarray, str]:
    """This host's first output for the release's artifact, one row per sample (a classifier's logits)."""
    outs, where = local_outputs(release, x)
    return np.asarray(outs[0]).reshape(len(outs[0]), -1), where


# ---------------------------------------------------------------------------------------------------------
# the metric: the manifest names it, the caller chooses code


@dataclass(frozen=True)
class MetricChoice:
    """What the outputs are scored with (``spec``, ``postprocess``), or why they are not (``skipped``).

    ``matches_release``: the metric and postprocess are the ones the release was scored with (same specs, same
    source code), so ``value`` and the manifest's value are the same measure.
    """

    spec: str
    postprocess: str | None = None
    skipped: str | None = None
    matches_release: bool = True


def _recorded_metric_key(m: Manifest) -> str | None:
    for s in m.stages:
        if s.name == "evaluate" and isinstance(s.inputs, dict) and isinstance(s.inputs.get("metric"), str):
            return s.inputs["metric"]
    return None


def choose_metric(m: Manifest, metric: str | None = None, postprocess: str | None = None) -> MetricChoice:
    """The metric to score a release's outputs with: the caller's, else the manifest's when it is built in.

    A user metric or postprocess is code; a manifest cannot choose code, so one the manifest names is not run
    (``skipped`` says so and what to pass). A metric the caller names is loaded now: an unknown one is a
    ``ConfigError`` before any work.
    """
    from edgepipe import metrics
    from edgepipe.pipeline.stages import Scorer

    spec = metric or m.accuracy.metric
    if not metric and ":" in spec:
        return MetricChoice(spec, postprocess, f"the release is scored by the user metric {spec!r}, which is code "
                            "that a manifest cannot choose: pass --metric "
                            f"{spec} (metric=) to compute it; fidelity only")
    metrics.get(spec)  # unknown, or a user module that does not import: one line, now
    if postprocess:
        metrics.get_postprocess(postprocess)
    recorded = _recorded_metric_key(m)
    same = recorded is None or Scorer(spec, postprocess).key == recorded
    if not same and not metric and not postprocess and spec == m.accuracy.metric:
        return MetricChoice(spec, None, f"the release's metric {spec!r} was scored after a postprocess, which is code "
                            "that a manifest cannot choose: pass --postprocess (the one it was built with; "
                            "postprocess=) to compute it; fidelity only", matches_release=False)
    return MetricChoice(spec, postprocess, None, same and spec == m.accuracy.metric)


def verified(m: Measurement, release: Path, x: Samples, targets: dict[str, np.ndarray], *,
             metric: str | None = None, postprocess: str | None = None) -> Measurement:
    """``m`` with its eval record's outputs scored with the release's metric and compared with this host's run.

    Args:
        m: a measurement whose ``eval`` holds the worker's outputs (``worker.evaluate``).
        release: the release directory (its manifest names the metric; its artifact is run here to compare).
        x: the inputs the worker was given, as :func:`eval_data` has them.
        targets: the split's targets by name (``y`` and any other).
        metric: the metric to score with instead of the manifest's (needed for a user metric: code).
        postprocess: the postprocess to run before it (needed when the release was scored after one).

    Returns:
        ``m`` whose ``eval`` holds the samples, each output's name, shape and dtype, the metric's ``value``
        (``release_value``: the manifest's on the whole test split), top-1 for a classifier with labels, and the
        ``comparison`` (or why it was skipped); the outputs' bytes are dropped.
    """
    from edgepipe import metrics
    from edgepipe.errors import BenchmarkError
    from edgepipe.harness.worker import decode_outputs
    from edgepipe.types import take

    man, _ = _manifest(release)
    ev = dict(m.eval or {})
    if "outputs" not in ev and "logits" not in ev:
        raise BenchmarkError("the worker returned no outputs to verify")
    there = decode_outputs(ev)
    n = int(ev.get("samples", len(there[0])))
    total = int(ev.get("of", n))
    sig_outs = [str(o.get("name")) for o in (man.signature or {}).get("outputs") or [] if isinstance(o, dict)]
    sent = [str(o["name"]) for o in ev["outputs"]] if "outputs" in ev else ["output_0"]
    names = sig_outs if len(sig_outs) == len(there) else sent
    x_n = take(x, slice(0, n))
    tg = {k: np.asarray(v)[:n] for k, v in targets.items()}
    for k in ("outputs", "logits", "top1"):
        ev.pop(k, None)
    ev["samples"], ev["of"] = n, total
    ev["outputs"] = [{"name": nm, "shape": list(o.shape), "dtype": o.dtype.name}
                     for nm, o in zip(names, there, strict=True)]
    ev["note"] = (None if n == total else
                  f"the outputs of the first {n} of {total} samples fit the reply limit; the figures here are over "
                  f"those {n}, the release's over all {total}")
    acc = man.accuracy
    choice = choose_metric(man, metric, postprocess)
    ev.update(metric=choice.spec, value=None, unit=None, release_metric=acc.metric,
              release_value=acc.value if choice.spec == acc.metric else None, metric_skipped=choice.skipped,
              metric_matches_release=choice.matches_release)
    if choice.skipped is None:
        found = metrics.get(choice.spec)
        ev["unit"] = found.unit
        if found.reference:
            ev["metric_skipped"] = (f"metric {choice.spec!r} compares with the fp32 model, which is not at hand "
                                    "where it runs; the comparison is the fidelity to this host's run")
        else:
            try:
                ev["value"] = metrics.score(found, there, tg, choice.postprocess)
            except metrics.MetricError as e:  # the comparison below still says how close the outputs are
                ev["metric_skipped"] = str(e).splitlines()[0]
    ev["top1"] = _top1(there[0], tg) if len(there) == 1 else None
    ev["release_top1"] = acc.value / 100 if acc.metric == "top1" else None
    try:
        here, here_name = local_outputs(release, x_n)
        ev["comparison"] = compare(here, there, tg, here_name, m.where, names).to_dict()
        ev["comparison_skipped"] = None
    except (BackendUnavailable, ImportError) as e:  # this host cannot run the artifact: the metric only
        ev["comparison"] = None
        ev["comparison_skipped"] = f"this host cannot run the artifact to compare: {e}"
    return dataclasses.replace(m, eval=ev)
