"""Reading an output's records: the append log merged into one record per id (the newest wins).

The writers (``farm.results``) append Parquet parts to ``<out>/_log/``; this module reads them back. Parts written
before the log moved (``<out>/results/part-*.parquet``) are read as log parts too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import storage
from farm.faults import with_retries
from farm.lease import OutputLease
from farm.results import carried_name, result_schema
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


# ---------------------------------------------------------------------- types across the log
class SchemaDrift(ValueError):
    """A carried column's type in this manifest cannot be merged with the type earlier runs logged for it."""


@dataclass(frozen=True)
class _Part:
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


def _survey(layout: OutputLayout, damaged: list[DamagedPart] | None = None) -> list[_Part]:
    """Every readable log part, oldest first, from its footer only (a range read on object stores)."""
    found = []
    for uri in layout.log_parts():
        fs, path = storage.get_fs(uri, layout.storage_options)
        try:
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
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
        found.append(_Part(uri, schema, meta.num_rows))
    return found


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


def _column_types(parts: list[_Part]) -> dict[str, list[pa.DataType]]:
    """Per column (in first-seen order), the type each part that has it wrote it with."""
    types: dict[str, list[pa.DataType]] = {}
    for part in parts:
        for fld in part.schema:
            types.setdefault(fld.name, []).append(fld.type)
    return types


def _merged_type(name: str, seen: list[pa.DataType]) -> pa.DataType | None:
    """One type for every value of a column the log wrote with the types ``seen``; None if they clash."""
    merged: pa.DataType | None = pa.null()
    for kind in seen:
        merged = _promote(merged, kind) if merged is not None else None
    return merged


def _unified_schema(parts: list[_Part]) -> pa.Schema:
    """Core and identity columns with their result types, then carried columns in the order they appeared, with the
    type every part's values fit in. A carried column the log holds with clashing types (written before
    ``check_carried_types`` guarded runs) becomes text, with a warning; an all-null column becomes text too, so no
    reader has to guess a type for it."""
    fields = list(result_schema())
    types = _column_types(parts)
    for name, seen in types.items():
        if name in result_schema().names:
            continue
        kind = _merged_type(name, seen)
        if kind is None:
            olds = sorted({str(t) for t in seen})
            log.warning("the log holds column %r with clashing types %s: published as text", name, olds)
            kind = pa.string()
        fields.append(pa.field(name, pa.string() if pa.types.is_null(kind) else kind))
    return pa.schema(fields)


def log_schema(layout: OutputLayout) -> pa.Schema:
    """The schema of the output's records as one table (what ``open_results`` and the published table have),
    from the parts' footers only; damaged parts are skipped."""
    return _unified_schema(_survey(layout))


def check_carried_types(layout: OutputLayout, carried: pa.Schema) -> None:
    """Refuse a run whose manifest changed a carried column's type to one that cannot be merged with the type
    earlier runs logged (``SchemaDrift``); widening (int32 -> int64, null -> anything, small ints -> float) is fine.

    The driver calls this at run start, before any record is written, so the log never gains a clash.
    """
    parts = _survey(layout)
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


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
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
class _Winners:
    """Per part (aligned with the survey), the rows whose record is its id's newest, and each one's place in the
    id-sorted table."""

    rows: list[np.ndarray]
    ranks: list[np.ndarray]
    records: int

    @property
    def ids(self) -> int:
        return sum(len(r) for r in self.rows)


def _winners(layout: OutputLayout, parts: list[_Part]) -> _Winners:
    """Pass 1: reads only ``id`` of every part. The newest record of an id is its last in log order (parts in name
    order, rows in file order), never the one with the latest clock. Memory: the ids of every record."""
    ids, offsets = [], [0]
    for part in parts:
        table = _read_part(part.uri, layout, ["id"], None)
        column = table.column("id") if table is not None else pa.chunked_array([], pa.string())
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
    return _Winners(rows, ranks, total)


