"""Result records: the one Arrow schema, writing committed parts, and reading them back merged.

Commit protocol (README "Resume"): a row's video is fully written (atomic write / single PUT) before the driver adds
its record to a part file; a part file appears atomically; a rerun reads the ``id`` column of every part and skips
those ids. Reading merges all parts and keeps the newest record per id (``committed_at``), so readers never see two.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import storage
from farm.storage import OutputLayout

log = logging.getLogger("farm")

CORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("video", pa.string()),
    pa.field("portrait", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("num_frames", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("num_inference_steps", pa.int32()),
    pa.field("guidance_scale", pa.float64()),
    pa.field("guidance_scale_i", pa.float64()),
    pa.field("ip_scale", pa.float64()),
    pa.field("ref_scale", pa.float64()),
    pa.field("fps", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("model", pa.string()),
    pa.field("queue_s", pa.float64()),
    pa.field("prepare_s", pa.float64()),
    pa.field("generate_s", pa.float64()),
    pa.field("encode_s", pa.float64()),
    pa.field("score_s", pa.float64()),
    pa.field("total_s", pa.float64()),
    pa.field("replica", pa.string()),
    pa.field("node", pa.string()),
    pa.field("gpu_ids", pa.string()),
    pa.field("attempts", pa.int32()),
    pa.field("committed_at", pa.timestamp("ms", tz="UTC")),
)

IDENTITY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("identity_mean", pa.float64()),
    pa.field("identity_min", pa.float64()),
    pa.field("identity_max", pa.float64()),
    pa.field("identity_std", pa.float64()),
    pa.field("identity_distance_mean", pa.float64()),
    pa.field("identity_distance_min", pa.float64()),
    pa.field("identity_distance_max", pa.float64()),
    pa.field("face_frames", pa.int32()),
    pa.field("frames_scored", pa.int32()),
    pa.field("face_rate", pa.float64()),
    pa.field("identity_model", pa.string()),
)

RESERVED = frozenset(f.name for f in CORE_FIELDS + IDENTITY_FIELDS)
CARRY_PREFIX = "input_"


def carried_name(column: str) -> str:
    """A manifest column that collides with a result column is carried as ``input_<name>``."""
    return f"{CARRY_PREFIX}{column}" if column in RESERVED else column


def result_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """Core + identity fields, then the carried-through manifest columns with their own types."""
    fields = list(CORE_FIELDS + IDENTITY_FIELDS)
    for f in carried or []:
        fields.append(pa.field(carried_name(f.name), f.type))
    return pa.schema(fields)


def records_to_table(records: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    rows = list(records)
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def write_part(layout: OutputLayout, run_id: str, seq: int, records: list[dict[str, Any]], schema: pa.Schema) -> str:
    """Commit ``records`` as one Parquet part (atomic); returns its URI."""
    buf = io.BytesIO()
    pq.write_table(records_to_table(records, schema), buf, compression="zstd")
    uri = layout.results_part(run_id, seq)
    storage.write_bytes_atomic(uri, buf.getvalue(), layout.storage_options)
    return uri


@dataclass(frozen=True)
class DamagedPart:
    """A file under ``results/`` that is not a readable result part; readers skip it (README "Damaged parts")."""

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
    log.warning("skipping damaged result part %s: %s; move it out of results/ to silence this", uri, reason)
    if damaged is not None:
        damaged.append(DamagedPart(uri, reason))


def committed_ids(layout: OutputLayout, damaged: list[DamagedPart] | None = None) -> set[str]:
    """Every id that already has a committed record (reads only the ``id`` column); damaged parts are skipped."""
    out: set[str] = set()
    for uri in layout.result_parts():
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
    """All committed records, one per id (the newest wins), sorted by id; damaged parts are skipped (and listed in
    ``damaged`` when given)."""
    wanted = None if columns is None else list(dict.fromkeys(["id", "committed_at", *columns]))
    tables = [t for t in (_read_part(uri, layout, wanted, damaged) for uri in layout.result_parts()) if t is not None]
    if not tables:
        return _select(result_schema().empty_table(), columns)
    table = _concat(tables)
    order = "_order"
    while order in table.column_names:  # a carried-through column may have any name
        order = f"_{order}"
    table = table.append_column(order, pa.array(range(table.num_rows), pa.int64()))
    table = table.sort_by([("id", "ascending"), ("committed_at", "ascending"), (order, "ascending")])
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


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


class ResultWriter:
    """Buffers records and commits them as Parquet parts every ``every_rows`` records or ``every_s`` seconds."""

    def __init__(
        self,
        layout: OutputLayout,
        schema: pa.Schema,
        every_rows: int = 256,
        every_s: float = 15.0,
        guard: Callable[[], None] | None = None,
    ) -> None:
        """``guard`` runs before every commit and may raise to stop it (the driver passes its output lease check)."""
        self.layout = layout
        self.guard = guard
        self.schema = schema
        self.every_rows = every_rows
        self.every_s = every_s
        self.run_id = new_run_id()
        self.buffer: list[dict[str, Any]] = []
        self.seq = 0
        self.last_flush = time.monotonic()

    def add(self, record: dict[str, Any]) -> None:
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
            rec["committed_at"] = now
        write_part(self.layout, self.run_id, self.seq, self.buffer, self.schema)
        self.seq += 1
        self.buffer = []
