"""The manual (docs/, an MkDocs site) builds strictly and offline, and its commands run as written.

Every shell block in docs/ and in the README is run by a test or says why not, on the line right before it:
``<!-- run: tests/FILE.py::TEST -->`` names the test that runs it (the test finds the block by that marker),
``<!-- not run: why -->`` says why not. The README's first block is .ci/run's (its set-up and test lines).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!--\s*(run|not run):\s*(.*?)\s*-->$")

#: mkdocs, with every connection and name look-up refused: the build must need no network
OFFLINE_MKDOCS = """
import sys
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
        raise RuntimeError(f"the docs build tried the network: {event} {args!r:.200}")
sys.addaudithook(refuse)
from mkdocs.__main__ import cli
sys.argv = ["mkdocs", *sys.argv[1:]]
cli()
"""


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def fenced(path: Path) -> list[tuple[int, str, str | None, str]]:
    """Every fenced block of a page: (line, language, the marker comment right before it or None, body)."""
    lines = path.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(2)
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        body = "\n".join(line[len(m.group(1)):] for line in lines[start + 1:j]) + "\n"
        out.append((start + 1, lang, prev if MARK.match(prev) else None, body))
        i = j + 1
    return out


def block(test: str) -> str:
    """The shell block marked ``<!-- run: TEST -->``; where several pages show it, they must show the same."""
    found = [(p, body) for p in pages() for _, lang, mark, body in fenced(p)
             if lang in SHELL and mark is not None and MARK.match(mark).groups() == ("run", test)]
    assert found, f"no block is marked <!-- run: {test} -->"
    for p, body in found[1:]:
        assert body == found[0][1], f"{p.relative_to(ROOT)} shows another version of {found[0][0].relative_to(ROOT)}'s block"
    return found[0][1]


def run_block(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a block as a user would, with this venv's ``edgepipe`` first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_the_docs_build_strictly_and_offline(tmp_path):
    import importlib.util

    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_click")
               if importlib.util.find_spec(m.split(".")[0]) is None]
    assert not missing, f"{missing} not installed: pip install -e '.[docs]' (part of .[all])"
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-c", OFFLINE_MKDOCS, "build", "--strict", "-d", str(site)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the generated pages hold what they are generated from
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "edgepipe release" in cli and "--search" in cli and "edgepipe docker build" in cli
    manifest = (site / "reference" / "manifest" / "index.html").read_text()
    assert "validation_drop" in manifest and "peak_rss_above_baseline_mb" in manifest and "within_noise" in manifest
    toml = (site / "reference" / "toml" / "index.html").read_text()
    assert "max_metric_drop" in toml and "ssh_options" in toml and "round_to" in toml
    assert 'id="edgepipe.api.release"' in (site / "reference" / "api" / "index.html").read_text()
    assert "raspberry-pi-5" in (site / "concepts" / "targets" / "index.html").read_text()


def test_every_shell_block_is_run_by_a_test_or_says_why_not():
    problems = []
    tests = {}
    for p in pages():
        for n, (line, lang, mark, _) in enumerate(fenced(p)):
            if lang not in SHELL:
                continue
            where = f"{p.relative_to(ROOT)}:{line}"
            if p == README and n == 0:
                continue  # .ci/run runs the README's first block (set-up + main job, then the tests)
            if mark is None:
                problems.append(f"{where}: a {lang} block without <!-- run: tests/FILE.py::TEST --> or "
                                "<!-- not run: why --> on the line before it")
                continue
            kind, what = MARK.match(mark).groups()
            if not what:
                problems.append(f"{where}: <!-- {kind}: --> says nothing")
            elif kind == "run":
                tests.setdefault(what, []).append(where)
    for test, where in tests.items():
        file, _, name = test.partition("::")
        src = ROOT / file
        if not (src.is_file() and re.search(rf"^def {re.escape(name)}\(", src.read_text(), re.M)):
            problems.append(f"{', '.join(where)}: marked run by {test}, which does not exist")
        elif f'block("{test}")' not in src.read_text():
            problems.append(f"{', '.join(where)}: {test} does not read its block (block(\"{test}\"))")
    assert not problems, "\n".join(problems)
    assert fenced(README)[0][1] == "bash", "the README must open with .ci/run's bash block"


def test_the_readme_is_a_front_door_into_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"the README links to {target}, which is not there"
    for p in sorted((ROOT / "targets").glob("*.toml")):
        assert f"`{p.stem}`" in text, f"the README's table of targets lacks {p.stem}"
        assert tomllib.loads(p.read_text())["backend"] in {"onnxruntime", "openvino", "tflite", "tensorrt"}
    for heading in ("## Quickstart", "## Your own model", "## Targets and backends", "## Development"):
        assert heading in text
    assert "mkdocs serve" in text


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One stage cache for the two command walks: they build the example for cpu-int8 alike (what is run as
    written is the commands; the second finds the first's compile where a user's second command would)."""
    return tmp_path_factory.mktemp("docs-cache")


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(shared_cache))
    run_block(block("tests/test_docs.py::test_the_quickstart_runs_as_written"), tmp_path)
    for t in ("cpu-fp32", "cpu-int8"):
        m = json.loads((tmp_path / "dist" / t / "manifest.json").read_text())
        assert m["accuracy"]["metric"] == "top1" and m["latency"]["p50_ms"] > 0
    index = json.loads((tmp_path / "release" / "quick" / "index.json").read_text())
    entry = index["targets"]["cpu-int8"]
    assert entry["status"] == "released" and len(entry["candidates"]) == 2
    assert (tmp_path / "release" / "quick" / "cpu-int8" / "manifest.json").is_file()


@pytest.mark.slow
def test_the_stage_commands_run_as_written(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(shared_cache))
    r = run_block(block("tests/test_docs.py::test_the_stage_commands_run_as_written"), tmp_path)
    assert (tmp_path / "model.onnx").is_file()
    m = json.loads((tmp_path / "compiled" / "cpu-int8" / "manifest.json").read_text())
    assert m["artifact"]["precision"] == "int8" and m["latency"] is None
    assert json.loads((tmp_path / "sensitivity.json").read_text())
    assert "structured_prune" in r.stdout
