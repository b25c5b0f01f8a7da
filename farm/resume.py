"""What a rerun into an existing output keeps, redoes, rescores, or refuses to do (README "Resume").

Every record carries fingerprints of what made it (``farm.fingerprints``). Before any GPU time, a rerun compares
them with what this spec and manifest would make:

- a committed ``ok`` row whose inputs changed (a sampling parameter, seed, prompt, negative prompt, portrait URI or
  bytes, model settings) is *changed*: the run refuses with a summary of what changed (``ChangedRows``) unless
  ``--regenerate-changed`` redoes it; one whose metric settings alone changed is rescored from its committed video
  with ``--rescore-changed`` (no generation);
- a ``failed`` or ``skipped`` row whose inputs changed is redone (nothing good is lost), as is a row that failed on
  the infrastructure (``infra_error``: storage, network, credentials; never the row's fault), and every ``failed``
  row with ``--retry-failed``;
- records written before fingerprints existed are kept as they are (counted); committed ids no longer in the
  manifest are kept and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from farm import fingerprints, storage, table
from farm.config import SpecError
from farm.manifest import Manifest, RowDefaults, RowState, plan_rows, resolve_keyed
from farm.params import SAMPLING_FIELDS
from farm.records import ErrorCode, Record, RowError, Status
from farm.storage import OutputLayout

log = logging.getLogger("farm")

COMPARED = [
    "status",
    "error_code",
    "request_fingerprint",
    "metrics_config",
    "portrait",
    "portrait_sha256",
    "portrait_stamp",
    "config_id",
]
DIFFED = [*SAMPLING_FIELDS, "fps", "seed", "prompt", "negative_prompt", "portrait", "model_config", "status"]
STAT_THREADS = 16  # portraits are checked with one metadata call each (stat / HEAD), in parallel


class ChangedRows(SpecError):
    """Committed ``ok`` rows were made differently from what this spec and manifest ask; nothing was run."""


@dataclass
class ResumePlan:
    """What this run does with each committed id; ``keep`` are skipped, ``rescore`` scored again."""

    keep: set[str] = field(default_factory=set)
    rescore: dict[str, Record] = field(default_factory=dict)
    regenerate: set[str] = field(default_factory=set)
    redo: set[str] = field(default_factory=set)
    unfingerprinted: int = 0
    removed: int = 0
    changes: list[str] = field(default_factory=list)
    invalid_now: Counter[str] = field(default_factory=Counter)  # kept ok rows whose manifest row is invalid now

    def as_dict(self) -> dict[str, Any]:
        return {
            "kept": len(self.keep),
            "regenerated": len(self.regenerate),
            "rescored": len(self.rescore),
            "redone_not_ok": len(self.redo),
            "without_fingerprints": self.unfingerprinted,
            "not_in_manifest": self.removed,
            "kept_ok_invalid_now": dict(self.invalid_now),
            "changes": self.changes,
        }


@dataclass(frozen=True)
class Context:
    """What this run would make of each row."""

    layout: OutputLayout
    manifest: Manifest
    defaults: RowDefaults
    model_config: str
    metrics_config: str
    configs: Sequence[Any] = ()  # a sweep's configs this run makes (one model group)


def row_now(ctx: Context, key: str, row: dict[str, Any], error: RowError | None) -> tuple[str, str | None]:
    """The request fingerprint this run gives a row, and its error code when the row is invalid now (an invalid
    row's fingerprint is a digest of what it holds)."""
    if error is None:
        try:
            request = resolve_keyed(key, row, ctx.defaults)
            return fingerprints.request_fingerprint(ctx.model_config, request, row["portrait"]), None
        except RowError as exc:
            error = exc
    return fingerprints.invalid_fingerprint(ctx.model_config, row), error.code.value


def _rows(ctx: Context) -> Iterator[tuple[str, dict[str, Any], RowError | None]]:
    for state, key, row, error in plan_rows(ctx.manifest, set(), ctx.configs):
        if state is not RowState.REPEAT:
            yield key, row, error


def plan_resume(
    ctx: Context,
    retry_failed: bool = False,
    regenerate_changed: bool = False,
    rescore_changed: bool = False,
    verify_portraits: bool = True,
) -> ResumePlan:
    """Compare the output's records with this run; raises ``ChangedRows`` for changes not allowed by a flag."""
    committed = _this_runs(ctx, table.read_results(ctx.layout, COMPARED))
    plan = ResumePlan()
    if committed.num_rows == 0:
        return plan
    joined, seen = _join_current(ctx, committed)
    plan.removed = committed.num_rows - seen
    plan.unfingerprinted = joined.column("request_fingerprint").null_count
    regenerate, rescore, plan.redo = _classify(ctx, joined, retry_failed, verify_portraits)
    plan.invalid_now = _ok_rows_invalid_now(joined)
    old = _records(ctx.layout, regenerate | rescore)  # one read of the changed rows' whole records
    if regenerate or rescore:
        plan.changes = describe_changes(ctx, old, regenerate, rescore)
    if (regenerate and not regenerate_changed) or (rescore and not rescore_changed):
        raise ChangedRows(_refusal(ctx.layout.root, regenerate, rescore, plan.changes))
    plan.regenerate = regenerate
    plan.rescore = {key: old[key] for key in rescore if key in old}
    plan.keep = set(committed.column("id").to_pylist()) - plan.regenerate - set(plan.rescore) - plan.redo
    return plan


def _classify(
    ctx: Context, joined: pa.Table, retry_failed: bool, verify_portraits: bool
) -> tuple[set[str], set[str], set[str]]:
    """(ok rows whose video would differ, ok rows whose metrics alone would, not-ok rows to redo). Records without
    fingerprints (written before they existed) are in none."""
    known = pc.is_valid(joined.column("request_fingerprint"))
    ok = pc.fill_null(pc.equal(joined.column("status"), Status.OK.value), False)
    differs = pc.and_(known, pc.not_equal(joined.column("now"), joined.column("request_fingerprint")))
    same_ok = pc.and_(pc.and_(ok, known), pc.invert(differs))
    regenerate = _ids(joined, pc.and_(pc.and_(ok, differs), pc.is_null(joined.column("now_error"))))
    if verify_portraits:
        regenerate |= _portraits_changed(ctx, joined.filter(same_ok))
    metrics_moved = pc.fill_null(pc.not_equal(joined.column("metrics_config"), ctx.metrics_config), True)
    rescore = _ids(joined, pc.and_(same_ok, metrics_moved)) - regenerate
    failed = pc.fill_null(pc.equal(joined.column("status"), Status.FAILED.value), False)
    infra = pc.and_(failed, pc.fill_null(pc.equal(joined.column("error_code"), ErrorCode.INFRA.value), False))
    redo = _ids(joined, pc.and_(pc.invert(ok), differs)) | _ids(joined, failed if retry_failed else infra)
    return regenerate, rescore, redo


def _ok_rows_invalid_now(joined: pa.Table) -> Counter[str]:
    """Committed ok rows whose manifest row is invalid now (a duplicated id, an emptied prompt ...), by error code:
    nothing can be made of them, so their records and videos are kept (never replaced by a failure)."""
    ok = pc.fill_null(pc.equal(joined.column("status"), Status.OK.value), False)
    return Counter(joined.filter(pc.and_(ok, pc.is_valid(joined.column("now_error")))).column("now_error").to_pylist())


def _this_runs(ctx: Context, committed: pa.Table) -> pa.Table:
    """With a sweep, the records of this run's configs only (the grid's other model groups run apart)."""
    if not ctx.configs:
        return committed
    ids = pa.array([c.id for c in ctx.configs], pa.string())
    return committed.filter(pc.fill_null(pc.is_in(committed.column("config_id"), ids), False))


def _join_current(ctx: Context, committed: pa.Table) -> tuple[pa.Table, int]:
    """Committed records joined with this run's fingerprint (``now``) of the same id; also how many committed ids
    the manifest still has."""
    ids = set(committed.column("id").to_pylist())
    keys: list[str] = []
    now: list[str] = []
    codes: list[str | None] = []
    for key, row, error in _rows(ctx):
        if key in ids:
            fingerprint, code = row_now(ctx, key, row, error)
            keys.append(key)
            now.append(fingerprint)
            codes.append(code)
    columns = {"id": keys, "now": now, "now_error": codes}
    current = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    return committed.join(current, "id", join_type="inner"), len(keys)


def _ids(joined: pa.Table, mask: pa.ChunkedArray | pa.Array) -> set[str]:
    return set(joined.filter(pc.fill_null(mask, False)).column("id").to_pylist())


def _portraits_changed(ctx: Context, rows: pa.Table) -> set[str]:
    """Ids whose portrait file now holds other bytes than the ones its video was made from. One metadata call per
    distinct portrait; the bytes are read only when the stamp moved (a touched file with the same bytes is fine)."""
    rows = rows.filter(pc.is_valid(rows.column("portrait_sha256")))
    recorded = rows.select(["id", "portrait", "portrait_stamp", "portrait_sha256"]).to_pylist()
    versions = sorted({(r["portrait"], r["portrait_stamp"], r["portrait_sha256"]) for r in recorded})
    options = ctx.layout.storage_options
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        same = list(pool.map(lambda version: _same_bytes(version, options), versions))
    moved = {(uri, sha) for (uri, _, sha), unchanged in zip(versions, same) if not unchanged}
    return {r["id"] for r in recorded if (r["portrait"], r["portrait_sha256"]) in moved}


def _same_bytes(version: tuple[str, str, str], options: dict[str, Any] | None) -> bool:
    uri, stamp, sha = version
    try:
        if storage.file_stamp(uri, options) == stamp:
            return True
        return storage.file_sha256(uri, options) == sha
    except FileNotFoundError:
        log.warning("portrait %s of committed rows is gone: their videos are kept", uri)
        return True


def _records(layout: OutputLayout, ids: set[str]) -> dict[str, Record]:
    if not ids:
        return {}
    rows = table.read_results(layout)
    rows = rows.filter(pc.is_in(rows.column("id"), pa.array(sorted(ids), pa.string())))
    return {r["id"]: Record.from_row(r) for r in rows.to_pylist()}


# ---------------------------------------------------------------------- the summary users read
def describe_changes(ctx: Context, old: dict[str, Record], regenerate: set[str], rescore: set[str]) -> list[str]:
    """One line per changed setting: how many rows were made with which value (``old``: their committed records),
    and what this run gives."""
    lines = _input_changes(ctx, {key: old[key] for key in regenerate if key in old}, regenerate) if regenerate else []
    if rescore:
        lines.extend(_metrics_changes(ctx, [old[key] for key in rescore if key in old]))
    return lines


def _input_changes(ctx: Context, old: dict[str, Record], ids: set[str]) -> list[str]:
    pairs: Counter[tuple[str, str, str]] = Counter()
    explained: set[str] = set()
    for key, row, error in _rows(ctx):
        if key not in old:
            continue
        for name, before, after in _differences(ctx, old[key], key, row, error):
            pairs[(name, before, after)] += 1
            explained.add(key)
    lines = [_line(name, before, after, count) for (name, before, after), count in pairs.most_common(12)]
    if len(pairs) > 12:
        lines.append(f"... and {len(pairs) - 12} more kinds of change")
    bytes_only = len(ids - explained)
    if bytes_only:
        lines.append(f"portrait: {bytes_only:,} committed rows were made from portrait files whose bytes have changed")
    return lines


def _differences(
    ctx: Context, old: Record, key: str, row: dict[str, Any], error: RowError | None
) -> Iterator[tuple[str, str, str]]:
    try:
        if error is not None:
            raise error
        request = resolve_keyed(key, row, ctx.defaults)
    except RowError as exc:
        yield "row", "ok", f"now invalid ({exc.code.value}: {exc.message})"
        return
    if old.model_config != ctx.model_config:
        yield from _json_differences("model", old.model_config, ctx.model_config)
    for name, after in fingerprints.request_values(request, row["portrait"]).items():
        before = old.value(name)
        if _shown(before) != _shown(after):
            yield name, _shown(before), _shown(after)


def _metrics_changes(ctx: Context, old: list[Record]) -> list[str]:
    return settings_changes("metrics", Counter(rec.metrics_config for rec in old), ctx.metrics_config)


def settings_changes(prefix: str, committed: Counter[str | None], now: str) -> list[str]:
    """``metrics.identity.frames: 3 committed rows were made with 8; this run gives 4`` for each setting that
    differs between the committed rows' canonical settings (JSON, with their row counts) and this run's."""
    pairs: Counter[tuple[str, str, str]] = Counter()
    for value, count in committed.items():
        for name, before, after in _json_differences(prefix, value, now):
            pairs[(name, before, after)] += count
    return [_line(name, before, after, count) for (name, before, after), count in pairs.most_common(12)]


def _json_differences(prefix: str, before: str | None, after: str) -> Iterator[tuple[str, str, str]]:
    """Leaf-by-leaf differences of two canonical JSON settings (``metrics.identity.frames: 4 -> 8``)."""
    old, new = _flat(json.loads(before) if before else {}, prefix), _flat(json.loads(after), prefix)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            yield name, _shown(old.get(name)), _shown(new.get(name))


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """Leaves by dotted name; list items by index (``model.weights.lora[0].scale``)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}.{key}"))
        return out
    if isinstance(value, list) and value:
        for index, inner in enumerate(value):
            out.update(_flat(inner, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _shown(value: Any) -> str:
    text = "null" if value is None else json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + '..."'


def _line(name: str, before: str, after: str, count: int) -> str:
    return f"{name}: {count:,} committed rows were made with {before}; this run gives {after}"


def _refusal(output: str, regenerate: set[str], rescore: set[str], changes: list[str]) -> str:
    parts = [f"output {output!r} has committed ok rows made differently from what this spec and manifest ask:"]
    parts.extend(f"  {line}" for line in changes)
    if regenerate:
        parts.append(f"{len(regenerate):,} row(s) would need new videos: rerun with --regenerate-changed to redo them")
    if rescore:
        parts.append(
            f"{len(rescore):,} row(s) differ only in metric settings: rerun with --rescore-changed to score their "
            "committed videos again (no generation)"
        )
    parts.append("or write to a new output. Nothing was run.")
    return "\n".join(parts)
