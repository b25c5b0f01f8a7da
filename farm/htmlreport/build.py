"""``write_report``: an output's records -> one self-contained HTML file (``farm report``)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

import farm
from farm import storage
from farm.htmlreport import sections as s
from farm.htmlreport.page import page
from farm.htmlreport.picks import Picks, Row, pick
from farm.htmlreport.thumbs import Thumbs, ThumbSpec, make_thumbs
from farm.summary import default_by, described, summarize

ROW_COLUMNS = ("id", "status", "error_code", "error_message", "video", "portrait", "prompt", "identity_mean")
NAV = [
    ("summary", "Summary"),
    ("distributions", "Distributions"),
    ("sheets", "Contact sheets"),
    ("best", "Best"),
    ("worst", "Worst"),
    ("static", "Near-static"),
    ("failures", "Failures"),
]


def _rows(table: pa.Table, by: Sequence[str], metrics: Sequence[str]) -> list[Row]:
    wanted = dict.fromkeys([*ROW_COLUMNS, "motion_static", *by, *metrics])
    return table.select([c for c in wanted if c in table.column_names]).to_pylist()


def _counts(rows: list[Row]) -> str:
    statuses = [r.get("status") for r in rows]
    return ", ".join(f"{name} {statuses.count(name)}" for name in ("ok", "failed", "skipped"))


def _intro(uri: str, rows: list[Row], picks: Picks, spec: ThumbSpec, seed: int, found: dict[str, Thumbs]) -> str:
    shown = sum(len(r) for r in picks.sheets.values())
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Output <code>{s.esc(uri)}</code>: {len(rows)} records ({_counts(rows)}). Made {stamp} by farm "
        f"{s.esc(farm.__version__)}.",
        f"Contact sheets show {shown} of {picks.with_video} ok videos, sampled evenly over {len(picks.sheets)} "
        f"config(s) (seed {seed}); {spec.frames} frames per video spread from first to last, thumbnails within "
        f"{spec.px * 3 // 2}×{spec.px} px, JPEG quality {spec.quality}. Statistics use every record.",
    ]
    notes = [n for t in found.values() for n in t.notes]
    for kind in ("video unreadable", "portrait unreadable", "left out"):
        count = sum(1 for n in notes if n.startswith(kind))
        if count:
            lines.append(f'<span class="warn">{count} picture(s) {kind}: see the notes on their cards.</span>')
    return '<div class="intro">' + "".join(f"<p>{line}</p>" for line in lines) + "</div>"


def _ranked_sections(picks: Picks, found: dict[str, Thumbs], by: Sequence[str], has_identity: bool) -> list[str]:
    if not has_identity:
        note = "No ok row has an identity_mean (identity scoring off, or no faces): section skipped."
        return [
            s.section("best", "Best by identity_mean", "", note),
            s.section("worst", "Worst by identity_mean", "", note),
        ]
    return [
        s.section("best", f"Best {len(picks.best)} by identity_mean", s.gallery(picks.best, found, by)),
        s.section("worst", f"Worst {len(picks.worst)} by identity_mean", s.gallery(picks.worst, found, by)),
    ]


def _static_section(picks: Picks, found: dict[str, Thumbs], by: Sequence[str], has_column: bool) -> str:
    if not has_column:
        note = "This output has no motion_static values (the motion metric did not run): section skipped."
        return s.section("static", "Near-static videos", "", note)
    note = f"{len(picks.static)} of {picks.static_total} videos flagged motion_static shown."
    return s.section("static", "Near-static videos", s.gallery(picks.static, found, by), note)


def render_report(
    uri: str, table: pa.Table, rows: list[Row], found: dict[str, Thumbs], picks: Picks, summary: pa.Table, **how: Any
) -> str:
    """The page's HTML; ``how`` holds the ``spec`` and ``seed`` the sampling note reports."""
    by, metrics = described(summary)
    bools = {m for m in metrics if pa.types.is_boolean(table.schema.field(m).type)}
    note = "Means over ok rows with a value, [95 % percentile bootstrap interval], n; nulls are left out, never 0."
    body = [
        s.section("summary", f"Per-config summary (by {', '.join(by) or 'all rows'})", s.summary_table(summary), note),
        s.section("distributions", "Metric distributions", s.distributions(rows, by, metrics, bools)),
        s.section("sheets", "Contact sheets", s.contact_sheets(picks.sheets, found, by)),
        *_ranked_sections(picks, found, by, bool(picks.best)),
        _static_section(picks, found, by, _measured(table, "motion_static")),
        s.section("failures", "Failures by error code", s.failures(rows)),
    ]
    return page(f"Lynx Farm report: {uri}", _intro(uri, rows, picks, how["spec"], how["seed"], found), NAV, body)


def write_report(
    output_uri: str,
    to_path: str,
    storage_options: dict[str, Any] | None = None,
    max_rows_per_section: int = 12,
    thumbs: int = 200,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    spec: ThumbSpec | None = None,
) -> dict[str, Any]:
    """Write the report of ``output_uri`` to ``to_path`` (a local path or URI) and return what it holds.

    ``thumbs``: at most this many videos on the contact sheets (stratified by config); ``max_rows_per_section``: the
    best, worst and near-static galleries' length. ``spec`` sets frames per strip, size, quality and the byte cap.
    """
    started = time.monotonic()
    spec = spec or ThumbSpec()
    table = farm.open_results(output_uri, storage_options)
    by = default_by(table) if by is None else list(by)
    summary = summarize(table, by, metrics, seed=seed)
    rows = _rows(table, by, described(summary)[1])
    picks = pick(rows, by, thumbs, max_rows_per_section, seed)
    found, capped = make_thumbs(picks.in_order(), storage_options, spec)
    data = render_report(output_uri, table, rows, found, picks, summary, spec=spec, seed=seed).encode("utf-8")
    storage.write_bytes_atomic(to_path, data, storage_options)
    notes = [n for t in found.values() for n in t.notes]
    return {
        "report": to_path,
        "bytes": len(data),
        "records": table.num_rows,
        "groups": summary.num_rows,
        "videos_shown": len(found),
        "videos_unreadable": sum(1 for n in notes if n.startswith("video unreadable")),
        "portraits_unreadable": sum(1 for n in notes if n.startswith("portrait unreadable")),
        "left_out_by_size_cap": capped,
        "seconds": round(time.monotonic() - started, 3),
    }


def _measured(table: pa.Table, column: str) -> bool:
    """The column exists and holds a value (every output has the metric columns; null where a metric did not run)."""
    return column in table.column_names and table.column(column).null_count < table.num_rows
