"""The README's commands for a non-classifier (the "Any model" section) run as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_any_model_section_runs_as_written(tmp_path):
    script = _block("## Any model, judged by its own metric")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((tmp_path / "dist" / "cpu-int8" / "manifest.json").read_text())
    assert m["accuracy"]["metric"] == "map50" and m["accuracy"]["drop"] <= 1.0
    assert [o["name"] for o in m["signature"]["outputs"]] == ["output_0", "output_1"]
