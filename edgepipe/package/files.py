"""The files of ``edgepipe pack`` and ``unpack``: a model's weights into a Huffman-coded archive (with the
hashed layers' seeds a ``.safetensors`` records), and back as a ``.pt2`` program or a ``.safetensors`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepipe._progress import Reporter
from edgepipe.config.recipe import Recipe
from edgepipe.errors import ConfigError
from edgepipe.package import archive

__all__ = ["hash_hints", "pack", "sort_safetensors_metadata", "unpack"]


def pack(spec: str, out: Path, weights: Path | None, recipe: str | Path | Recipe | None, data: str,
          input_shape: tuple[int, ...], reporter: Reporter | None) -> tuple[Any, list[dict[str, Any]]]:
    """Pack ``spec``'s weights (``weights`` loaded into it, ``recipe`` applied first) into the archive ``out``.

    Returns the :class:`~edgepipe.package.archive.PackReport` and the recipe's step records."""
    from edgepipe.models import load_model

    src = load_model(spec, weights)
    hints = hash_hints(Path(weights)) if weights is not None and Path(weights).suffix == ".safetensors" else {}
    assert src.module is not None
    records: list[dict[str, Any]] = []
    module = src.module
    if recipe:
        from edgepipe.compress import apply_recipe
        from edgepipe.config.recipe import load_recipe
        from edgepipe.pipeline.stages import data_splits

        # in-process, not from the cache: a hashed layer's seeds live on the module, not in a .pt2
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        module, records = apply_recipe(module, rec, data_splits(data, tuple(input_shape)), reporter)
    reference = load_model(spec).module
    report = archive.pack(module, spec, Path(out), input_shape=tuple(input_shape), reference=reference, hints=hints)
    return report, records


def hash_hints(path: Path) -> dict[str, Any]:
    """Hashed-layer seeds that `edgepipe unpack` wrote into a safetensors file's metadata."""
    import json

    from safetensors import safe_open

    from edgepipe.compress.hashing import HashSpec

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: HashSpec(*v) for k, v in json.loads(meta.get("edgepipe.hashed", "{}")).items()}


def unpack(archive_path: Path, out: Path, factory: str) -> tuple[Path, dict[str, Any]]:
    """Restore ``archive_path``'s weights (checked by hash) as ``out``: a ``.pt2`` program or a ``.safetensors``
    file with its metadata sorted (the same archive gives the same bytes). See :func:`edgepipe.api.unpack`."""
    from edgepipe._fs import atomic_path
    from edgepipe.models import save_program

    unpacked = archive.read(archive_path, factory)
    module = archive.restore(unpacked, factory)
    if out.suffix == ".safetensors":
        if unpacked.edits:
            raise ConfigError(f"archive {str(archive_path)!r} holds layers its factory does not build "
                              f"({', '.join(unpacked.edits)} were factorised): unpack it to a .pt2 instead")
        from safetensors.torch import save_file

        meta = {"edgepipe.spec": unpacked.spec, "edgepipe.sha256": unpacked.sha256,
                "edgepipe.hashed": json.dumps(unpacked.hashed)}
        with atomic_path(out) as tmp:
            mode = tmp.stat().st_mode
            save_file({k: v.contiguous() for k, v in unpacked.state.items()}, str(tmp), metadata=meta)
            tmp.chmod(mode)  # safetensors writes a fresh, owner-only file
            sort_safetensors_metadata(tmp)
    else:
        if not unpacked.input_shape:
            raise ConfigError(f"archive {str(archive_path)!r} records no input shape; unpack it to .safetensors")
        save_program(module, tuple(unpacked.input_shape), out)
    return out, {"spec": unpacked.spec, "tensors": len(unpacked.state), "sha256": unpacked.sha256,
                 "edits": sorted(unpacked.edits), "hashed": sorted(unpacked.hashed)}


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors keeps metadata in a hash map, so its order (and the file's bytes) varies run to run; the
    same keys and values in a fixed order give the same bytes. The header keeps its length (padded with
    spaces, as the format allows), so the tensor data does not move.
    """
    import json
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":")).encode()
        if len(text) > n:  # cannot happen for the same content; never corrupt the file if it does
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
