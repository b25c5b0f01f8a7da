"""Inline SVG box plots, drawn here (no plotting library, no script): one horizontal box per config.

The SVG has no ``xmlns`` attribute: inline in HTML it needs none, and the page stays free of any URL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

import numpy as np

WIDTH, LABEL_W, ROW_H, AXIS_H, PAD = 720, 200, 24, 28, 32  # PAD: room for the last tick's label


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _scale(low: float, high: float) -> tuple[float, float]:
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    margin = (high - low) * 0.04
    return low - margin, high + margin


def _row(label: str, values: np.ndarray, y: float, x: Callable[[float], float]) -> str:
    """One config's box (quartiles), whiskers (min..max), median line and mean dot, with a hover title."""
    q0, q1, q2, q3, q4 = np.percentile(values, [0, 25, 50, 75, 100])
    mid = y + ROW_H / 2
    tip = f"{label}: n={values.size} mean={_fmt(values.mean())} median={_fmt(q2)} min={_fmt(q0)} max={_fmt(q4)}"
    shown = label if len(label) <= 28 else label[:27] + "…"
    return (
        f'<g><title>{escape(tip)}</title><text x="{LABEL_W - 6}" y="{mid + 4:.1f}" text-anchor="end">{escape(shown)}'
        f' (n={values.size})</text><line x1="{x(q0):.1f}" x2="{x(q4):.1f}" y1="{mid:.1f}" y2="{mid:.1f}" '
        f'class="wh"/><rect x="{x(q1):.1f}" y="{y + 4:.1f}" width="{max(1.0, x(q3) - x(q1)):.1f}" '
        f'height="{ROW_H - 8}" class="box"/><line x1="{x(q2):.1f}" x2="{x(q2):.1f}" y1="{y + 4:.1f}" '
        f'y2="{y + ROW_H - 4:.1f}" class="med"/><circle cx="{x(values.mean()):.1f}" cy="{mid:.1f}" r="3" '
        f'class="mean"/></g>'
    )


def _tick_labels(ticks: np.ndarray) -> list[str]:
    """The fewest significant digits (3 and up) that tell every tick apart (0.9991, 0.9993, ... not 0.999 five
    times)."""
    for digits in range(3, 10):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _axis(low: float, high: float, y: float, x: Callable[[float], float]) -> str:
    ticks = np.linspace(low, high, 5)
    parts = [f'<line x1="{LABEL_W}" x2="{WIDTH - PAD}" y1="{y:.1f}" y2="{y:.1f}" class="ax"/>']
    for tick, text in zip(ticks, _tick_labels(ticks)):
        parts.append(
            f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{y:.1f}" y2="{y + 4:.1f}" class="ax"/>'
            f'<text x="{x(tick):.1f}" y="{y + 16:.1f}" text-anchor="middle">{text}</text>'
        )
    return "".join(parts)


def box_plot(metric: str, groups: Sequence[tuple[str, Sequence[float]]]) -> str:
    """An ``<svg>`` of ``metric`` per group (groups without values are listed as such); ``""`` when none has any."""
    kept = [(label, np.asarray(values, dtype=np.float64)) for label, values in groups]
    kept = [(label, values[~np.isnan(values)]) for label, values in kept]
    present = [(label, values) for label, values in kept if values.size]
    if not present:
        return ""
    low, high = _scale(min(v.min() for _, v in present), max(v.max() for _, v in present))

    def x(value: float) -> float:
        return LABEL_W + (value - low) / (high - low) * (WIDTH - LABEL_W - PAD)

    rows = [_row(label, values, PAD + i * ROW_H, x) for i, (label, values) in enumerate(present)]
    axis_y = PAD + len(present) * ROW_H + 4
    height = axis_y + AXIS_H
    empty = [label for label, values in kept if not values.size]
    caption = f" (no values: {', '.join(empty)})" if empty else ""
    return (
        f'<figure class="plot"><figcaption>{escape(metric)}{escape(caption)}</figcaption>'
        f'<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
        f'aria-label="{escape(metric)} per config">{"".join(rows)}{_axis(low, high, axis_y, x)}</svg></figure>'
    )
