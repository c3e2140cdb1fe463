"""The artifact a release directory's manifest names, read the way the worker may: numpy and the standard library
only, nothing of edgepipe above ``harness/`` (the runtime images' entrypoint runs ``--release DIR``).

Every file the manifest names must be one plain name of a regular file in the directory (no ``/``, ``..`` or
link out of it): a crafted manifest cannot make the worker load, or edgepipe copy or upload, a file from
elsewhere. :func:`edgepipe.release.artifact_from_release` applies the same rule on the driver.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgepipe.errors import ConfigError
from edgepipe.types import Artifact, Manifest

MANIFEST = "manifest.json"


def release_file(root: Path, name: Any, manifest: Path) -> Path:
    """``root / name`` when ``name`` is one plain path component naming a regular file inside ``root``."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
             and not os.path.isabs(name))
    p = root / name if plain else None
    if p is None or not p.is_file() or not p.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{str(manifest)!r} names the file {name!r}, which is not a plain file name of a regular "
                          f"file inside {str(root)!r} (no '/', '..' or link out of it); the manifest is damaged or "
                          "crafted: rebuild the release")
    return p


def artifact_from_release(path: Path) -> Artifact | None:
    """If ``path`` is a release directory (or a file in one), the artifact its manifest names; else ``None``."""
    root = path if path.is_dir() else path.parent
    mf = root / MANIFEST
    if not mf.is_file():
        return None
    try:
        a = Manifest.read(mf).artifact
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{str(mf)!r} is not a manifest edgepipe wrote ({type(e).__name__}: {e}); rebuild the "
                          "release") from None
    if a is None:
        return None
    files = [release_file(root, name, mf) for name in [a.file, *(f.name for f in a.files)]]
    return Artifact(a.backend, a.precision, files[0], files[1:], a.metadata)
