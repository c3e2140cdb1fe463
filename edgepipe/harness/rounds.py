"""Re-time several artifacts together, so that a noisy machine cannot decide between them.

Timing candidates one at a time, minutes apart, compares the machine's load at two moments as much as the
artifacts: on a loaded two-core machine two builds of the same graph measured 0.344 and 0.194 ms. Here
all of them are loaded in one worker process, warmed up, then timed round by round: in each round every
artifact runs ``iterations`` calls, in an order rotated from round to round, and the round's median is
kept. Whatever slows the machine during a round slows every artifact in it, so the ratio of two
artifacts' figures in the same round is what they differ by; the driver compares the artifacts on the
median, over the rounds, of those per-round ratios (:func:`edgepipe.harness.ratios`).

Run as ``python -m edgepipe.harness.rounds SETTINGS_JSON``; it prints one JSON line. Like the worker it
imports nothing of edgepipe above ``harness/`` (numpy and the runtime only).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.harness.worker import RUNTIME_MODULES, feeds_for, host_info


def retime(settings: dict[str, Any]) -> dict[str, Any]:
    """Time every artifact of ``settings["artifacts"]`` interleaved; returns per-round medians (ms).

    ``settings``: ``artifacts`` (each as the worker's settings: backend, precision, path, files,
    metadata), ``rounds``, ``iterations`` (per artifact per round), ``warmup``, ``threads``, ``batch``,
    ``shapes`` and ``seed`` (the inputs, as the worker builds them).
    """
    import importlib.util

    from edgepipe import backends
    from edgepipe.types import Artifact

    arts = settings["artifacts"]
    runners, feeds = [], []
    for a in arts:
        wanted = RUNTIME_MODULES.get(a["backend"], ())
        if wanted and not any(importlib.util.find_spec(m) for m in wanted):
            raise ModuleNotFoundError(f"No module named {wanted[0]!r} (the {a['backend']} runtime)", name=wanted[0])
        art = Artifact(a["backend"], a.get("precision", ""), Path(a["path"]), [Path(p) for p in a.get("files", [])],
                       a.get("metadata", {}))
        r = backends.get(a["backend"]).load(art, settings.get("threads"))
        f = feeds_for(r.inputs, settings.get("shapes"), settings.get("batch", 1), settings.get("seed", 0))
        runners.append(r)
        feeds.append(f)
    for r, f in zip(runners, feeds, strict=True):
        for _ in range(max(1, settings.get("warmup", 20))):
            r(f)
    rounds, iters = int(settings.get("rounds", 5)), int(settings.get("iterations", 50))
    p50: list[list[float]] = [[] for _ in arts]
    n = len(arts)
    for k in range(rounds):
        for i in [(k + j) % n for j in range(n)]:  # rotated: no artifact always runs first (or right after another)
            r, f = runners[i], feeds[i]
            times = np.empty(iters)
            for j in range(iters):
                t = time.perf_counter()
                r(f)
                times[j] = time.perf_counter() - t
            p50[i].append(float(np.median(times) * 1e3))
    return {"rounds": rounds, "iterations": iters, "p50_ms": p50, "host": host_info()}


@dataclass(frozen=True)
class Retiming:
    """Artifacts timed together: per artifact, the median of each round (ms), and where."""

    ids: list[str]
    p50_ms: list[list[float]]
    rounds: int
    iterations: int
    where: str

    def ratios(self) -> list[list[float]]:
        """Per artifact, each round's figure over that round's fastest (1.0: the fastest of its round)."""
        best = [min(col) for col in zip(*self.p50_ms, strict=True)]
        return [[v / b if b > 0 else 1.0 for v, b in zip(row, best, strict=True)] for row in self.p50_ms]

    def score(self) -> dict[str, float]:
        """Per artifact id, the median of its per-round ratios: what the choice compares."""
        return {i: float(np.median(r)) for i, r in zip(self.ids, self.ratios(), strict=True)}

    def spread(self) -> dict[str, tuple[float, float]]:
        """Per artifact id, the smallest and largest per-round ratio (how much the rounds disagree)."""
        return {i: (float(min(r)), float(max(r))) for i, r in zip(self.ids, self.ratios(), strict=True)}

    def to_dict(self) -> dict[str, Any]:
        score, spread = self.score(), self.spread()
        return {"ids": list(self.ids), "rounds": self.rounds, "iterations": self.iterations, "where": self.where,
                "p50_ms": {i: [round(v, 6) for v in row] for i, row in zip(self.ids, self.p50_ms, strict=True)},
                "ratio": {i: round(score[i], 6) for i in self.ids},
                "spread": {i: [round(a, 6), round(b, 6)] for i, (a, b) in spread.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Retiming:
        ids = list(d["ids"])
        return cls(ids, [list(d["p50_ms"][i]) for i in ids], int(d["rounds"]), int(d["iterations"]), str(d["where"]))


def _reply(stdout: str, what: str, n: int, rounds: int) -> list[list[float]]:
    """The per-round figures of a rounds worker's last JSON line, checked (shape, finite positive numbers)."""
    import math

    from edgepipe.errors import BenchmarkError

    for line in reversed(stdout.strip().splitlines()[-50:]):
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line[:1 << 20])
        except ValueError:
            break
        if not isinstance(d, dict) or d.get("ok") is not True:
            err = d.get("error") if isinstance(d, dict) else None
            raise BenchmarkError(f"re-timing {what} failed in the worker: {str(err)[:300]}")
        p50 = d.get("p50_ms")
        if (isinstance(p50, list) and len(p50) == n and all(isinstance(r, list) and len(r) == rounds for r in p50)
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for r in p50 for v in r)):
            return [[float(v) for v in r] for r in p50]
        break
    raise BenchmarkError(f"re-timing {what}: the worker's reply is not {n} artifacts x {rounds} rounds of timings")


