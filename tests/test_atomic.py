"""A release is never lost: directories are replaced by an atomic exchange, one writer at a time, and the
debris of killed writers is cleaned by the next one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgepipe import _fs
from edgepipe.errors import ConfigError

_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from edgepipe import _fs

    dest, kill_at, fallback, version = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    calls = [0]

    def then_die(fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a kill right after this rename
            return out
        return wrapped

    _fs.exchange = then_die((lambda a, b: False) if fallback else _fs.exchange)
    os.replace = then_die(os.replace)
    with _fs.atomic_dir(dest) as tmp:
        for name in ("a", "b"):
            (tmp / name).write_text(version)
""")


def _write(dest: Path, version: str, kill_at: int = 0, fallback: bool = False) -> int:
    return subprocess.run([sys.executable, "-c", _WRITER, str(dest), str(kill_at), "1" if fallback else "0", version],
                          capture_output=True, text=True, timeout=60).returncode


def _version(dest: Path) -> str | None:
    if not dest.is_dir():
        return None
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["a", "b"], files
    a, b = ((dest / n).read_text() for n in files)
    assert a == b, "a release mixed from two versions"
    return a


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_kill_at_any_rename_keeps_a_whole_release(tmp_path):
    dest = tmp_path / "cpu-int8"
    assert _write(dest, "v1") == 0 and _version(dest) == "v1"
    for kill_at in (1, 2, 3):
        rc = _write(dest, f"v{kill_at + 1}", kill_at)
        assert rc in (0, -9)
        assert _version(dest) in ("v1", "v2", "v3", "v4")  # always one whole version, never none
    assert _write(dest, "v9") == 0 and _version(dest) == "v9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-int8"]  # debris cleaned, lock file gone


def test_two_rename_fallback_killed_between_renames_is_restored_by_the_next_write(tmp_path):
    dest = tmp_path / "cpu-int8"
    assert _write(dest, "v1", fallback=True) == 0
    assert _write(dest, "v2", kill_at=2, fallback=True) == -9  # after `dest -> .cpu-int8.old-PID`
    assert not dest.exists() and any(".old-" in p.name for p in tmp_path.iterdir())
    _fs.clean_debris(dest)  # what the next writer does first, under the lock
    assert _version(dest) == "v1"
    assert _write(dest, "v3", fallback=True) == 0 and _version(dest) == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-int8"]


def test_concurrent_writers_never_collide(tmp_path):
    dest = tmp_path / "out"
    loop = _WRITER.replace("with _fs.atomic_dir(dest)", "for _ in range(25):\n  with _fs.atomic_dir(dest)").replace(
        "        for name in", "    for name in").replace("            (tmp / name)", "      (tmp / name)")
    procs = [subprocess.Popen([sys.executable, "-c", loop, str(dest), "0", "0", v], stderr=subprocess.PIPE, text=True)
             for v in ("x", "y")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert _version(dest) in ("x", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_debris_of_killed_runs_is_removed_and_nothing_else(tmp_path):
    dest = tmp_path / "cpu-int8"
    for name in (".cpu-int8.tmp-abc123_x", ".cpu-int8.abcd1234.tmp", ".cpu-int8.old-4242", ".cpu-fp32.tmp-zzz",
                 ".cpu-int8.lock"):
        (tmp_path / name).mkdir() if not name.endswith(".lock") else (tmp_path / name).write_text("999")
    with _fs.atomic_dir(dest) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cpu-fp32.tmp-zzz", "cpu-int8"]


def test_a_second_run_into_the_same_out_fails_in_one_line(tmp_path, capsys):
    from edgepipe import api
    from edgepipe.cli import main

    out = tmp_path / "dist"
    with _fs.dir_lock(out):  # another run holds it
        with pytest.raises(ConfigError, match=rf"--out '{out}' is being written by another edgepipe run \(pid {os.getpid()}\)"):
            api.build(None, ["cpu-int8"], out=out)
        with pytest.raises(SystemExit) as e:
            main(["release", "--targets", "cpu-int8", "--out", str(out)])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "being written by another edgepipe run" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written; the lock file went with the lock


def test_killed_runs_scratch_is_removed_by_the_next_run(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from edgepipe._fs import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"edgepipe-build-p{int(dead.stdout)}-abc"  # a run killed before its cleanup
    (stale / "cpu-int8").mkdir(parents=True)
    mine = tmp_path / "edgepipe-build-notapid"  # not ours to judge: left alone
    mine.mkdir()
    with scratch_dir("release") as d:
        assert d.is_dir() and d.parent == tmp_path and not stale.exists()
    assert not d.exists() and mine.exists()


def test_pt2_and_safetensors_outputs_are_byte_identical_run_to_run(tmp_path):
    from edgepipe import api
    from edgepipe.models import load_model, save_program

    m = load_model(None).module
    a = save_program(m, (1, 1, 32, 32), tmp_path / "a" / "model.pt2").read_bytes()
    b = save_program(m, (1, 1, 32, 32), tmp_path / "b" / "model.pt2").read_bytes()
    assert a == b and b".tmp" not in a  # no random temp name inside the archive
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.pt2"]
    api.pack(out=tmp_path / "m.epk")
    outs = [api.unpack(tmp_path / "m.epk", tmp_path / f"u{i}.safetensors")[0].read_bytes() for i in range(4)]
    assert len(set(outs)) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "u0.safetensors"), "pt") as f:
        assert f.metadata()["edgepipe.spec"] == "edgepipe.models.example:digits_resnet" and len(list(f.keys())) > 50
