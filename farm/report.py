"""``farm status`` and ``farm results``: read a job's committed records (one per id) and summarise/export them."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from farm import secrets, storage
from farm.lease import OutputLease, describe_holder, holds_lease
from farm.manifest import column_values
from farm.storage import OutputLayout
from farm.table import DamagedPart, read_results

OUTPUT_MARKERS = ("_job.json", "_lease.json", "_log", "results")


class OutputNotFound(FileNotFoundError):
    """No job output at the URI given (a typo, a job spec instead of its output); the message says what to give."""


def check_output(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """``OutputNotFound`` unless ``output`` holds one of ``OUTPUT_MARKERS`` (one listing; a local file is named)."""
    if storage.is_local(output) and os.path.isfile(output):
        raise OutputNotFound(
            f"{output} is a file, not a job's output folder: give the output URI from the job spec's `output:` "
            "(e.g. farm status ./farm-out/demo), not the spec or a results file"
        )
    names = {posixpath.basename(n.rstrip("/")) for n in storage.list_files(output, "", storage_options)}
    if not names.intersection(OUTPUT_MARKERS):
        found = "nothing is there" if not names else "it holds no _job.json, _log/ or results/"
        raise OutputNotFound(
            f"no job output at {output}: {found}. Give the output URI of a job (its spec's `output:`, or the "
            "--output of `farm run` / `farm score`); check the path for a typo"
        )


STALE_AFTER_BEATS = 3  # a running run whose heartbeat is older than this many intervals: its driver is gone


def status_dict(output: str, storage_options: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    """Where an output stands (``farm status OUT --json``): records by status and error code, mean timings, every
    run (a running one with its live progress, and ``stale`` when its heartbeat stopped: the driver died), the
    lease and any damaged log parts. No secret reaches it."""
    secrets.remember({"storage_options": storage_options or {}})
    now = time.time() if now is None else now
    layout = OutputLayout(output, storage_options)
    damaged: list[DamagedPart] = []
    table = read_results(layout, ["status", "error_code", "generate_s", "total_s"], damaged)
    meta = layout.read_json(layout.job_json)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    codes = table.filter(pc.is_valid(table.column("error_code")))
    holder = OutputLease(layout, storage_options, run_id="farm-status").read()
    out = {
        "output": output,
        "job": meta.get("name"),
        "model": meta.get("model", {}),
        "records": table.num_rows,
        "by_status": dict(_counts(table.column("status"))),
        "by_error_code": dict(_counts(codes.column("error_code"))),
        "mean_s": {
            name: pc.mean(ok.column(name)).as_py() if ok.num_rows else None for name in ("generate_s", "total_s")
        },
        "runs": [_run_state(run, now, holder) for run in meta.get("runs", [])],
        "lease": _lease_state(holder, now) if holder else None,
        "damaged_parts": [{"uri": d.uri, "reason": d.reason} for d in damaged],
    }
    return json.loads(secrets.scrub(json.dumps(secrets.redact_spec(out), default=str)))


def _lease_state(holder: dict[str, Any], now: float) -> dict[str, Any]:
    """The lease read, whether it still counts (``live``: its run holds the output) and a line for ``farm status``:
    a lease whose holder's process is gone (on this host) or that expired is taken over by the next run."""
    live = holds_lease(holder, holder.get("run_id"), now)
    if live:
        return {"holder": holder, "live": True, "text": describe_holder(holder, now)}
    who = f"run {holder.get('run_id', '?')!s} on host {holder.get('host', '?')!s} (pid {holder.get('pid', '?')!s})"
    expires = holder.get("expires_at")
    if isinstance(expires, (int, float)) and expires < now:
        why = f"expired {now - expires:.0f} s ago"
    else:
        why = "its process is gone (no need to wait for it to expire)"
    text = f"{who}: not held, {why}; the next run takes the output over"
    return {"holder": holder, "live": False, "text": text}


def _run_state(run: dict[str, Any], now: float, holder: dict[str, Any] | None) -> dict[str, Any]:
    """A ``_job.json`` run entry, without its spec; a running one gets ``heartbeat_age_s`` and ``stale`` (its driver
    is gone: the heartbeat stopped, or the run no longer holds the output lease) with ``stale_reason``."""
    state = {k: v for k, v in run.items() if k not in ("spec", "model_config", "metrics_config", "resolved_defaults")}
    if run.get("status") != "running":
        return state
    beat, every = run.get("heartbeat_at"), run.get("heartbeat_every_s")
    reasons = []
    if beat and every:
        age = now - dt.datetime.fromisoformat(beat).timestamp()
        state["heartbeat_age_s"] = round(age, 1)
        if age > STALE_AFTER_BEATS * float(every):
            reasons.append(f"its heartbeat stopped {age:.0f}s ago")
    if not holds_lease(holder, str(run.get("run_id")), now):
        reasons.append("it no longer holds the output lease")
    state.update(stale=bool(reasons), stale_reason="; ".join(reasons) or None)
    return state