def retime_here(ids: list[str], artifacts: list[Any], settings: Any, rounds: int = 7,
                iterations: int | None = None) -> Retiming:
    """Time ``artifacts`` (named ``ids``) together in one fresh local worker process, interleaved.

    Args:
        ids: a name for each artifact (a candidate id).
        artifacts: the :class:`~edgepipe.types.Artifact` of each.
        settings: the :class:`~edgepipe.harness.BenchSettings` they were timed with (threads, batch, shapes).
        rounds: how many rounds; the choice uses the median of per-round ratios.
        iterations: calls per artifact per round (default: the settings' iterations spread over the rounds,
            at least 20).

    Returns:
        A :class:`Retiming`.
    """
    import platform
    import subprocess

    from edgepipe.errors import BenchmarkError
    from edgepipe.harness import _settings, _worker_env

    iters = iterations or max(20, settings.iterations // max(1, rounds))
    payload = {"artifacts": [_settings(a, settings) for a in artifacts], "rounds": rounds, "iterations": iters,
               "warmup": settings.warmup, "threads": settings.threads, "batch": settings.batch, "seed": settings.seed,
               "shapes": {k: list(v) for k, v in (settings.shapes or {}).items()} or None}
    what = ", ".join(ids)
    try:
        proc = subprocess.run([sys.executable, "-m", "edgepipe.harness.rounds", json.dumps(payload)],
                              capture_output=True, text=True, timeout=settings.timeout_s * len(ids), env=_worker_env())
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"re-timing {what} ran past {settings.timeout_s * len(ids):.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"re-timing {what}: the worker exited with {proc.returncode}: {tail}")
    return Retiming(list(ids), _reply(proc.stdout, what, len(ids), rounds), rounds, iters,
                    f"{platform.node()} {platform.machine()}")


def main() -> None:
    try:
        result = {"ok": True, **retime(json.loads(sys.argv[1]))}
    except ModuleNotFoundError as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "missing": (e.name or "").split(".")[0]}
    except Exception as e:  # reported to the parent as data, not a traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
