"""Benchmark on a board over SSH: the same worker, shipped as one zip file, run by the board's Python.

The board needs Python >= 3.11, numpy and the artifact's runtime (onnxruntime, ai-edge-litert, openvino,
tensorrt): not torch and not edgepipe. The worker zip holds edgepipe's pure-Python modules; only the
worker path and the backend's runtime are imported on the board.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shlex
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_path
from edgepipe._telemetry import NO_TELEMETRY_ENV
from edgepipe.config import Board
from edgepipe.errors import BenchmarkError, ConfigError
from edgepipe.harness import (
    MAX_REPLY_BYTES,
    BenchSettings,
    Measurement,
    _settings,
    parse_worker_output,
    partial_figures,
)
from edgepipe.types import Artifact

_MAIN = """\
import json, sys
try:
    if sys.argv[1:2] == ["--rounds"]:  # the finalists, re-timed together (edgepipe.harness.rounds)
        del sys.argv[1]
        from edgepipe.harness.rounds import main
    else:
        from edgepipe.harness.worker import main
except ModuleNotFoundError as e:  # the board's Python lacks numpy: said as data, the host names the pip line
    print(json.dumps({"ok": False, "error": f"ModuleNotFoundError: {e}", "missing": (e.name or "").split(".")[0]}))
    sys.exit(0)
main()
"""


def worker_zip(dest_dir: Path) -> Path:
    """A zipapp of edgepipe's Python sources whose ``__main__`` is the bench worker, named by content hash."""
    pkg = Path(__file__).resolve().parents[1]
    files = sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
    h = hashlib.sha256(_MAIN.encode())
    for f in files:
        h.update(f.relative_to(pkg).as_posix().encode() + f.read_bytes())
    dest = dest_dir / f"edgepipe-worker-{h.hexdigest()[:16]}.pyz"
    if not dest.exists():
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.writestr(zipfile.ZipInfo(f"edgepipe/{f.relative_to(pkg).as_posix()}", (2020, 1, 1, 0, 0, 0)),
                           f.read_bytes())
            z.writestr(zipfile.ZipInfo("__main__.py", (2020, 1, 1, 0, 0, 0)), _MAIN)
    return dest


