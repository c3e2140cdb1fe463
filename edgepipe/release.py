"""Release directories: the artifact, the ONNX it came from, the calibration record and ``manifest.json``.

Everything is written into a temporary directory beside the destination and renamed into place at the
end, so a directory named after a target is always complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgepipe._fs import atomic_dir
from edgepipe._hashing import sha256_file
from edgepipe.backends.base import Artifact, CalibrationSet, OnnxModel

MANIFEST = "manifest.json"


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
    return dest


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
