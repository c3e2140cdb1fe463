"""Release directories: the artifact, the ONNX it came from, the calibration record, ``manifest.json``
and ``report.html``.

Everything is written into a temporary directory beside the destination and renamed into place at the
end, so a directory named after a target is always complete.
"""

from __future__ import annotations

import dataclasses
import html
import json
import shutil
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file
from edgepipe.types import Artifact, ArtifactRecord, CalibrationSet, FileRecord, Manifest, OnnxModel

MANIFEST = "manifest.json"
REPORT = "report.html"


def _file_record(p: Path, root: Path) -> FileRecord:
    return FileRecord(p.relative_to(root).as_posix(), sha256_file(p), p.stat().st_size)


def write_release(dest: Path, artifact: Artifact, onnx: OnnxModel, calibration: CalibrationSet,
                  manifest: Manifest) -> Path:
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
        calib = {**calibration.record(), "method": manifest.target.get("calibration", {}).get("method")}
        (tmp / "calibration.json").write_text(json.dumps(calib, indent=2) + "\n")
        files = [_file_record(tmp / f.relative_to(art_root), tmp) for f in artifact.files if f.is_file()]
        manifest = dataclasses.replace(
            manifest,
            artifact=ArtifactRecord(artifact.backend, artifact.precision, artifact.path.relative_to(art_root).as_posix(),
                                    files, sum(f.bytes for f in files), artifact.metadata),
            source_onnx=_file_record(tmp / "source.onnx", tmp),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        (tmp / REPORT).write_text(render_report(manifest))
    return dest


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)


def render_report(m: Manifest) -> str:
    """A self-contained HTML page of one release's manifest: for people; the manifest is for machines."""
    t, acc, lat, ref, a = m.target, m.accuracy, m.latency, m.reference_latency, m.artifact
    assert a is not None
    summary = [
        ("target", f"{t['name']}: {t.get('description', '')}"),
        ("backend / precision", f"{a.backend} / {a.precision}"),
        ("top-1 (artifact)", f"{acc.top1:.2%} on {acc.samples} held-out test samples"),
        ("top-1 (original model, fp32)", f"{acc.reference_top1:.2%} (drop {acc.drop_points:+.2f} points)"),
        ("size", f"{a.size_bytes:,} bytes"),
    ]
    if acc.validation_top1 is not None:
        summary.append(("top-1 on validation (choices)", f"{acc.validation_top1:.2%} on {acc.validation_samples} "
                        f"samples (drop {acc.validation_drop_points:+.2f} points)"))
    if acc.compressed_top1 is not None:
        summary.append(("compressed model, fp32 (validation)", f"{acc.compressed_top1:.2%}"))
    if m.candidate:
        summary.append(("search candidate", ", ".join(f"{k}={v}" for k, v in m.candidate.items())))
    if acc.evaluated_on:
        summary.append(("top-1 measured on", acc.evaluated_on))
    if m.bench_skipped:
        summary.append(("not benchmarked", m.bench_skipped))
    if lat:
        summary += [("latency p50 / p90 / p99", f"{lat['p50_ms']:.3f} / {lat['p90_ms']:.3f} / {lat['p99_ms']:.3f} ms"),
                    ("throughput", f"{lat['throughput_per_s']:.1f} / s at batch {lat['batch']}"),
                    ("peak memory above baseline", f"{lat['peak_rss_above_baseline_mb']:.1f} MB")]
        if ref:
            summary.append(("speed-up vs fp32 reference", f"{ref['p50_ms'] / lat['p50_ms']:.2f}x"))
    budgets = [(k, f"{'ok' if b.ok else 'MISSED'}: {b.value:.3f} (limit {b.limit})") for k, b in m.budgets.items()]
    files = [(f.name, f"{f.bytes:,} bytes, sha256 {f.sha256}") for f in a.files]
    stages = [(s.name, "skipped: " + s.skipped if s.skipped else
               f"{'cached' if s.cached else f'{s.seconds:.2f} s'}, output {str(s.output_sha256)[:16]}")
              for s in m.stages]
    tools = list(m.tools.items())
    sections = [("Summary", summary), ("Budgets", budgets), ("Files", files), ("Stages", stages), ("Tools", tools)]
    body = "".join(f"<h2>{name}</h2><table>{_rows(rows)}</table>" for name, rows in sections if rows)
    title = html.escape(f"edgepipe release: {t['name']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;width:100%}"
            "th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{width:16em;color:#444}td{font-family:monospace;word-break:break-all}</style></head>"
            f"<body><h1>{title}</h1>{body}</body></html>\n")


def read_manifest(release_dir: Path) -> Manifest:
    return Manifest.read(release_dir / MANIFEST)


def artifact_from_release(path: Path) -> Artifact | None:
    """If ``path`` is a release directory (or a file in one), the artifact its manifest names."""
    root = path if path.is_dir() else path.parent
    mf = root / MANIFEST
    if not mf.is_file():
        return None
    a = Manifest.read(mf).artifact
    if a is None:
        return None
    return Artifact(a.backend, a.precision, root / a.file, [root / f.name for f in a.files], a.metadata)
