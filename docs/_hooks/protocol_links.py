"""mkdocs hook: include protocol/README.md in the protocol reference page.

The page holds the line ``--8<-- "protocol/README.md"``. The hook includes
the file itself, rather than leaving it to pymdownx.snippets, because the
README's links to its golden vectors (``vectors/...``) are relative to
protocol/ in the repository and the vectors are not part of the site: they
become repository paths in code style before mkdocs checks the page's links.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

_PAGE = "reference/protocol.md"
_INCLUDE = '--8<-- "protocol/README.md"'
_VECTOR_LINK = re.compile(r"\[([^\]]+)\]\((vectors/[^)\s]*)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    if page.file.src_uri != _PAGE:
        return markdown
    if _INCLUDE not in markdown:
        raise ValueError(f"{_PAGE} must contain the line {_INCLUDE}")
    root = pathlib.Path(config.config_file_path).parent
    readme = (root / "protocol" / "README.md").read_text(encoding="utf-8")
    readme = _VECTOR_LINK.sub(lambda m: f"{m[1]} (`protocol/{m[2]}` in the repository)", readme)
    return markdown.replace(_INCLUDE, readme)