def _winning_rows(
    layout: OutputLayout, parts: list[_Part], winners: _Winners, schema: pa.Schema
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Pass 2: per row group of each part, its winning records in ``schema`` and their ranks (id order).
    Memory: one part's bytes and one row group."""
    for part, rows, ranks in zip(parts, winners.rows, winners.ranks, strict=True):
        if not len(rows):
            continue
        data = storage.read_bytes(part.uri, layout.storage_options)
        reader = pq.ParquetFile(pa.BufferReader(data))
        start = 0
        for group in range(reader.num_row_groups):
            end = start + reader.metadata.row_group(group).num_rows
            lo, hi = np.searchsorted(rows, [start, end])
            if hi > lo:
                table = reader.read_row_group(group).take(pa.array(rows[lo:hi] - start))
                yield _conform(table, schema), ranks[lo:hi]
            start = end


def _merge_in_memory(layout: OutputLayout, parts: list[_Part], winners: _Winners, schema: pa.Schema) -> pa.Table:
    tables, ranks = [], []
    for table, rank in _winning_rows(layout, parts, winners, schema):
        tables.append(table)
        ranks.append(rank)
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    place = np.empty(table.num_rows, dtype=np.int64)
    place[np.concatenate(ranks)] = np.arange(table.num_rows)
    return table.take(pa.array(place)).combine_chunks()


def open_results(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """An output's results: one row per id (its newest record in log order), sorted by id, in the published
    schema (``log_schema``). Read from the log, so it is right even when the published table is stale (a run
    crashed before compacting). ``FileNotFoundError`` when ``uri`` holds no output at all."""
    layout = OutputLayout(uri, storage_options)
    if not layout.log_parts() and not storage.exists(layout.job_json, storage_options):
        raise FileNotFoundError(
            f"{uri}: no Lynx Farm output here (no _log/ parts, no results/part-*.parquet, no _job.json); "
            "give the folder a job's `output:` names"
        )
    parts = _survey(layout)
    return _merge_in_memory(layout, parts, _winners(layout, parts), _unified_schema(parts))


# ---------------------------------------------------------------------- publishing
ROW_GROUP_ROWS = 65_536  # of the published table and of consolidated parts
SORT_BUCKET_ROWS = ROW_GROUP_ROWS  # ids sorted per bucket of this many (more when there would be > MAX_BUCKETS)
MAX_BUCKETS = 256  # spill files open at once
MAX_LOG_PARTS = 64  # more parts than this since the last consolidation: consolidate them
TARGET_PART_ROWS = 4 * ROW_GROUP_ROWS  # records per consolidated part
LEGACY_PREFIX = "part-00000000-legacy-"
COMPACTED = "--compacted"  # "part-<run_seq>--compacted...": "-" sorts before any run id of the same run_seq


def _write_parquet(uri: str, schema: pa.Schema, tables: Iterable[pa.Table], options: dict[str, Any] | None) -> int:
    """Write ``tables`` as one Parquet file that appears whole or not at all; returns its size in bytes.

    Local: a hidden sibling (``.<name>.tmp-<uuid>``: no ``*.parquet`` glob or ``pyarrow.dataset`` lists it), fsync,
    ``os.replace``. Object stores: the file is built in a local temp file, then uploaded by one PUT / multipart
    upload, which the store shows only once complete.
    """
    fs, path = storage.get_fs(uri, options)
    folder, name = posixpath.split(path)
    local = storage.is_local(uri)
    if local:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    else:
        handle, tmp = tempfile.mkstemp(prefix=".farm-publish-", suffix=".parquet")
        os.close(handle)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in tables:
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        size = os.path.getsize(tmp)
        if local:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            with_retries(lambda: fs.put_file(tmp, path), f"uploading {uri!r}")
        return size
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _adopt_legacy_parts(layout: OutputLayout) -> int:
    """Move ``results/part-*.parquet`` (written before the log moved) into ``_log/`` under names that sort before
    every run's parts, so ``results/`` holds only the published table. Copy, then delete: a crash in between leaves
    the same records twice, which newest-wins reads the same."""
    legacy = layout.legacy_parts()
    for uri in legacy:
        _copy(uri, storage.join(layout.log_dir, LEGACY_PREFIX + posixpath.basename(uri)), layout.storage_options)
        _delete(uri, layout.storage_options)
    return len(legacy)


def _copy(uri: str, target: str, options: dict[str, Any] | None) -> None:
    fs, src = storage.get_fs(uri, options)
    dst = storage.get_fs(target, options)[1]
    if storage.is_local(uri):
        os.makedirs(posixpath.dirname(dst), exist_ok=True)
    with_retries(lambda: fs.copy(src, dst), f"copying {uri!r} to {target!r}", local=storage.is_local(uri))


def _delete(uri: str, options: dict[str, Any] | None) -> None:
    fs, path = storage.get_fs(uri, options)
    with_retries(lambda: fs.rm(path), f"deleting {uri!r}", local=storage.is_local(uri))


def _remove_stale_temps(layout: OutputLayout) -> None:
    """Temp files a crashed local publish left in ``results/`` (we hold the lease: no publish is running)."""
    if storage.is_local(layout.results_dir) and os.path.isdir(layout.results_dir):
        for name in os.listdir(layout.results_dir):
            if name.startswith(".") and ".tmp-" in name:
                os.remove(os.path.join(layout.results_dir, name))


def _is_compacted(uri: str) -> bool:
    return COMPACTED in posixpath.basename(uri)


def _segments(block: list[_Part]) -> list[tuple[list[_Part], pa.Schema]]:
    """Consecutive parts grouped into new parts of about ``TARGET_PART_ROWS`` records, a new group also where a
    column's type cannot be merged (the log keeps every record in the type it was written with)."""
    out: list[tuple[list[_Part], pa.Schema]] = []
    group: list[_Part] = []
    for part in block:
        full = sum(p.num_rows for p in group) >= TARGET_PART_ROWS
        if group and (full or _merged_schema([*group, part]) is None):
            out.append((group, _merged_schema(group)))
            group = []
        group.append(part)
    if group:
        out.append((group, _merged_schema(group)))
    return out


def _merged_schema(parts: list[_Part]) -> pa.Schema | None:
    fields = []
    for name, seen in _column_types(parts).items():
        kind = _merged_type(name, seen)
        if kind is None:
            return None
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def _consolidate(layout: OutputLayout, parts: list[_Part]) -> tuple[int, int]:
    """Rewrite the parts written since the last consolidation, when there are more than ``MAX_LOG_PARTS``, into
    fewer larger ones; every record is kept (the log is the audit trail), in log order.

    The new parts are named ``part-<last run_seq>--compacted<stamp>-<n>``: after every part of an earlier run, before
    any part a later run writes (and before a part the last run might still add). New parts are written first and
    the old ones deleted after, so a crash in between leaves the same records twice (newest-wins reads them the
    same), never loses one. Returns (parts removed, parts written).
    """
    done = max((run_seq_of(p.uri) for p in parts if _is_compacted(p.uri)), default=-1)
    block = [p for p in parts if run_seq_of(p.uri) > done]
    if len(block) <= MAX_LOG_PARTS:
        return 0, 0
    last = run_seq_of(block[-1].uri)
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}{uuid.uuid4().hex[:6]}"
    written = 0
    for group, schema in _segments(block):
        uri = storage.join(layout.log_dir, f"part-{last:08d}{COMPACTED}{stamp}-{written:06d}.parquet")
        tables = (_conform(_read_whole(p.uri, layout), schema) for p in group)
        _write_parquet(uri, schema, tables, layout.storage_options)
        written += 1
    for part in block:
        _delete(part.uri, layout.storage_options)
    return len(block), written


def _read_whole(uri: str, layout: OutputLayout) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri, layout.storage_options)))


