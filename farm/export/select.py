"""Which records an export takes: ``ok`` rows with a video, never a row whose rights are not confirmed, narrowed by
``--where``; and how many were left out for each reason (the dataset card reports them).

The rules that are not the user's to change (only ``ok`` rows with a video, never ``rights_confirmed = false``) are
applied here, outside the parsed filter, so no ``--where`` can widen them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from farm.export.errors import ExportError
from farm.export.where import parse_where

RIGHTS = "rights_confirmed"


@dataclass(frozen=True)
class Selection:
    """The selected records (sorted by id) and the counts of the records left out, by reason."""

    table: pa.Table
    total: int
    not_ok: int
    excluded_rights: int
    excluded_filter: int

    @property
    def counts(self) -> dict[str, int]:
        return {
            "records": self.total,
            "selected": self.table.num_rows,
            "not_ok": self.not_ok,
            "excluded_rights": self.excluded_rights,
            "excluded_filter": self.excluded_filter,
        }


def _mask(table: pa.Table, expr: pc.Expression) -> pa.Array:
    """``expr`` evaluated per row, unknown (null) read as false; Arrow type errors become ``ExportError``."""
    try:
        column = ds.dataset(table).to_table(columns={"m": expr}).column("m")
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ExportError(f"the filter {expr} cannot be evaluated on the results: {exc}") from None
    return pc.fill_null(column.combine_chunks() if column.num_chunks else pa.array([], pa.bool_()), False)


def rights_refused(table: pa.Table) -> pa.Array:
    """Rows whose manifest said ``rights_confirmed = false`` (a missing column or a null refuses nothing)."""
    if RIGHTS not in table.column_names:
        return pa.array([False] * table.num_rows, pa.bool_())
    column = table.column(RIGHTS)
    if not pa.types.is_boolean(column.type):  # merged as text when runs disagreed on its type
        column = pc.equal(pc.utf8_lower(pc.cast(column, pa.string())), "false")
    else:
        column = pc.invert(column)
    return pc.fill_null(column.combine_chunks() if column.num_chunks else pa.array([], pa.bool_()), False)


def select(table: pa.Table, where: str | None) -> Selection:
    """The rows to export, by id; ``ValueError`` from ``where`` (an unknown column, a syntax error)."""
    user = parse_where(where, table.schema) if where is not None else None
    ok = _mask(table, (pc.field("status") == "ok") & pc.field("video").is_valid())
    refused = pc.and_(ok, rights_refused(table))
    allowed = pc.and_(ok, pc.invert(refused))
    chosen = pc.and_(allowed, _mask(table, user)) if user is not None else allowed
    picked = table.filter(chosen).sort_by([("id", "ascending")])
    return Selection(
        table=picked,
        total=table.num_rows,
        not_ok=table.num_rows - _count(ok),
        excluded_rights=_count(refused),
        excluded_filter=_count(allowed) - _count(chosen),
    )


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def effective_filter(where: str | None, has_rights: bool) -> str:
    """The whole filter an export applied, as text for the card and ``export.json``."""
    parts = ["status = 'ok'", "video IS NOT NULL"]
    if has_rights:
        parts.append(f"{RIGHTS} IS NOT FALSE")
    if where:
        parts.append(f"({where.strip()})")
    return " AND ".join(parts)


__all__ = ["RIGHTS", "Selection", "effective_filter", "rights_refused", "select"]
