"""Publishing an output: the log compacted into ``<out>/results/results.parquet`` (one row per id), legacy parts
adopted into the log, and a log of many small parts consolidated (``farm compact``; every run at its end).

Reads with ``farm.table``'s two passes; sorts by id through spill files so memory follows a bucket of rows, not the
output; every file appears whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from farm import storage
from farm.faults import with_retries
from farm.lease import OutputLease
from farm.storage import OutputLayout
from farm.table import (
    LOG_KEY,
    DamagedPart,
    Part,
    column_types,
    conform,
    find_winners,
    log_signature,
    merged_type,
    read_parquet_bytes,
    run_seq_of,
    survey,
    unified_schema,
    winning_rows,
)

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


def _segments(block: list[Part]) -> list[tuple[list[Part], pa.Schema]]:
    """Consecutive parts grouped into new parts of about ``TARGET_PART_ROWS`` records, a new group also where a
    column's type cannot be merged (the log keeps every record in the type it was written with)."""
    out: list[tuple[list[Part], pa.Schema]] = []
    group: list[Part] = []
    for part in block:
        full = sum(p.num_rows for p in group) >= TARGET_PART_ROWS
        if group and (full or _merged_schema([*group, part]) is None):
            out.append((group, _merged_schema(group)))
            group = []
        group.append(part)
    if group:
        out.append((group, _merged_schema(group)))
    return out


def _merged_schema(parts: list[Part]) -> pa.Schema | None:
    fields = []
    for name, seen in column_types(parts).items():
        kind = merged_type(name, seen)
        if kind is None:
            return None
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def _consolidate(layout: OutputLayout, parts: list[Part]) -> tuple[int, int]:
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
        tables = (conform(_read_whole(p.uri, layout), schema) for p in group)
        _write_parquet(uri, schema, tables, layout.storage_options)
        written += 1
    for part in block:
        _delete(part.uri, layout.storage_options)
    return len(block), written


def _read_whole(uri: str, layout: OutputLayout) -> pa.Table:
    return read_parquet_bytes(storage.read_bytes(uri, layout.storage_options))


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
    parts = survey(layout, damaged)
    removed, written = _consolidate(layout, parts)
    if removed:  # the log's parts changed: read their footers again
        damaged.clear()
        parts = survey(layout, damaged)
    schema = unified_schema(parts)
    winners = find_winners(layout, parts)
    with tempfile.TemporaryDirectory(prefix="farm-publish-") as spill:
        rows = _sorted_by_rank(winning_rows(layout, parts, winners, schema), schema, winners.ids, spill)
        stamped = schema.with_metadata({LOG_KEY: log_signature(parts)})  # open_results reads it when current
        size = _write_parquet(layout.published, stamped, rows, layout.storage_options)
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
