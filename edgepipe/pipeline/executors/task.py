"""The task every worker runs, a Ray task's or a pool worker's: ``candidate.run`` for one candidate in a
session kept per worker process, its result packed with the bytes of its files into a typed :class:`Reply`;
and on the driver, the reply checked and unpacked under the job's work directory (:func:`job_result`)."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.config import Target
from edgepipe.errors import ClusterError, EdgepipeError
from edgepipe.pipeline import candidate as cand
from edgepipe.pipeline.candidate import CandidateResult, Session
from edgepipe.pipeline.executors.base import Job, JobResult


@dataclass
class Reply:
    """What a worker sends back for one job: the result and the bytes of its files, or why there is none.

    Attributes:
        node: the worker's node id (Ray) or ``pid N`` (a pool worker).
        host: the worker's host name.
        result: the candidate's result, its paths relative to the job's work directory.
        files: relative path -> bytes of every file the release needs.
        error: the one-line reason the candidate could not be built.
        refused: the one-line reason the node refused the job (its versions differ): the release stops.
        bench_spans: the wall-clock (start, end) of each measurement (a pool worker's, under its lock).
    """

    node: str
    host: str
    result: CandidateResult | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    refused: str | None = None
    bench_spans: list[tuple[float, float]] = field(default_factory=list)


def load_source(model: str | None, options: Any) -> Any:
    """The model source for ``options`` (what ``release`` loads on the driver; workers load the same)."""
    from edgepipe.pipeline.stages import source

    return source(model, options.weights)


_SESSIONS: dict[str, Session] = {}


#: this worker's scratch directories (removed at exit, or by the watch of :func:`_exit_with_parent`)
_SCRATCH: list[Path] = []


def remove_scratch() -> None:
    """Remove this worker's scratch directories (at exit, or when its parent is gone)."""
    for d in _SCRATCH:
        shutil.rmtree(d, ignore_errors=True)


def _trusting(options: Any) -> Any:
    from edgepipe.models import trusting

    return trusting(bool(getattr(options, "trust_code", False)))


def _sweep_scratch() -> None:
    """Remove the scratch directories of workers that are gone. A Ray worker is often killed, not exited,
    so its ``atexit`` never runs; each new worker session sweeps what dead ones left on this host."""
    for d in Path(tempfile.gettempdir()).glob("edgepipe-worker-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _worker_session(model: str | None, options: Any, cache_root: str, lock: Any = None) -> Session:
    """One session per worker process and (model, options, cache): the source and the references are
    loaded once per worker, not once per candidate. ``lock``: a pool's shared bench lock (its measurements
    take it and note when they held it); ``None``: no lock."""
    import hashlib
    import pickle

    from edgepipe.pipeline.cache import Cache

    k = hashlib.sha256(pickle.dumps((model, options, cache_root))).hexdigest()
    if k not in _SESSIONS:
        _sweep_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"edgepipe-worker-{os.getpid()}-"))
        if not _SCRATCH:
            atexit.register(remove_scratch)  # Ray may kill the worker first: _sweep_scratch then
        _SCRATCH.append(scratch)
        with _trusting(options):
            src = load_source(model, options)
        _SESSIONS[k] = Session(src, options, Cache(Path(cache_root), enabled=options.cache), scratch,
                               bench_lock=lock if lock is not None else contextlib.nullcontext(),
                               bench_spans=[] if lock is not None else None)
    return _SESSIONS[k]


def _pack(res: CandidateResult, root: Path) -> tuple[CandidateResult, dict[str, bytes]]:
    """The result with paths made relative to ``root`` and the bytes of every file the release needs."""
    files: dict[str, bytes] = {}

    def add(p: Path) -> None:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file():
                    files[f.relative_to(root).as_posix()] = f.read_bytes()
        elif p.is_file():
            files[p.relative_to(root).as_posix()] = p.read_bytes()

    art = res.artifact
    for f in art.files:
        add(f)
    add(res.onnx.path)
    rel = dataclasses.replace(
        res,
        artifact=dataclasses.replace(art, path=art.path.relative_to(root),
                                     files=[f.relative_to(root) for f in art.files]),
        onnx=dataclasses.replace(res.onnx, path=res.onnx.path.relative_to(root)),
        calibration=None,  # type: ignore[arg-type]  # the driver rebuilds it from the data (same bytes)
    )
    return rel, files


def _plain_name(name: object, who: str, what: str = "file name") -> str:
    """``name`` when it is a relative POSIX path of plain components, else one :class:`ClusterError` line."""
    text = name.as_posix() if isinstance(name, Path) else name
    parts = text.split("/") if isinstance(text, str) else []
    if not parts or any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        raise ClusterError(f"{who} returned the {what} {name!r}: not a relative path of plain components (no '..', "
                           "no absolute path, no empty part, NUL or backslash); nothing was written: that worker is "
                           "faulty or not yours, check the node (and the cluster's token authentication)")
    return text


