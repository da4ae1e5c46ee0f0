"""Rendering the report's document model (a list of blocks) to Markdown and to one HTML page.

Blocks are tuples: ``("h1" | "h2" | "h3" | "p", text)``, ``("img", caption, png_path)``
and ``("table", Table)`` (tinyptq.ablate.report.Table: header, body, bold cells).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyptq.ablate.report import Table


def render_markdown(blocks: list[tuple], base: Path) -> str:
    """Markdown text of the blocks; images link to their PNG files relative to ``base``."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "img":
            out.append(f"![{args[0]}]({args[1].relative_to(base).as_posix()})")
        elif kind == "table":
            t: Table = args[0]

            def cell(text: str, i: int, j: int, t: Table = t) -> str:
                text = text.replace("|", "\\|")
                return f"**{text}**" if (i, j) in t.bold and text else text

            lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
            lines += ["| " + " | ".join(cell(c, i, j) for j, c in enumerate(r)) + " |"
                      for i, r in enumerate(t.body)]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}
img{max-width:100%;display:block;margin:1em 0}.wide{overflow-x:auto}"""


def render_html(blocks: list[tuple], title: str) -> str:
    """One self-contained HTML page: inline CSS, plots embedded as base64 PNG."""
    esc = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{esc(args[0])}</{kind}>")
        elif kind == "img":
            data = base64.b64encode(args[1].read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{esc(args[0])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(args[0])}</figcaption></figure>")
        elif kind == "table":
            t: Table = args[0]
            rows = ["<tr>" + "".join(f"<th>{esc(h)}</th>" for h in t.header) + "</tr>"]
            for i, r in enumerate(t.body):
                tds = (f"<td><b>{esc(c)}</b></td>" if (i, j) in t.bold else f"<td>{esc(c)}</td>"
                       for j, c in enumerate(r))
                rows.append("<tr>" + "".join(tds) + "</tr>")
            out.append("<div class='wide'><table>" + "".join(rows) + "</table></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
