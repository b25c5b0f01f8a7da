"""Per-configuration summary of an output's records: counts, face rate, speed, and each metric's mean with a 95 %
percentile-bootstrap interval (``farm summary``; the HTML report's first table).

Metrics are treated generically: every numeric or boolean column of ``KNOWN_METRICS`` that the table has (a boolean
such as ``motion_static`` summarises as a rate). Only ok rows with a value count: a null metric is left out, never
read as 0, and a group without values shows null. The bootstrap is seeded, so the same table gives the same text.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

KNOWN_METRICS = (
    "identity_mean",
    "identity_min",
    "identity_std",
    "identity_temporal_mean",
    "identity_temporal_min",
    "identity_facexlib_mean",
    "identity_distance_mean",
    "motion_mean",
    "motion_static",
    "clip_score",
)
DEFAULT_BY = ("config_id", "model")
FORMATS = ("table", "csv", "json")
LEVEL = 0.95
BOOT_CELLS = 2_000_000  # resample indices held at once (16 MB): big groups are resampled in chunks


def default_by(table: pa.Table) -> list[str]:
    """``config_id`` when the table has one with values (a sweep), else ``model``, else no grouping."""
    for name in DEFAULT_BY:
        if name in table.column_names and table.column(name).null_count < table.num_rows:
            return [name]
    return []


def _is_metric_type(dtype: pa.DataType) -> bool:
    """Numbers and booleans (a rate); an all-null column (no part wrote the metric yet) shows as n = 0 when asked."""
    return any(
        test(dtype) for test in (pa.types.is_floating, pa.types.is_integer, pa.types.is_boolean, pa.types.is_null)
    )


def metric_columns(table: pa.Table, metrics: Sequence[str] | None = None) -> list[str]:
    """The metrics to summarise: ``metrics`` as given (each must be a numeric or boolean column), else every column
    of ``KNOWN_METRICS`` the table has with such a type and at least one value (a metric never measured in this
    output, e.g. ``identity_std`` with identity scoring off, would only add a column of nulls). A metric named twice
    counts once (the first place kept)."""
    if metrics is None:
        names = table.column_names
        found = [m for m in KNOWN_METRICS if m in names and _is_metric_type(table.schema.field(m).type)]
        return [m for m in found if table.column(m).null_count < table.num_rows]
    for name in metrics:
        if name not in table.column_names:
            raise ValueError(f"metric {name!r} is not a column of this output; its columns are {table.column_names}")
        if not _is_metric_type(table.schema.field(name).type):
            kind = table.schema.field(name).type
            raise ValueError(f"metric {name!r} is {kind}, not a number; give a numeric column in --metrics")
    return list(dict.fromkeys(metrics))


def bootstrap_interval(values: np.ndarray, seed: int = 0, resamples: int = 1000) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of ``values`` (deterministic for a ``seed``)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    if values.size == 1 or resamples < 1:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, BOOT_CELLS // values.size)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        means[start : start + count] = values[rng.integers(0, values.size, size=(count, values.size))].mean(axis=1)
    tail = (1.0 - LEVEL) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def _values(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _key(value: Any) -> Any:
    """A group key part: hashable (nested carried values as JSON text)."""
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, list | dict) else value


def group_rows(table: pa.Table, by: Sequence[str]) -> dict[tuple[Any, ...], list[int]]:
    """Row indices per group key, groups in sorted key order (nulls last)."""
    missing = [name for name in by if name not in table.column_names]
    if missing:
        raise ValueError(f"cannot group by {missing}: no such column; the columns are {table.column_names}")
    columns = [[_key(v) for v in _values(table, name)] for name in by]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, key in enumerate(zip(*columns) if columns else [()] * table.num_rows):
        groups.setdefault(tuple(key), []).append(index)
    order = sorted(groups, key=lambda k: tuple((v is None, v) for v in k))  # a column's values share one type
    return {k: groups[k] for k in order}


def _mean(values: list[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(kept)) if kept else None


def _metric_cells(name: str, values: list[Any], seed: int, resamples: int) -> dict[str, Any]:
    kept = np.array([float(v) for v in values if v is not None], dtype=np.float64)
    kept = kept[~np.isnan(kept)]
    if kept.size == 0:
        return {f"{name}_mean": None, f"{name}_lo": None, f"{name}_hi": None, f"{name}_n": 0}
    low, high = bootstrap_interval(kept, seed, resamples)
    return {f"{name}_mean": float(kept.mean()), f"{name}_lo": low, f"{name}_hi": high, f"{name}_n": int(kept.size)}


def _seconds(columns: dict[str, list[Any]], ok: list[int]) -> float | None:
    """Seconds per ok video: mean ``generate_s``, else ``total_s`` where no row has a generate time."""
    for name in ("generate_s", "total_s"):
        mean = _mean([columns[name][i] for i in ok])
        if mean is not None:
            return mean
    return None


def _group_summary(
    columns: dict[str, list[Any]], rows: list[int], metrics: list[str], seed: int, resamples: int
) -> dict[str, Any]:
    status = columns["status"]
    ok = [i for i in rows if status[i] == "ok"]
    out: dict[str, Any] = {"rows": len(rows)}
    for name in ("ok", "failed", "skipped"):
        out[name] = sum(1 for i in rows if status[i] == name)
    out["face_rate"] = _mean([columns["face_rate"][i] for i in ok])
    out["seconds_per_video"] = _seconds(columns, ok)
    for name in metrics:
        out.update(_metric_cells(name, [columns[name][i] for i in ok], seed, resamples))
    return out


def summary_schema(table: pa.Table, by: Sequence[str], metrics: Sequence[str]) -> pa.Schema:
    fields = [table.schema.field(name) for name in by]
    fields += [pa.field(name, pa.int64()) for name in ("rows", "ok", "failed", "skipped")]
    fields += [pa.field(name, pa.float64()) for name in ("face_rate", "seconds_per_video")]
    for name in metrics:
        fields += [pa.field(f"{name}_{part}", pa.float64()) for part in ("mean", "lo", "hi")]
        fields.append(pa.field(f"{name}_n", pa.int64()))
    return pa.schema(fields)


def summarize(
    table: pa.Table,
    by: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    resamples: int = 1000,
) -> pa.Table:
    """One row per group of ``by`` (default: ``default_by``): rows, ok/failed/skipped, face rate and seconds per
    video over ok rows, and per metric ``<m>_mean``, ``<m>_lo``/``<m>_hi`` (95 % bootstrap) and ``<m>_n``.

    The table's schema metadata names the grouping (``by``) and the metrics, so ``render`` needs nothing else."""
    by = default_by(table) if by is None else list(by)
    names = metric_columns(table, metrics)
    needed = ["status", "face_rate", "generate_s", "total_s", *names]
    columns = {name: _values(table, name) for name in dict.fromkeys(needed)}
    records = []
    for rows in group_rows(table, by).values():
        record = {name: table.column(name)[rows[0]].as_py() for name in by}
        record.update(_group_summary(columns, rows, names, seed, resamples))
        records.append(record)
    schema = summary_schema(table, by, names)
    meta = {"by": json.dumps(by), "metrics": json.dumps(names), "resamples": str(resamples), "seed": str(seed)}
    return pa.Table.from_pylist(records, schema=schema).replace_schema_metadata(meta)