def _unpack(res: CandidateResult, files: dict[str, bytes], dest: Path, options: Any,
            who: str = "a worker", source: Any = None) -> CandidateResult:
    """Write a worker's ``files`` under ``dest`` and point the result's paths there. Every name (and every
    path of the result) must be a relative path of plain components that stays inside ``dest``: a worker
    does not choose where the driver writes, nor which of the driver's files go into a release. Every
    name is checked before anything is written."""
    from edgepipe.pipeline import stages

    if not isinstance(files, dict):
        raise ClusterError(f"{who} returned {type(files).__name__} for its files, not a mapping of names to bytes")
    names: dict[str, bytes] = {}
    for name, data in files.items():
        if not isinstance(data, bytes):
            raise ClusterError(f"{who} returned {type(data).__name__} for {name!r}, not bytes; nothing was written")
        names[_plain_name(name, who)] = data
    sent = set(names) | {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    art = res.artifact
    for f in [art.path, *art.files, res.onnx.path]:
        if _plain_name(f, who, "result path") not in sent:
            raise ClusterError(f"{who} returned a result naming {str(f)!r}, a file it did not send; nothing was written")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    root = dest.resolve()
    for rel in names:
        if os.path.commonpath([root, (root / rel).resolve()]) != str(root):
            raise ClusterError(f"{who} returned the file name {rel!r}, which leads outside {dest}; nothing was written")
    try:
        for rel, data in names.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    except OSError as e:
        raise ClusterError(f"{who} returned files that cannot all be written under {dest} "
                           f"({e.strerror or e}: {e.filename})") from None
    return dataclasses.replace(
        res,
        artifact=dataclasses.replace(art, path=dest / art.path, files=[dest / f for f in art.files]),
        onnx=dataclasses.replace(res.onnx, path=dest / res.onnx.path),
        calibration=stages.calibration_set(stages.load_splits(options.data, res.target, source)),
    )


def job_result(r: Reply, job: Job, session: Session) -> JobResult:
    """A worker's reply (a Ray task's or a pool worker's) as the job's result, its files written under
    the job's work directory and its notes passed on. A reply of another type, or without a result or an
    error, is a :class:`ClusterError`: nothing is written."""
    if not isinstance(r, Reply):
        raise ClusterError(f"a worker replied {type(r).__name__} for candidate {job.info.get('id', '?')!r} of "
                           f"{job.target.name!r}, not edgepipe's reply; nothing was written: check the node")
    if r.error is not None:
        return JobResult(error=str(r.error), node=str(r.node), host=str(r.host))
    who = (f"the worker on {r.host!r} (node {r.node!r}) for candidate {job.info.get('id', '?')!r} "
           f"of {job.target.name!r}")
    if not isinstance(r.result, CandidateResult):
        raise ClusterError(f"{who} replied without a result or an error; nothing was written: check the node")
    res = _unpack(r.result, r.files, job.workdir, session.options, who, session.source)
    for n in res.notes:
        session.reporter.note(n)
    return JobResult(res, node=str(r.node), host=str(r.host))


def run_job(model: str | None, options: Any, cache_root: str, cwd: str, target: Target, recipe: Any,
            info: dict[str, Any], tag: str, node: str, host: str, lock: Any = None) -> Reply:
    """``candidate.run`` for one candidate in this worker process (a Ray task's or a pool worker's).

    ``lock``: the pool's shared bench lock (a pool worker's); the reply then carries the measurements' spans."""
    if os.path.isdir(cwd):
        # the driver's directory, where it exists here (one machine, NFS): relative model, weights and
        # data paths, and a model factory's module, resolve as they did on the driver
        os.chdir(cwd)
        if cwd not in sys.path:
            sys.path.append(cwd)
    try:
        with _trusting(options):
            session = _worker_session(model, options, cache_root, lock)
    except EdgepipeError as e:
        return Reply(node, host, error=str(e))
    work = session.scratch / "jobs" / tag
    try:
        with _trusting(options):
            res = cand.run(session, target, recipe, info, work)
        packed, files = _pack(res, work)
        return Reply(node, host, result=packed, files=files, bench_spans=_drain_spans(session))
    except EdgepipeError as e:
        return Reply(node, host, error=str(e), bench_spans=_drain_spans(session))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _drain_spans(session: Session) -> list[tuple[float, float]]:
    """The measurements' spans this session noted since the last reply (a pool worker's), and forget them."""
    spans = list(session.bench_spans or [])
    if session.bench_spans:
        session.bench_spans.clear()
    return spans

