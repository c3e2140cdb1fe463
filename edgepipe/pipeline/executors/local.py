"""Executors on this machine: :class:`LocalExecutor` (in this process, one candidate after another) and
:class:`PoolExecutor` (the default: a spawned process pool sized to the cores, one bench at a time)."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from edgepipe.config import Target
from edgepipe.errors import EdgepipeError
from edgepipe.pipeline import candidate as cand
from edgepipe.pipeline.candidate import Session
from edgepipe.pipeline.executors.base import Job, JobResult
from edgepipe.pipeline.executors.task import Reply, job_result, remove_scratch, run_job

#: a pool worker's lock (set by ``_pool_init``), shared by the pool's workers: ``None`` outside a pool
_POOL_LOCK: Any = None


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
                remove_scratch()  # os._exit skips atexit
                os._exit(1)

    threading.Thread(target=watch, name="edgepipe-exit-with-parent", daemon=True).start()


def _pool_init(lock: Any, threads: int) -> None:
    """A pool worker: its benches take the lock the pool's workers share; torch and onnxruntime get
    ``threads`` threads each, so the workers do not oversubscribe the cores."""
    global _POOL_LOCK

    _exit_with_parent()
    _POOL_LOCK = lock
    os.environ.setdefault("EDGEPIPE_THREADS", str(threads))  # onnxruntime and OpenVINO sessions too (not benches)
    import torch

    torch.set_num_threads(threads)


def _pool_work(model: str | None, options: Any, cache_root: str, cwd: str, target: Target, recipe: Any,
               info: dict[str, Any], tag: str) -> Reply:
    """A pool worker's job: the shared task, its measurements under the pool's lock."""
    return run_job(model, options, cache_root, cwd, target, recipe, info, tag, f"pid {os.getpid()}",
                   platform.node(), lock=_POOL_LOCK)


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
                self.nodes.append(r.node)
                self.bench_spans += [(r.node, a, b) for a, b in r.bench_spans]
                out.append(job_result(r, j, session))
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

