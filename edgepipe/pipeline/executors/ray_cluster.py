"""The Ray executor: one task per candidate on an existing cluster, checked before any work (reachable,
trusted, board resources declared, every node's versions the driver's); see :mod:`edgepipe.pipeline.executors`."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from edgepipe.config import Target
from edgepipe.errors import ClusterError
from edgepipe.pipeline.candidate import Session
from edgepipe.pipeline.executors.base import Job, JobResult, board_resource, needs_board
from edgepipe.pipeline.executors.task import Reply, job_result, run_job
from edgepipe.versions import tool_versions


def _node() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), platform.node()


def _work(model: str | None, options: Any, cache_root: str, cwd: str, versions: dict[str, str], target: Target,
          recipe: Any, info: dict[str, Any], tag: str) -> Reply:
    """A Ray task: ``candidate.run`` for one candidate on this worker (module-level: workers import it)."""
    node, host = _node()
    mine = tool_versions()
    if mine != versions:
        return Reply(node, host, refused=_version_diff(host, versions, mine))
    return run_job(model, options, cache_root, cwd, target, recipe, info, tag, node, host)


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
            if isinstance(r, Reply):
                self.nodes.append(r.host)
                if r.refused is not None:
                    raise ClusterError(str(r.refused))
            out.append(job_result(r, j, session))
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

