"""Reading an output's records: the append log merged into one record per id (the newest wins), in one schema.

The writers (``farm.results``) append Parquet parts to ``<out>/_log/``; this module reads them back (``open_results``,
``read_results``) and says what types the log holds (``log_schema``, ``check_carried_types``); ``farm.publish`` writes
the published table from the same passes. Parts written before the log moved (``<out>/results/part-*.parquet``) are
read as log parts too.

Two passes keep memory bounded: ``find_winners`` reads only the ``id`` column of every part and finds each id's newest
record (its last in log order: parts in name order, rows in file order, never the latest clock); ``winning_rows``
then reads the parts one row group at a time and keeps those records.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import storage
from farm.faults import with_retries
from farm.results import carried_name, result_schema
from farm.storage import OutputLayout

log = logging.getLogger("farm")


@dataclass(frozen=True)
class DamagedPart:
    """A file in the log that is not a readable result part; readers skip it (README "Damaged parts")."""

    uri: str
    reason: str


REQUIRED_COLUMNS = ("id", "status")
LOG_KEY = b"farm.log"  # the published table's metadata: the log it was made from (``log_signature``)


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
        schema = part.schema_arrow
        reason = _not_a_result_part(schema)
        if reason:
            return _damaged(uri, reason, damaged)
        have = schema.names
        if columns is not None:
            columns = [c for c in columns if c in have]
        return part.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        return _damaged(uri, f"unreadable Parquet ({type(exc).__name__}: {exc})", damaged)


_WARNED: set[tuple[str, str]] = set()  # a damaged part is read several times per run: warn once per process


def _damaged(uri: str, reason: str, damaged: list[DamagedPart] | None) -> None:
    if (uri, reason) not in _WARNED:
        _WARNED.add((uri, reason))
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


def run_seq_of(part_uri: str) -> int:
    """The run sequence number a log part's name carries (0 for parts written before the log had one)."""
    name = part_uri.rsplit("/", 1)[-1]
    head = name.split("-")[1] if name.count("-") >= 3 else ""
    return int(head) if name.startswith("part-") and head.isdigit() and len(head) == 8 else 0


def next_run_seq(layout: OutputLayout, recorded: int = 0) -> int:
    """The sequence number of a new run: above every part in the log and above ``recorded`` (the highest one
    ``_job.json`` lists), so it only grows even if one of the two was lost. Taken under the output lease."""
    return max([recorded, *(run_seq_of(uri) for uri in layout.log_parts())]) + 1


# ---------------------------------------------------------------------- types across the log
class SchemaDrift(ValueError):
    """A carried column's type in this manifest cannot be merged with the type earlier runs logged for it."""


@dataclass(frozen=True)
class Part:
    """One readable log part as its footer describes it (no data read)."""

    uri: str
    schema: pa.Schema
    num_rows: int


def _not_a_result_part(schema: pa.Schema) -> str | None:
    """Why a Parquet schema is not one of a result part (None when it is)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        return f"not a result part: no {' / '.join(missing)} column"
    id_type = schema.field("id").type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        return f"not a result part: its id column is {id_type}, not text"
    return None


def survey(layout: OutputLayout, damaged: list[DamagedPart] | None = None) -> list[Part]:
    """Every readable log part, oldest first, from its footer only (a range read on object stores)."""
    found = []
    for uri in layout.log_parts():
        try:
            meta = _footer(uri, layout)
            schema = meta.schema.to_arrow_schema()
        except IsADirectoryError as exc:
            _damaged(uri, f"not a part file ({exc})", damaged)
            continue
        except (pa.ArrowException, ValueError) as exc:
            _damaged(uri, f"unreadable Parquet ({type(exc).__name__}: {exc})", damaged)
            continue
        reason = _not_a_result_part(schema)
        if reason:
            _damaged(uri, reason, damaged)
            continue
        found.append(Part(uri, schema, meta.num_rows))
    return found


def _footer(uri: str, layout: OutputLayout) -> pq.FileMetaData:
    """A part's footer (a range read on object stores; storage faults retried, then ``InfraError``)."""
    fs, path = storage.get_fs(uri, layout.storage_options)

    def read() -> pq.FileMetaData:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).metadata

    return read() if storage.is_local(uri) else with_retries(read, f"reading the footer of {uri!r}")


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _promote(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both ``a`` and ``b`` values fit in without loss, or None.

    Wider integers, null to anything, text to large text, finer timestamps are fine; an integer of more than 32
    bits with a float is not (a 64-bit seed above 2**53 would silently change), nor a signed/unsigned mix that
    does not fit, nor text with numbers.
    """
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    for x, y in ((a, b), (b, a)):
        if _is_int(x) and pa.types.is_floating(y):
            return pa.float64() if x.bit_width <= 32 else None
        if pa.types.is_unsigned_integer(x) and pa.types.is_signed_integer(y):
            return y if x.bit_width < y.bit_width else None
    try:
        merged = pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return merged.field("x").type


def column_types(parts: list[Part]) -> dict[str, list[pa.DataType]]:
    """Per column (in first-seen order), the type each part that has it wrote it with."""
    types: dict[str, list[pa.DataType]] = {}
    for part in parts:
        for fld in part.schema:
            types.setdefault(fld.name, []).append(fld.type)
    return types


def merged_type(name: str, seen: list[pa.DataType]) -> pa.DataType | None:
    """One type for every value of a column the log wrote with the types ``seen``; None if they clash."""
    merged: pa.DataType | None = pa.null()
    for kind in seen:
        merged = _promote(merged, kind) if merged is not None else None
    return merged


def unified_schema(parts: list[Part]) -> pa.Schema:
    """Core and identity columns with their result types, then carried columns in the order they appeared, with the
    type every part's values fit in. A carried column the log holds with clashing types (written before
    ``check_carried_types`` guarded runs) becomes text, with a warning; an all-null column becomes text too, so no
    reader has to guess a type for it."""
    fields = list(result_schema())
    types = column_types(parts)
    for name, seen in types.items():
        if name in result_schema().names:
            continue
        kind = merged_type(name, seen)
        if kind is None:
            olds = sorted({str(t) for t in seen})
            log.warning("the log holds column %r with clashing types %s: published as text", name, olds)
            kind = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def log_schema(layout: OutputLayout) -> pa.Schema:
    """The schema of the output's records as one table (what ``open_results`` and the published table have),
    from the parts' footers only; damaged parts are skipped."""
    return unified_schema(survey(layout))