def status_text(output: str, storage_options: dict[str, Any] | None = None) -> str:
    """``farm status OUT``: ``status_dict`` in lines; ``-`` for what is not known (yet)."""
    state = status_dict(output, storage_options)
    lines = [f"output: {output}"]
    if state["job"]:
        model = state["model"]
        lines.append(
            f"job: {state['job']}  model: {_shown(model.get('description'))}  "
            f"fingerprint: {_shown(model.get('fingerprint'))}"
        )
    lines.append(f"records: {state['records']}")
    lines.extend(f"  {status:<10} {count}" for status, count in state["by_status"].items())
    lines.extend(f"    {code:<22} {count}" for code, count in state["by_error_code"].items())
    if state["by_status"].get("ok"):
        lines.append("  ".join(f"{k} mean: {'-' if v is None else f'{v:.3f}'}" for k, v in state["mean_s"].items()))
    lines.extend(_run_line(run) for run in state["runs"])
    if state["lease"]:
        lines.append(f"lease: {state['lease']['text']}")
    if state["damaged_parts"]:
        lines.append(f"damaged parts: {len(state['damaged_parts'])} (skipped; their rows count as not committed)")
        lines.extend(f"  {d['uri']}: {d['reason']}" for d in state["damaged_parts"])
    return "\n".join(lines)


def _shown(value: Any, unit: str = "") -> str:
    """A value for a status line: ``-`` when unknown."""
    return "-" if value is None or value == "" else f"{value}{unit}"


def _replicas_text(replicas: Any) -> str:
    """``{'ready': 0, 'wanted': 1, 'pending': 1}`` -> ``0/1 ready (+1 loading or waiting)``."""
    if not isinstance(replicas, dict):
        return _shown(replicas)
    text = f"{_shown(replicas.get('ready'))}/{_shown(replicas.get('wanted'))} ready"
    pending = replicas.get("pending")
    return f"{text} (+{pending} loading or waiting)" if pending else text


def _run_line(run: dict[str, Any]) -> str:
    head = f"run {run.get('run_id')} (#{run.get('run_seq')}): {run.get('status')}"
    live = run.get("progress") or {}
    if run.get("status") == "running":
        if run.get("stale"):
            return f"{head} but its driver is gone ({run['stale_reason']}): rerun the same command to resume"
        return f"{head}  {_live_text(run, live)}"
    if run.get("ended_by"):
        done = live.get("rows_done")
        by_then = f" (rows done by then: {done})" if isinstance(done, int) and done > 0 else ""
        return f"{head}: {run['ended_by']}{by_then}"
    elapsed = run.get("elapsed_s")
    done = sum(v for k, v in run.get("counts", {}).items() if ":" not in k)
    rate = f"{done / elapsed * 3600:.0f} rows/h" if elapsed else "-"
    return (
        f"{head}  rows: {done}  elapsed: {_shown(elapsed, 's')}  {rate}  replicas: {_shown(run.get('replicas'))}  "
        f"restarts: {_shown(run.get('replica_restarts'))}"
    )


def _live_text(run: dict[str, Any], live: dict[str, Any]) -> str:
    """A running run's progress: rows, rate, ETA, replicas, last commit, heartbeat age."""
    rate, eta, beat = live.get("rows_per_s"), live.get("eta_s"), run.get("heartbeat_age_s")
    return (
        f"rows: {_shown(live.get('rows_done'))}/{_shown(live.get('rows_total'))}  "
        f"rate: {'-' if rate is None else f'{rate:.2f}'} rows/s  ETA: {'-' if eta is None else f'{eta:.0f}s'}  "
        f"replicas: {_replicas_text(live.get('replicas'))}  last commit: {_shown(run.get('last_commit_at'))}  "
        f"heartbeat: {'-' if beat is None else f'{beat:.0f}s ago'}"
    )


