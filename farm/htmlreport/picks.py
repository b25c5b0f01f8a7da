"""Which rows the report shows pictures of: a contact-sheet sample stratified by config, the best and worst by
``identity_mean``, and near-static videos. Deterministic for a seed, so two reports of one output show the same rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Row = dict[str, Any]


def group_label(row: Row, by: Sequence[str]) -> str:
    """A row's config as text (``g5.0-ip1.0-s42``; several columns joined with `` / ``; ``(all)`` ungrouped)."""
    if not by:
        return "(all)"
    return " / ".join("-" if row.get(name) is None else str(row[name]) for name in by)


def has_video(row: Row) -> bool:
    return row.get("status") == "ok" and bool(row.get("video"))


def stratified(rows: list[Row], by: Sequence[str], limit: int, seed: int) -> dict[str, list[Row]]:
    """At most ``limit`` ok rows with a video, spread evenly over configs (a config with fewer rows leaves its share
    to the others), each config's rows in id order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if has_video(row):
            groups.setdefault(group_label(row, by), []).append(row)
    quotas = _quotas({label: len(members) for label, members in groups.items()}, limit)
    rng = np.random.default_rng(seed)
    picked = {}
    for label in sorted(groups):
        members, quota = groups[label], quotas[label]
        chosen = sorted(rng.choice(len(members), size=quota, replace=False)) if quota < len(members) else range(quota)
        if quota:
            picked[label] = [members[i] for i in chosen]
    return picked


def _quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """Round-robin shares of ``limit`` over groups of ``sizes`` (no group gets more than it has)."""
    quotas = dict.fromkeys(sizes, 0)
    left = max(0, limit)
    while left > 0:
        open_groups = [label for label in sorted(sizes) if quotas[label] < sizes[label]]
        if not open_groups:
            break
        for label in open_groups[:left]:
            quotas[label] += 1
        left -= min(left, len(open_groups))
    return quotas


def ranked(rows: list[Row], metric: str, count: int) -> tuple[list[Row], list[Row]]:
    """The ``count`` best and worst ok rows with a video by ``metric`` (rows without a value left out)."""
    scored = [r for r in rows if has_video(r) and isinstance(r.get(metric), int | float)]
    scored.sort(key=lambda r: (r[metric], r["id"]))
    return scored[::-1][:count], scored[:count]


def static(rows: list[Row], count: int, seed: int) -> tuple[list[Row], int]:
    """Up to ``count`` ok rows flagged ``motion_static`` (sampled when there are more) and how many there are."""
    flagged = [r for r in rows if has_video(r) and r.get("motion_static") is True]
    if len(flagged) <= count:
        return flagged, len(flagged)
    chosen = sorted(np.random.default_rng(seed).choice(len(flagged), size=count, replace=False))
    return [flagged[i] for i in chosen], len(flagged)


@dataclass
class Picks:
    """The rows each picture section shows, and the counts the page's sampling note reports."""

    sheets: dict[str, list[Row]]
    best: list[Row]
    worst: list[Row]
    static: list[Row]
    static_total: int
    with_video: int
    notes: list[str] = field(default_factory=list)

    def in_order(self) -> list[Row]:
        """Every picked row once, the small sections first (they keep their thumbnails if the size cap bites)."""
        seen: dict[str, Row] = {}
        for row in [*self.best, *self.worst, *self.static, *(r for rows in self.sheets.values() for r in rows)]:
            seen.setdefault(row["id"], row)
        return list(seen.values())


def pick(rows: list[Row], by: Sequence[str], sheet_limit: int, per_section: int, seed: int) -> Picks:
    best, worst = ranked(rows, "identity_mean", per_section)
    chosen, total = static(rows, per_section, seed)
    sheets = stratified(rows, by, sheet_limit, seed)
    return Picks(sheets, best, worst, chosen, total, sum(1 for r in rows if has_video(r)))
