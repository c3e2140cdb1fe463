"""MkDocs hook: what the generated pages get from edgepipe's help texts and docstrings, rendered as meant.

- On the CLI page, click's ``\\b`` paragraphs (examples, lists: "do not rewrap") stay as written. mkdocs-click
  hands a command's help to Markdown as it is, so a ``\\b`` paragraph's indented lines run together into one;
  click prints them line by line. Here such a paragraph (a heading line, then lines indented by two spaces)
  becomes its heading and a preformatted block, as ``--help`` shows it.
- On the API page, the Sphinx roles some docstrings use (``:func:`x```, ``:class:`~a.B```) are dropped, leaving
  the name as code.
"""

from __future__ import annotations

import re
from typing import Any

PARAGRAPH = re.compile(r"<p>([^<\n]*:)\n((?:  [^\n]*(?:\n|(?=</p>)))+)</p>")
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):(<code>)~?")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri == "reference/cli.md":
        return PARAGRAPH.sub(lambda m: f"<p>{m.group(1)}</p>\n<pre><code>{m.group(2).rstrip()}\n</code></pre>", html)
    if page.file.src_uri == "reference/api.md":
        return ROLE.sub(r"\1", html)
    return html
