"""Result records: the one Arrow schema, and committing records as parts of the output's append log.

Commit protocol (README "Resume"): a row's video is fully written (atomic write / single PUT) before the driver adds
its record to a part file; a part file appears atomically under ``<out>/_log/``. Every part is named and stamped with
the run's sequence number (``run_seq``, taken under the output lease), so the newest record of an id is the one of the
highest ``run_seq`` whatever the clocks said; ``farm.table`` reads the log back merged.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from farm import storage
from farm.records import COLUMNS, CORE, IDENTITY, Record
from farm.storage import OutputLayout

log = logging.getLogger("farm")


def _arrow_field(column: Any) -> pa.Field:
    return pa.field(column.name, column.metadata["arrow"], nullable=not column.metadata["required"])


CORE_FIELDS: tuple[pa.Field, ...] = tuple(_arrow_field(c) for c in COLUMNS if c.metadata["group"] == CORE)
IDENTITY_FIELDS: tuple[pa.Field, ...] = tuple(_arrow_field(c) for c in COLUMNS if c.metadata["group"] == IDENTITY)
RESULT_FIELDS: tuple[pa.Field, ...] = tuple(_arrow_field(c) for c in COLUMNS)  # in Record's order

RESERVED = frozenset(f.name for f in RESULT_FIELDS)
CARRY_PREFIX = "input_"


def carried_name(column: str) -> str:
    """A manifest column that collides with a result column is carried as ``input_<name>``."""
    return f"{CARRY_PREFIX}{column}" if column in RESERVED else column


def carried_schema(result_schema: pa.Schema, columns: list[str]) -> pa.Schema:
    """The fields of the carried-through manifest ``columns`` in a result schema (names as the log stores them)."""
    return pa.schema([result_schema.field(carried_name(c)) for c in columns])


def result_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """Core + identity fields, then the carried-through manifest columns with their own types."""
    fields = list(RESULT_FIELDS)
    for f in carried or []:
        fields.append(pa.field(carried_name(f.name), f.type))
    return pa.schema(fields)


def records_to_table(records: Iterable[Record], schema: pa.Schema) -> pa.Table:
    """Records as a table of ``schema``; a carried value whose column ``schema`` lacks is an error, not dropped."""
    rows = list(records)
    names = set(schema.names)
    for rec in rows:
        stray = sorted(set(rec.carried) - names)
        if stray:
            raise KeyError(f"record {rec.id!r} carries {stray}, which the results schema has no column for")
    columns = {name: [r.value(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_part(
    layout: OutputLayout, run_seq: int, run_id: str, seq: int, records: list[Record], schema: pa.Schema
) -> str:
    """Commit ``records`` as one Parquet part of the log (atomic); returns its URI."""
    buf = io.BytesIO()
    pq.write_table(records_to_table(records, schema), buf, compression="zstd")
    uri = layout.log_part(run_seq, run_id, seq)
    storage.write_bytes_atomic(uri, buf.getvalue(), layout.storage_options)
    return uri


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


class ResultWriter:
    """Buffers records and commits them as Parquet parts every ``every_rows`` records or ``every_s`` seconds."""

    def __init__(
        self,
        layout: OutputLayout,
        schema: pa.Schema,
        run_seq: int,
        every_rows: int = 256,
        every_s: float = 15.0,
        guard: Callable[[], None] | None = None,
        run_id: str | None = None,
    ) -> None:
        """``guard`` runs before every commit and may raise to stop it (the driver passes its output lease check)."""
        self.layout = layout
        self.guard = guard
        self.schema = schema
        self.every_rows = every_rows
        self.every_s = every_s
        self.run_id = run_id or new_run_id()
        self.run_seq = run_seq
        self.buffer: list[Record] = []
        self.seq = 0
        self.last_commit_at: str | None = None  # when the last part was committed (the heartbeat shows it)
        self.last_flush = time.monotonic()

    def add(self, record: Record) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.every_rows:
            self.flush()

    def due_in(self) -> float:
        """Seconds until a time-based flush is due (0 = now)."""
        return max(0.0, self.every_s - (time.monotonic() - self.last_flush))

    def flush_if_due(self) -> None:
        if self.due_in() == 0.0:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        if self.guard is not None:
            self.guard()
        now = dt.datetime.now(dt.timezone.utc)
        for rec in self.buffer:
            rec.set(committed_at=now, run_seq=self.run_seq, run_id=self.run_id)
        write_part(self.layout, self.run_seq, self.run_id, self.seq, self.buffer, self.schema)
        self.seq += 1
        self.buffer = []
        self.last_commit_at = now.isoformat()
