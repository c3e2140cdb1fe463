"""Candidates per minute: the release search in this process against the same search on a Ray cluster.

    python bench/bench_cluster.py [--workers 2] [--targets cpu-int8] [--address HEAD:PORT]

Runs `edgepipe release` on the bundled example with a grid of recipes x calibration x activation
type, with the local executor at 1 worker (one candidate after another in this process) and at
``--workers`` processes (the local pool, one bench at a time), and once with ``--cluster`` (each
candidate a Ray task). Without ``--address`` it starts a throwaway cluster on
127.0.0.1: a head with no CPUs and ``--workers`` worker nodes of one CPU each, one after the other, and
ends exactly those processes afterwards. Every run gets a fresh, empty stage cache, so every stage is
computed (the figures are cold-start throughput, references included); the two releases must choose
the same candidates. On a machine with fewer cores than workers the cluster cannot be faster: the
figures then show its overhead (Ray start-up per worker process, shipping artifacts, one session per
worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgepipe import api

SEARCH = """
recipes = ["none", "structured-50"]
[onnxruntime]
calibration = ["minmax", "percentile"]
activation_type = ["uint8", "int8"]
[openvino]
calibration = ["minmax"]
preset = ["performance", "mixed"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(addr: str) -> int:
    import ray

    try:
        ray.init(address=addr, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError):
        return 0
    try:
        return sum(1 for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()


@contextlib.contextmanager
def local_cluster(workers: int):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    common = ["--object-store-memory", str(100 * 1024 * 1024), "--node-ip-address", "127.0.0.1", "--block"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    procs: list[subprocess.Popen] = []
    try:
        for i in range(workers + 1):
            args = (["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard=false"] if i == 0
                    else ["--address", addr, "--num-cpus", "1"])
            procs.append(subprocess.Popen([ray_bin, "start", *args, *common], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
            deadline = time.monotonic() + 120
            while _nodes(addr) < i + 1:  # one node at a time: nodes starting at once can pick one port
                if time.monotonic() > deadline:
                    raise SystemExit(f"the throwaway cluster at {addr} did not come up")
                time.sleep(1)
        yield addr
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def _run(label: str, targets: list[str], search: Path, root: Path, iterations: int, cluster: str | None,
         workers: int | None = None):
    os.environ["EDGEPIPE_CACHE_DIR"] = str(root / f"cache-{label}")  # cold: every stage computed
    t0 = time.perf_counter()
    r = api.release(None, targets, out=root / label, search=search, iterations=iterations, cluster=cluster,
                    workers=workers)
    wall = time.perf_counter() - t0
    n = sum(len(o.tried) for o in r.outcomes)
    chosen = {o.target.name: o.chosen.candidate.id if o.chosen else None for o in r.outcomes}
    return {"executor": label, "candidates": n, "wall_s": round(wall, 1),
            "candidates_per_min": round(n / wall * 60, 1), "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="worker nodes of the throwaway cluster (1 CPU each)")
    ap.add_argument("--targets", default="cpu-int8", help="comma-separated targets (default: cpu-int8)")
    ap.add_argument("--address", help="use this running cluster instead of starting one")
    ap.add_argument("--iterations", type=int, default=50, help="timed iterations per benchmark")
    args = ap.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-cluster-") as tmp:
        root = Path(tmp)
        search = root / "search.toml"
        search.write_text(SEARCH)
        rows = [_run("local-1w", targets, search, root, args.iterations, None, 1),
                _run(f"local-{args.workers}w", targets, search, root, args.iterations, None, args.workers)]
        if args.address:
            rows.append(_run("ray", targets, search, root, args.iterations, args.address))
        else:
            with local_cluster(args.workers) as addr:
                rows.append(_run(f"ray-{args.workers}w", targets, search, root, args.iterations, addr))
    print(f"{'executor':<10} {'candidates':>10} {'wall s':>8} {'cand/min':>9}  chosen")
    for r in rows:
        print(f"{r['executor']:<10} {r['candidates']:>10} {r['wall_s']:>8} {r['candidates_per_min']:>9}  "
              f"{json.dumps(r['chosen'])}")
    if len({json.dumps(r["chosen"], sort_keys=True) for r in rows}) != 1:
        print("note: the executors chose differently (latency ties measured apart can flip the choice)")
    print(f"machine: {os.cpu_count()} cores; cold cache every run")


if __name__ == "__main__":
    main()