def check_carried_types(layout: OutputLayout, carried: pa.Schema) -> None:
    """Refuse a run whose manifest changed a carried column's type to one that cannot be merged with the type
    earlier runs logged (``SchemaDrift``); widening (int32 -> int64, null -> anything, small ints -> float) is fine.

    The driver calls this at run start, before any record is written, so the log never gains a clash.
    """
    parts = survey(layout)
    problems = []
    for fld in carried:
        name = carried_name(fld.name)
        clash = [p for p in parts if name in p.schema.names and _promote(p.schema.field(name).type, fld.type) is None]
        if clash:
            olds = ", ".join(sorted({str(p.schema.field(name).type) for p in clash}))
            problems.append(
                f"column {name!r} is {fld.type} in this manifest but {olds} in {len(clash)} earlier part(s) of "
                f"{layout.log_dir} (first: {clash[0].uri})"
            )
    if problems:
        raise SchemaDrift(
            "; ".join(problems) + ". Cast the manifest column back to the type the earlier runs used, "
            "or write this manifest to a new output"
        )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones all-null, others cast (text where text is wanted and
    no cast exists, e.g. a struct written by an old run)."""
    columns = []
    for fld in schema:
        if fld.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, fld.type))
            continue
        column = table.column(fld.name)
        if column.type == fld.type:
            columns.append(column)
        elif pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type):
            columns.append(pc.cast(_as_text(column), fld.type))
        else:
            columns.append(_cast(column, fld))
    return pa.Table.from_arrays(columns, schema=schema)


def _cast(column: pa.ChunkedArray, fld: pa.Field) -> pa.ChunkedArray:
    """A safe cast; timestamps of an old run written finer than the result type are truncated, not refused."""
    try:
        return pc.cast(column, fld.type)
    except pa.ArrowInvalid:
        if pa.types.is_timestamp(fld.type) and pa.types.is_timestamp(column.type):
            return pc.cast(column, fld.type, safe=False)
        raise ValueError(f"column {fld.name!r}: cannot cast the log's {column.type} values to {fld.type}") from None


# ---------------------------------------------------------------------- which record of each id wins
@dataclass(frozen=True)
class Winners:
    """Per part (aligned with the survey), the rows whose record is its id's newest, and each one's place in the
    id-sorted table."""

    rows: list[np.ndarray]
    ranks: list[np.ndarray]
    records: int

    @property
    def ids(self) -> int:
        return sum(len(r) for r in self.rows)


def find_winners(layout: OutputLayout, parts: list[Part]) -> Winners:
    """Pass 1: reads only ``id`` of every part. The newest record of an id is its last in log order (parts in name
    order, rows in file order), never the one with the latest clock. Memory: the ids of every record."""
    ids, offsets = [], [0]
    for part in parts:
        table = _read_part(part.uri, layout, ["id"], None)
        if table is None:  # its footer read, its data did not: skipped like any damaged part
            offsets.append(offsets[-1])
            continue
        column = table.column("id")
        if len(column) != part.num_rows:
            raise RuntimeError(f"{part.uri} changed while being read ({part.num_rows} rows, now {len(column)})")
        ids.extend(pc.cast(c, pa.large_string()) for c in column.chunks)
        offsets.append(offsets[-1] + part.num_rows)
    total = offsets[-1]
    order = pa.array(np.arange(total, dtype=np.int64))
    keyed = pa.table({"id": pa.chunked_array(ids, pa.large_string()), "o": order})
    newest = keyed.group_by("id", use_threads=False).aggregate([("o", "max")]).sort_by("id")
    where = newest.column("o_max").to_numpy()
    rank = np.arange(len(where), dtype=np.int64)
    by_log = np.argsort(where, kind="stable")
    where, rank = where[by_log], rank[by_log]
    bounds = np.searchsorted(where, offsets)
    rows = [where[bounds[i] : bounds[i + 1]] - offsets[i] for i in range(len(parts))]
    ranks = [rank[bounds[i] : bounds[i + 1]] for i in range(len(parts))]
    return Winners(rows, ranks, total)


def winning_rows(
    layout: OutputLayout, parts: list[Part], winners: Winners, schema: pa.Schema
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Pass 2: per row group of each part, its winning records in ``schema`` and their ranks (id order).
    Memory: one part's bytes and one row group."""
    for part, rows, ranks in zip(parts, winners.rows, winners.ranks, strict=True):
        if not len(rows):
            continue
        data = storage.read_bytes(part.uri, layout.storage_options)
        reader = pq.ParquetFile(pa.BufferReader(data))
        wanted = [name for name in schema.names if name in part.schema.names]
        start = 0
        for group in range(reader.num_row_groups):
            end = start + reader.metadata.row_group(group).num_rows
            lo, hi = np.searchsorted(rows, [start, end])
            if hi > lo:
                table = reader.read_row_group(group, columns=wanted).take(pa.array(rows[lo:hi] - start))
                yield conform(table, schema), ranks[lo:hi]
            start = end


