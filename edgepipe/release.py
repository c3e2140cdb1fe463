"""Release directories: the artifact, the ONNX it came from, the calibration record, ``manifest.json``
and ``report.html``.

Everything is written into a temporary directory beside the destination and renamed into place at the
end, so a directory named after a target is always complete.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file
from edgepipe.backends.base import Artifact, CalibrationSet, OnnxModel

MANIFEST = "manifest.json"
REPORT = "report.html"


def _file_record(p: Path, root: Path) -> dict[str, Any]:
    return {"name": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def write_release(dest: Path, artifact: Artifact, onnx: OnnxModel, calibration: CalibrationSet,
                  manifest: dict[str, Any]) -> Path:
    """Write one target's release directory atomically; returns ``dest``."""
    with atomic_dir(dest) as tmp:
        art_root = artifact.path.parent
        for f in artifact.files:
            target = tmp / f.relative_to(art_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.is_dir():
                shutil.copytree(f, target)
            else:
                shutil.copy2(f, target)
        shutil.copy2(onnx.path, tmp / "source.onnx")
        (tmp / "calibration.json").write_text(json.dumps(calibration.record(), indent=2) + "\n")
        files = [_file_record(tmp / f.relative_to(art_root), tmp) for f in artifact.files if f.is_file()]
        manifest = {
            **manifest,
            "artifact": {
                "backend": artifact.backend,
                "precision": artifact.precision,
                "file": artifact.path.relative_to(art_root).as_posix(),
                "files": files,
                "size_bytes": sum(f["bytes"] for f in files),
                "metadata": artifact.metadata,
            },
            "source_onnx": _file_record(tmp / "source.onnx", tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        (tmp / REPORT).write_text(render_report(manifest))
    return dest


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)


def render_report(m: dict[str, Any]) -> str:
    """A self-contained HTML page of one release's manifest: for people; the manifest is for machines."""
    t, a, acc, lat = m["target"], m["artifact"], m["accuracy"], m.get("latency")
    ref = m.get("reference_latency")
    summary = [
        ("target", f"{t['name']}: {t.get('description', '')}"),
        ("backend / precision", f"{a['backend']} / {a['precision']}"),
        ("top-1 (artifact)", f"{acc['top1']:.2%} on {acc['samples']} held-out samples"),
        ("top-1 (fp32 reference)", f"{acc['reference_top1']:.2%} (drop {acc['drop_points']:+.2f} points)"),
        ("size", f"{a['size_bytes']:,} bytes"),
    ]
    if acc.get("evaluated_on"):
        summary.append(("top-1 measured on", acc["evaluated_on"]))
    if m.get("bench_skipped"):
        summary.append(("not benchmarked", m["bench_skipped"]))
    if lat:
        summary += [("latency p50 / p90 / p99", f"{lat['p50_ms']:.3f} / {lat['p90_ms']:.3f} / {lat['p99_ms']:.3f} ms"),
                    ("throughput", f"{lat['throughput_per_s']:.1f} / s at batch {lat['batch']}"),
                    ("peak memory above baseline", f"{lat['peak_rss_above_baseline_mb']:.1f} MB")]
        if ref:
            summary.append(("speed-up vs fp32 reference", f"{ref['p50_ms'] / lat['p50_ms']:.2f}x"))
    budgets = [(k, f"{'ok' if b['ok'] else 'MISSED'}: {b['value']:.3f} (limit {b['limit']})")
               for k, b in (m.get("budgets") or {}).items()]
    files = [(f["name"], f"{f['bytes']:,} bytes, sha256 {f['sha256']}") for f in a["files"]]
    stages = [(s["name"], ", ".join(f"{k}={v}" for k, v in s.items() if k != "name")) for s in m.get("stages", [])]
    tools = list((m.get("tools") or {}).items())
    sections = [("Summary", summary), ("Budgets", budgets), ("Files", files), ("Stages", stages), ("Tools", tools)]
    body = "".join(f"<h2>{name}</h2><table>{_rows(rows)}</table>" for name, rows in sections if rows)
    title = html.escape(f"edgepipe release: {t['name']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;width:100%}"
            "th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{width:16em;color:#444}td{font-family:monospace;word-break:break-all}</style></head>"
            f"<body><h1>{title}</h1>{body}</body></html>\n")


def read_manifest(release_dir: Path) -> dict[str, Any]:
    return json.loads((release_dir / MANIFEST).read_text())


def artifact_from_release(path: Path) -> Artifact | None:
    """If ``path`` is a release directory (or a file in one), the artifact its manifest names."""
    root = path if path.is_dir() else path.parent
    mf = root / MANIFEST
    if not mf.is_file():
        return None
    m = json.loads(mf.read_text())["artifact"]
    return Artifact(m["backend"], m["precision"], root / m["file"], [root / f["name"] for f in m["files"]],
                    m.get("metadata", {}))