def _counts(column: pa.ChunkedArray) -> list[tuple[str, int]]:
    counts = pc.value_counts(column).to_pylist()
    return sorted(((c["values"], c["counts"]) for c in counts), key=lambda kv: -kv[1])


def _json_default(value: Any) -> Any:
    """datetimes, decimals, bytes -> text; an Arrow value Python cannot hold (a timestamp past 9999) -> its raw int."""
    if isinstance(value, pa.Scalar):
        return getattr(value, "value", None) if not hasattr(value, "as_buffer") else repr(value)
    return str(value)


def _flat_for_csv(table: pa.Table) -> pa.Table:
    """CSV has no nested types: nested columns (list, struct, map) are written as JSON text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            values = column_values(table.column(i).combine_chunks())
            text = pa.array([None if v is None else json.dumps(v, default=_json_default) for v in values], pa.string())
            table = table.set_column(i, field.name, text)
    return table


RESULT_FORMATS = ("table", "csv", "jsonl", "parquet")
COMPARE_FORMATS = ("csv", "parquet")
FORMAT_OF_EXTENSION = {
    ".txt": "table",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".tsv": "tsv",
}
EXTENSION_OF_FORMAT = {"table": ".txt", "csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}


def _split_extension(to: str) -> tuple[str, str]:
    """``to`` as (everything before the extension, the lowercased extension); a URI's query is not part of it."""
    path = to.split("?", 1)[0]
    stem, ext = posixpath.splitext(path)
    return stem, ext.lower()


def results_format(fmt: str | None, to: str | None) -> str:
    """The format ``farm results`` writes: ``fmt`` as given, else the one ``to``'s extension names, else ``table``.

    ``ValueError`` when the extension contradicts ``fmt`` (``--format csv --to r.parquet``) or names a format that
    is not written (``--to r.json``): a file whose contents do not match its name is worse than an error."""
    stem, ext = _split_extension(to) if to else ("", "")
    implied = FORMAT_OF_EXTENSION.get(ext)
    if implied is not None and implied not in RESULT_FORMATS:
        asked = f" with --format {fmt}" if fmt else ""
        fix = f"--to {stem}{EXTENSION_OF_FORMAT[fmt]}" if fmt else f"e.g. --to {stem}.jsonl (JSON Lines) or {stem}.csv"
        raise ValueError(
            f"--to {to}{asked}: its extension names {implied}, which farm results does not write; it writes "
            f"{', '.join(RESULT_FORMATS)} (--format): give {fix}"
        )
    if fmt is not None and implied is not None and implied != fmt:
        raise ValueError(
            f"--format {fmt} contradicts --to {to}, whose extension names {implied}: give --to {stem}"
            f"{EXTENSION_OF_FORMAT[fmt]}, or leave --format out and the extension picks the format"
        )
    return fmt or implied or "table"


def compare_format(to: str) -> str:
    """The format ``farm compare --to`` writes its per-id table in, from the extension: csv or parquet; any other
    extension is a ``ValueError`` naming both (compare has no --format, so the extension must say which)."""
    stem, ext = _split_extension(to)
    implied = FORMAT_OF_EXTENSION.get(ext)
    if implied not in COMPARE_FORMATS:
        named = f"names {implied}" if implied else f"({ext or 'none'}) names no format"
        raise ValueError(
            f"--to {to}: its extension {named}; farm compare writes its per-id table as "
            f"{' or '.join(COMPARE_FORMATS)}, picked by the extension: give --to {stem}.csv or --to {stem}.parquet"
        )
    return implied


def export_results(
    output: str, storage_options: dict[str, Any] | None, fmt: str, to: str | None, limit: int | None
) -> str:
    """Merged results in ``fmt`` (``RESULT_FORMATS``; ``limit`` caps the table) written to ``to`` when given (then a
    line saying so is returned), else returned as text. Parquet needs ``to``."""
    if fmt == "parquet" and not to:
        raise ValueError("--format parquet writes a file: add --to FILE (e.g. --to results.parquet)")
    table = read_results(OutputLayout(output, storage_options))
    count, data = _encode_results(table, fmt, limit)
    if not to:
        return data.decode()
    storage.write_bytes_atomic(to, data + b"\n" if fmt == "table" else data, storage_options)
    return f"wrote {count} records to {to}"