def _sorted_by_rank(
    chunks: Iterable[tuple[pa.Table, np.ndarray]], schema: pa.Schema, ids: int, spill: str
) -> Iterator[pa.Table]:
    """The winning records in id order, without holding them all: each chunk's rows go to the spill file of their
    bucket of ranks (Arrow IPC under ``spill``), then each bucket is read back, put in order and yielded.
    Memory: one bucket (``SORT_BUCKET_ROWS`` records, more above ``MAX_BUCKETS`` buckets)."""
    size = max(SORT_BUCKET_ROWS, -(-ids // MAX_BUCKETS))
    ranked = schema.append(pa.field("__rank", pa.int64()))
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        for table, ranks in chunks:
            bucket = ranks // size
            for b in np.unique(bucket):
                pick = np.flatnonzero(bucket == b)
                if b not in writers:
                    writers[b] = pa.ipc.new_file(os.path.join(spill, f"{b}.arrow"), ranked)
                rows = table.take(pa.array(pick)).append_column("__rank", pa.array(ranks[pick]))
                writers[b].write_table(rows)
    finally:
        for writer in writers.values():
            writer.close()
    for b in sorted(writers):
        with pa.memory_map(os.path.join(spill, f"{b}.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        place = np.empty(table.num_rows, dtype=np.int64)
        place[table.column("__rank").to_numpy() - b * size] = np.arange(table.num_rows)
        yield table.drop_columns(["__rank"]).take(pa.array(place))
        os.remove(os.path.join(spill, f"{b}.arrow"))


def publish(layout: OutputLayout) -> dict[str, Any]:
    """Compact the output: ``results/results.parquet`` becomes one row per id (its newest record), sorted by id, in
    one schema (``log_schema``), zstd, row groups of ``ROW_GROUP_ROWS``; replaced atomically, so a reader sees the
    old table or the new one, and ``results/`` holds nothing else. Legacy parts move into ``_log/``; a log of many
    small parts is consolidated (``_consolidate``). Takes no lease: the caller holds it (a run at its end, or
    ``compact_output``), after the run's last commit.

    Memory: pass 1 holds the ids of every record in the log (about 40 bytes per record plus the id's length);
    pass 2 holds one part's bytes, one row group, and one sort bucket of winning records (``SORT_BUCKET_ROWS``);
    the sort spills to local temp files of about the published table's uncompressed size. Measured
    (``benchmarks/results/compact_cpu.md``): 1,000,000 records / 900,000 ids, about 500 MiB peak RSS.
    """
    start = time.monotonic()
    _remove_stale_temps(layout)
    before = len(layout.log_parts())
    moved = _adopt_legacy_parts(layout)
    damaged: list[DamagedPart] = []
    removed, written = _consolidate(layout, _survey(layout))
    parts = _survey(layout, damaged)
    schema = _unified_schema(parts)
    winners = _winners(layout, parts)
    with tempfile.TemporaryDirectory(prefix="farm-publish-") as spill:
        rows = _sorted_by_rank(_winning_rows(layout, parts, winners, schema), schema, winners.ids, spill)
        size = _write_parquet(layout.published, schema, rows, layout.storage_options)
    return {
        "published": layout.published,
        "records_in_log": winners.records,
        "ids_published": winners.ids,
        "parts_before": before,
        "parts_after": len(parts) + len(damaged),
        "legacy_parts_moved": moved,
        "parts_consolidated": removed,
        "parts_written": written,
        "damaged_parts": [d.uri for d in damaged],
        "bytes": size,
        "seconds": round(time.monotonic() - start, 3),
    }


def compact_output(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``farm compact OUT``: take the output lease (``LeaseHeld`` while a run holds it), ``publish``, release."""
    layout = OutputLayout(uri, storage_options)
    run_id = f"compact-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lease = OutputLease(layout, storage_options, run_id=run_id)
    lease.acquire()
    try:
        return publish(layout)
    finally:
        lease.release()
