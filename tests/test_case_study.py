"""bench/case_study.py --quick: the case study's smoke run (the example's goal rows, 3-batch fine-tunes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_case_study_quick_writes_every_backend_and_the_goal_lines(tmp_path):
    out_json, out_md = tmp_path / "study.json", tmp_path / "study.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "case_study.py"), "--quick", "--json", str(out_json),
                        "--markdown", str(out_md)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(x["technique"], x["precision"]): x for x in json.loads(out_json.read_text())}
    assert set(rows) == {("original", "fp32"), ("original", "int8"), ("structured 50 % + soft KD", "int8"),
                         ("student digits_student (soft KD)", "int8")}
    for row in rows.values():  # every backend built, evaluated and timed every row
        assert set(row["backends"]) == {"onnxruntime", "openvino", "tflite"}, row
        for b, cell in row["backends"].items():
            assert cell["error"] is None and 0 < cell["p50_ms"] < 100 and cell["speedup"] > 0, (b, cell)
            assert 0 <= cell["top1"] <= 1
    orig, int8 = rows[("original", "fp32")], rows[("original", "int8")]
    assert orig["drop"] == 0 and orig["backends"]["onnxruntime"]["speedup"] == 1
    assert int8["backends"]["onnxruntime"]["top1"] > 0.98  # the shipped int8 settings hold on the example
    assert int8["artifact_bytes"] < orig["artifact_bytes"] / 2.5 and int8["params"] == orig["params"]
    pruned = rows[("structured 50 % + soft KD", "int8")]
    assert pruned["params"] < orig["params"] / 3 and pruned["macs"] < orig["macs"] / 3
    assert pruned["epk_bytes"] is None  # a pruned architecture cannot be unpacked with the example's factory
    student = rows[("student digits_student (soft KD)", "int8")]
    assert student["macs"] < orig["macs"] / 20
    md = out_md.read_text()
    assert "| technique | precision | params | MACs |" in md
    goals = [line for line in md.splitlines() if line.startswith("- ")]
    assert [g.split(":")[0] for g in goals] == ["- ORT", "- OV", "- TFL"]
    assert all("goal ≥ 6×" in g for g in goals)
    assert "batch 1, 1 thread on every backend" in r.stdout
