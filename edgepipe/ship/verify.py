"""Accuracy measured where an artifact runs (a board, an image), compared with this host's run of the
same file on the same samples: top-1 on both, how often the answers agree, the largest logit difference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ConfigError

EVAL_FILE = "eval.npz"


def eval_split(release: Path, data: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """The test split a release's top-1 was measured on: ``(x, y, name)``.

    Rebuilt from the manifest (data source, target input shape and split seed) and checked against the
    data hash it records, so a board is verified on exactly the samples the release was judged on. A
    manifest that names its data but records no sha256 of it is refused: whatever that name means on this
    machine (any dataset, folder or file here) would be read and bundled. ``data`` overrides the source
    (e.g. the release was built from a folder that is elsewhere now): the caller's choice, not checked.
    """
    from edgepipe.config.target import target_from_dict
    from edgepipe.pipeline import stages
    from edgepipe.release import MANIFEST
    from edgepipe.types import Manifest

    mf = Path(release) / MANIFEST
    if not mf.is_file():
        raise ConfigError(f"{str(release)!r} is not a release directory (no {MANIFEST}); give a directory "
                          "written by `edgepipe build` or `edgepipe release`")
    m = Manifest.read(mf)
    recorded = m.inputs.get("data") if isinstance(m.inputs, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    source, want = data or recorded.get("name"), recorded.get("sha256")
    if not source:
        raise ConfigError(f"{mf} records no data source; pass the evaluation data explicitly")
    if data is None and not (isinstance(source, str) and isinstance(want, str) and want):
        raise ConfigError(f"{mf} names the data {source!r} but records no sha256 of it, so nothing ties that name "
                          "to the samples the release was evaluated on (here it could read any data on this "
                          "machine); pass the evaluation data explicitly (--data)")
    target = target_from_dict({k: v for k, v in m.target.items() if k != "sha256"}, str(mf))
    splits = stages.load_splits(source, target)
    if data is None and stages.data_sha256(splits) != want:
        raise ConfigError(f"the data {source!r} here is not the data {release} was evaluated on (its sha256 "
                          "differs from the manifest's); pass the data it was built from (--data)")
    return splits.test.x.astype(np.float32), splits.test.y, splits.test.name


def save_eval(dest: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Samples and labels as the .npz the worker evaluates (``x``, ``y``), written atomically."""
    import io

    from edgepipe._fs import write_bytes_atomic

    buf = io.BytesIO()
    np.savez(buf, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    write_bytes_atomic(dest, buf.getvalue())
    return dest


def write_eval(release: Path, dest: Path, data: str | None = None) -> Path:
    """The release's evaluation split (:func:`eval_split`) as that .npz at ``dest``."""
    x, y, _ = eval_split(release, data)
    return save_eval(dest, x, y)


@dataclass(frozen=True)
class Comparison:
    """The same artifact on the same samples, here and there."""

    samples: int
    here_top1: float
    there_top1: float
    agreement: float  # share of samples whose top-1 class is the same in both runs
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    here: str
    there: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.there} vs {self.here} on {self.samples} samples: top-1 {self.there_top1:.2%} vs "
                f"{self.here_top1:.2%}, answers agree on {self.agreement:.2%}, largest logit difference "
                f"{self.max_abs_logit_diff:.4g}")


def compare(here: np.ndarray, there: np.ndarray, y: np.ndarray, here_name: str, there_name: str) -> Comparison:
    """Compare two runs' logits (``[samples, classes]``) on labels ``y``."""
    if here.shape != there.shape:
        raise ConfigError(f"cannot compare logits of shape {here.shape} ({here_name}) with {there.shape} "
                          f"({there_name}): not the same samples")
    from edgepipe import metrics

    d = np.abs(here.astype(np.float64) - there.astype(np.float64))
    return Comparison(
        samples=int(len(y)), here_top1=metrics.score("top1", [here], {"y": y}) / 100,
        there_top1=metrics.score("top1", [there], {"y": y}) / 100,
        agreement=metrics.score("agreement", [there], {metrics.reference_key(0): here}) / 100,
        max_abs_logit_diff=float(d.max()) if d.size else 0.0, mean_abs_logit_diff=float(d.mean()) if d.size else 0.0,
        here=here_name, there=there_name)


def local_logits(release: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """This host's logits for the release's artifact (its own runtime, here), and where they came from."""
    import platform

    from edgepipe import backends
    from edgepipe.evaluate import predict
    from edgepipe.release import artifact_from_release

    art = artifact_from_release(Path(release))
    if art is None:
        raise ConfigError(f"{str(release)!r} is not a release directory (no manifest.json naming an artifact)")
    runner = backends.get(art.backend).load(art, 1)
    return np.asarray(predict(runner, x), np.float32), f"{platform.node()} ({platform.machine()})"
