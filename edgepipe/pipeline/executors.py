"""Executors: where the candidates of a release run. The cluster is an executor, not a second pipeline.

An :class:`Executor` takes a batch of :class:`Job` (one candidate: a target with its settings applied, a
recipe, the candidate's manifest record) and returns one :class:`JobResult` per job, in submission order.
Both executors run the same function, :func:`edgepipe.pipeline.candidate.run`, i.e. the same typed stages
(compress → export → compile → evaluate → bench) with the same stage cache; nothing is re-implemented.

* :class:`PoolExecutor` (the default): a process pool sized to the cores of this machine, one bench at a
  time (``--workers 1``: in this process, one candidate after another).
* :class:`LocalExecutor`: in this process, one candidate after another (what the pool does with one worker).
* :class:`RayExecutor`: one Ray task per candidate on an existing Ray cluster.

How artifacts travel (RayExecutor). A task runs ``candidate.run`` on a worker node, with the stage cache
rooted at the *driver's* cache directory, and returns the :class:`CandidateResult` (manifest, stage
records, measurement) plus the bytes of the files the release needs (the artifact's files and the source
ONNX) through the Ray object store; the driver writes those bytes under its own work directory, and only
the driver writes the release. The manifest is the one the worker assembled, so a cluster run on one
machine gives byte-identical releases to a local run (the tests check ``SHA256SUMS``).

Why bytes and not a replay from a shared cache: a driver-side replay of ``candidate.run`` only hits the
cache when the cache directory is shared *and* every key matches; the bench key names the machine that
measured (``platform.node()``), so on a farm the driver would miss and measure again on itself. Shipping
the result needs no shared filesystem. The cache still matters: on one machine (or with
``$EDGEPIPE_CACHE_DIR`` on NFS, same path on every node) every node reuses every other node's stages and
a rerun is served from the cache; on nodes without the shared path each node keeps its own cache at that
path (correct, less reuse; the path must be writable there).

Resources. A target with a ``[board]`` (bench on, no ``local_bench``) runs only on a node declaring the
Ray custom resource ``board:<target name>``, 1 per task, so a board times one thing at a time (its whole
candidate runs there: a board node should be a host with CPU to spare). A TensorRT target's candidates
run on a node declaring ``backend:tensorrt`` (1 per task: one engine build at a time per declared unit)
where the cluster has one, else on a GPU (``num_gpus=1``) where it has one: ``compile`` builds the
engine there; a cluster with neither makes the engine build bundle on any CPU node, as ``compile`` does
on any machine without TensorRT (see :func:`task_resources`). Benchmarks of targets without a board run on whichever node the task lands on, next to
other tasks: declare few CPUs per node (``ray start --num-cpus``) when latency budgets are tight.

Trust. Whoever reaches a Ray cluster without token authentication runs code on every node, and the
driver unpickles what tasks return. So ``--cluster`` to an address that is not loopback (``auto``'s too)
is refused, before anything is sent there, unless this process has Ray's token authentication
(``RAY_AUTH_MODE=token`` and a token where Ray looks for one) or the caller says ``insecure=True``
(``--insecure-cluster``); see :func:`check_cluster_trust`. A worker's file names are checked before any
is written: relative paths of plain components, inside the job's work directory (:func:`_unpack`).

Checked before any work: a cluster is reachable at the address (else one line, nothing started); every
board resource the targets need is declared by some node (else one line naming the resource and the
``ray start --resources`` line that provides it); every node has the driver's edgepipe and tool
versions (else refused: the cache keys would lie). Each task checks the versions again, for nodes that
join later. A node that dies mid-release: Ray retries its tasks elsewhere (``max_retries``); a board task
waits for its board's node to come back, up to ``board_timeout`` seconds, then the release stops with
one line (a rerun takes the finished candidates from the cache).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgepipe.config import Target
from edgepipe.errors import ClusterError, ConfigError, EdgepipeError
from edgepipe.pipeline import candidate as cand
from edgepipe.pipeline.candidate import CandidateResult, Session
from edgepipe.versions import tool_versions


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


class LocalExecutor:
    """In this process, one candidate after another (today's behaviour, and the default).

    ``batch_size``: trials a sampled search asks for per round (1: tell after each). Give a cluster's
    batch size to reproduce a cluster run's sampled candidates here."""

    def __init__(self, batch_size: int = 1) -> None:
        self.batch_size = max(1, batch_size)

    def check(self, targets: list[Target], options: Any) -> None:
        return None

    def run(self, session: Session, jobs: list[Job]) -> list[JobResult]:
        out = []
        for j in jobs:
            try:
                out.append(JobResult(cand.run(session, j.target, j.recipe, j.info, j.workdir)))
            except EdgepipeError as e:
                out.append(JobResult(error=str(e)))
        return out

    def close(self) -> None:
        return None


def cores() -> int:
    """The cores this process may use (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _exit_with_parent(every: float = 1.0) -> None:
    """End this worker when the process that started it is gone. A release killed with SIGKILL (or by the
    OOM killer) cannot shut its pool down, and its spawned workers, each holding a pipe end the others
    wait on, would sleep forever with their models in memory."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                _remove_scratch()  # os._exit skips atexit
                os._exit(1)

    threading.Thread(target=watch, name="edgepipe-exit-with-parent", daemon=True).start()


def _pool_init(lock: Any, threads: int) -> None:
    """A pool worker: its benches take the lock the pool's workers share; torch and onnxruntime get
    ``threads`` threads each, so the workers do not oversubscribe the cores."""
    global _POOL_LOCK

    _exit_with_parent()
    _POOL_LOCK = lock
    import torch

    torch.set_num_threads(threads)


def _pool_work(model: str | None, options: Any, cache_root: str, cwd: str, target: Target, recipe: Any,
               info: dict[str, Any], tag: str) -> dict[str, Any]:
    r = _run_job(model, options, cache_root, cwd, target, recipe, info, tag, f"pid {os.getpid()}",
                 platform.node())
    spans: list[tuple[float, float]] = []
    for s in _SESSIONS.values():  # the job's session noted its measurements: hand them to the driver
        if s.bench_spans:
            spans += s.bench_spans
            s.bench_spans.clear()
    r["bench_spans"] = spans
    return r


class PoolExecutor:
    """The local default: a process pool sized to the cores, one bench at a time.

    Each worker process (spawned, so nothing of the driver's torch state is shared) runs the same task as
    a Ray worker: ``candidate.run`` with the stage cache rooted at the driver's, and returns the result
    with the bytes of its files; the driver writes them under its work directory (byte-identical to an
    in-process run). Every measurement holds a lock the workers share: while one worker times its
    artifact the others may compress or compile, but never time. A batch of one job, or ``workers=1``,
    runs in this process with no pool. The pool starts on the first batch and lives until :meth:`close`.

    ``batch_size`` (default: ``workers``): trials a sampled search asks for before telling; give the same
    value to reproduce a run made with another executor."""

    def __init__(self, workers: int | None = None, batch_size: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise EdgepipeError(f"--workers {workers}: give 1 or more (default: the {cores()} cores here)")
        self.workers = workers or cores()
        self.batch_size = max(1, batch_size or self.workers)
        self._pool: Any = None
        self._local = LocalExecutor(self.batch_size)
        self.nodes: list[str] = []  # which worker ran each job, in submission order ("local": this process)
        #: (worker, start, end) of every measurement the workers made (wall clock), for the tests and logs
        self.bench_spans: list[tuple[str, float, float]] = []

    def check(self, targets: list[Target], options: Any) -> None:
        return None

    def _start(self) -> Any:
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("spawn")
            threads = max(1, cores() // self.workers)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_init,
                                             initargs=(ctx.Lock(), threads))
        return self._pool

    def run(self, session: Session, jobs: list[Job]) -> list[JobResult]:
        if self.workers == 1 or len(jobs) <= 1:
            self.nodes += ["local"] * len(jobs)
            return self._local.run(session, jobs)
        from concurrent.futures.process import BrokenProcessPool

        pool = self._start()
        opts = session.options
        cache_root = str(session.cache.root.parent)
        model, cwd = session.source.spec, os.getcwd()
        futures = [pool.submit(_pool_work, model, opts, cache_root, cwd, j.target, j.recipe, j.info,
                               f"{j.target.name}-{j.info.get('id', i)}-{os.getpid()}-{i}")
                   for i, j in enumerate(jobs)]
        out = []
        try:
            for j, f in zip(jobs, futures, strict=True):
                r = f.result()
                self.nodes.append(r["node"])
                self.bench_spans += [(r["node"], a, b) for a, b in r.get("bench_spans") or []]
                out.append(_job_result(r, j, session))
        except BrokenProcessPool:
            self.close()
            raise EdgepipeError("a worker process of the local pool died (out of memory? killed?); run the release "
                                "again (finished candidates come from the cache), or pass --workers 1") from None
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ---------------------------------------------------------------------------------------------------------
# Ray


def load_source(model: str | None, options: Any) -> Any:
    """The model source for ``options`` (what ``release`` loads on the driver; workers load the same)."""
    from edgepipe.pipeline.stages import source

    return source(model, options.weights)


#: a pool worker's lock (set by ``_pool_init``), shared by the pool's workers: ``None`` outside a pool
_POOL_LOCK: Any = None
_SESSIONS: dict[str, Session] = {}
#: this worker's scratch directories (removed at exit, or by the watch of :func:`_exit_with_parent`)
_SCRATCH: list[Path] = []


def _remove_scratch() -> None:
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


def _worker_session(model: str | None, options: Any, cache_root: str) -> Session:
    """One session per worker process and (model, options, cache): the source and the references are
    loaded once per worker, not once per candidate."""
    import hashlib
    import pickle

    from edgepipe.pipeline.cache import Cache

    k = hashlib.sha256(pickle.dumps((model, options, cache_root))).hexdigest()
    if k not in _SESSIONS:
        _sweep_scratch()
        scratch = Path(tempfile.mkdtemp(prefix=f"edgepipe-worker-{os.getpid()}-"))
        if not _SCRATCH:
            atexit.register(_remove_scratch)  # Ray may kill the worker first: _sweep_scratch then
        _SCRATCH.append(scratch)
        with _trusting(options):
            src = load_source(model, options)
        # a pool worker's measurements take the lock its pool shares, and note when they held it
        lock = _POOL_LOCK if _POOL_LOCK is not None else contextlib.nullcontext()
        _SESSIONS[k] = Session(src, options, Cache(Path(cache_root), enabled=options.cache), scratch,
                               bench_lock=lock, bench_spans=[] if _POOL_LOCK is not None else None)
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


def _job_result(r: dict[str, Any], job: Job, session: Session) -> JobResult:
    """A worker's answer (a Ray task's or a pool worker's) as the job's result, its files written under
    the job's work directory and its notes passed on."""
    if "error" in r:
        return JobResult(error=r["error"], node=r["node"], host=r["host"])
    who = (f"the worker on {r.get('host')!r} (node {r.get('node')!r}) for candidate {job.info.get('id', '?')!r} "
           f"of {job.target.name!r}")
    res = _unpack(r["result"], r["files"], job.workdir, session.options, who, session.source)
    for n in res.notes:
        session.reporter.note(n)
    return JobResult(res, node=r["node"], host=r["host"])


def _node() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), platform.node()


def _run_job(model: str | None, options: Any, cache_root: str, cwd: str, target: Target, recipe: Any,
             info: dict[str, Any], tag: str, node: str, host: str) -> dict[str, Any]:
    """``candidate.run`` for one candidate in this worker process (a Ray task's or a pool worker's)."""
    if os.path.isdir(cwd):
        # the driver's directory, where it exists here (one machine, NFS): relative model, weights and
        # data paths, and a model factory's module, resolve as they did on the driver
        os.chdir(cwd)
        if cwd not in sys.path:
            sys.path.append(cwd)
    try:
        with _trusting(options):
            session = _worker_session(model, options, cache_root)
    except EdgepipeError as e:
        return {"error": str(e), "node": node, "host": host}
    work = session.scratch / "jobs" / tag
    try:
        with _trusting(options):
            res = cand.run(session, target, recipe, info, work)
        packed, files = _pack(res, work)
        return {"result": packed, "files": files, "node": node, "host": host}
    except EdgepipeError as e:
        return {"error": str(e), "node": node, "host": host}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _work(model: str | None, options: Any, cache_root: str, cwd: str, versions: dict[str, str], target: Target,
          recipe: Any, info: dict[str, Any], tag: str) -> dict[str, Any]:
    """A Ray task: ``candidate.run`` for one candidate on this worker (module-level: workers import it)."""
    node, host = _node()
    mine = tool_versions()
    if mine != versions:
        return {"refused": _version_diff(host, versions, mine), "node": node, "host": host}
    return _run_job(model, options, cache_root, cwd, target, recipe, info, tag, node, host)


def _versions() -> dict[str, Any]:
    node, host = _node()
    return {"node": node, "host": host, "versions": tool_versions()}


def _version_diff(host: str, want: dict[str, str], have: dict[str, str]) -> str:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    parts = ", ".join(f"{k} {have.get(k, 'absent')} (driver: {want.get(k, 'absent')})" for k in diff)
    return (f"cluster node {host} refused: its versions differ from this machine's ({parts}); the stage cache "
            "keys would lie: install the same edgepipe and tools on every node")


def _auto_address() -> str:
    """The cluster ``auto`` means: ``$RAY_ADDRESS``, else the last ``ray start`` on this machine."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception:  # a private helper: whatever it raises means "none found"
        found = None
    if not found:
        raise ClusterError("--cluster auto: no Ray cluster found (no RAY_ADDRESS, no `ray start` on this machine); "
                           "start one with `ray start --head`, or pass --cluster HOST:PORT")
    return str(found)


def address_host(address: str) -> str:
    """The host of a Ray address: ``HOST:PORT``, ``[IPV6]:PORT``, ``ray://HOST:PORT``, or a bare host."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(rest)
        return rest  # a bare IPv6 address (no port)
    return rest.rpartition(":")[0] if ":" in rest else rest


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (also as ``::ffff:127.x.y.z``); names are not resolved."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


#: where Ray (2.52 and later) finds the token when ``RAY_AUTH_MODE=token``, in its order
RAY_TOKEN_SOURCES = "RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token"


def ray_token_auth() -> str | None:
    """Where this process's Ray token comes from when it has token authentication, else ``None``.

    Read as Ray reads it, without importing Ray: ``RAY_AUTH_MODE=token`` in the environment (a driver that
    connects to a given address enables it no other way), and a token from ``RAY_AUTH_TOKEN``, else the
    file ``RAY_AUTH_TOKEN_PATH`` names, else ``~/.ray/auth_token``. A ``RAY_AUTH_TOKEN_PATH`` that cannot
    be read is a :class:`ClusterError` (Ray would abort the process on it)."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        if path.read_text().strip():
            return str(path)
    except OSError as e:
        if named:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named}: {e.strerror or e}; point it at the file holding the "
                               "cluster's token (`ray get-auth-token` on the head prints it)") from None
    return None


def check_cluster_trust(address: str, given: str, insecure: bool = False) -> str | None:
    """Refuse a cluster at a non-loopback ``address`` unless this process has Ray's token authentication
    (:func:`ray_token_auth`) or ``insecure``: whoever reaches a cluster without it runs code on every node,
    and the driver unpickles what its tasks return. Sends nothing anywhere: call it before connecting.

    Returns how the cluster is trusted: ``"loopback"``, the token's source, or ``"insecure"``."""
    host = address_host(address)
    if is_loopback(host):
        return "loopback"
    token = ray_token_auth()
    if token:
        return token
    if insecure:
        return "insecure"
    found = (" (found by --cluster auto; a cluster on this machine: --cluster 127.0.0.1:PORT)"
             if given == "auto" and address != given else "")
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token":
        why = f"RAY_AUTH_MODE=token is set but no token was found ({RAY_TOKEN_SOURCES})"
    else:
        why = "this process has no Ray token authentication (RAY_AUTH_MODE=token and a token)"
    raise ClusterError(
        f"--cluster {address}{found}: {host!r} is not a loopback address and {why}; whoever reaches a cluster "
        "without it runs code on every node and on this driver. Start every node with RAY_AUTH_MODE=token and "
        f"the cluster's token, and run edgepipe with them too ({RAY_TOKEN_SOURCES}); or pass --insecure-cluster "
        "(api: insecure_cluster=True) for a network only you can reach")


def _reachable(address: str, given: str) -> None:
    """One line, nothing started, when nothing listens at a ``host:port`` address."""
    if "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--cluster {address!r}: give HOST:PORT of the Ray head (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        how = "; found by --cluster auto: a cluster that has stopped?" if given == "auto" else ""
        raise ClusterError(f"no Ray cluster at {address} ({e.strerror or e}{how}); start one with `ray start --head "
                           f"--port {port}` on {host}") from None


#: a node that can build TensorRT engines (TensorRT and a GPU) declares this custom resource
TENSORRT_RESOURCE = "backend:tensorrt"


def task_resources(target: Target, options: Any, have: dict[str, float]) -> tuple[dict[str, float], float]:
    """The custom resources and GPUs a candidate of ``target`` asks of a cluster offering ``have``.

    A board target: its board (1, so the board times one thing at a time). A TensorRT target: a node
    declaring ``backend:tensorrt`` where one does, else a GPU where the cluster has one, so ``compile``
    builds the engine there; a cluster with neither makes the build bundle on any CPU node, as
    ``compile`` does on a machine without TensorRT."""
    if needs_board(target, options):
        return {board_resource(target): 1}, 0
    if target.backend == "tensorrt":
        if have.get(TENSORRT_RESOURCE):
            return {TENSORRT_RESOURCE: 1}, 0
        if have.get("GPU"):
            return {}, 1
    return {}, 0


class RayExecutor:
    """One Ray task per candidate on the cluster at ``address`` (``"auto"``: the one this machine is in).

    Connects, and checks every node's versions, on construction; :meth:`close` disconnects. A cluster at
    a non-loopback address needs Ray's token authentication here, or ``insecure=True``
    (:func:`check_cluster_trust`): refused before anything is sent to it.
    """

    def __init__(self, address: str = "auto", *, max_retries: int = 3, batch_size: int | None = None,
                 board_timeout: float = 600.0, insecure: bool = False) -> None:
        self.given = address
        self.board_timeout = board_timeout
        try:
            import ray
        except ImportError:
            raise ClusterError("--cluster needs Ray: pip install 'edgepipe[cluster]'") from None
        if address == "auto":
            address = _auto_address()
        self.trust = check_cluster_trust(address, self.given, insecure)  # before anything is sent there
        _reachable(address, self.given)
        self.address = address
        self.max_retries = max_retries
        self._ray = ray
        if not ray.is_initialized():
            try:
                # address given: Ray connects, never starts a cluster of its own
                ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ClusterError(f"no Ray cluster at {address}: {first}") from None
        try:
            self.versions = tool_versions()
            self._check_versions()
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.batch_size = batch_size or max(1, cpus)
        except BaseException:
            self.close()
            raise
        self.nodes: list[str] = []  # the host each job ran on, in submission order (for the tests and logs)

    def _check_versions(self) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_versions)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in alive]
        for ref in refs:
            try:
                r = ray.get(ref, timeout=120)
            except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                    ray.exceptions.WorkerCrashedError):
                continue  # a node that left since ray.nodes() listed it gets no task either
            if r["versions"] != self.versions:
                raise ClusterError(_version_diff(r["host"], self.versions, r["versions"]))

    def check(self, targets: list[Target], options: Any) -> None:
        """Every board resource these targets need is declared by a node of the cluster."""
        have = set(self._ray.cluster_resources())
        for t in targets:
            if needs_board(t, options) and board_resource(t) not in have:
                r = board_resource(t)
                raise ClusterError(
                    f"target {t.name!r} is benchmarked on its board, but no node of the cluster at {self.address} "
                    f"declares the resource {r!r}; on the host wired to the board run: ray start --address "
                    f"HEAD:PORT --resources '{{\"{r}\": 1}}' (or pass --local-bench)")

    def run(self, session: Session, jobs: list[Job]) -> list[JobResult]:
        ray = self._ray
        task = ray.remote(_work)
        opts = session.options
        cache_root = str(session.cache.root.parent)
        model, cwd = session.source.spec, os.getcwd()
        refs = []
        have = self._ray.cluster_resources()
        for i, j in enumerate(jobs):
            resources, gpus = task_resources(j.target, opts, have)
            tag = f"{j.target.name}-{j.info.get('id', i)}-{os.getpid()}-{i}"
            refs.append(task.options(num_cpus=1, num_gpus=gpus, resources=resources,
                                     max_retries=self.max_retries).remote(
                model, opts, cache_root, cwd, self.versions, j.target, j.recipe, j.info, tag))
        out = []
        self._wait(refs, {board_resource(j.target) for j in jobs if needs_board(j.target, opts)})
        for j, r in zip(jobs, ray.get(refs), strict=True):
            self.nodes.append(r["host"])
            if "refused" in r:
                raise ClusterError(r["refused"])
            out.append(_job_result(r, j, session))
        return out

    def _wait(self, refs: list[Any], boards: set[str]) -> None:
        """Until every task is done; a board whose node has left gets ``board_timeout`` seconds to return
        (its tasks wait for it: no other node may time them), then the batch is cancelled, one line."""
        ray = self._ray
        gone_since: float | None = None
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            if not pending or not boards:
                continue
            missing = sorted(boards - set(ray.cluster_resources()))
            if not missing:
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > self.board_timeout:
                for r in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(r, force=True)
                raise ClusterError(
                    f"the node declaring {', '.join(missing)} left the cluster at {self.address} and did not come "
                    f"back within {self.board_timeout:.0f} s; restart it (ray start --address {self.address} "
                    f"--resources '{{\"{missing[0]}\": 1}}') and run the release again: finished candidates "
                    "come from the cache")

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


def executor(cluster: str | None = None, workers: int | None = None, insecure: bool = False) -> Executor:
    """Where a release's candidates run: the one place that chooses (the CLI and :func:`edgepipe.api.release`
    both call it).

    Args:
        cluster: ``None``: the local process pool; ``"auto"`` or ``HOST:PORT``: a :class:`RayExecutor`
            connected to that cluster, its nodes checked before any work.
        workers: the pool's processes (default: the cores; 1: in this process). Only without ``cluster``.
        insecure: allow a non-loopback cluster without token authentication (see
            :func:`check_cluster_trust`). Only with ``cluster``.

    Returns:
        An open executor: the caller closes it.

    Raises:
        ConfigError: ``workers`` with a cluster, or ``insecure`` without one.
        ClusterError: the cluster is unreachable, untrusted or its nodes do not match.
    """
    if cluster is None:
        if insecure:
            raise ConfigError("insecure cluster: only applies with a cluster address")
        return PoolExecutor(workers)
    if workers is not None:
        raise ConfigError("workers sizes the local pool; with a cluster the cluster's CPUs decide: give one of them")
    return RayExecutor(cluster, insecure=insecure)
