"""The report's `index.html`: one self-contained page of a benchmark's sections, findings first.

Apart from `tatr.report.build`, which decides what the sections (`Section`, `FigureSpec`) hold, so that the
page's markup and style change without touching what is computed.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from tatr.report.findings import findings
from tatr.report.render import Table

__all__ = ["FigureSpec", "Section", "render_index"]


@dataclass
class FigureSpec:
    name: str
    title: str
    build: Callable[[], object]  # returns a Figure or None
    caption: str = ""  # what a reader needs to judge it: n, seeds, what the whiskers are, the axis


@dataclass
class Section:
    """One block of the page: a heading, its tables and figures, or why it is missing."""

    title: str
    tables: list[Table] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    missing: str = ""


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.85em}caption{text-align:left;font-weight:600;padding:.3em 0}
th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
thead th{border-bottom:2px solid #444}tbody th{text-align:left}
figure.fig{margin:1em 0}.fig img{width:100%;height:auto;border:1px solid #eee}
.fig figcaption,.note,.links{font-size:.8em;color:#555}.missing{color:#a33}
.scroll{overflow-x:auto}
"""


def _findings_html(sections: list[Section]) -> str:
    """The opening Findings: one sentence per trust-region comparison, with its interval."""
    e = html.escape
    found = findings([t for s in sections for t in s.tables])
    parts = ["<h2 id='findings'>Findings</h2>"]
    if not found:
        parts.append("<p class='missing'>No trust-region comparisons with predictions in the store yet.</p>")
    for where, sentences in found:
        parts.append(f"<p>In the {e(where)}:</p><ul>" + "".join(f"<li>{e(s)}</li>" for s in sentences) + "</ul>")
    parts.append(
        "<p class='note'>Generated from the store: paired 95% bootstrap intervals over test examples (stratified by"
        " task; seeds, then examples, where a row has several seeds), paired sign-flip test, Holm over each"
        " table's comparisons.</p>"
    )
    return "\n".join(parts)


def render_index(benchmark: str, rows: pd.DataFrame, sections: list[Section], shown: dict[int, list[str]]) -> str:
    """One self-contained page; images and downloads are relative links into the same folder."""
    e = html.escape
    runs = rows["run_id"].nunique()
    commits = sorted(str(c) for c in rows["git_commit"].dropna().unique())
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tatr report: {e(benchmark)}</title><style>{_CSS}</style></head><body>",
        f"<h1>tatr report: {e(benchmark)}</h1>",
        f"<p>{len(rows)} rows from {runs} runs of the results store"
        + (f"; code commits {e(', '.join(commits))}" if commits else "")
        + ". Regenerate with <code>tatr report</code>.</p>",
        _findings_html(sections),
    ]
    for i, section in enumerate(sections):
        parts.append(f"<h2>{e(section.title)}</h2>")
        has_table = False
        for table in section.tables:
            if table.empty:
                continue
            has_table = True
            parts.append(f"<div class='scroll'>{table.to_html()}</div>")
            links = " · ".join(f"<a href='tables/{e(table.name)}.{x}'>{x.upper()}</a>" for x in ("csv", "tex", "md"))
            parts.append(f"<p class='links'>Download: {links}</p>")
        for name in shown.get(i, []):
            spec = next(s for s in section.figures if s.name == name)
            parts.append(
                f"<figure class='fig'><img src='figures/{e(name)}.png' alt='{e(spec.title)}'>"
                f"<figcaption><b>{e(spec.title)}.</b> {e(spec.caption)} (<a href='figures/{e(name)}.pdf'>PDF</a>)"
                "</figcaption></figure>"
            )
        if not has_table and not shown.get(i) and section.missing:
            parts.append(f"<p class='missing'>Not available: {e(section.missing)}.</p>")
        elif not shown.get(i) and section.figures and not has_table:
            parts.append("<p class='missing'>Not available: no data for this figure in the store.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
