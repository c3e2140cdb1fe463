"""What every executor shares: a :class:`Job` (one candidate), its :class:`JobResult`, the
:class:`Executor` protocol, and which board a target's candidates need."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgepipe.config import Target
from edgepipe.pipeline.candidate import CandidateResult, Session

__all__ = ["Executor", "Job", "JobResult", "board_resource", "needs_board"]


@dataclass
class Job:
    """One candidate to run: ``target`` already carries the candidate's settings."""

    target: Target
    recipe: Any
    info: dict[str, Any]
    workdir: Path


@dataclass
class JobResult:
    """A job's result, or the one-line reason it could not be built; where it ran."""

    result: CandidateResult | None = None
    error: str | None = None
    node: str = "local"
    host: str = field(default_factory=platform.node)


class Executor(Protocol):
    #: how many candidates a sampled (Optuna) search asks for before telling; the same value gives the
    #: same candidates whichever executor runs them
    batch_size: int

    def check(self, targets: list[Target], options: Any) -> None:
        """Raise :class:`ClusterError` when these targets cannot run here (before any work)."""

    def run(self, session: Session, jobs: list[Job]) -> list[JobResult]:
        """Run ``jobs``; results in submission order."""
        ...

    def close(self) -> None: ...


def board_resource(target: Target) -> str:
    return f"board:{target.name}"


def needs_board(target: Target, options: Any) -> bool:
    return target.board is not None and bool(options.bench) and not options.local_bench