def _encode_results(table: pa.Table, fmt: str, limit: int | None) -> tuple[int, bytes]:
    """(records written, their bytes) of ``table`` in ``fmt``."""
    if fmt == "table":
        wanted = ("id", "status", "error_code", "identity_mean", "identity_distance_mean", "face_rate", "video")
        shown = table.select([c for c in wanted if c in table.column_names])
        if limit is not None:
            shown = shown.slice(0, limit)
        text = shown.to_pandas().to_string(index=False, na_rep="-") if shown.num_rows else "(no records)"
        return shown.num_rows, text.encode()
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf)
    elif fmt == "csv":
        pacsv.write_csv(_flat_for_csv(table), buf)
    elif fmt == "jsonl":
        names = table.column_names
        columns = [column_values(table.column(n).combine_chunks()) for n in names]
        for values in zip(*columns):
            buf.write((json.dumps(dict(zip(names, values)), default=_json_default, ensure_ascii=False) + "\n").encode())
    else:
        raise ValueError(f"format {fmt!r} is not one of {RESULT_FORMATS}; give --format {' or '.join(RESULT_FORMATS)}")
    return table.num_rows, buf.getvalue()


def _label(outputs: list[str]) -> list[str]:
    """Short, unique column labels for outputs: their last path segment, else their position."""
    names = [o.rstrip("/").rsplit("/", 1)[-1] or f"out{i}" for i, o in enumerate(outputs)]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def compare_outputs(
    outputs: list[str], storage_options: dict[str, Any] | None, to: str | None = None, limit: int = 20
) -> str:
    """Per side (each output; or, given one output of a sweep, each of its configs) a summary (records, ok rows,
    mean identity, face rate), and a table of ``identity_mean`` side by side per manifest row (``row_id``).

    Typical uses: a Lynx job and the ``still`` baseline over the same manifest (the baseline is the ceiling the
    metric reaches after compression, so ``lynx / still`` reads as the share of the reachable identity kept), or the
    configs of one sweep.
    """
    if to:
        compare_format(to)  # a bad extension fails before any reading
    sides = _sides(outputs, storage_options)
    labels = list(sides)
    lines = [f"{'side':<24} {'records':>8} {'ok':>6} {'identity_mean':>14} {'face_rate':>10}"]
    for lab, t in sides.items():
        ok = t.filter(pc.equal(t.column("status"), "ok"))
        mean = pc.mean(ok.column("identity_mean")).as_py() if ok.num_rows else None
        rate = pc.mean(ok.column("face_rate")).as_py() if ok.num_rows else None
        lines.append(f"{lab:<24} {t.num_rows:>8} {ok.num_rows:>6} {_fmt(mean):>14} {_fmt(rate):>10}")
    joined = None
    for lab, t in sides.items():
        part = t.select(["row", "identity_mean"]).rename_columns(["row", lab])
        joined = part if joined is None else joined.join(part, "row", join_type="full outer")
    joined = joined.sort_by("row")
    if len(labels) >= 2:
        first, last = labels[0], labels[-1]
        ratio = pc.divide(joined.column(first), joined.column(last))
        joined = joined.append_column(f"{first}/{last}", ratio)
        lines.append(f"mean {first}/{last} over rows scored in both: {_fmt(pc.mean(ratio).as_py())}")
    if to:
        buf = io.BytesIO()
        (pq.write_table if compare_format(to) == "parquet" else pacsv.write_csv)(joined, buf)
        storage.write_bytes_atomic(to, buf.getvalue(), storage_options)
        lines.append(f"wrote {joined.num_rows} rows to {to}")
    shown = joined.slice(0, limit).to_pandas().to_string(index=False, na_rep="-") if joined.num_rows else ""
    return "\n".join(lines + (["", shown] if shown else []))


def _sides(outputs: list[str], storage_options: dict[str, Any] | None) -> dict[str, pa.Table]:
    """Label -> records keyed by manifest row (``row``: ``row_id``, else ``id`` for records made before sweeps).
    One output whose records span several sweep configs is compared config by config."""
    cols = ["row_id", "config_id", "status", "identity_mean", "identity_distance_mean", "face_rate"]
    sides = {}
    for lab, out in zip(_label(outputs), outputs):
        t = read_results(OutputLayout(out, storage_options), cols)
        sides[lab] = t.append_column("row", pc.coalesce(t.column("row_id"), t.column("id")))
    if len(sides) == 1:
        (only,) = sides.values()
        configs = sorted({c for c in only.column("config_id").to_pylist() if c})
        if len(configs) >= 2:
            return {c: only.filter(pc.equal(only.column("config_id"), c)) for c in configs}
    return sides


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
