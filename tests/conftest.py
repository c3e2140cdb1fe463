"""Shared fixtures: the trained example model, its data splits, an exported ONNX of it, and a loopback
SSH board (a real sshd on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need TensorRT and an NVIDIA GPU: skip them elsewhere, saying what is missing."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    from edgepipe import backends

    avail = backends.get("tensorrt").check()
    if avail.run:
        return
    skip = pytest.mark.skip(reason=f"needs TensorRT and an NVIDIA GPU: {avail.reason}")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide default, so that module- and session-scoped fixtures never touch the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        mp.setenv("OPENVINO_TELEMETRY_DISABLE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own stage cache, so no test passes because of another's output."""
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("OPENVINO_TELEMETRY_DISABLE", "1")


@pytest.fixture(scope="session")
def example_model():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


@pytest.fixture(scope="session")
def splits():
    from edgepipe.data import digits, split

    return split(digits((1, 32, 32)), calibration_samples=128)


@pytest.fixture(scope="session")
def example_onnx(tmp_path_factory: pytest.TempPathFactory, example_model):
    """The example exported once per session (dynamic batch)."""
    from edgepipe.export import export

    return export(example_model, (1, 1, 32, 32), tmp_path_factory.mktemp("onnx") / "example.onnx")


@pytest.fixture
def calibration(splits):
    from edgepipe.types import CalibrationSet

    return CalibrationSet(splits.calibration.x, "digits:calibration")


def no_temp_leftovers(root: Path) -> list[Path]:
    """Anything a failed stage left behind that looks like output."""
    return [p for p in root.rglob("*") if p.name != ".gitkeep"] if root.exists() else []


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


@pytest.fixture(scope="session")
def loopback_board(tmp_path_factory: pytest.TempPathFactory):
    """A :class:`Board` that is this machine over a real sshd on 127.0.0.1 (key auth, this Python).

    Skipped only where sshd or root is missing (the README's set-up line installs openssh-server).
    """
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time

    from edgepipe.config import Board

    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if sshd is None or os.geteuid() != 0:
        pytest.skip("needs openssh-server (sshd) and root to run a loopback sshd")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PidFile {d / 'sshd.pid'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield Board(host="127.0.0.1", user="root", port=port, python=sys.executable, workdir=str(d / "board"),
                identity_file=str(d / "client_key"),
                ssh_options=("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"))
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def cli_error(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in this process; it must exit 1 with exactly one `error:` line and no traceback.

    Returns that line.
    """

    def run(*args: str) -> str:
        from edgepipe.cli import main

        with pytest.raises(SystemExit) as e:
            main(list(args))
        err = capsys.readouterr().err
        assert e.value.code == 1, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return run
