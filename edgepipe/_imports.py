"""Importing code the user named (``pkg.mod:obj``): a model factory, a metric, a postprocess, a data function.

The module is imported from where Python finds it; the current directory is searched only when nothing
else has it, and then last, so a local ``sklearn/`` never shadows the installed one.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from edgepipe.errors import ConfigError, EdgepipeError


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def import_module(spec: str, mod_name: str, what: str, error: type[EdgepipeError] = ConfigError, *,
                  search_cwd: bool = True) -> Any:
    """Import ``mod_name`` for ``spec``; failures are one ``error`` line naming ``what`` and ``spec``."""
    try:
        try:
            return importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            cwd = str(Path.cwd())
            top = mod_name.partition(".")[0]
            if e.name != top or not search_cwd or cwd in sys.path or "" in sys.path:
                raise
            if not (Path(cwd) / top).is_dir() and not (Path(cwd) / f"{top}.py").is_file():
                raise
            sys.path.append(cwd)
            importlib.invalidate_caches()
            return importlib.import_module(mod_name)
    except ImportError as e:
        raise error(f"{what} {spec!r}: cannot import module {mod_name!r} ({first_line(e)})") from e
    except SyntaxError as e:
        raise error(f"{what} {spec!r}: module {mod_name!r} does not compile: {e.msg} "
                    f"({e.filename}, line {e.lineno})") from e
    except Exception as e:
        raise error(f"{what} {spec!r}: importing module {mod_name!r} raised {type(e).__name__}: "
                    f"{first_line(e)}") from e


def import_object(spec: str, what: str, example: str = "fn", error: type[EdgepipeError] = ConfigError) -> Any:
    """The object ``spec`` (``pkg.mod:name``, ``name`` may be dotted) names."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise error(f"{what} {spec!r}: give package.module:{example}")
    obj = import_module(spec, mod_name, what, error)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
