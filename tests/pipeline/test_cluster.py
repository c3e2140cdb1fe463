"""`edgepipe release --cluster`: a real Ray cluster on 127.0.0.1 (a head and two worker nodes, each its own
`ray start` process, one declaring a board), against a local run of the same search."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[cluster]'")

from edgepipe import api  # noqa: E402
from edgepipe.errors import ClusterError  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
BOARD = "loopboard"  # the target (file stem) whose [board] is a loopback sshd

SEARCH = """
recipes = ["none"]
[onnxruntime]
calibration = ["minmax", "percentile"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(addr: str, nodes: int, timeout: float = 120.0) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=addr, logging_level="ERROR", log_to_driver=False)
            try:
                alive = [n for n in ray.nodes() if n["Alive"]]
            finally:
                ray.shutdown()
            if len(alive) >= nodes:
                return
        except (ConnectionError, RuntimeError):
            pass
        assert time.monotonic() < deadline, f"the test cluster at {addr} did not come up with {nodes} nodes"
        time.sleep(1)


class _Nodes:
    """Ray nodes on 127.0.0.1, each its own `ray start --block` in its own process group: ending one ends
    exactly its processes (not `ray stop`, which would end every Ray process here, another run's too)."""

    def __init__(self, logs: Path) -> None:
        self.addr = f"127.0.0.1:{_free_port()}"
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        small = ["--object-store-memory", str(80 * 1024 * 1024), "--node-ip-address", "127.0.0.1", "--block"]
        if not self.procs:
            args = ("--head", "--port", self.addr.rsplit(":", 1)[1], "--num-cpus", "0", "--include-dashboard=false",
                    "--disable-usage-stats", *args)
        else:
            args = ("--address", self.addr, *args)
        with open(self.logs / f"node{len(self.procs)}.log", "w") as log:
            p = subprocess.Popen([RAY, "start", *args, *small], env=env, stdout=log, stderr=log,
                                 start_new_session=True)
        self.procs.append(p)
        # one after the other: nodes starting at once on one machine can pick the same free port
        _wait_for(self.addr, len(self.procs))
        return p

    @staticmethod
    def end(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM if grace else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """A head (no CPUs: it schedules only) and two 1-CPU workers, one declaring backend:tensorrt (its
    TensorRT candidates make build bundles: no GPU here), the other board:loopboard."""
    n = _Nodes(tmp_path_factory.mktemp("ray-nodes"))
    try:
        n.start()
        n.start("--num-cpus", "1", "--resources", json.dumps({"backend:tensorrt": 1}))
        n.start("--num-cpus", "1", "--resources", json.dumps({f"board:{BOARD}": 1}))
        yield n
    finally:
        n.end(list(reversed(n.procs)))
        from edgepipe.pipeline.executors.task import _sweep_scratch

        _sweep_scratch()  # the workers were killed: their scratch would stay until the next run's workers


@pytest.fixture(scope="module")
def cluster(nodes):
    """HEAD:PORT of the test cluster."""
    return nodes.addr


@pytest.fixture(scope="module")
def board_target(loopback_board, tmp_path_factory):
    """A target file named loopboard.toml whose [board] is the loopback sshd running this Python."""
    b = loopback_board
    target = tmp_path_factory.mktemp("board") / f"{BOARD}.toml"
    options = ", ".join(f'"{o}"' for o in b.ssh_options)
    target.write_text(
        (Path(__file__).parents[2] / "targets" / "cpu-int8.toml").read_text().replace('description = "', 'description = "loopback board: ')
        + f'\n[board]\nhost = "{b.host}"\nuser = "{b.user}"\nport = {b.port}\npython = "{b.python}"\n'
          f'workdir = "{b.workdir}"\nidentity_file = "{b.identity_file}"\nssh_options = [{options}]\n')
    return target


def _search(tmp_path: Path) -> Path:
    p = tmp_path / "search.toml"
    p.write_text(SEARCH)
    return p


def _chosen(result) -> dict[str, str | None]:
    return {o.target.name: (o.chosen.candidate.id if o.chosen else None) for o in result.outcomes}


def test_cluster_release_is_byte_identical_to_a_local_one(cluster, tmp_path, monkeypatch):
    """No benchmarks (the only figures that vary run to run) and separate caches: nothing is shared
    between the two runs, yet the cluster's release is the local one, byte for byte."""
    search = _search(tmp_path)
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-cluster"))
    on_cluster = api.release(None, ["cpu-int8"], out=tmp_path / "cluster", search=search, bench=False,
                             cluster=cluster)
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-local"))
    local = api.release(None, ["cpu-int8"], out=tmp_path / "local", search=search, bench=False, workers=1)
    assert _chosen(on_cluster) == _chosen(local)
    assert (tmp_path / "cluster" / "SHA256SUMS").read_bytes() == (tmp_path / "local" / "SHA256SUMS").read_bytes()
    nodes = {t.node for o in on_cluster.outcomes for t in o.tried}
    assert "local" not in nodes and None not in nodes  # every candidate ran as a task on a worker
    assert {t.node for o in local.outcomes for t in o.tried} == {"local"}


def test_a_sampled_search_asks_per_batch_and_matches_a_local_run_of_that_batch(cluster, tmp_path, monkeypatch):
    """Optuna stays on the driver: the cluster's batch (its CPUs, 2) of trials is asked, run as tasks, told;
    the local executor with that batch size proposes the same candidates and writes the same bytes."""
    from edgepipe.pipeline.executors import LocalExecutor, RayExecutor

    search = tmp_path / "sampled.toml"
    search.write_text('recipes = ["none"]\nmax_trials = 4\nseed = 1\n[onnxruntime]\ncalibration = ["minmax", '
                      '"percentile"]\ncalibration_samples = { low = 32, high = 128, step = 32 }\n')
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-cluster"))
    ex = RayExecutor(cluster)
    try:
        assert ex.batch_size == 2
        on_cluster = api.release(None, ["cpu-int8"], out=tmp_path / "cluster", search=search, bench=False, cluster=ex)
    finally:
        ex.close()
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-local"))
    local = api.release(None, ["cpu-int8"], out=tmp_path / "local", search=search, bench=False,
                        cluster=LocalExecutor(batch_size=2))

    def tried(r):
        return [(t.candidate.id, t.candidate.settings) for o in r.outcomes for t in o.tried]

    assert len(tried(on_cluster)) == 4 and tried(on_cluster) == tried(local)
    assert (tmp_path / "cluster" / "SHA256SUMS").read_bytes() == (tmp_path / "local" / "SHA256SUMS").read_bytes()


def test_board_benchmarks_run_only_on_the_boards_node_and_match_local(cluster, board_target, tmp_path):
    """With benchmarks (a CPU target and a board target over loopback ssh): the board's candidates ran
    only on the node declaring board:loopboard; a local rerun over the cache the cluster filled finds
    every stage under the same key and writes the same bytes."""
    import ray

    search = _search(tmp_path)
    targets = ["cpu-int8", str(board_target)]
    on_cluster = api.release(None, targets, out=tmp_path / "cluster", search=search, iterations=20, cluster=cluster)
    assert {o.target.name: o.status for o in on_cluster.outcomes} == {"cpu-int8": "released", BOARD: "released"}
    local = api.release(None, targets, out=tmp_path / "local", search=search, iterations=20)
    assert _chosen(on_cluster) == _chosen(local)
    assert local.stages_cached == local.stages_total  # the cluster's stages, found under the local keys
    assert (tmp_path / "cluster" / "SHA256SUMS").read_bytes() == (tmp_path / "local" / "SHA256SUMS").read_bytes()
    m = json.loads((tmp_path / "cluster" / BOARD / "manifest.json").read_text())
    assert next(s for s in m["stages"] if s["name"] == "bench")["where"] == "board 127.0.0.1"

    ray.init(address=cluster, logging_level="ERROR", log_to_driver=False)
    try:
        board_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and f"board:{BOARD}" in n["Resources"]}
    finally:
        ray.shutdown()
    assert len(board_nodes) == 1
    board = next(o for o in on_cluster.outcomes if o.target.name == BOARD)
    assert {t.node for t in board.tried} == board_nodes


