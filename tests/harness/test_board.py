"""An emulated aarch64 board: an arm64 Debian container under QEMU with sshd on 127.0.0.1 (key auth) and
a venv of numpy, LiteRT and onnxruntime. `bench --device` and `build` with a [board] go through real SSH
into real aarch64 userland; the figures say they were emulated; accuracy is measured by the board's
own runtime; a broken board is reported with what to do."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgepipe.errors import BenchmarkError

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def board_cache(tmp_path_factory) -> Path:
    """The stage cache of the board's build and release: both convert the example for the same board target
    (a TFLite conversion each, ~20 s); what they test, the board's timing and labels, is measured anew
    (their benches differ in iterations, so neither finds the other's figures)."""
    return tmp_path_factory.mktemp("board-cache")


@pytest.fixture(scope="module")
def board(emulated_board):
    b, _ = emulated_board.start()
    return b


def _board_target(tmp: Path, board, name: str = "emuboard", base: str = "arm64-cpu-int8") -> Path:
    """A copy of a shipped target with a [board] table for the emulated board (and a latency budget)."""
    from edgepipe.config import target_files

    text = target_files()[base].read_text().replace("[budgets]\n", "[budgets]\nmax_latency_ms = 5.0\n")
    opts = ", ".join(json.dumps(o) for o in board.ssh_options)
    text += (f'\n[board]\nhost = "{board.host}"\nuser = "{board.user}"\nport = {board.port}\n'
             f'python = "{board.python}"\nidentity_file = "{board.identity_file}"\nssh_options = [{opts}]\n')
    d = tmp / "targets"
    d.mkdir(exist_ok=True)
    (d / f"{name}.toml").write_text(text)
    return d / f"{name}.toml"


def test_bench_on_the_board_is_labelled_emulated_and_verified_there(board, releases, tmp_path, monkeypatch, capsys):
    from edgepipe.cli import main

    _board_target(tmp_path, board)
    monkeypatch.setenv("EDGEPIPE_TARGETS", str(tmp_path / "targets"))
    with pytest.raises(SystemExit) as e:
        main(["bench", str(releases["arm64-cpu-int8"]), "--device", "emuboard", "--verify", "--iterations", "10",
              "--warmup", "2", "--json"])
    assert e.value.code == 0
    m = json.loads(capsys.readouterr().out)
    assert m["host"]["machine"] == "aarch64" and m["host"]["emulated"] == "qemu-user"
    ev = m["eval"]
    assert ev["samples"] == 359 and abs(ev["top1"] - ev["release_top1"]) <= 0.01  # the board's own runtime
    c = ev["comparison"]
    assert c["agreement"] >= 0.99 and "emulated by qemu-user" in c["there"] and "x86_64" in c["here"]
    # the table says so too
    with pytest.raises(SystemExit):
        main(["bench", str(releases["arm64-cpu-int8"]), "--device", "emuboard", "--iterations", "5", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "emulated by qemu-user" in out and "not how fast" in out


def test_build_on_the_board_times_its_reference_there_and_keeps_emulated_latency_off_budgets(
        board, board_cache, tmp_path, capsys, monkeypatch):
    from edgepipe.cli import main

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(board_cache))

    target = _board_target(tmp_path, board)
    with pytest.raises(SystemExit) as e:
        main(["build", "--target", str(target), "--out", str(tmp_path / "dist"), "--iterations", "10"])
    assert e.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "(emulated)" in out  # the speed-up compares the board with itself, and says it was emulated
    mf = json.loads((tmp_path / "dist" / "emuboard" / "manifest.json").read_text())
    lat, ref = mf["latency"], mf["reference_latency"]
    assert lat["host"]["machine"] == "aarch64" and lat["host"]["emulated"] == "qemu-user"
    assert ref["host"] == lat["host"]  # the fp32 reference was timed on the same (emulated) board
    assert "max_latency_ms" not in mf["budgets"]  # an emulated figure is never checked against a latency budget
    assert "max_metric_drop" in mf["budgets"]
    report = (tmp_path / "dist" / "emuboard" / "report.html").read_text()
    assert "emulated by qemu-user: proves function, not speed" in report


def test_a_board_without_numpy_or_the_runtime_is_named_with_the_pip_line(board, releases, emulated_board):
    import dataclasses

    from edgepipe import api
    from edgepipe.versions import tool_versions

    bare = dataclasses.replace(board, python="/usr/bin/python3")  # Debian's Python: no numpy
    with pytest.raises(BenchmarkError, match=r"has no 'numpy' module; install it there: /usr/bin/python3 -m pip "
                                             rf"install 'numpy=={tool_versions()['numpy']}'"):
        api.bench(releases["arm64-cpu-int8"], device=bare, iterations=2, warmup=0)
    with pytest.raises(BenchmarkError, match=r"has no 'openvino' module; install it there: /opt/board/bin/python -m "
                                             rf"pip install 'openvino=={tool_versions()['openvino']}'"):
        api.bench(releases["intel-cpu-int8"], device=board, iterations=2, warmup=0)


def test_an_unreachable_or_keyless_board_says_what_to_check(board, releases, tmp_path):
    import dataclasses
    import socket

    from edgepipe import api

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(BenchmarkError, match=rf"ssh -p {closed} root@127.0.0.1. works without a password"):
        api.bench(releases["arm64-cpu-int8"], device=dataclasses.replace(board, port=closed), iterations=2)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(BenchmarkError, match=r"Permission denied.*without a password \(keys\)"):
        api.bench(releases["arm64-cpu-int8"], device=dataclasses.replace(board, identity_file=str(other)),
                  iterations=2)


def test_a_board_that_drops_mid_run_keeps_the_figures_so_far(emulated_board, releases):
    from edgepipe import api

    b, name = emulated_board.start()
    errors: list[BaseException] = []

    def bench() -> None:
        try:
            api.bench(releases["arm64-cpu-int8"], device=b, warmup=1, duration_s=120)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=bench)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline:  # until the worker on the board has timed a few seconds
        r = subprocess.run(["docker", "exec", name, "sh", "-c", "ls /tmp/edgepipe/*/ 2>/dev/null; "
                            "ps -eo args 2>/dev/null || cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
                           capture_output=True, text=True)
        if "edgepipe-worker" in r.stdout:
            break
        time.sleep(1)
    time.sleep(8)
    subprocess.run(["docker", "kill", name], capture_output=True)  # the board drops
    t.join(timeout=180)
    assert errors and isinstance(errors[0], BenchmarkError), errors
    e = errors[0]
    assert "it stopped while timing, after" in str(e) and "figures so far are kept" in str(e)
    assert e.partial["phase"] == "timing" and e.partial["iterations"] > 0 and e.partial["p50_ms"] > 0


def test_release_for_a_board_target_marks_emulated_figures(board, board_cache, tmp_path, monkeypatch):
    from edgepipe import api

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(board_cache))

    target = _board_target(tmp_path, board)
    api.release(None, [str(target)], out=tmp_path / "rel", max_trials=1, workers=1, iterations=5)
    index = json.loads((tmp_path / "rel" / "index.json").read_text())
    e = index["targets"]["emuboard"]
    assert e["reference"]["emulated"] == "qemu-user"  # the reference was timed on the board too
    timed = [c for c in e["candidates"] if c.get("p50_ms") is not None]
    assert timed and all(c["emulated"] == "qemu-user" for c in timed)
    assert "(emulated by qemu-user: function, not speed)" in (tmp_path / "rel" / "report.html").read_text()