class SSH:
    """ssh/scp to one board, non-interactive (keys only), with a connect timeout.

    ``BatchMode=yes`` comes first: ssh keeps the first value given for an option, and the target's
    ``ssh_options`` (an allow-list, see :data:`edgepipe.config.target.SSH_OPTIONS`) cannot name it anyway.
    What a board prints is read up to ``max_reply_bytes`` and refused beyond, never held whole.
    """

    def __init__(self, board: Board, timeout_s: float = 600.0, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.board = board
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self.dest = f"{board.user}@{board.host}" if board.user else board.host
        extra = board.ssh_args()
        opts = ["-o", "BatchMode=yes"]
        if not any(o.startswith("ConnectTimeout=") for o in extra):
            opts += ["-o", "ConnectTimeout=10"]
        opts += extra
        if board.identity_file:
            opts += ["-i", str(Path(board.identity_file).expanduser())]
        self.opts = opts

    def _run(self, cmd: list[str], what: str) -> str:
        code, out, err, stop = _bounded_run(cmd, self.timeout_s, self.max_reply_bytes)
        if stop == "timeout":
            raise _stopped(f"board {self.dest}: {what} ran past {self.timeout_s:.0f} s", out)
        if stop == "too large":
            raise BenchmarkError(f"board {self.dest}: {what}: the board's reply is larger than "
                                 f"{self.max_reply_bytes / 2**20:.0f} MiB, far more than edgepipe's worker sends; "
                                 "it was refused unread: check what board.python runs there")
        if code != 0:
            tail = (err.strip().splitlines() or [f"exit status {code}"])[-1]
            msg = f"board {self.dest}: {what} failed: {tail}"
            if partial_figures(out) is not None:  # it had started: the board or the link dropped mid-run
                raise _stopped(msg, out)
            raise BenchmarkError(f"{msg}; check that `ssh -p {self.board.port} {self.dest}` works without a "
                                 "password (keys) and the host is reachable")
        return out

    def run(self, command: str, what: str) -> str:
        return self._run(["ssh", "-p", str(self.board.port), *self.opts, "--", self.dest, command], what)

    def copy(self, files: list[Path], remote_dir: str) -> None:
        self._run(["scp", "-q", "-P", str(self.board.port), *self.opts, "--", *map(str, files),
                   f"{self.dest}:{remote_dir}/"], "copying files")


#: the most stderr kept from ssh (its last lines name the failure)
_STDERR_KEEP = 64 << 10


def _bounded_run(cmd: list[str], timeout_s: float, limit: int) -> tuple[int, str, str, str | None]:
    """Run ``cmd`` reading at most ``limit`` bytes of its stdout (and the last 64 KiB of stderr).

    Returns ``(exit status, stdout, stderr, stop)``; ``stop`` is ``"timeout"`` or ``"too large"`` when the
    command was killed for that, else ``None``.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    stop: str | None = None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        try:
            while sel.get_map() and stop is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    stop = "timeout"
                    break
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    buf: bytearray = key.data
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf += chunk
                    if buf is out and len(out) > limit:
                        stop = "too large"
                        break
                    if buf is err and len(err) > 2 * _STDERR_KEEP:
                        del err[:-_STDERR_KEEP]
        finally:
            try:
                proc.wait(timeout=0 if stop or sel.get_map() else max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                stop = stop or "timeout"
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    text = "" if stop == "too large" else out.decode(errors="replace")
    return proc.returncode, text, err[-_STDERR_KEEP:].decode(errors="replace"), stop


def _stopped(message: str, stdout: str) -> BenchmarkError:
    """The error for a run that stopped part-way, saying where, with the figures measured so far kept on
    the exception (``.partial``)."""
    p = partial_figures(stdout)
    if p is None:
        return BenchmarkError(message)
    phase = p.get("phase")
    if phase == "loaded":
        where = f"after loading the artifact ({p.get('load_ms', 0):.0f} ms), during warm-up"
    elif phase == "timing":
        of = f" of {p['of']}" if p.get("of") else ""
        where = (f"while timing, after {p['iterations']}{of} iterations (p50 so far {p['p50_ms']:.3f} ms, "
                 f"mean {p['mean_ms']:.3f} ms)")
    else:
        where = (f"after timing ({p['iterations']} iterations, p50 {p['p50_ms']:.3f} ms), while evaluating "
                 "the samples")
    return BenchmarkError(f"{message}: it stopped {where}; the figures so far are kept (--json prints them)", partial=p)


def measure_remote(artifact: Artifact, board: Board, settings: BenchSettings | None = None,
                   scratch: Path | None = None, eval_path: Path | None = None) -> Measurement:
    """Copy the artifact and the worker to ``board``, measure there, and return the board's figures.

    With ``eval_path`` (an .npz of every input by name, and the targets) the board's runtime also runs every
    sample, and the measurement's ``eval`` holds every output (see ``worker.evaluate``; the driver scores them). A board that drops part-way raises a
    ``BenchmarkError`` that says where it stopped and keeps the figures so far in ``.partial``.
    """
    import tempfile

    s = settings or BenchSettings()
    ssh = SSH(board, s.timeout_s)
    root = artifact.path.parent
    for p in artifact.files:  # one directory is copied: a file from elsewhere would be a host file sent out
        if p.parent != root:
            raise ConfigError(f"artifact file {str(p)!r} is not in {str(root)!r}, the artifact's directory; only "
                              "the artifact's own files are copied to a board")
    extra = [eval_path] if eval_path is not None else []
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*artifact.files, *extra] if p.is_file())).hexdigest()
    remote_dir = f"{board.workdir.rstrip('/')}/{digest[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        wz = worker_zip(scratch or Path(tmp))
        ssh.run(f"mkdir -p {shlex.quote(remote_dir)}", "creating the work directory")
        ssh.copy([wz, *[p for p in artifact.files if p.is_file()], *extra], remote_dir)
    remote = Artifact(artifact.backend, artifact.precision, Path(remote_dir) / artifact.path.name,
                      [Path(remote_dir) / p.name for p in artifact.files], artifact.metadata)
    payload = json.dumps(_settings(remote, s, Path(remote_dir) / eval_path.name if eval_path else None))
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in NO_TELEMETRY_ENV.items())
    out = ssh.run(f"{env} {shlex.quote(board.python)} "
                  f"{shlex.quote(remote_dir + '/' + wz.name)} {shlex.quote(payload)}", "running the worker")
    result = parse_worker_output(out, f"{artifact.path.name} on {ssh.dest}", board.python, f"board {ssh.dest}")
    return Measurement(**result, size_bytes=artifact.size_bytes, backend=artifact.backend,
                       precision=artifact.precision)


def retime_remote(ids: list[str], artifacts: list[Artifact], board: Board, settings: BenchSettings,
                  rounds: int = 7, iterations: int | None = None) -> Any:
    """Re-time ``artifacts`` together on ``board``, interleaved round by round in one worker there
    (see :mod:`edgepipe.harness.rounds`); returns a :class:`~edgepipe.harness.rounds.Retiming`."""
    import tempfile

    from edgepipe.harness.rounds import Retiming, _reply

    ssh = SSH(board, settings.timeout_s * len(ids))
    files: list[Path] = []
    for a in artifacts:
        for p in a.files:
            if p.parent != a.path.parent:
                raise ConfigError(f"artifact file {str(p)!r} is not in {str(a.path.parent)!r}, the artifact's "
                                  "directory; only the artifact's own files are copied to a board")
        files += [p for p in a.files if p.is_file()]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    remote_dir = f"{board.workdir.rstrip('/')}/{digest[:16]}"
    remote_arts = []
    with tempfile.TemporaryDirectory() as tmp:
        wz = worker_zip(Path(tmp))
        ssh.run(f"mkdir -p {shlex.quote(remote_dir)}", "creating the work directory")
        subdirs = []
        for k, a in enumerate(artifacts):  # each artifact in its own directory: two may share file names
            d = f"{remote_dir}/{k}"
            subdirs.append(d)
            remote_arts.append(Artifact(a.backend, a.precision, Path(d) / a.path.name,
                                        [Path(d) / p.name for p in a.files], a.metadata))
        ssh.run("mkdir -p " + " ".join(shlex.quote(d) for d in subdirs), "creating the work directories")
        ssh.copy([wz], remote_dir)
        for a, d in zip(artifacts, subdirs, strict=True):
            ssh.copy([p for p in a.files if p.is_file()], d)
    iters = iterations or max(20, settings.iterations // max(1, rounds))
    payload = json.dumps({"artifacts": [_settings(a, settings) for a in remote_arts], "rounds": rounds,
                          "iterations": iters, "warmup": settings.warmup, "threads": settings.threads,
                          "batch": settings.batch, "seed": settings.seed,
                          "shapes": {k: list(v) for k, v in (settings.shapes or {}).items()} or None})
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in NO_TELEMETRY_ENV.items())
    out = ssh.run(f"{env} {shlex.quote(board.python)} {shlex.quote(remote_dir + '/' + wz.name)} --rounds "
                  f"{shlex.quote(payload)}", "re-timing the finalists")
    return Retiming(list(ids), _reply(out, f"{', '.join(ids)} on {ssh.dest}", len(ids), rounds), rounds, iters,
                    f"board {ssh.dest}")
