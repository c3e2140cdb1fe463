"""The local default executor: a process pool sized to the cores, one bench at a time, the same tasks as
the Ray cluster runs, against the same search run one candidate after another in this process."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from edgepipe import api
from edgepipe.errors import EdgepipeError
from edgepipe.pipeline.executors import PoolExecutor

pytestmark = pytest.mark.slow

SEARCH = """
recipes = ["none"]
[onnxruntime]
calibration = ["minmax", "percentile"]
activation_type = ["uint8", "int8"]
"""


def _search(tmp_path: Path) -> Path:
    p = tmp_path / "search.toml"
    p.write_text(SEARCH)
    return p


def test_the_pool_writes_the_release_one_process_writes(tmp_path, monkeypatch):
    """No benchmarks (the only figures that vary run to run) and separate caches: two worker processes
    give the release that one-after-another in this process gives, byte for byte."""
    search = _search(tmp_path)
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-pool"))
    pool = PoolExecutor(workers=2)
    try:
        pooled = api.release(None, ["cpu-int8"], out=tmp_path / "pool", search=search, bench=False, cluster=pool)
    finally:
        pool.close()
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache-one"))
    one = api.release(None, ["cpu-int8"], out=tmp_path / "one", search=search, bench=False, workers=1)
    assert (tmp_path / "pool" / "SHA256SUMS").read_bytes() == (tmp_path / "one" / "SHA256SUMS").read_bytes()
    ran = [t.node for o in pooled.outcomes for t in o.tried]
    assert len(ran) == 4 and len(set(ran)) == 2 and all(n.startswith("pid ") for n in ran), ran
    assert str(os.getpid()) not in " ".join(ran)  # nothing of it ran in the driver
    assert {t.node for o in one.outcomes for t in o.tried} == {"local"}


def test_the_pool_times_one_thing_at_a_time(tmp_path, monkeypatch):
    """Both workers compile while either may bench, but no two measurements overlap in time."""
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    pool = PoolExecutor(workers=2)
    try:
        r = api.release(None, ["cpu-int8"], out=tmp_path / "rel", search=_search(tmp_path), iterations=200,
                        cluster=pool)
    finally:
        pool.close()
    assert not r.failed and r.outcomes[0].chosen is not None
    spans = sorted(pool.bench_spans, key=lambda s: s[1])
    # each worker times the fp32 reference once (the second finds it cached, or measures it again if
    # both missed together) and its own candidates: at least the 4 candidates, from 2 workers
    assert len(spans) >= 4 and len({w for w, _, _ in spans}) == 2, spans
    for (_, _, end), (_, start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two measurements overlapped: {spans}"


def test_a_worker_that_dies_stops_the_release_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    killed: list[int] = []

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for p in mp.active_children():
                if p.pid:
                    time.sleep(3)  # let it start a candidate
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=kill_first_worker, daemon=True)
    t.start()
    with pytest.raises(EdgepipeError, match="worker process of the local pool died") as e:
        api.release(None, ["cpu-int8"], out=tmp_path / "rel", search=_search(tmp_path), bench=False, workers=2)
    t.join(timeout=5)
    assert killed and "\n" not in str(e.value)
    assert not (tmp_path / "rel").exists()


def test_the_default_pool_is_the_cores_this_process_may_use_not_the_machines():
    import subprocess
    import sys

    # pinned to one core (as a CI job or `taskset -c 0` pins it), the pool is one worker, whatever the machine has
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edgepipe.pipeline.executors import PoolExecutor; print(PoolExecutor().workers, os.cpu_count())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    workers, machine = map(int, r.stdout.split())
    assert workers == 1, (workers, machine)
    assert PoolExecutor().workers == len(os.sched_getaffinity(0)) >= 1
    assert PoolExecutor(workers=3).batch_size == 3 and PoolExecutor(workers=3, batch_size=5).batch_size == 5
    with pytest.raises(EdgepipeError, match="give 1 or more"):
        PoolExecutor(workers=0)


def test_workers_and_cluster_are_one_or_the_other(capsys):
    from edgepipe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["release", "--targets", "cpu-int8", "--workers", "2", "--cluster", "auto"])
    assert e.value.code == 2 and "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["release", "--targets", "cpu-int8", "--workers", "0"])
    assert e.value.code == 2 and "--workers" in capsys.readouterr().err


def test_a_killed_workers_scratch_is_swept_by_the_next_worker(tmp_path, monkeypatch):
    """A Ray worker is killed rather than exited, so its atexit never runs: the next worker session on the
    host removes the scratch of processes that are gone and keeps that of live ones."""
    import subprocess
    import sys
    import tempfile

    from edgepipe.pipeline.executors import task

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"edgepipe-worker-{gone.pid}-abcd1234"
    live = tmp_path / f"edgepipe-worker-{os.getpid()}-efgh5678"
    other = tmp_path / "edgepipe-worker-notapid-x"
    for d in (dead, live, other):
        (d / "reference-0").mkdir(parents=True)
    task._sweep_scratch()
    assert not dead.exists()
    assert live.exists() and other.exists()
