"""One-off check for issue #27: nothing of the old README was lost when it moved into docs/.

Every sentence of the old README's prose, every row of its tables and every line of its code blocks must
appear in the new README or in a page under docs/ (after normalising: link targets dropped, heading and
list markers dropped, whitespace collapsed). Prints what is missing, with its line in the old README.

    python tools/check_readme_moved.py [OLD_REV]     # OLD_REV: the commit whose README.md is the old one
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def norm(text: str) -> str:
    text = re.sub(r"\]\([^)]*\)", "]", text)            # [text](target) -> [text]
    text = text.replace("[", "").replace("]", "")
    text = re.sub(r"\{\s*#[\w-]+\s*\}", "", text)       # attr_list ids
    text = re.sub(r"(?m)^\s*(#+|[-*]|\d+\.|>)\s+", "", text)  # headings, list items, quotes
    return re.sub(r"\s+", " ", text).strip()


def units(old: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    lines = old.splitlines()
    para: list[tuple[int, str]] = []
    in_code = False

    def flush() -> None:
        if not para:
            return
        text = " ".join(line for _, line in para)
        first = para[0][0]
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z`*(\"'])", norm(text)):
            if sentence:
                out.append((first, sentence))
        para.clear()

    for n, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("```"):
            flush()
            in_code = not in_code
            continue
        if in_code or s.startswith("|"):
            if s:
                out.append((n, re.sub(r"\s+", " ", s) if in_code else norm(s)))
            continue
        if not s or re.match(r"^(#+ |[-*] |\d+\. )", s):
            flush()
        if s:
            para.append((n, line))
    flush()
    return out


def main() -> int:
    rev = sys.argv[1] if len(sys.argv) > 1 else "94866b7"
    old = subprocess.run(["git", "show", f"{rev}:README.md"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    prose = norm("\n".join(p.read_text() for p in pages))
    code = re.sub(r"\s+", " ", "\n".join(p.read_text() for p in pages))
    missing = [(n, u) for n, u in units(old) if u not in prose and u not in code]
    total = len(units(old))
    for n, u in missing:
        print(f"README.md:{n} (old): {u[:160]}")
    print(f"{total - len(missing)} of {total} units of the old README ({rev}) found in README.md + docs/; "
          f"{len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
