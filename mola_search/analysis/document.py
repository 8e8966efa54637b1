"""A tiny document model rendered twice: a self-contained HTML page and a Markdown summary.

The report and the comparison build a list of `Section`s made of paragraphs,
bullet lists, tables and figures; `to_html` and `to_markdown` render the same
content, so the two files never disagree. Figures are PNG files in the same
folder, referenced by relative path (the page works offline and when the
folder is moved).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Para:
    text: str
    kind: str = ""          # "" | "warning" | "muted"


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    emphasis: set[int] = field(default_factory=set)   # row indices drawn bold


@dataclass
class Figure:
    file: str               # PNG name, relative to the page
    caption: str


Block = Para | Bullets | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    anchor: str = ""

    def add(self, *blocks: Block) -> "Section":
        self.blocks.extend(blocks)
        return self


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 16px 28px 48px; background: #fff; }
h1 { font-size: 1.5em; margin: 0.4em 0 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
  border-bottom: 2px solid #e4e4e4; padding-bottom: 3px; }
nav { font-size: 0.9em; margin-bottom: 1em; } nav a { margin-right: 0.9em; color: #1f5fa8; text-decoration: none; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.6em 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } tr.em td { font-weight: 600; background: #fff6e5; }
td code, p code, li code { font-size: 0.95em; background: #f3f3f3; padding: 0 3px; border-radius: 3px;
  word-break: break-all; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
p.warning { background: #fff3cd; border: 1px solid #f0d78c; padding: 8px 12px; border-radius: 4px; }
p.muted { color: #666; font-size: 0.9em; }
ul { padding-left: 1.3em; } li { margin: 0.2em 0; }
"""


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only markup the text uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{html.escape(title)}</h1>", f'<p class="muted">{_inline(subtitle)}</p>', "<nav>"]
    out += [f'<a href="#{s.anchor or i}">{html.escape(s.title)}</a>' for i, s in enumerate(sections)]
    out.append("</nav>")
    for i, s in enumerate(sections):
        out.append(f'<section id="{s.anchor or i}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            out.append(_html_block(b))
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def _html_block(b: Block) -> str:
    if isinstance(b, Para):
        cls = f' class="{b.kind}"' if b.kind else ""
        return f"<p{cls}>{_inline(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b.items) + "</ul>"
    if isinstance(b, Table):
        head = "".join(f"<th>{_inline(h)}</th>" for h in b.head)
        rows = "".join(f'<tr{" class=em" if i in b.emphasis else ""}>' + "".join(f"<td>{_inline(c)}</td>" for c in r)
                       + "</tr>" for i, r in enumerate(b.rows))
        thead = f"<thead><tr>{head}</tr></thead>" if any(b.head) else ""
        return f"<table>{thead}<tbody>{rows}</tbody></table>"
    if isinstance(b, Figure):
        src = html.escape(b.file, quote=True)
        return (f'<figure><img src="{src}" alt="{html.escape(b.caption, quote=True)}">'
                f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {type(b).__name__}")


def to_markdown(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", "", subtitle, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            out += [_md_block(b), ""]
    return "\n".join(out).rstrip() + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block) -> str:
    if isinstance(b, Para):
        return f"> **Note:** {b.text}" if b.kind == "warning" else b.text
    if isinstance(b, Bullets):
        return "\n".join(f"- {x}" for x in b.items)
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in b.head) + " |", "|" + "---|" * len(b.head)]
        for i, r in enumerate(b.rows):
            cells = [_md_cell(c) for c in r]
            if i in b.emphasis and cells:
                cells[0] = f"**{cells[0]}**" if cells[0] else "**>**"
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if isinstance(b, Figure):
        return f"![{b.caption}]({b.file})"
    raise TypeError(f"unknown block {type(b).__name__}")


def write(folder: Path, title: str, subtitle: str, sections: Sequence[Section]) -> tuple[Path, Path]:
    """Write index.html and summary.md into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / "index.html"
    page.write_text(to_html(title, subtitle, sections), encoding="utf-8")
    md = folder / "summary.md"
    md.write_text(to_markdown(title, subtitle, sections), encoding="utf-8")
    return page, md
