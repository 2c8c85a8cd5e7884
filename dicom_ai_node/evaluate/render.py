"""Markdown and HTML from one list of report sections, so the two reports never disagree.

Everything shown is escaped (case names come from folder names, notes from file contents): `|` in
Markdown table cells, HTML entities in HTML.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Row = Sequence[str]


@dataclass(frozen=True)
class Block:
    kind: str  # "p" | "list" | "table" | "images"
    items: Sequence[Any]
    header: Row = ()


Section = tuple[str, list[Block]]


def to_markdown(title: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if block.kind == "p":
                lines += [*block.items, ""]
            elif block.kind == "list":
                lines += [*(f"- {item}" for item in block.items), ""]
            elif block.kind == "table":
                lines += [
                    "| " + " | ".join(cell(h) for h in block.header) + " |",
                    "|" + "---|" * len(block.header),
                    *("| " + " | ".join(cell(v) for v in row) + " |" for row in block.items),
                    "",
                ]
            else:
                lines += [*(f"![{cell(caption)}]({path})" for path, caption in block.items), ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top;font-size:.9em}th{background:#f2f2f2}img{max-width:100%;margin:.3em;border:1px solid #ddd}
figure{display:inline-block;margin:.3em}figcaption{font-size:.8em;color:#555}"""


def to_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for heading, blocks in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for block in blocks:
            if block.kind == "p":
                parts += [f"<p>{e(str(item))}</p>" for item in block.items]
            elif block.kind == "list":
                parts.append("<ul>" + "".join(f"<li>{e(str(item))}</li>" for item in block.items) + "</ul>")
            elif block.kind == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in block.header) if any(block.header) else ""
                body = "".join(
                    "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in block.items
                )
                parts.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
            else:
                parts += [
                    f"<figure><a href='{e(path)}'><img src='{e(path)}' alt='{e(caption)}'></a>"
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                    for path, caption in block.items
                ]
    parts.append("</body></html>")
    return "\n".join(parts)
