"""MkDocs hook: ``<!-- shipped-targets -->`` becomes a table of the targets shipped in ``targets/``, read from
the files themselves (name, backend, precision, description)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

MARK = "<!-- shipped-targets -->"
ROOT = Path(__file__).resolve().parents[2]


def table() -> str:
    rows = ["| target | backend | precision | description |", "|---|---|---|---|"]
    for p in sorted((ROOT / "targets").glob("*.toml")):
        t = tomllib.loads(p.read_text())
        rows.append(f"| `{p.stem}` | {t['backend']} | {t['precision']} | {t.get('description', '')} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARK, table()) if MARK in markdown else markdown
