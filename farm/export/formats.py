"""The three layouts an export writes, one shard at a time: WebDataset tars, a Hugging Face Parquet dataset, and
Parquet records beside a folder of videos.

Every writer is deterministic (rows by id, fixed tar headers, no clocks in the bytes), so a resumed export equals an
uninterrupted one byte for byte.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from farm import storage
from farm.export.errors import ExportError
from farm.export.shards import FETCH_THREADS, HashingWriter, Shard, publish

CAPTION = "caption"
SOURCE_VIDEO = "source_video"
PROVENANCE = "provenance"


def encode_key(row_id: str) -> str:
    """A WebDataset sample key for ``row_id``: readers split a file name at its first dot, so ``.`` becomes ``%2E``
    (and ``%``, which ids never hold, ``%25``); ``urllib.parse.unquote`` gives the id back (it is in the json too)."""
    return row_id.replace("%", "%25").replace(".", "%2E")


def _free(name: str, taken: list[str]) -> str:
    """``name``, or ``_name``, ``__name`` ... whichever a carried-through column does not already use."""
    while name in taken:
        name = f"_{name}"
    return name


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


@dataclass(frozen=True)
class ShardInput:
    """What a writer gets: the shard's rows (by id), its videos as they arrive (``(id, bytes)`` in id order, only
    those found: a writer keeps none it has written), and the provenance for the json."""

    rows: pa.Table
    videos: Iterable[tuple[str, bytes]]
    provenance: dict[str, Any]

    def take(self, ids: list[str]) -> pa.Table:
        """The rows of ``ids`` (in id order, as the rows are)."""
        column = self.rows.column("id")
        return self.rows.filter(pc.is_in(column, pa.array(ids, column.type)))


def _batches(items: Iterable[tuple[str, bytes]], size: int) -> Iterator[list[tuple[str, bytes]]]:
    batch: list[tuple[str, bytes]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------ webdataset
def webdataset_name(i: int, n: int) -> str:
    return f"shard-{i:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(record: dict[str, Any], provenance: dict[str, Any], run_id: str | None) -> bytes:
    key = _free(PROVENANCE, list(record))
    payload = {**record, key: {**provenance, "run_id": run_id}}
    return json.dumps(payload, sort_keys=True, default=_json_default).encode()


def write_webdataset(dest: str, shard: Shard, data: ShardInput, options: dict[str, Any] | None) -> dict[str, Any]:
    """``<key>.json`` (the record and its provenance), ``<key>.mp4``, ``<key>.txt`` (the prompt: the caption)."""

    def write(out: HashingWriter) -> None:
        records = {record["id"]: record for record in data.rows.to_pylist()}
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for row_id, video in data.videos:
                record = records[row_id]
                key = encode_key(row_id)
                _add(tar, f"{key}.json", sample_json(record, data.provenance, record.get("run_id")))
                _add(tar, f"{key}.mp4", video)
                _add(tar, f"{key}.txt", (record.get("prompt") or "").encode())

    return publish(storage.join(dest, shard.file), write, options)


# ------------------------------------------------------------------ tables (hf, parquet)
def _with_columns(rows: pa.Table, video: pa.Array) -> pa.Table:
    """``rows`` with ``caption`` (the prompt), ``source_video`` (the output's URI) and ``video`` replaced."""
    names = rows.column_names
    table = rows.set_column(names.index("video"), _free(SOURCE_VIDEO, names), rows.column("video"))
    table = table.append_column(_free(CAPTION, names), rows.column("prompt"))
    return table.append_column("video", video)


MEDIA_ROW_GROUP = 100  # rows per row group when a row holds a video: a reader's batch stays a few hundred MB


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """mp4 bytes are stored as they are: they are compressed already and every video differs, so zstd and a
    dictionary would cost time for nothing (a dictionary would even hold each video twice while writing)."""
    media = [f.name for f in schema if pa.types.is_large_binary(f.type) or pa.types.is_binary(f.type)]
    return {
        "compression": {name: "none" if name in media else "zstd" for name in schema.names},
        "use_dictionary": [name for name in schema.names if name not in media],
    }


def _write_table(dest: str, shard: Shard, table: pa.Table, options: dict[str, Any] | None) -> dict[str, Any]:
    def write(out: HashingWriter) -> None:
        pq.write_table(table, out, **_parquet_options(table.schema))

    return publish(storage.join(dest, shard.file), write, options)


def hf_name(i: int, n: int) -> str:
    return f"data/train-{i:05d}-of-{n:05d}.parquet"


def write_hf(dest: str, shard: Shard, data: ShardInput, options: dict[str, Any] | None) -> dict[str, Any]:
    """The records, ``caption``, and ``video``: the mp4 bytes (a binary column: loads without a video decoder);
    written a row group at a time as the videos arrive."""
    schema = _with_columns(data.rows.slice(0, 0), pa.array([], pa.large_binary())).schema

    def write(out: HashingWriter) -> None:
        with pq.ParquetWriter(out, schema, **_parquet_options(schema)) as writer:
            for batch in _batches(data.videos, MEDIA_ROW_GROUP):
                video = pa.array([v for _, v in batch], pa.large_binary())
                writer.write_table(_with_columns(data.take([i for i, _ in batch]), video))

    return publish(storage.join(dest, shard.file), write, options)


def parquet_name(i: int, n: int) -> str:
    return f"data/part-{i:06d}.parquet"


def video_path(row_id: str) -> str:
    """Where the parquet layout puts a video, relative to the destination (the ``video`` column holds this)."""
    return f"videos/{row_id}.mp4"


def write_parquet(dest: str, shard: Shard, data: ShardInput, options: dict[str, Any] | None) -> dict[str, Any]:
    """The videos to ``videos/<id>.mp4`` first (a few uploads at a time), then the records with ``video`` = that
    relative path."""
    ids: list[str] = []
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        pending: deque[Future[None]] = deque()
        for row_id, video in data.videos:
            uri = storage.join(dest, video_path(row_id))
            pending.append(pool.submit(storage.write_bytes_atomic, uri, video, options))
            ids.append(row_id)
            while len(pending) >= 2 * FETCH_THREADS:
                pending.popleft().result()
        for future in pending:
            future.result()
    video = pa.array([video_path(i) for i in ids], pa.string())
    return _write_table(dest, shard, _with_columns(data.take(ids), video), options)


@dataclass(frozen=True)
class Format:
    """A layout: how shard ``i`` of ``n`` is named, how it is written, and the files HF's loader should read."""

    name: Callable[[int, int], str]
    write: Callable[[str, Shard, ShardInput, dict[str, Any] | None], dict[str, Any]]
    data_files: str


FORMATS = {
    "webdataset": Format(webdataset_name, write_webdataset, "shard-*.tar"),
    "hf": Format(hf_name, write_hf, "data/train-*.parquet"),
    "parquet": Format(parquet_name, write_parquet, "data/part-*.parquet"),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ExportError(f"export format {name!r} is not one of {', '.join(FORMATS)}; pick one with --format")
    return FORMATS[name]


__all__ = ["FORMATS", "Format", "ShardInput", "encode_key", "get_format", "sample_json", "video_path"]
