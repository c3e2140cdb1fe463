"""Shared fixtures: the trained example model, its data splits, an exported ONNX of it, a loopback SSH
board (a real sshd on 127.0.0.1), a Docker engine with arm64 emulation, and an emulated aarch64 board."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker (before any test module imports torch): with
    # every runtime taking both cores, two workers' spinning threads burned a third of the suite's time
    os.environ.setdefault("EDGEPIPE_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_SERVERS = ("docker", "cluster")
#: session fixtures that are expensive to make, and the group whose worker makes them: a test that takes one
#: runs there, so it is made once, not once per worker (``releases`` built twice cost ~40 s)
SHARED_FIXTURES = {"releases": "docker"}  # each is one server per session: its tests share one xdist worker
#: each test's measured seconds (setup + call + teardown) in the last full run: ``--record-durations`` rewrites it
DURATIONS = Path(__file__).with_name("durations.txt")
#: a test measured at or above this many seconds is not in the fast profile, nor is any test of a file whose tests
#: took ``FAST_FILE_LIMIT_S`` together (their shared fixtures and stage caches would move to the tests left in it)
FAST_LIMIT_S = 1.0
FAST_FILE_LIMIT_S = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"record each test's seconds in {DURATIONS.name} (tests not run keep theirs): the fast profile "
                          f"leaves out tests measured at {FAST_LIMIT_S} s or more")


def _plain_id(nodeid: str) -> str:
    """A node id without the ``@group`` suffix pytest-xdist's loadgroup adds."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def _recorded() -> dict[str, float]:
    if not DURATIONS.is_file():
        return {}
    out = {}
    for line in DURATIONS.read_text().splitlines():
        seconds, _, nodeid = line.partition(" ")
        if nodeid:
            out[nodeid] = float(seconds)
    return out


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not config.getoption("--record-durations"):
        return
    total: dict[str, float] = {}  # the tests that ran now; the others keep their recorded figures
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) in ("setup", "call", "teardown") and hasattr(r, "duration"):
                key = _plain_id(r.nodeid)
                total[key] = total.get(key, 0.0) + float(r.duration)
    merged = {**_recorded(), **total}
    lines = [f"{v:.2f} {k}" for k, v in sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))]
    DURATIONS.write_text("\n".join(lines) + "\n")
    terminalreporter.write_line(f"recorded {len(total)} tests' durations in {DURATIONS} ({len(lines)} in all)")


def pytest_configure(config: pytest.Config) -> None:
    # xdist hands out groups in collection order, which pytest_collection_modifyitems sorts longest first;
    # its default reorder (by number of tests per group) would undo that
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Sort the suite into its profiles and skip what this machine cannot run.

    - ``fast``: every test not marked ``slow``, ``timing``, ``docker``, ``cluster`` or ``gpu``, not measured at
      ``FAST_LIMIT_S`` or more in the last full run (``durations.txt``; a new test counts as fast until the next
      ``--record-durations``) and not in a file whose tests took ``FAST_FILE_LIMIT_S`` together: the edit loop,
      ``pytest -n 2 -m fast``.
    - Under pytest-xdist (``-n 2 --dist loadgroup``) the tests of one shared server (the private dockerd and
      its images, the Ray cluster) run on one worker, so each server starts once; every other test runs with
      the rest of its file (its module-scoped fixtures made once).
    - Tests marked ``gpu`` need TensorRT and an NVIDIA GPU: skipped elsewhere, saying what is missing.
    """
    recorded = _recorded()
    per_file: dict[str, float] = {}
    for nodeid, seconds in recorded.items():
        per_file[nodeid.split("::")[0]] = per_file.get(nodeid.split("::")[0], 0.0) + seconds
    groups: dict[str, str] = {}
    for item in items:
        if (not any(m in item.keywords for m in ("slow", "timing", "gpu", *SHARED_SERVERS))
                and recorded.get(item.nodeid, 0.0) < FAST_LIMIT_S
                and per_file.get(item.nodeid.split("::")[0], 0.0) < FAST_FILE_LIMIT_S):
            item.add_marker(pytest.mark.fast)
        # one shared server's tests together; every other test with the rest of its file, so a module's
        # fixtures (a release, a cluster of builds) are made once, not once per worker
        server = next((s for s in SHARED_SERVERS if s in item.keywords), None)
        server = server or next((g for f, g in SHARED_FIXTURES.items() if f in item.fixturenames), None)
        groups[item.nodeid] = server or item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    # longest group first (by last run's seconds): the workers take groups in this order, so the long ones
    # start at once and the short ones fill in at the end (xdist's own order, by number of tests, left a
    # 10-minute group for last); the sort is stable, so a file's tests stay together in their order
    seconds: dict[str, float] = {}
    for item in items:
        seconds[groups[item.nodeid]] = seconds.get(groups[item.nodeid], 0.0) + recorded.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -seconds[groups[item.nodeid]])
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
        # the key that signs cache records: the tests' own, never the user's ~/.config/edgepipe/cache.key
        mp.setenv("EDGEPIPE_CACHE_KEY_FILE", str(tmp_path_factory.mktemp("cache-key") / "cache.key"))
        mp.setenv("OPENVINO_TELEMETRY_DISABLE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own stage cache, so no test passes because of another's output. It is removed
    when the test ends: 450 caches of models and artifacts kept to the end fill a small disk."""
    import shutil

    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(d))
    monkeypatch.setenv("OPENVINO_TELEMETRY_DISABLE", "1")
    yield
    shutil.rmtree(d, ignore_errors=True)


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