def test_tensorrt_candidates_run_only_on_the_node_declaring_backend_tensorrt(cluster, tmp_path):
    import ray

    search = tmp_path / "trt.toml"
    search.write_text('recipes = ["none"]\n[tensorrt]\ncalibration = ["minmax", "entropy"]\n')
    r = api.release(None, ["cpu-int8", "jetson-orin-nano-int8"], out=tmp_path / "rel", search=search, bench=False,
                    cluster=cluster)
    ray.init(address=cluster, logging_level="ERROR", log_to_driver=False)
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        trt = {n["NodeID"] for n in alive if "backend:tensorrt" in n["Resources"]}
    finally:
        ray.shutdown()
    assert len(trt) == 1
    jetson = next(o for o in r.outcomes if o.target.name == "jetson-orin-nano-int8")
    assert jetson.status == "released" and len(jetson.tried) == 2
    assert {t.node for t in jetson.tried} == trt
    m = json.loads((tmp_path / "rel" / "jetson-orin-nano-int8" / "manifest.json").read_text())
    assert m["accuracy"]["evaluated_on"]  # no GPU on that node either: a bundle, its ONNX run on onnxruntime


def test_task_resources_ask_for_tensorrt_then_a_gpu_then_nothing():
    from edgepipe.config import load_target
    from edgepipe.pipeline.executors import task_resources
    from edgepipe.pipeline.options import BuildOptions

    opts = BuildOptions()
    trt, cpu = load_target("jetson-orin-nano-int8"), load_target("cpu-int8")
    assert task_resources(trt, opts, {"CPU": 4, "backend:tensorrt": 1, "GPU": 1}) == ({"backend:tensorrt": 1}, 0)
    assert task_resources(trt, opts, {"CPU": 4, "GPU": 2}) == ({}, 1)
    assert task_resources(trt, opts, {"CPU": 4}) == ({}, 0)
    assert task_resources(cpu, opts, {"CPU": 4, "GPU": 2, "backend:tensorrt": 1}) == ({}, 0)


