"""``farm export``: an output's videos and records as a dataset (WebDataset tars, Hugging Face Parquet, or Parquet
beside a folder of videos), with a dataset card and a manifest of what it holds (README "Exporting a dataset").

Only ``ok`` rows with a video are exported, never one whose ``rights_confirmed`` is false; ``--where`` narrows that
(``farm.export.where``). Shards are cut from the rows sorted by id and written atomically, each followed by its index,
so a rerun with the same settings skips the shards already complete (``farm.export.shards``). An ``ok`` row whose
video file is gone is not dropped silently: it is counted, listed in ``export.json`` and warned about.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from farm import __version__, secrets, storage
from farm.export import card, shards
from farm.export.errors import ExportError
from farm.export.formats import Format, ShardInput, get_format
from farm.export.select import RIGHTS, Selection, effective_filter, select
from farm.export.shards import Shard
from farm.storage import OutputLayout

log = logging.getLogger("farm")

EXPORT_JSON = "export.json"
CARD = "README.md"


def read_records(uri: str, storage_options: dict[str, Any] | None) -> tuple[OutputLayout, pa.Table]:
    """The output's layout and its records, one per id (the newest); ``FileNotFoundError`` if ``uri`` is no output."""
    from farm.table import open_results

    return OutputLayout(uri, storage_options), open_results(uri, storage_options)


def export_output(
    output: str,
    fmt: str,
    to: str,
    where: str | None = None,
    shard_size: int = 1000,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``output`` to ``to`` in format ``fmt``; returns a summary (counts, shards written and skipped).

    ``ExportError`` (a ``ValueError``) for a bad filter, format or shard size, or a destination that holds something
    else; nothing is written before those checks pass.
    """
    form = get_format(fmt)
    secrets.remember({secrets.OPTIONS_KEY: storage_options or {}})
    options = storage.bind_storage_options(storage_options, output, to)
    started = time.perf_counter()
    layout, records = read_records(output, options)
    selection = select(records, where)
    plan = {"format": fmt, "source": secrets.scrub(layout.root), "where": where, "shard_size": shard_size}
    planned = shards.cut(selection.table.column("id").to_pylist(), shard_size, form.name)
    key = shards.plan_key(plan)
    shards.claim(to, {**plan, "plan": key}, options)
    removed = shards.prune(to, planned, options)
    job = layout.read_json(layout.job_json)
    provenance = _provenance(layout, job)
    indexes, written = [], 0
    for shard in planned:
        index = shards.is_complete(to, shard, key, options)
        if index is None:
            index = _export_shard(to, shard, key, selection.table, layout, form, provenance, options)
            written += 1
        indexes.append(index)
    manifest = _manifest(plan, selection, indexes, records)
    _write_meta(to, manifest, job, form, options)
    return {
        "format": fmt,
        "to": secrets.scrub(to),
        "shards": len(planned),
        "shards_written": written,
        "shards_skipped": len(planned) - written,
        "stale_files_removed": removed,
        "counts": manifest["counts"],
        "missing_videos": [m["id"] for m in manifest["missing_videos"]],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _provenance(layout: OutputLayout, job: dict[str, Any]) -> dict[str, Any]:
    """What every exported sample says about where it came from (the record carries its own ``run_id``)."""
    return card.redacted(
        {
            "output": layout.root,
            "model": job.get("model"),
            "generated_by": f"farm {job.get('farm_version')}",
            "exported_by": f"farm {__version__}",
            "ai_generated": True,
        }
    )


def _export_shard(
    dest: str,
    shard: Shard,
    key: str,
    table: pa.Table,
    layout: OutputLayout,
    form: Format,
    provenance: dict[str, Any],
    options: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write the shard as its videos arrive, then its index (the shard counts as done only once that exists)."""
    rows = table.filter(pc.is_in(table.column("id"), pa.array(shard.ids, table.column("id").type)))
    sources = dict(zip(rows.column("id").to_pylist(), rows.column("video").to_pylist(), strict=True))
    wanted = [(i, list(dict.fromkeys([sources[i], layout.video(i)]))) for i in shard.ids]
    stream = shards.VideoStream(shards.fetch_videos(wanted, options), sources)
    info = form.write(dest, shard, ShardInput(rows, stream, provenance), options)
    if stream.missing:
        log.warning(
            "export shard %s: %d ok row(s) have no video file, left out and listed in %s: %s",
            shard.file,
            len(stream.missing),
            EXPORT_JSON,
            ", ".join(m["id"] for m in stream.missing[:10]),
        )
    index = {
        "plan": key,
        "file": shard.file,
        **info,
        "ids": list(shard.ids),
        "count": len(stream.videos),
        "videos": stream.videos,
        "missing": stream.missing,
    }
    shards.write_index(dest, shard, index, options)
    return index


def _manifest(
    plan: dict[str, Any], selection: Selection, indexes: list[dict[str, Any]], records: pa.Table
) -> dict[str, Any]:
    """``export.json``: the source, the filter, counts, and per shard its file, ids and each video's sha256/size."""
    missing = [m for index in indexes for m in index["missing"]]
    exported_ids = pa.array([v["id"] for index in indexes for v in index["videos"]], pa.string())
    exported = selection.table.filter(pc.is_in(pc.cast(selection.table.column("id"), pa.string()), exported_ids))
    counts = {**selection.counts, "missing_video": len(missing), "exported": len(exported_ids)}
    return card.redacted(
        {
            "format": plan["format"],
            "source": plan["source"],
            "filter": {
                "where": plan["where"],
                "effective": effective_filter(plan["where"], RIGHTS in records.schema.names),
            },
            "shard_size": plan["shard_size"],
            "farm_version": __version__,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "counts": counts,
            "metrics": card.metric_summary(exported),
            "missing_videos": missing,
            "shards": [{k: v for k, v in index.items() if k != "plan"} for index in indexes],
        }
    )


def _write_meta(
    dest: str, manifest: dict[str, Any], job: dict[str, Any], form: Format, options: dict[str, Any] | None
) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(dest, EXPORT_JSON), data, options)
    text = card.card(manifest, job, form.data_files)
    storage.write_bytes_atomic(storage.join(dest, CARD), text.encode(), options)


__all__ = ["CARD", "EXPORT_JSON", "ExportError", "export_output", "read_records"]
