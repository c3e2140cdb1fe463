"""The manual's commands for a non-classifier (the "Any model" section of the old README, now the detector
how-to, docs/how-to/detector.md) run as written. The block is found by its marker (see tests/test_docs.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def block(test: str) -> str:
    """The shell block right after ``<!-- run: TEST -->`` in docs/."""
    for page in sorted(DOCS.rglob("*.md")):
        m = re.search(rf"^<!-- run: {re.escape(test)} -->\n```bash\n(.*?)^```", page.read_text(), re.M | re.S)
        if m:
            return m.group(1)
    raise AssertionError(f"no block in docs/ is marked <!-- run: {test} -->")


def test_the_any_model_section_runs_as_written(tmp_path):
    script = block("tests/test_readme.py::test_the_any_model_section_runs_as_written")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((tmp_path / "dist" / "cpu-int8" / "manifest.json").read_text())
    assert m["accuracy"]["metric"] == "map50" and m["accuracy"]["drop"] <= 1.0
    assert [o["name"] for o in m["signature"]["outputs"]] == ["output_0", "output_1"]