#: the toy detector head's input shape (tests/quantize/test_mixed_ranges.py, tests/backends/test_int16.py)
HEAD_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="session")
def detector_head(tmp_path_factory: pytest.TempPathFactory):
    """A toy one-stage detector head whose one output joins boxes in pixels (0-640) and class scores (0-1), as
    YOLO's does (``[N, anchors, 4 + classes]``): one int8 scale for both rounds the scores to 0 or 2.5. Returns
    its ONNX, 64 calibration samples, 32 held-out samples and the torch model's outputs on them."""
    import torch
    from torch import nn

    from edgepipe.export import export
    from edgepipe.types import CalibrationSet

    class DetectorHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
            self.box, self.cls = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.body(x)
            y = torch.cat([torch.sigmoid(self.box(f)) * 640, torch.sigmoid(self.cls(f))], 1)
            return y.flatten(2).transpose(1, 2)

    x = np.random.default_rng(0).uniform(0, 1, (96, *HEAD_SHAPE[1:])).astype(np.float32)
    model = DetectorHead().eval()
    onnx_model = export(model, HEAD_SHAPE, tmp_path_factory.mktemp("head") / "head.onnx")
    with torch.no_grad():
        ref = model(torch.from_numpy(x[64:])).numpy()
    return onnx_model, CalibrationSet(x[:64], "uniform noise"), x[64:], ref


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
    key_type, host_key = (d / "host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {key_type} {host_key}\n")  # the board's key, checked
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
                ssh_options=(f"UserKnownHostsFile={d / 'known_hosts'}", "LogLevel=ERROR"))
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


# ---------------------------------------------------------------------------------------------------------
# Docker, arm64 emulation and an emulated aarch64 board (tests marked `docker`)

BASES_CACHE = Path(os.environ.get("EDGEPIPE_TEST_BASES") or Path.home() / ".cache" / "edgepipe" / "bases")
BOARD_PACKAGES = ("openssh-server",)  # the arm64 base doubles as the board's root


def _engine_answers(env: dict[str, str]) -> bool:
    import shutil
    import subprocess

    docker = shutil.which("docker")
    if docker is None:
        return False
    r = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True,
                       env=env, timeout=30)
    return r.returncode == 0


def register_qemu_binfmt() -> str | None:
    """Register qemu-user-static's aarch64 handler with binfmt_misc (root); ``None`` or why it cannot."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if (binfmt / "qemu-aarch64").exists():
        return None
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    if not conf.is_file():
        return "qemu-user-static is not installed (apt-get install qemu-user-static)"
    import subprocess

    if not (binfmt / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
    line = next(ln for ln in conf.read_text().splitlines() if ln.startswith(":"))
    try:
        (binfmt / "register").write_text(line)
    except OSError as e:
        return f"cannot register the aarch64 binfmt handler: {e}"
    return None


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory):
    """A Docker engine for the session: the one DOCKER_HOST (or the default socket) names if it answers,
    else a private dockerd started here (root; no bridge network, no iptables). arm64 emulation
    (qemu binfmt) is registered too. Skipped only without root or without docker.io installed."""
    import shutil
    import subprocess
    import time

    env = dict(os.environ)
    proc = None
    if not _engine_answers(env):
        dockerd = shutil.which("dockerd")
        if dockerd is None or os.geteuid() != 0 or shutil.which("docker") is None:
            pytest.skip("needs Docker's engine and root: apt-get install docker.io (the README's set-up line does)")
        d = Path("/tmp") / f"edgepipe-dockerd-{os.getpid()}"  # short: unix socket paths are limited to 108 bytes
        d.mkdir(exist_ok=True)
        sock = f"unix://{d}/docker.sock"
        log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "w")  # noqa: SIM115
        proc = subprocess.Popen([dockerd, "--data-root", str(d / "data"), "--exec-root", str(d / "exec"),
                                 "--pidfile", str(d / "dockerd.pid"), "--host", sock, "--bridge=none",
                                 "--iptables=false"], stdout=log, stderr=subprocess.STDOUT)
        env["DOCKER_HOST"] = sock
        for _ in range(120):
            if _engine_answers(env):
                break
            if proc.poll() is not None:
                pytest.fail(f"dockerd exited with {proc.returncode}; see {log.name}")
            time.sleep(0.5)
        else:
            pytest.fail(f"dockerd did not answer in 60 s; see {log.name}")
    why = register_qemu_binfmt() if os.geteuid() == 0 else None
    if why:
        pytest.fail(why)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_HOST", env.get("DOCKER_HOST", ""))
        if not env.get("DOCKER_HOST"):
            mp.delenv("DOCKER_HOST")
        from edgepipe.ship.engine import Docker

        yield Docker()
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        # dockerd leaves its network namespace bind-mounted under exec/: unmount, or rmtree cannot remove it
        # and every run leaves a directory behind
        for line in Path("/proc/mounts").read_text().splitlines():
            point = line.split()[1]
            if point.startswith(f"{d}/"):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        if d.exists():
            import warnings

            warnings.warn(f"{d} is left behind (a mount under it?): remove it by hand", stacklevel=1)


@pytest.fixture(scope="session")
def bases(docker_engine):
    """Debian bookworm bases made from the mirror (cached between runs in BASES_CACHE):
    ``{"linux/amd64": tag, "linux/arm64": tag}``; the arm64 one carries openssh-server for the board."""
    from edgepipe.ship import base

    out = {}
    for platform, extra in (("linux/amd64", ()), ("linux/arm64", BOARD_PACKAGES)):
        b = base.build_base(platform, f"edgepipe-test/debian-{base.ARCH[platform]}:bookworm",
                            (*base.DEFAULT_PACKAGES, *extra), docker=docker_engine, cache=BASES_CACHE)
        out[platform] = b.tag
    return out


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory):
    """The example released (no bench) for one target per CPU runtime: ``{target: release dir}``."""
    from edgepipe import api

    out = tmp_path_factory.mktemp("releases")
    api.build(None, ["cpu-int8", "intel-cpu-int8", "arm64-cpu-int8"], out=out, bench=False)
    return {t: out / t for t in ("cpu-int8", "intel-cpu-int8", "arm64-cpu-int8")}


BOARD_DOCKERFILE = """\
FROM {base}
COPY wheels/ /tmp/wheels/
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m venv /opt/board \\
    && /opt/board/bin/python -m pip install --no-cache-dir --no-compile --no-index --find-links /tmp/wheels \\
       --require-hashes -r /tmp/requirements.lock \\
    && rm -rf /tmp/wheels && mkdir -p /run/sshd /root/.ssh && chmod 700 /root/.ssh && ssh-keygen -A
