"""The schemas a user reads (``schemas/*.json``), generated from the code; a test keeps the files in sync."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from farm.config import job_schema
from farm.manifest import ID_PATTERN, REQUIRED_COLUMNS
from farm.params import INT_FIELDS, NULLABLE_FIELDS, RANGES, SAMPLING_FIELDS, SEED_RANGE
from farm.records import ErrorCode, Status
from farm.results import CORE_FIELDS, RESULT_FIELDS

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def manifest_schema() -> dict[str, Any]:
    """One manifest row. Columns not listed are carried through to the results untouched."""
    props: dict[str, Any] = {
        "id": {"type": "string", "pattern": f"^{ID_PATTERN.pattern}$", "description": "Unique row id"},
        "portrait": {"type": "string", "minLength": 1, "description": "Local path, fsspec URI or pkg://package/path"},
        "prompt": {"type": "string", "minLength": 1, "pattern": "\\S"},
        "negative_prompt": {"type": ["string", "null"], "description": "null = job/backend default"},
        "seed": {
            "type": ["integer", "null"],
            "minimum": SEED_RANGE[0],
            "maximum": SEED_RANGE[1],
            "description": "null = derived from the job seed and the id",
        },
        "rights_confirmed": {"type": ["boolean", "null"], "description": "false -> the row is skipped"},
    }
    for name in SAMPLING_FIELDS:
        lo, hi = RANGES[name]
        kind = "integer" if name in INT_FIELDS else "number"
        entry: dict[str, Any] = {"type": [kind, "null"], "minimum": lo, "maximum": hi}
        if name in ("height", "width"):
            entry["multipleOf"] = 16
        if name == "num_frames":
            entry["description"] = "4k+1"
        if name in NULLABLE_FIELDS:
            entry["description"] = "null = job/backend default"
        props[name] = entry
    return {
        "$schema": DRAFT,
        "title": "Lynx Farm manifest row (Parquet columns)",
        "type": "object",
        "required": list(REQUIRED_COLUMNS),
        "properties": props,
        "additionalProperties": True,
    }


def _json_type(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    if pa.types.is_boolean(t):
        return "boolean"
    return "string"


def result_schema_json() -> dict[str, Any]:
    """One result record; the Parquet files also carry the manifest's extra columns."""
    props: dict[str, Any] = {}
    for f in RESULT_FIELDS:
        kind = _json_type(f.type)
        entry: dict[str, Any] = {"type": kind if not f.nullable else [kind, "null"], "arrow_type": str(f.type)}
        if f.name == "status":
            entry["enum"] = [s.value for s in Status]
        if f.name == "error_code":
            entry["enum"] = [c.value for c in ErrorCode] + [None]
        props[f.name] = entry
    return {
        "$schema": DRAFT,
        "title": "Lynx Farm result record (one per input id)",
        "type": "object",
        "required": [f.name for f in CORE_FIELDS if not f.nullable],
        "properties": props,
        "additionalProperties": True,
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    return {
        "job.schema.json": job_schema(),
        "manifest.schema.json": manifest_schema(),
        "result.schema.json": result_schema_json(),
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: str | Path) -> list[Path]:
    out = []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in all_schemas().items():
        path = directory / name
        path.write_text(render(schema))
        out.append(path)
    return out
