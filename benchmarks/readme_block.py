"""Writing a benchmark's latest table into the README, between its markers.

A block is delimited by ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
lines; everything between them is replaced, the rest of the README is left
as it is. A README without the markers is not touched (the caller is told).
"""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(name: str, text: str, readme: Path = README) -> bool:
    """Put ``text`` between the ``name`` markers of ``readme``; False when the markers are missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")
    return True
