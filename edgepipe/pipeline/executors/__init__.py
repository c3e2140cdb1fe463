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


The package: :mod:`~edgepipe.pipeline.executors.base` (jobs, results, the protocol),
:mod:`~edgepipe.pipeline.executors.task` (what every worker runs, its typed reply),
:mod:`~edgepipe.pipeline.executors.local` (in this process, the process pool) and
:mod:`~edgepipe.pipeline.executors.ray_cluster` (Ray). :func:`executor` chooses among them.
"""

from __future__ import annotations

from edgepipe.errors import ConfigError
from edgepipe.pipeline.executors.base import Executor, Job, JobResult, board_resource, needs_board
from edgepipe.pipeline.executors.local import LocalExecutor, PoolExecutor, cores
from edgepipe.pipeline.executors.ray_cluster import (
    RAY_TOKEN_SOURCES,
    TENSORRT_RESOURCE,
    RayExecutor,
    address_host,
    check_cluster_trust,
    is_loopback,
    ray_token_auth,
    task_resources,
)

__all__ = ["RAY_TOKEN_SOURCES", "TENSORRT_RESOURCE", "Executor", "Job", "JobResult", "LocalExecutor", "PoolExecutor",
           "RayExecutor", "address_host", "board_resource", "check_cluster_trust", "cores", "executor", "is_loopback",
           "needs_board", "ray_token_auth", "task_resources"]


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
            raise ConfigError("--insecure-cluster (insecure_cluster=True) only applies with --cluster (cluster=ADDRESS)")
        return PoolExecutor(workers)
    if workers is not None:
        raise ConfigError("--workers (workers=N) sizes the local pool; with --cluster (cluster=ADDRESS) the cluster's "
                          "CPUs decide: give one of them")
    return RayExecutor(cluster, insecure=insecure)

