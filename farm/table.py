"""Reading an output's records: the append log merged into one record per id (the newest wins).

The writers (``farm.results``) append Parquet parts to ``<out>/_log/``; this module reads them back. Parts written
before the log moved (``<out>/results/part-*.parquet``) are read as log parts too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import storage
from farm.results import result_schema
from farm.storage import OutputLayout

log = logging.getLogger("farm")


@dataclass(frozen=True)
class DamagedPart:
    """A file in the log that is not a readable result part; readers skip it (README "Damaged parts")."""

    uri: str
    reason: str


REQUIRED_COLUMNS = ("id", "status")


def _read_part(
    uri: str, layout: OutputLayout, columns: list[str] | None, damaged: list[DamagedPart] | None
) -> pa.Table | None:
    """One part; of ``columns`` only those it has (parts of earlier runs may lack a column added since).

    The bytes are fetched first, so a storage fault still raises (a rerun must not redo committed rows because S3
    hiccuped); a file that then does not parse as a result part is logged, added to ``damaged`` and skipped.
    """
    try:
        data = storage.read_bytes(uri, layout.storage_options)
    except IsADirectoryError as exc:  # a folder (a Spark/Dask dataset) or a FIFO named *.parquet
        return _damaged(uri, f"not a part file ({exc})", damaged)
    try:
        part = pq.ParquetFile(pa.BufferReader(data))
        have = part.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in have]
        if missing:
            return _damaged(uri, f"not a result part: no {' / '.join(missing)} column", damaged)
        id_type = part.schema_arrow.field("id").type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
            return _damaged(uri, f"not a result part: its id column is {id_type}, not text", damaged)
        if columns is not None:
            columns = [c for c in columns if c in have]
        return part.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return _damaged(uri, f"unreadable Parquet ({type(exc).__name__}: {exc})", damaged)


def _damaged(uri: str, reason: str, damaged: list[DamagedPart] | None) -> None:
    log.warning("skipping damaged result part %s: %s; move it out of the log to silence this", uri, reason)
    if damaged is not None:
        damaged.append(DamagedPart(uri, reason))


def committed_ids(layout: OutputLayout, damaged: list[DamagedPart] | None = None) -> set[str]:
    """Every id that already has a committed record (reads only the ``id`` column); damaged parts are skipped."""
    out: set[str] = set()
    for uri in layout.log_parts():
        part = _read_part(uri, layout, ["id"], damaged)
        if part is not None:
            out.update(part.column("id").to_pylist())
    return out


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    """A column as text, for when runs wrote it with types that cannot be merged."""
    try:
        return pc.cast(column.combine_chunks(), pa.large_string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([_scalar_text(v) for v in column], pa.large_string())


def _scalar_text(value: pa.Scalar) -> str | None:
    if not value.is_valid:
        return None
    try:
        return str(value.as_py())
    except (ValueError, OverflowError, ArithmeticError):
        return f"<{value.type} value Python cannot show>"


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate parts; a carried-through column whose type changed between runs (the manifest was edited) is
    merged as text instead of failing every later read."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    types: dict[str, list[pa.DataType]] = {}
    for table in tables:
        for fld in table.schema:
            types.setdefault(fld.name, []).append(fld.type)
    clash = []
    for name, seen in types.items():
        try:
            pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in seen], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            clash.append(name)
    log.warning("result parts disagree on the type of column(s) %s: merged as text", clash)
    fixed = []
    for table in tables:
        for name in clash:
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, _as_text(table.column(name)))
        fixed.append(table)
    return pa.concat_tables(fixed, promote_options="permissive")


def read_results(
    layout: OutputLayout, columns: list[str] | None = None, damaged: list[DamagedPart] | None = None
) -> pa.Table:
    """All committed records, one per id (the newest in log order wins, never a clock), sorted by id; damaged
    parts are skipped (and listed in ``damaged`` when given)."""
    wanted = None if columns is None else list(dict.fromkeys(["id", *columns]))
    tables = [t for t in (_read_part(uri, layout, wanted, damaged) for uri in layout.log_parts()) if t is not None]
    if not tables:
        return _select(result_schema().empty_table(), columns)
    table = _concat(tables)
    order = "_order"
    while order in table.column_names:  # a carried-through column may have any name
        order = f"_{order}"
    table = table.append_column(order, pa.array(range(table.num_rows), pa.int64()))
    # parts come in log order (run sequence, then part number): the last record of an id is its newest
    table = table.sort_by([("id", "ascending"), (order, "ascending")])
    ids = table.column("id")
    if table.num_rows > 1:
        nxt = pc.not_equal(ids.slice(1), ids.slice(0, table.num_rows - 1))
        keep = pa.concat_arrays([c for c in nxt.chunks] + [pa.array([True])])
        table = table.filter(keep)
    return _select(table.drop_columns([order]), columns)


def _select(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """``id`` plus ``columns``; a column no part has comes back all-null (with its result type if it is a core one)."""
    if columns is None:
        return table
    core = result_schema()
    for name in columns:
        if name not in table.column_names:
            kind = core.field(name).type if name in core.names else pa.null()
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    return table.select(columns if "id" in columns else ["id", *columns])


def run_seq_of(part_uri: str) -> int:
    """The run sequence number a log part's name carries (0 for parts written before the log had one)."""
    name = part_uri.rsplit("/", 1)[-1]
    head = name.split("-")[1] if name.count("-") >= 3 else ""
    return int(head) if name.startswith("part-") and head.isdigit() and len(head) == 8 else 0


def next_run_seq(layout: OutputLayout, recorded: int = 0) -> int:
    """The sequence number of a new run: above every part in the log and above ``recorded`` (the highest one
    ``_job.json`` lists), so it only grows even if one of the two was lost. Taken under the output lease."""
    return max([recorded, *(run_seq_of(uri) for uri in layout.log_parts())]) + 1
