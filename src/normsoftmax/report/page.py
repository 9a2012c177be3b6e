"""HTML building blocks of the report: one self-contained page, its figures inline as base64 PNG data URIs,
its style in a ``<style>`` element, no scripts and no links to anything else. Every text is escaped here.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.hit { background: #e6f4ea; } td.miss { background: #fdecea; }
.missing { background: #fff4e5; border: 1px solid #f0b35e; padding: 0.5em 1em; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #444; }
details { margin: 0.5em 0 1.5em; }
"""


def text(value) -> str:
    return html.escape(str(value))


def number(value, digits: int = 2) -> str:
    """A metric as the tables show it ("-" when not evaluated)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric_cell(value, digits: int = 2) -> tuple[str, str]:
    """A table cell of :func:`number`, right-aligned."""
    return text(number(value, digits)), "number"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{text(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def table(header: Sequence[str], rows: Iterable[Sequence], table_id: str | None = None) -> str:
    """A table; a cell is a plain value (escaped; numbers right-aligned) or ``(html, css_class)``."""
    head = "".join(f"<th>{text(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    identifier = f' id="{text(table_id)}"' if table_id else ""
    return f"<table{identifier}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if isinstance(value, tuple):
        markup, css_class = value
        return f'<td class="{text(css_class)}">{markup}</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="number">{text(value)}</td>'
    return f"<td>{text(value)}</td>"


def paragraph(content: str) -> str:
    return f"<p>{text(content)}</p>"


def section(section_id: str, title: str, parts: Iterable[str]) -> str:
    return f'<section id="{text(section_id)}"><h2>{text(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def missing_section(notes: Sequence[str]) -> str:
    """What the report could not show, and why: first on the page, so nobody mistakes a gap for a result."""
    if not notes:
        return ""
    items = "".join(f"<li>{text(note)}</li>" for note in notes)
    return f'<section id="missing" class="missing"><h2>Missing from this report</h2><ul>{items}</ul></section>'


def document(title: str, parts: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{text(title)}</h1>\n"
            + "\n".join(part for part in parts if part) + "\n</body>\n</html>\n")


__all__ = ["text", "number", "metric_cell", "image", "table", "paragraph", "section", "missing_section", "document"]
