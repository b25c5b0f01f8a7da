"""``farm status`` and ``farm results``: read a job's committed records (one per id) and summarise/export them."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from farm import storage
from farm.results import read_results
from farm.storage import OutputLayout


def _job_json(layout: OutputLayout) -> dict[str, Any]:
    try:
        return json.loads(storage.read_bytes(layout.job_json, layout.storage_options))
    except FileNotFoundError:
        return {}


def status_text(output: str, storage_options: dict[str, Any] | None = None) -> str:
    layout = OutputLayout(output, storage_options)
    table = read_results(layout, ["status", "error_code", "generate_s", "total_s", "committed_at"])
    meta = _job_json(layout)
    lines = [f"output: {output}"]
    if meta:
        model = meta.get("model", {})
        lines.append(f"job: {meta.get('name')}  model: {model.get('description')}  fingerprint: "
                     f"{model.get('fingerprint')}")
    lines.append(f"records: {table.num_rows}")
    if table.num_rows:
        for status, count in _counts(table.column("status")):
            lines.append(f"  {status:<10} {count}")
        codes = table.filter(pc.is_valid(table.column("error_code")))
        for code, count in _counts(codes.column("error_code")):
            lines.append(f"    {code:<22} {count}")
        ok = table.filter(pc.equal(table.column("status"), "ok"))
        if ok.num_rows:
            gen = pc.mean(ok.column("generate_s")).as_py()
            lines.append(f"generate_s mean: {gen:.3f}  total_s mean: {pc.mean(ok.column('total_s')).as_py():.3f}")
    for run in meta.get("runs", []):
        elapsed = run.get("elapsed_s")
        done = sum(v for k, v in run.get("counts", {}).items() if ":" not in k)
        rate = f"{done / elapsed * 3600:.0f} rows/h" if elapsed else "-"
        lines.append(f"run {run.get('run_id')}: {run.get('status')}  rows: {done}  elapsed: {elapsed}s  {rate}  "
                     f"replicas: {run.get('replicas')}  restarts: {run.get('replica_restarts')}")
    return "\n".join(lines)


def _counts(column: pa.ChunkedArray) -> list[tuple[str, int]]:
    counts = pc.value_counts(column).to_pylist()
    return sorted(((c["values"], c["counts"]) for c in counts), key=lambda kv: -kv[1])


def export_results(
    output: str, storage_options: dict[str, Any] | None, fmt: str, to: str | None, limit: int | None
) -> str:
    """Merged results as a table (text), or CSV/JSONL/Parquet written to ``to`` (or returned as text)."""
    layout = OutputLayout(output, storage_options)
    table = read_results(layout)
    if fmt == "table":
        shown = table.select([c for c in ("id", "status", "error_code", "identity_mean", "face_rate", "video")
                              if c in table.column_names])
        if limit is not None:
            shown = shown.slice(0, limit)
        return shown.to_pandas().to_string(index=False) if shown.num_rows else "(no records)"
    buf = io.BytesIO()
    if fmt == "parquet":
        if not to:
            raise SystemExit("--format parquet needs --to FILE")
        pq.write_table(table, buf)
    elif fmt == "csv":
        pacsv.write_csv(table, buf)
    else:
        for row in table.to_pylist():
            buf.write((json.dumps(row, default=str) + "\n").encode())
    if to:
        storage.write_bytes_atomic(to, buf.getvalue(), storage_options)
        return f"wrote {table.num_rows} records to {to}"
    return buf.getvalue().decode()
