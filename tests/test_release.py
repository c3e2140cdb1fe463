"""`edgepipe release`: a real search on the bundled example through real backends, its outputs, and the
bad inputs it must survive."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe import api
from edgepipe.config.search import Range, load_search, search_from_dict
from edgepipe.errors import ConfigError
from edgepipe.pipeline.search import Candidate, Tried, choose

SEARCH = """
recipes = ["none"]
noise = 0.05
finalist_margin = 1.0
[onnxruntime]
calibration = ["minmax", "percentile"]
activation_type = ["uint8", "int8"]
[openvino]
calibration = ["minmax"]
preset = ["performance", "mixed"]
"""

#: the killed release's space: two candidates per target, enough for two workers to be mid-search
SMALL_SEARCH = """
recipes = ["none"]
[onnxruntime]
calibration = ["minmax", "percentile"]
[openvino]
preset = ["performance", "mixed"]
"""

UNREACHABLE = """
description = "cpu-int8 with a latency budget nothing can meet"
backend = "onnxruntime"
precision = "int8"
[budgets]
max_accuracy_drop = 1.0
max_latency_ms = 0.0001
[runtime]
threads = 1
iterations = 30
"""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    search = root / "search.toml"
    search.write_text(SEARCH)
    unreachable = root / "too-fast.toml"
    unreachable.write_text(UNREACHABLE)
    out = root / "v1"
    targets = ["cpu-int8", "intel-cpu-int8", str(unreachable)]
    with pytest.MonkeyPatch.context() as mp:  # a cache of its own: the first release is cold, the second cached
        mp.setenv("EDGEPIPE_CACHE_DIR", str(root / "cache"))
        first = api.release(None, targets, out=out, search=search, iterations=30)
        sums = (out / "SHA256SUMS").read_text()
        second = api.release(None, targets, out=out, search=search, iterations=30)
    return out, first, second, sums


def _keys(obj: object) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_release_writes_every_target_index_sums_and_report(released):
    out, first, _, _ = released
    assert {o.target.name: o.status for o in first.outcomes} == {
        "cpu-int8": "released", "intel-cpu-int8": "released", "too-fast": "failed"}
    for name in ("cpu-int8", "intel-cpu-int8"):
        m = json.loads((out / name / "manifest.json").read_text())
        assert m["schema"] == 3 and m["candidate"]["search_sha256"] and m["candidate"]["id"]
        assert m["accuracy"]["metric"] == "top1" and m["accuracy"]["reference"] >= m["accuracy"]["value"] - 1
        assert not {"seconds", "cached"} & _keys(m)  # how a run went stays out of released files, at any depth
    assert not (out / "too-fast").exists()
    index = json.loads((out / "index.json").read_text())
    ort = index["targets"]["cpu-int8"]
    assert len(ort["candidates"]) == 4 and ort["chosen"] in {c["id"] for c in ort["candidates"]}
    chosen = next(c for c in ort["candidates"] if c["id"] == ort["chosen"])
    assert chosen["why"].startswith("chosen: fastest of the finalists re-timed together")
    # the finalists (within 2x of the fastest here) were re-timed together and the choice is theirs: minmax and
    # percentile give the same graph, so at least those two are in it
    fin = ort["finalists"]
    assert 2 <= len(fin["ids"]) <= 3 and ort["chosen"] in fin["ids"] and set(fin["ids"]) <= {c["id"] for c in ort["candidates"]}
    assert all(len(fin["p50_ms"][i]) == fin["rounds"] == 7 for i in fin["ids"]), fin
    best = min(fin["ratio"].values())
    assert best == pytest.approx(1.0, abs=0.5) and fin["ratio"][ort["chosen"]] <= best * 1.05 + 1e-9, fin
    assert all(fin["spread"][i][0] <= fin["ratio"][i] <= fin["spread"][i][1] for i in fin["ids"])
    assert isinstance(fin["within_noise"], bool) and "Finalists re-timed together" in (out / "report.html").read_text()
    assert all(c["why"] for c in ort["candidates"])
    failed = index["targets"]["too-fast"]
    assert failed["status"] == "failed" and "closest is" in failed["reason"] and "max_latency_ms by" in failed["reason"]
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {ln.split("  ", 1)[1] for ln in (out / "SHA256SUMS").read_text().splitlines()}
    assert {"index.json", "report.html", "cpu-int8/manifest.json", "cpu-int8/model.int8.onnx"} <= listed
    assert not any(p.startswith(".work") for p in listed)


def test_rerun_is_fully_cached_and_byte_identical(released):
    out, first, second, sums = released
    assert second.stages_cached == second.stages_total > 0
    assert first.stages_cached < first.stages_total
    assert (out / "SHA256SUMS").read_text() == sums


def test_report_renders_its_charts_in_headless_chromium(released, tmp_path):
    out = released[0]
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 4
    assert not any(s in html for s in ('src="http', "src='http", 'href="http', "<script", "@import"))  # no network
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("needs chromium (the README's set-up line installs it with apt)")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") >= 4 and "Pareto front" in dom.stdout
    shot = tmp_path / "report.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1200,2400", (out / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20) or []
    # matplotlib's tab:green (44, 160, 44) marks the candidates within budgets: the charts were drawn
    assert any(abs(c[0] - 44) < 30 and abs(c[1] - 160) < 30 and abs(c[2] - 44) < 30 and n > 20 for n, c in colors)


def test_cli_release_exit_code_says_a_target_failed(released, tmp_path):
    import os

    out = released[0]
    search = tmp_path / "s.toml"
    search.write_text(SEARCH)
    env = {**os.environ, "EDGEPIPE_CACHE_DIR": str(out.parent / "cache")}  # the module's release: its stages cached
    r = subprocess.run([sys.executable, "-m", "edgepipe", "release", "--targets",
                        f"cpu-int8,{out.parent / 'too-fast.toml'}", "--search", str(search), "--out",
                        str(tmp_path / "rel"), "--iterations", "30", "--json"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 3, r.stderr[-2000:]
    index = json.loads(r.stdout)
    assert index["targets"]["cpu-int8"]["status"] == "released" and index["run"]["stages_cached"] > 0


def test_search_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'onnxruntime.nonsense'.*activation_type"):
        search_from_dict({"onnxruntime": {"nonsense": [1]}})
    with pytest.raises(ConfigError, match="unknown key 'frobnicate'"):
        search_from_dict({"frobnicate": 1})
    with pytest.raises(ConfigError, match="empty list"):
        search_from_dict({"onnxruntime": {"calibration": []}})
    with pytest.raises(ConfigError, match="recipes is empty"):
        search_from_dict({"recipes": []})
    with pytest.raises(ConfigError, match="onnxruntime.recipes is empty"):
        search_from_dict({"onnxruntime": {"recipes": []}})
    with pytest.raises(ConfigError, match="tflite.recipes = 'none': give a list"):
        search_from_dict({"tflite": {"recipes": "none"}})
    with pytest.raises(ConfigError, match=r"openvino.preset\[0\] = 'fastest' is not allowed; choose one of 'performance', 'mixed'"):
        search_from_dict({"openvino": {"preset": ["fastest"]}})
    p = tmp_path / "bad.toml"
    p.write_text("[onnxruntime]\ncalibration = [\"minmax\"]\nper_channel = [1]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*per_channel\[0\] = 1: expected bool"):
        load_search(p)


def test_a_backend_table_can_name_its_own_recipes():
    s = search_from_dict({"recipes": ["none", "structured-50"], "onnxruntime": {"recipes": ["none", "structured-50-r16"],
                                                                              "calibration": ["minmax", "percentile"]}})
    assert s.recipes_for("onnxruntime") == ("none", "structured-50-r16")
    assert s.recipes_for("openvino") == ("none", "structured-50")
    assert s.all_recipes == ("none", "structured-50", "structured-50-r16")
    assert [r for r, _ in s.grid("onnxruntime")] == ["none", "none", "structured-50-r16", "structured-50-r16"]
    assert s.size("openvino") == 2 and s.size("onnxruntime") == 4
    again = search_from_dict(s.to_dict())  # written back as it was read (the release records its space)
    assert again.sha256 == s.sha256 and again.recipes_for("onnxruntime") == s.recipes_for("onnxruntime")
    assert search_from_dict({"recipes": ["none"]}).sha256 != search_from_dict(
        {"recipes": ["none"], "tflite": {"recipes": ["none"]}}).sha256


def test_default_space_loads_and_ranges_are_sampled():
    space = load_search()
    assert space.name == "default" and "none" in space.recipes and not space.is_sampled("onnxruntime")
    s = search_from_dict({"onnxruntime": {"calibration_samples": {"low": 64, "high": 256, "step": 64}}})
    assert isinstance(s.for_backend("onnxruntime")["calibration_samples"], Range) and s.is_sampled("onnxruntime")


def test_sampled_search_uses_optuna_and_resumes_from_its_journal(tmp_path):
    search = tmp_path / "s.toml"
    search.write_text('recipes = ["none"]\nmax_trials = 3\nseed = 1\n[onnxruntime]\n'
                      'calibration = ["minmax", "percentile"]\ncalibration_samples = { low = 32, high = 128, step = 32 }\n')
    out = tmp_path / "rel"
    a = api.release(None, ["cpu-int8"], out=out, search=search, iterations=20)
    journal = out / ".work" / "optuna-cpu-int8.log"
    assert journal.is_file() and journal.stat().st_size > 0
    ids = [t.candidate.id for t in a.outcomes[0].tried]
    assert ids == ["t00", "t01", "t02"]
    b = api.release(None, ["cpu-int8"], out=out, search=search, iterations=20)
    # the journal's finished trials are replayed (same settings), nothing new is sampled
    assert [t.candidate.settings for t in b.outcomes[0].tried] == [t.candidate.settings for t in a.outcomes[0].tried]
    assert b.stages_cached == b.stages_total


def test_choice_prefers_smaller_within_noise_then_accuracy(monkeypatch):
    figures = {"a": (1.00, 300, 0.99), "b": (1.03, 200, 0.98), "c": (0.90, 500, 0.97), "d": (0.80, 100, 0.90)}
    monkeypatch.setattr(Tried, "p50_ms", property(lambda s: figures[s.candidate.id][0]))
    monkeypatch.setattr(Tried, "size_bytes", property(lambda s: figures[s.candidate.id][1]))
    monkeypatch.setattr(Tried, "goodness", property(lambda s: figures[s.candidate.id][2]))
    monkeypatch.setattr(Tried, "qualifies", property(lambda s: s.candidate.id != "d"))
    tried = [Tried(Candidate(k, "none", {})) for k in figures]
    assert choose(tried, 0.05).candidate.id == "c"  # fastest qualifying; d is faster but misses a budget
    assert choose(tried, 0.20).candidate.id == "b"  # a, b, c tie within 20 %: the smallest
    figures["a"], figures["b"] = (1.00, 600, 0.99), (1.03, 500, 0.995)
    assert choose(tried, 0.20).candidate.id == "b"  # b and c the smallest: the more accurate
    figures["b"], figures["c"] = (1.01, 602, 0.996), (0.90, 700, 0.97)  # b, 2 bytes over a: a size tie
    assert choose(tried, 0.20).candidate.id == "b"
    # re-timed together, the finalists' figures decide, and only finalists compete
    figures["a"], figures["b"], figures["c"] = (1.00, 300, 0.99), (1.03, 300, 0.98), (0.90, 300, 0.97)
    assert choose(tried, 0.05).candidate.id == "c"
    assert choose(tried, 0.05, {"a": 1.0, "c": 1.4}).candidate.id == "a"  # c was fast alone, not side by side
    assert choose(tried, 0.05, {"a": 1.02, "c": 1.0}).candidate.id == "a"  # within noise: the more accurate
    assert choose(tried, 0.05, {"b": 1.0}).candidate.id == "b"
    monkeypatch.setattr(Tried, "qualifies", property(lambda s: False))
    assert choose(tried, 0.05) is None


def test_target_that_cannot_compile_here_is_skipped_not_fatal(released, tmp_path, monkeypatch):
    from edgepipe import backends
    from edgepipe.backends.base import Availability

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(released[0].parent / "cache"))  # cpu-int8's stages: cached
    cls = type(backends.get("openvino"))
    monkeypatch.setattr(cls, "check", lambda self: Availability(False, False, "openvino not installed"))
    search = tmp_path / "s.toml"
    search.write_text(SEARCH)
    r = api.release(None, ["cpu-int8", "intel-cpu-int8"], out=tmp_path / "rel", search=search, iterations=30)
    status = {o.target.name: (o.status, o.reason) for o in r.outcomes}
    assert status["cpu-int8"][0] == "released"
    assert status["intel-cpu-int8"][0] == "skipped" and "openvino not installed" in status["intel-cpu-int8"][1]
    index = json.loads((tmp_path / "rel" / "index.json").read_text())
    assert index["targets"]["intel-cpu-int8"]["status"] == "skipped"


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_release_leaves_nothing_half_written_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    import os
    import signal
    import time

    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path / "cache"))
    search = tmp_path / "s.toml"
    search.write_text(SMALL_SEARCH)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "edgepipe", "release", "--targets", "cpu-int8,intel-cpu-int8", "--search",
           str(search), "--out", str(out), "--iterations", "20", "--json", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    compiled = tmp_path / "cache" / "stages" / "compile-onnxruntime"
    deadline = time.monotonic() + 120
    workers: set[int] = set()  # the local pool's processes (and multiprocessing's resource tracker)
    while time.monotonic() < deadline and not (workers and compiled.is_dir() and any(compiled.iterdir())):
        workers |= _children(proc.pid)
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-search: some stages cached, nothing released yet
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert workers, "the release started no worker processes"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "the killed release's workers are still running"
    import tempfile

    left = [d.name for p in workers for d in Path(tempfile.gettempdir()).glob(f"edgepipe-worker-{p}-*")]
    assert not left, f"the killed release's workers left their scratch: {left}"
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []
    assert "index.json" not in visible and "SHA256SUMS" not in visible
    for name in visible:  # a target directory that exists is complete
        assert (out / name / "manifest.json").is_file()
    resumed = api.release(None, ["cpu-int8", "intel-cpu-int8"], out=out, search=search, iterations=20)
    assert 0 < resumed.stages_cached < resumed.stages_total  # resumed: the killed run's stages were reused
    clean = tmp_path / "clean"
    api.release(None, ["cpu-int8", "intel-cpu-int8"], out=clean, search=search, iterations=20)
    assert (out / "SHA256SUMS").read_text() == (clean / "SHA256SUMS").read_text()
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
