"""Shards of an export: fixed boundaries, atomic publication, and the per-shard index that makes a rerun resume.

Why this shape (datatrove's completion markers): the unit of work and of resume is a shard. Rows are sorted by id and
cut every ``shard_size`` rows, so a rerun plans the same shards; a shard's file appears atomically (a temp file
renamed, or one upload that the object store shows whole or not at all); only then its index
``_index/shard-NNNNNN.json`` is written. A shard whose index names the same plan and ids, and whose file has the
recorded size, is complete and is skipped. ``_export_plan.json`` pins what a destination holds, so a rerun with
another source, format, filter or shard size is refused instead of mixing two exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from farm import faults, storage
from farm.export.errors import ExportError

log = logging.getLogger("farm")

PLAN_FILE = "_export_plan.json"
INDEX_DIR = "_index"
FETCH_THREADS = 8


@dataclass(frozen=True)
class Shard:
    """One shard: its number, its file (relative to the destination) and the ids planned into it."""

    index: int
    file: str
    ids: tuple[str, ...]

    @property
    def index_file(self) -> str:
        return posixpath.join(INDEX_DIR, f"shard-{self.index:06d}.json")


def cut(ids: list[str], shard_size: int, name: Callable[[int, int], str]) -> list[Shard]:
    """``ids`` (sorted) cut every ``shard_size``; ``name(i, n)`` gives shard ``i`` of ``n`` its file."""
    if shard_size < 1:
        raise ExportError(f"--shard-size {shard_size} must be at least 1 (rows per shard)")
    n = (len(ids) + shard_size - 1) // shard_size
    return [Shard(i, name(i, n), tuple(ids[i * shard_size : (i + 1) * shard_size])) for i in range(n)]


def plan_key(plan: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def claim(dest: str, plan: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    """Record ``plan`` in ``dest`` (new or empty), or check that ``dest`` already holds an export of this plan."""
    plan_uri = storage.join(dest, PLAN_FILE)
    try:
        held = json.loads(storage.read_bytes(plan_uri, storage_options))
    except FileNotFoundError:
        held = None
    if held is None:
        leftovers = _entries(dest, storage_options)
        if leftovers:
            raise ExportError(
                f"export destination {dest!r} is not empty ({', '.join(leftovers[:5])}) and holds no export plan; "
                "give a new --to (an export never writes into a folder it did not start)"
            )
        storage.write_bytes_atomic(plan_uri, _dumps(plan), storage_options)
        return
    if held != plan:
        differs = sorted(k for k in set(plan) | set(held) if plan.get(k) != held.get(k))
        was = {k: held.get(k) for k in differs}
        raise ExportError(
            f"export destination {dest!r} holds another export ({was}); this one asks for "
            f"{ {k: plan.get(k) for k in differs} }: rerun with the same settings to resume it, or give a new --to"
        )


def _entries(dest: str, storage_options: dict[str, Any] | None) -> list[str]:
    fs, path = storage.get_fs(dest, storage_options)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def is_complete(dest: str, shard: Shard, key: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The shard's index if the shard is complete for plan ``key`` (same ids, file of the recorded size), else None."""
    try:
        index = json.loads(storage.read_bytes(storage.join(dest, shard.index_file), storage_options))
    except (FileNotFoundError, ValueError):
        return None
    if index.get("plan") != key or tuple(index.get("ids", ())) != shard.ids or index.get("file") != shard.file:
        return None
    fs, path = storage.get_fs(storage.join(dest, shard.file), storage_options)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return None
    return index if size == index.get("bytes") else None


def prune(dest: str, planned: list[Shard], storage_options: dict[str, Any] | None) -> list[str]:
    """Remove the shards an earlier pass of this plan wrote that this pass does not plan (the source gained or lost
    rows since: the count of shards changed, and HF file names carry it), so the folder holds one export. Runs before
    any shard is written: an index still names its old file. Returns the files removed."""
    keep = {shard.index_file: shard.file for shard in planned}
    removed = []
    for uri in storage.list_files(storage.join(dest, INDEX_DIR), ".json", storage_options):
        name = posixpath.join(INDEX_DIR, posixpath.basename(uri))
        try:
            old = json.loads(storage.read_bytes(uri, storage_options)).get("file")
        except (FileNotFoundError, ValueError):
            old = None
        if old and old != keep.get(name):
            _remove(storage.join(dest, old), storage_options)
            removed.append(old)
        if name not in keep:
            _remove(uri, storage_options)
    return removed


def _remove(uri: str, storage_options: dict[str, Any] | None) -> None:
    fs, path = storage.get_fs(uri, storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass


def write_index(dest: str, shard: Shard, index: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    storage.write_bytes_atomic(storage.join(dest, shard.index_file), _dumps(index), storage_options)


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


class HashingWriter:
    """A write-only file that hashes and counts what goes through it (tar and Parquet writers only append)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.fh.flush()

    @property
    def closed(self) -> bool:
        return False


def publish(uri: str, write: Callable[[HashingWriter], None], storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Write a file through ``write`` so that readers see all of it or nothing; returns its size and sha256.

    Local: a sibling temp file, fsync, rename. Object stores: a local temp file, then one upload (a multipart upload
    of a large file also appears only when it completes), retried on infrastructure faults.
    """
    fs, path = storage.get_fs(uri, storage_options)
    local = storage.is_local(uri)
    if local:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    else:
        handle, tmp = tempfile.mkstemp(prefix="farm-export-")
        os.close(handle)
    try:
        with open(tmp, "wb") as fh:
            out = HashingWriter(fh)
            write(out)
            fh.flush()
            os.fsync(fh.fileno())
        if local:
            os.replace(tmp, path)
        else:
            faults.with_retries(lambda: fs.put_file(tmp, path), f"uploading {uri!r}", faults.DEFAULT_RETRY)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"bytes": out.size, "sha256": out.sha.hexdigest()}


def fetch_videos(
    wanted: list[tuple[str, list[str]]], storage_options: dict[str, Any] | None
) -> Iterator[tuple[str, bytes | None]]:
    """``(id, bytes)`` for each ``(id, candidate URIs)``, in order: the first candidate that exists (``None`` when
    none does), read by a few threads. Storage faults other than a missing file raise."""

    def read(item: tuple[str, list[str]]) -> tuple[str, bytes | None]:
        row_id, uris = item
        for uri in uris:
            try:
                return row_id, storage.read_bytes(uri, storage_options)
            except FileNotFoundError:
                continue
        return row_id, None

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        pending: deque[Future[tuple[str, bytes | None]]] = deque()
        for item in wanted:  # a bounded window: a shard of large videos never sits in memory whole
            pending.append(pool.submit(read, item))
            if len(pending) >= 2 * FETCH_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class VideoStream:
    """A shard's videos as they arrive, ``(id, bytes)`` of those found; keeps what the shard's index records: each
    video's sha256 and size, and the ids whose file is missing (with the URI the record gave)."""

    def __init__(self, fetched: Iterator[tuple[str, bytes | None]], sources: dict[str, str]) -> None:
        self.fetched = fetched
        self.sources = sources
        self.videos: list[dict[str, Any]] = []
        self.missing: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        for row_id, data in self.fetched:
            if data is None:
                self.missing.append({"id": row_id, "video": self.sources[row_id]})
                continue
            self.videos.append({"id": row_id, "sha256": digest(data), "bytes": len(data)})
            yield row_id, data


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "Shard",
    "VideoStream",
    "claim",
    "cut",
    "digest",
    "fetch_videos",
    "is_complete",
    "plan_key",
    "prune",
    "publish",
    "write_index",
]
