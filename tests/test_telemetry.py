"""Builds never touch the network: a whole build (bench worker included) with an empty HOME and an audit hook
on every Python process makes no socket connection or name lookup and writes nothing under HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HOOK = textwrap.dedent("""
    import os, socket, sys

    _LOG = os.environ["EDGEPIPE_TEST_NET_LOG"]
    _NET = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.sendto", "socket.sendmsg", "urllib.Request", "http.client.connect")

    def _hook(event, args):
        if event not in _NET:
            return
        if event.startswith("socket.") and args and isinstance(args[0], socket.socket) \\
                and args[0].family == socket.AF_UNIX:
            return
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {event} {args[1:] if event.startswith('socket.') else args}\\n")

    sys.addaudithook(_hook)
""")


def test_build_makes_no_network_call_and_writes_nothing_under_home(tmp_path):
    home, site, log = tmp_path / "home", tmp_path / "site", tmp_path / "net.log"
    home.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOOK)  # loaded by every Python process: the build and its worker
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "OPENVINO_TELEMETRY_DISABLE")}
    env.update(HOME=str(home), EDGEPIPE_TEST_NET_LOG=str(log), XDG_CACHE_HOME="", XDG_CONFIG_HOME="",
               PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    code = (f"from edgepipe import api; import sys; r = api.build(None, ['cpu-int8'], out={str(tmp_path / 'dist')!r}, "
            "iterations=5); print(r.results[0].manifest.latency.iterations, 'sitecustomize' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["5", "True"]  # benched (the worker ran) with the hook installed
    assert not log.exists(), log.read_text()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []  # no ~/.cache/Microsoft/...
