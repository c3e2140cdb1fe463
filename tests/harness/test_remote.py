"""Benchmarking on a board over SSH, against a real sshd on 127.0.0.1 (skipped where sshd is absent)."""

from __future__ import annotations

import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from edgepipe.config import Board
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.harness import BenchSettings
from edgepipe.harness.remote import measure_remote, worker_zip
from edgepipe.types import Artifact

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board(loopback_board):
    return loopback_board


def test_worker_zip_is_self_contained_and_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = worker_zip(tmp_path / "a"), worker_zip(tmp_path / "b")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    names = zipfile.ZipFile(a).namelist()
    assert "__main__.py" in names and "edgepipe/harness/worker.py" in names
    assert not any(n.endswith(".safetensors") for n in names)


def test_measure_on_board_over_ssh(board, example_onnx):
    art = Artifact("onnxruntime", "fp32", example_onnx.path)
    m = measure_remote(art, board, BenchSettings(threads=1, warmup=2, iterations=15))
    assert m.iterations == 15 and 0 < m.p50_ms <= m.p99_ms
    assert m.size_bytes == example_onnx.path.stat().st_size
    copied = list(Path(board.workdir).rglob(example_onnx.path.name))
    assert copied and copied[0].read_bytes() == example_onnx.path.read_bytes()


def test_unreachable_board_is_a_clear_error(example_onnx):
    b = Board(host="127.0.0.1", port=_free_port(), ssh_options=("ConnectTimeout=5",))
    with pytest.raises(BenchmarkError, match=r"board 127.0.0.1: creating the work directory failed: .*without a password"):
        measure_remote(Artifact("onnxruntime", "fp32", example_onnx.path), b, BenchSettings(iterations=1))


def test_board_spec_parsing():
    assert Board.parse("pi@raspberrypi.local:2222") == Board(host="raspberrypi.local", user="pi", port=2222)
    assert Board.parse("jetson").user is None
    with pytest.raises(ConfigError, match="give \\[user@\\]host\\[:port\\]"):
        Board.parse("pi@host:ssh")
