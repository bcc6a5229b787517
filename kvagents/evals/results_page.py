"""Results pages are reference pages: an evaluation writes its section in place instead of appending a new one.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> page = Path(tempfile.mkdtemp()) / "results.md"
    >>> _ = page.write_text("# Evaluations\\n\\n## A\\n\\nold\\n\\n## B\\n\\nkept\\n")
    >>> write_section(page, "A", "new")
    'replaced'
    >>> page.read_text()
    '# Evaluations\\n\\n## A\\n\\nnew\\n\\n## B\\n\\nkept\\n'
"""

from __future__ import annotations

from pathlib import Path


def write_section(page: str | Path, heading: str, body: str, level: int = 2) -> str:
    """Replace the section ``heading`` of the Markdown file ``page`` (from its ``#``-heading at ``level`` to the next
    heading of that level or higher) with ``body``, or add it at the end when the page has none. Returns
    ``"replaced"`` or ``"added"``. The file is written through a temporary file and a rename."""
    page = Path(page)
    marks = "#" * level
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == f"{marks} {heading}"), None)
    section = [f"{marks} {heading}", "", body.strip("\n"), ""]
    if start is None:
        if lines and lines[-1] == "":
            lines.pop()
        new = lines + ([""] if lines else []) + section
        how = "added"
    else:
        end = next((j for j in range(start + 1, len(lines))
                    if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level
                    and lines[j][len(lines[j]) - len(lines[j].lstrip("#")):].startswith(" ")), len(lines))
        new = lines[:start] + section + lines[end:]
        how = "replaced"
    out = "\n".join(new)
    if not out.endswith("\n"):
        out += "\n"
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(out, encoding="utf-8")
    tmp.replace(page)
    return how