def test_a_worker_node_killed_mid_release_loses_nothing(nodes, tmp_path, monkeypatch):
    """A third worker joins, and is killed (its whole process group) once every worker is busy: Ray runs
    its lost task again on another node, and the release is the local one, byte for byte."""
    import threading

    import ray

    from edgepipe.pipeline.executors import RayExecutor

    doomed = nodes.start("--num-cpus", "1")
    search = tmp_path / "grid.toml"
    search.write_text('recipes = ["none"]\n[onnxruntime]\ncalibration = ["minmax", "percentile"]\n'
                      'activation_type = ["uint8", "int8"]\n')
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-cluster"))
    ex = RayExecutor(nodes.addr)
    out: dict[str, object] = {}
    run = threading.Thread(target=lambda: out.update(r=api.release(
        None, ["cpu-int8"], out=tmp_path / "cluster", search=search, bench=False, cluster=ex)))
    try:
        run.start()
        deadline = time.monotonic() + 120
        while ray.available_resources().get("CPU", 0) > 0:  # wait until all 3 workers run a candidate
            assert run.is_alive() and time.monotonic() < deadline, "the workers never all got a candidate"
            time.sleep(0.2)
        nodes.end([doomed], grace=0)
        run.join(timeout=240)
        assert not run.is_alive()
    finally:
        ex.close()
    on_cluster = out["r"]
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-local"))
    local = api.release(None, ["cpu-int8"], out=tmp_path / "local", search=search, bench=False, workers=1)
    assert len([t for o in on_cluster.outcomes for t in o.tried if t.result is not None]) == 4
    assert _chosen(on_cluster) == _chosen(local)
    assert (tmp_path / "cluster" / "SHA256SUMS").read_bytes() == (tmp_path / "local" / "SHA256SUMS").read_bytes()


def test_a_board_no_node_declares_fails_before_any_work(cluster, tmp_path):
    t = tmp_path / "shelf-pi.toml"
    t.write_text('backend = "onnxruntime"\nprecision = "fp32"\ninput_shape = [1, 1, 32, 32]\n'
                 '[board]\nhost = "192.0.2.1"\n')
    out = tmp_path / "out"
    with pytest.raises(ClusterError) as e:
        api.release(None, ["cpu-int8", str(t)], out=out, search=_search(tmp_path), cluster=cluster)
    msg = str(e.value)
    assert "\n" not in msg and "'board:shelf-pi'" in msg
    assert """ray start --address HEAD:PORT --resources '{"board:shelf-pi": 1}'""" in msg
    assert not (out / "cpu-int8").exists()  # nothing was built


def test_a_node_with_other_versions_is_refused(cluster, tmp_path, monkeypatch):
    from edgepipe.pipeline.executors import ray_cluster

    real = ray_cluster.tool_versions()
    monkeypatch.setattr(ray_cluster, "tool_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    with pytest.raises(ClusterError, match=r"refused: its versions differ.*onnxruntime .* \(driver: 0\.0\.1\)"):
        api.release(None, ["cpu-int8"], out=tmp_path / "out", search=_search(tmp_path), cluster=cluster)
    assert not (tmp_path / "out").exists()


def test_no_cluster_at_the_address_is_one_line_and_starts_nothing(tmp_path):
    port = _free_port()
    r = subprocess.run([sys.executable, "-m", "edgepipe", "release", "--targets", "cpu-int8", "--out",
                        str(tmp_path / "out"), "--cluster", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"no Ray cluster at 127.0.0.1:{port}" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_a_board_node_that_does_not_come_back_stops_the_release_in_one_line():
    """The wait for a board whose node left: past ``board_timeout`` the pending tasks are cancelled and the
    error names the resource and the `ray start` that brings it back (a stand-in for Ray: no waiting)."""
    from edgepipe.pipeline.executors import RayExecutor

    class FakeRay:
        cancelled: list[str] = []

        def wait(self, pending, num_returns, timeout):
            return [], pending

        def cluster_resources(self):
            return {"CPU": 1.0}  # board:pi has left

        def cancel(self, ref, force):
            self.cancelled.append(ref)

    ex = object.__new__(RayExecutor)
    ex._ray, ex.board_timeout, ex.address = FakeRay(), -1.0, "10.0.0.5:6379"
    with pytest.raises(ClusterError) as e:
        ex._wait(["task-1", "task-2"], {"board:pi"})
    assert "\n" not in str(e.value) and "board:pi left the cluster at 10.0.0.5:6379" in str(e.value)
    assert """ray start --address 10.0.0.5:6379 --resources '{"board:pi": 1}'""" in str(e.value)
    assert FakeRay.cancelled == ["task-1", "task-2"]
