"""MkDocs hook: the repository's README.md is the site's home page (docs/index.md is not a file).

One front door, not two copies to keep in step. The README links to pages as ``docs/<page>.md``
(so they work on the forge); on the site those pages sit at the root, so that prefix is removed
from the links' targets. Everything else (a link to a page that does not exist, a broken anchor)
is left for ``mkdocs build --strict`` to catch.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

README = Path(__file__).resolve().parents[2] / "README.md"

#: ``](docs/`` in a Markdown link or image target.
_DOCS_PREFIX = re.compile(r"\]\(docs/")


def readme_as_home_page(text: str) -> str:
    """The README's Markdown with its ``docs/`` link targets made relative to the site root."""
    return _DOCS_PREFIX.sub("](", text)


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", content=readme_as_home_page(README.read_text(encoding="utf-8"))))
    return files