def described(summary: pa.Table) -> tuple[list[str], list[str]]:
    """The grouping columns and metrics a ``summarize`` table was made with."""
    meta = {k.decode(): v.decode() for k, v in (summary.schema.metadata or {}).items()}
    return json.loads(meta.get("by", "[]")), json.loads(meta.get("metrics", "[]"))


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def interval_text(row: dict[str, Any], metric: str) -> str:
    """``0.7123 [0.7011, 0.7230] n=40``, or ``- (n=0)`` for a group without values."""
    if row.get(f"{metric}_mean") is None:
        return "- (n=0)"
    low, high = _num(row[f"{metric}_lo"]), _num(row[f"{metric}_hi"])
    return f"{_num(row[f'{metric}_mean'])} [{low}, {high}] n={row[f'{metric}_n']}"


def display_rows(summary: pa.Table) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the human-readable table (one cell per metric: mean [lo, hi] n). ``face_rate``
    asked for as a metric is shown once, as the metric (the same mean, with its interval)."""
    by, metrics = described(summary)
    rate = [] if "face_rate" in metrics else ["face_rate"]
    header = [*by, "rows", "ok", "failed", "skipped", *rate, "s/video", *metrics]
    body = []
    for row in summary.to_pylist():
        cells = ["-" if row[name] is None else str(row[name]) for name in by]
        cells += [str(row[name]) for name in ("rows", "ok", "failed", "skipped")]
        cells += [_num(row["face_rate"], 3) for _ in rate] + [_num(row["seconds_per_video"], 2)]
        cells += [interval_text(row, metric) for metric in metrics]
        body.append(cells)
    return header, body


def _text_table(summary: pa.Table) -> str:
    header, body = display_rows(summary)
    if not body:
        return "(no records)"
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *body]]
    by, metrics = described(summary)
    note = f"grouped by {', '.join(by) or '(all rows)'}; metrics over ok rows with a value: mean [95 % bootstrap] n"
    return "\n".join([*lines, "", note])


def render(summary: pa.Table, fmt: str = "table") -> str:
    """``summarize``'s table as aligned text (``table``), CSV (one column per number) or JSON (a list of objects)."""
    if fmt == "table":
        return _text_table(summary)
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(summary.replace_schema_metadata(None), buf)
        return buf.getvalue().decode()
    if fmt == "json":
        return json.dumps(summary.to_pylist(), indent=2, default=str)
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}; give --format table, csv or json")