COPY authorized_keys /root/.ssh/authorized_keys
"""


class EmulatedBoard:
    """An aarch64 container (qemu-user) with sshd on 127.0.0.1 and a venv of numpy, LiteRT and onnxruntime."""

    def __init__(self, engine, image: str, key: Path, tmp: Path) -> None:
        self.engine, self.image, self.key, self.tmp = engine, image, key, tmp
        self.containers: list[str] = []

    def start(self, python: str = "/opt/board/bin/python"):
        """Start one board container; returns its :class:`Board` (and the container name as ``.name``)."""
        import socket
        import time
        import uuid

        from edgepipe.config import Board
        from edgepipe.ship.emulation import DOCKER_ARGS

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        name = f"edgepipe-board-{uuid.uuid4().hex[:8]}"
        self.engine._run(["run", "-d", "--name", name, "--network", "host", *DOCKER_ARGS, self.image,
                          "/usr/sbin/sshd", "-D", "-e", "-p", str(port), "-o", "ListenAddress=127.0.0.1",
                          "-o", "PasswordAuthentication=no", "-o", "UsePAM=no",
                          "-o", "PermitRootLogin=prohibit-password"], timeout=120)
        self.containers.append(name)
        for _ in range(200):  # sshd under emulation takes a moment
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        host_key = self.engine._run(["exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"], timeout=60).stdout
        known = self.tmp / f"known_hosts-{name}"
        known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key.split()[:2])}\n")
        board = Board(host="127.0.0.1", user="root", port=port, python=python, workdir="/tmp/edgepipe",
                      identity_file=str(self.key), ssh_options=(f"UserKnownHostsFile={known}", "LogLevel=ERROR"))
        return board, name

    def close(self) -> None:
        for c in self.containers:
            self.engine._run(["rm", "-f", c], check=False, timeout=60)


@pytest.fixture(scope="session")
def emulated_board(docker_engine, bases, tmp_path_factory: pytest.TempPathFactory):
    """A real aarch64 userland behind real sshd on 127.0.0.1 (key auth): an arm64 container under QEMU."""
    import subprocess

    from edgepipe.ship import wheels
    from edgepipe.versions import tool_versions

    d = tmp_path_factory.mktemp("board")
    v = tool_versions()
    house = wheels.wheelhouse({"numpy": v["numpy"], "ai-edge-litert": v["ai-edge-litert"],
                               "onnxruntime": v["onnxruntime"]}, "linux/arm64")
    wheels.copy_into(house, d)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "key")], check=True)
    (d / "authorized_keys").write_text((d / "key.pub").read_text())
    (d / "Dockerfile").write_text(BOARD_DOCKERFILE.format(base=bases["linux/arm64"]))
    docker_engine._run(["build", "--network", "none", "-t", "edgepipe-test/board:arm64", str(d)],
                       env={"DOCKER_BUILDKIT": "0"}, what="build (board)")
    b = EmulatedBoard(docker_engine, "edgepipe-test/board:arm64", d / "key", d)
    yield b
    b.close()
