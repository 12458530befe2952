"""Rendering the report's blocks: Markdown (images linked) and self-contained HTML (PNGs embedded as base64)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from esc_evolve.evaluation.report.blocks import TITLE, Block


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            level = "#" if block.content == TITLE else "##"
            out.append(f"{level} {block.content}\n")
        elif block.kind == "text":
            out.append(block.content + "\n")
        elif block.kind == "table":
            header, rows = block.content
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif block.kind == "image":
            caption, path = block.content
            out.append(f"![{caption}]({path.relative_to(out_dir).as_posix()})\n")
        elif block.kind == "example":
            sample_id, profile, context, cells = block.content
            out.append(f"### {sample_id}\n\n*{profile}*\n")
            out += [f"> {_md_cell(line)}  " for line in context]
            out += ["", "| model | response | reflection |", "|---|---|---|"]
            out += [f"| {m} | {_md_cell(r)} | {_md_cell(n)} |" for m, r, n in cells]
            out.append("")
    return "\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}
.ex{display:grid;grid-template-columns:repeat(auto-fit,minmax(220px,1fr));gap:8px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;font-size:13px}.card b{display:block}
.refl{color:#666;font-size:12px;margin-top:4px}.ctx{background:#f7f7f7;padding:6px;font-size:13px}"""


def render_html(blocks: list[Block]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>{_CSS}</style></head><body>"]
    for block in blocks:
        if block.kind == "heading":
            tag = "h1" if block.content == TITLE else "h2"
            out.append(f"<{tag}>{e(block.content)}</{tag}>")
        elif block.kind == "text":
            out.append(_html_text(block.content))
        elif block.kind == "table":
            header, rows = block.content
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        elif block.kind == "image":
            caption, path = block.content
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(
                f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        elif block.kind == "example":
            sample_id, profile, context, cells = block.content
            out.append(
                f"<h3>{e(sample_id)}</h3><p><i>{e(profile)}</i></p><div class='ctx'>"
                + "<br>".join(e(line) for line in context)
                + "</div><div class='ex'>"
            )
            out += [
                f"<div class='card'><b>{e(m)}</b>{e(r)}" + (f"<div class='refl'>{e(n)}</div>" if n else "") + "</div>"
                for m, r, n in cells
            ]
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    escaped = html.escape(text)
    while escaped.count("**") >= 2:
        escaped = escaped.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return escaped


def _html_text(text: str) -> str:
    lines = text.split("\n")
    if all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_html_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_html_inline(text)}</p>"
