"""The report's sections as HTML fragments. Every value that came from a user or a file goes through ``esc``."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

import pyarrow as pa

from farm.htmlreport.picks import Row, group_label
from farm.htmlreport.svg import box_plot
from farm.htmlreport.thumbs import Thumbs
from farm.summary import display_rows

PROMPT_CHARS = 240
MESSAGE_CHARS = 300
EXAMPLES_PER_CODE = 5


def esc(value: Any, limit: int | None = None) -> str:
    """Text for HTML content or a quoted attribute; ``limit`` shortens it (with …) before escaping."""
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text, quote=True)


def section(anchor: str, title: str, body: str, note: str = "") -> str:
    noted = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{noted}{body}</section>'


def summary_table(summary: pa.Table) -> str:
    header, body = display_rows(summary)
    if not body:
        return "<p>(no records)</p>"
    head = "".join(f"<th>{esc(cell)}</th>" for cell in header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>" for cells in body)
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def distributions(rows: list[Row], by: Sequence[str], metrics: Sequence[str], bool_metrics: set[str]) -> str:
    """One box plot per numeric metric over ok rows, one box per config (boolean metrics are rates: the table)."""
    members: dict[str, list[Row]] = {}
    for row in rows:
        if row.get("status") == "ok":
            members.setdefault(group_label(row, by), []).append(row)
    plots = []
    for metric in (m for m in metrics if m not in bool_metrics):
        groups = []
        for label in sorted(members):
            values = (r.get(metric) for r in members[label])
            groups.append((label, [float(v) for v in values if isinstance(v, int | float)]))
        plots.append(box_plot(metric, groups))
    shown = [p for p in plots if p]
    return "".join(shown) if shown else "<p>No metric has values on ok rows.</p>"


def _img(uri: str | None, alt: str, cls: str) -> str:
    if not uri:
        return f'<span class="ph {cls}" title="{esc(alt)}">no {esc(alt)}</span>'
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}" loading="eager">'


def _metric_line(row: Row) -> str:
    value = row.get("identity_mean")
    shown = "-" if not isinstance(value, int | float) else f"{value:.4f}"
    extra = " · static" if row.get("motion_static") is True else ""
    return f"identity_mean {shown}{extra}"


def card(row: Row, thumbs: Thumbs | None, by: Sequence[str]) -> str:
    """A contact-sheet card: portrait, the frame strip, id, config, identity and prompt; notes for what is missing."""
    thumbs = thumbs or Thumbs(notes=["not sampled"])
    frames = "".join(_img(f, f"frame {i}", "frame") for i, f in enumerate(thumbs.frames))
    pictures = (
        _img(thumbs.portrait, "portrait", "portrait")
        + f'<div class="strip">{frames or _img(None, "video", "frame")}</div>'
    )
    notes = "".join(f'<div class="warn">{esc(n)}</div>' for n in thumbs.notes)
    caption = f"<b>{esc(row['id'])}</b> · {esc(group_label(row, by))} · {esc(_metric_line(row))}"
    prompt = f'<div class="prompt" title="{esc(row.get("prompt"))}">{esc(row.get("prompt"), PROMPT_CHARS)}</div>'
    return (
        f'<figure class="card" data-id="{esc(row["id"])}"><div class="pics">{pictures}</div>'
        f"<figcaption>{caption}{prompt}{notes}</figcaption></figure>"
    )


def gallery(rows: list[Row], thumbs: dict[str, Thumbs], by: Sequence[str]) -> str:
    if not rows:
        return "<p>(none)</p>"
    return '<div class="cards">' + "".join(card(r, thumbs.get(r["id"]), by) for r in rows) + "</div>"


def contact_sheets(sheets: dict[str, list[Row]], thumbs: dict[str, Thumbs], by: Sequence[str]) -> str:
    """One collapsible block per config (all open), its sampled cards inside."""
    if not sheets:
        return "<p>(no ok videos)</p>"
    blocks = [
        f'<details open class="sheet"><summary>{esc(label)} ({len(rows)} shown)</summary>{gallery(rows, thumbs, by)}'
        "</details>"
        for label, rows in sheets.items()
    ]
    return "".join(blocks)


def failures(rows: list[Row]) -> str:
    """Rows not ok, grouped by (status, error_code): counts, then a few example ids and messages per group."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.get("status") != "ok":
            groups.setdefault((str(row.get("status")), str(row.get("error_code") or "-")), []).append(row)
    if not groups:
        return "<p>No failed or skipped rows.</p>"
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    counts = "".join(f"<tr><td>{esc(s)}</td><td>{esc(c)}</td><td>{len(groups[(s, c)])}</td></tr>" for s, c in order)
    table = (
        f'<table class="fails"><thead><tr><th>status</th><th>error_code</th><th>rows</th></tr></thead>{counts}</table>'
    )
    examples = []
    for status, code in order:
        items = "".join(
            f"<li><code>{esc(r['id'])}</code>: {esc(r.get('error_message'), MESSAGE_CHARS)}</li>"
            for r in groups[(status, code)][:EXAMPLES_PER_CODE]
        )
        examples.append(f"<h3>{esc(code)} ({esc(status)})</h3><ul>{items}</ul>")
    return table + "".join(examples)