def merge_in_memory(layout: OutputLayout, parts: list[Part], winners: Winners, schema: pa.Schema) -> pa.Table:
    tables, ranks = [], []
    for table, rank in winning_rows(layout, parts, winners, schema):
        tables.append(table)
        ranks.append(rank)
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    place = np.empty(table.num_rows, dtype=np.int64)
    place[np.concatenate(ranks)] = np.arange(table.num_rows)
    return table.take(pa.array(place)).combine_chunks()


def log_signature(parts: list[Part]) -> str:
    """Which log a published table was made from (its parts' names and row counts), kept in its metadata."""
    return json.dumps([[posixpath.basename(p.uri), p.num_rows] for p in parts])


def _published_if_current(layout: OutputLayout, parts: list[Part]) -> pa.Table | None:
    """The published table, when it was made from exactly the log there is now (else None: merge the log)."""
    try:
        meta = _footer(layout.published, layout)
    except FileNotFoundError:
        return None
    except (pa.ArrowException, ValueError, IsADirectoryError):
        return None  # half-copied or foreign: the log is the truth
    if (meta.metadata or {}).get(LOG_KEY) != log_signature(parts).encode():
        return None
    table = read_parquet_bytes(storage.read_bytes(layout.published, layout.storage_options))
    return table.replace_schema_metadata(None)


def read_parquet_bytes(data: bytes) -> pa.Table:
    """One Parquet file's bytes as a Table, through ``ParquetFile`` rather than ``pq.read_table``: the latter runs
    pyarrow's dataset scanner, whose threads can outlive the interpreter and abort the process at exit
    (``terminate called without an active exception``, apache/arrow#34314; seen with ``farm.open_results``)."""
    return pq.ParquetFile(pa.BufferReader(data)).read()


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """An output's results: one row per id (its newest record in log order), sorted by id, in the published
    schema (``log_schema``). The published table when it was made from the log as it is now (cheap); else the log
    merged here, so it is right even when a run died before publishing. ``FileNotFoundError`` when ``uri`` holds
    no output at all."""
    layout = OutputLayout(uri, storage_options)
    if not layout.log_parts() and not storage.exists(layout.job_json, storage_options):
        raise FileNotFoundError(
            f"{uri}: no Lynx Farm output here (no _log/ parts, no results/part-*.parquet, no _job.json); "
            "give the folder a job's `output:` names"
        )
    parts = survey(layout)
    published = _published_if_current(layout, parts)
    if published is not None:
        return published
    return merge_in_memory(layout, parts, find_winners(layout, parts), unified_schema(parts))


def read_results(
    layout: OutputLayout, columns: list[str] | None = None, damaged: list[DamagedPart] | None = None
) -> pa.Table:
    """All committed records, one per id (the newest in log order wins, never a clock), sorted by id, in the
    unified schema (``log_schema``); with ``columns``, ``id`` plus those (a column no part has comes back all-null,
    with its result type if it is a result column). Damaged parts are skipped (and listed in ``damaged``)."""
    parts = survey(layout, damaged)
    schema = unified_schema(parts)
    if columns is not None:
        schema = _selected(schema, columns)
    return merge_in_memory(layout, parts, find_winners(layout, parts), schema)


def _selected(schema: pa.Schema, columns: list[str]) -> pa.Schema:
    core = result_schema()
    fields = []
    for name in dict.fromkeys(columns if "id" in columns else ["id", *columns]):
        if name in schema.names:
            fields.append(schema.field(name))
        else:
            fields.append(pa.field(name, core.field(name).type if name in core.names else pa.null()))
    return pa.schema(fields)
