"""HTML building blocks of the report: escaping, tables, text blocks, warning boxes and the page.

Why escaping lives here and nowhere else: model outputs, dataset prompts, group names and
model ids are untrusted text that can hold markup. Every string that is not built in this
package goes through `html.escape` (`escape`); trusted fragments are `Html` instances, and the
helpers here escape every value that is not `Html` (autoescaping by construction). Long texts
are cut *before* escaping (so an entity is never cut in half), marked "…".

The page has no external URLs: CSS is inline and figures are base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

from refusal_cliff import __version__


class Html(str):
    """A fragment of trusted HTML, built in this package from escaped parts."""


def escape(value: Any) -> Html:
    """Escape untrusted text for HTML (trusted `Html` passes through unchanged)."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def join(*parts: Html) -> Html:
    """Concatenate trusted fragments."""
    return Html("".join(escape(part) for part in parts))


def truncate_text(text: str, limit: int, keep_tail: bool = False) -> str:
    """Shorten `text` to about `limit` characters, marking the cut with "…".

    With `keep_tail` the start and the end are kept and the middle is cut (the end of a
    model's thinking is where the cliff happens, so it is worth showing).
    """
    text = str(text)
    if len(text) <= limit:
        return text
    if keep_tail:
        head = limit // 2
        tail = limit - head
        return text[:head].rstrip() + " … " + text[-tail:].lstrip()
    return text[:limit].rstrip() + " …"


def fmt(value: Any, digits: int = 3) -> str:
    """A value for display ("—" for missing or non-finite numbers, [lo, hi] for intervals)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "—"
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return str(value)


def pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> Html:
    """An HTML table; every cell that is not `Html` is formatted and escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td>{cell if isinstance(cell, Html) else escape(fmt(cell))}</td>" for cell in row)
        body.append(f"<tr>{cells}</tr>")
    cls = f' class="{escape(css)}"' if css else ""
    return Html(f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def text_block(text: Any, limit: int, keep_tail: bool = False) -> Html:
    """A long untrusted text (prompt, thinking, answer), cut to `limit` characters and escaped."""
    if text is None or text == "":
        return Html('<span class="muted">(empty)</span>')
    return Html(f'<div class="text">{escape(truncate_text(str(text), limit, keep_tail))}</div>')


def paragraph(text: Any, css: str = "") -> Html:
    cls = f' class="{escape(css)}"' if css else ""
    return Html(f"<p{cls}>{escape(text)}</p>")


def heading(text: Any) -> Html:
    return Html(f"<h3>{escape(text)}</h3>")


def figure_tag(png: bytes, name: str, alt: str, caption: str) -> Html:
    """An embedded <figure> of PNG bytes, captioned with its file name."""
    data = base64.b64encode(png).decode("ascii")
    return Html(
        f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">'
        f'<figcaption>{escape(caption)} <span class="muted">({escape(name)})</span></figcaption>'
        "</figure>"
    )


def warning_box(title: str, items: Sequence[Html | str], css: str = "warning") -> Html:
    """A highlighted box with a bold title and a list of (escaped) items."""
    entries = "".join(f"<li>{escape(item)}</li>" for item in items)
    return Html(f'<div class="{escape(css)}" role="alert"><b>{escape(title)}</b><ul>{entries}</ul></div>')


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;
margin:0;background:#f6f8fa;line-height:1.45}
header{background:#24292f;color:#fff;padding:18px 32px}header h1{margin:0 0 6px;font-size:1.5em}
header .meta{color:#d0d7de;font-size:.9em}header .meta span{margin-right:18px}
main{max-width:1200px;margin:0 auto;padding:16px 32px 48px}
section,nav,.skipped,.warning{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 20px;
margin:16px 0}
h2{font-size:1.2em;border-bottom:1px solid #d8dee4;padding-bottom:6px}h3{font-size:1em}
nav ol{margin:4px 0;columns:2}a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
.skipped{background:#fff8c5;border-color:#d4a72c}.skipped ul,.warning ul{margin:4px 0}
.warning{background:#ffebe9;border-color:#cf222e;border-width:2px}
table{border-collapse:collapse;margin:8px 0;font-size:.88em}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}tbody tr:nth-child(even){background:#fafbfc}
table.examples td{max-width:340px}table.notes td{max-width:800px}
.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:.85em;max-height:22em;overflow:auto}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.88em;color:#57606a}.muted{color:#6e7781;font-size:.85em}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;
word-break:break-word;line-height:1.9;border:1px solid #eaeef2;padding:6px 8px;margin:4px 0 12px}
.tok{padding:1px 0;border-radius:2px}.tok.end{outline:2px solid #0969da;outline-offset:-1px}
"""


def _header(facts: dict, folder: str, generated: str) -> Html:
    models = ", ".join(facts["model_ids"]) or "unknown"
    meta = [f"<span>model: <b>{escape(models)}</b></span>"]
    if facts["model_revisions"]:
        meta.append(f"<span>revision: {escape(', '.join(facts['model_revisions']))}</span>")
    if facts["started"]:
        meta.append(f"<span>run started: {escape(facts['started'])}</span>")
    meta += [
        f"<span>report generated: {escape(generated)}</span>",
        f"<span>refusal-cliff {escape(__version__)}</span>",
        f"<span>folder: {escape(folder)}</span>",
    ]
    return Html(f'<header><h1>Refusal-cliff report</h1><div class="meta">{"".join(meta)}</div></header>')


def page(
    sections: Sequence[tuple[str, str, Html]],
    skipped: Sequence[tuple[str, str]],
    facts: dict,
    folder: str,
    generated: str,
    warnings: Sequence[Html] = (),
) -> str:
    """The whole report page.

    Args:
        sections: (anchor, title, body) of each rendered section, in report order.
        skipped: (title, reason) of each skipped section.
        facts: run facts for the header (`model_ids`, `model_revisions`, `started`).
        folder: the run folder's name.
        generated: when the report was generated (ISO time).
        warnings: boxes shown at the very top, before anything else.
    """
    title = "refusal-cliff report — " + (", ".join(facts["model_ids"]) or "unknown")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        _header(facts, folder, generated),
        "<main>",
        *warnings,
    ]
    if skipped:
        items = "".join(f"<li><b>{escape(name)}</b>: {escape(reason)}</li>" for name, reason in skipped)
        parts.append(
            f'<div class="skipped"><b>Skipped sections</b> (missing artifacts)<ul>{items}</ul></div>'
        )
    if sections:
        links = "".join(f'<li><a href="#{escape(key)}">{escape(name)}</a></li>' for key, name, _ in sections)
        parts.append(f"<nav><b>Contents</b><ol>{links}</ol></nav>")
    else:
        parts.append("<section><p>This run folder holds no artifacts the report can show.</p></section>")
    for key, name, body in sections:
        parts.append(f'<section id="{escape(key)}"><h2>{escape(name)}</h2>{escape(body)}</section>')
    parts.append("</main></body></html>\n")
    return "".join(parts)
