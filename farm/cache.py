"""The node-local cache: remote folders (weights, model packs) fetched once per node and verified.

``fetch_folder(uri, kind)`` copies a remote folder (any fsspec URI) into ``$FARM_CACHE/<kind>/<digest of the URI>``
(default ``~/.cache/lynx-farm``). Replicas on one node share it safely: one process copies under a file lock, every
file is written to a temporary name and renamed into place, sizes are checked against the remote listing and a
sha256 of every file is recorded in ``.farm-manifest.json``, written last; a folder without that manifest, or whose
manifest no longer matches the remote listing, is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from farm import storage

MANIFEST = ".farm-manifest.json"


class CacheError(OSError):
    """A remote folder could not be copied faithfully (the message names the file)."""


def node_cache(kind: str) -> Path:
    """``$FARM_CACHE`` or ``~/.cache/lynx-farm``, then ``kind``."""
    return Path(os.environ.get("FARM_CACHE") or Path.home() / ".cache" / "lynx-farm") / kind


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remote_listing(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Relative path -> size of every file below ``uri`` ({} when there is none)."""
    fs, path = storage.get_fs(uri, storage_options)
    prefix = path.rstrip("/") + "/"
    listing = {}
    for name, info in fs.find(path, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = name[len(prefix) :] if name.startswith(prefix) else os.path.basename(name)
        listing[rel] = int(info["size"])
    return listing


def _valid(target: Path, listing: dict[str, int] | None) -> bool:
    manifest = target / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["files"]
    if listing is not None and {k: v["size"] for k, v in recorded.items()} != listing:
        return False  # the remote changed since it was cached
    return all((target / rel).is_file() and (target / rel).stat().st_size == v["size"] for rel, v in recorded.items())


def fetch_folder(uri: str, kind: str, storage_options: dict[str, Any] | None = None) -> Path:
    """The local copy of the remote folder ``uri`` (fetched now unless a valid copy is cached).

    The remote listing is checked every time, so a changed remote is fetched again; when the remote is gone or
    unreachable, a verified copy is used. Raises ``FileNotFoundError`` when the remote holds no file and nothing is
    cached, ``CacheError`` when a copy comes out wrong.
    """
    from filelock import FileLock

    target = node_cache(kind) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    try:
        listing = remote_listing(uri, storage_options)
    except OSError:  # unreachable right now: a verified copy is as good as the remote
        listing = {}
    if not listing:
        if _valid(target, None):
            return target
        raise FileNotFoundError(f"{uri!r} holds no files (and no verified copy is cached)")
    if _valid(target, listing):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _valid(target, listing):
            _download(uri, target, listing, storage_options)
    return target


def fetch_file(uri: str, kind: str, storage_options: dict[str, Any] | None = None) -> Path:
    """The local copy of the single remote file ``uri``, with the same guarantees as ``fetch_folder``."""
    from filelock import FileLock

    fs, path = storage.get_fs(uri, storage_options)
    name = os.path.basename(path.rstrip("/"))
    target = node_cache(kind) / hashlib.sha256(uri.encode()).hexdigest()[:20]
    try:
        info = fs.info(path)
        listing = {name: int(info["size"])} if info.get("type", "file") == "file" else {}
    except OSError:  # gone (FileNotFoundError) or unreachable: a verified copy is as good as the remote
        listing = {}
    if not listing:
        if _valid(target, None) and (target / name).is_file():
            return target / name
        raise FileNotFoundError(f"{uri!r} is not a file (and no verified copy is cached)")
    if not _valid(target, listing):
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not _valid(target, listing):
                _download(uri, target, listing, storage_options, sources={name: path})
    return target / name


def _download(
    uri: str,
    target: Path,
    listing: dict[str, int],
    storage_options: dict[str, Any] | None,
    sources: dict[str, str] | None = None,
) -> None:
    """Copy every listed file (``sources`` maps a name to its remote path; default: under the folder ``uri``)."""
    fs, path = storage.get_fs(uri, storage_options)
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST).unlink(missing_ok=True)  # invalid until every file is verified
    files = {}
    for rel, size in sorted(listing.items()):
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        source = sources[rel] if sources else path.rstrip("/") + "/" + rel
        with fs.open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        got = tmp.stat().st_size
        if got != size:
            tmp.unlink()
            raise CacheError(f"{uri}/{rel}: fetched {got} bytes, the remote lists {size}; retry the fetch")
        os.replace(tmp, dest)
        files[rel] = {"size": size, "sha256": sha256_file(dest)}
    tmp_manifest = target / f".{MANIFEST}.part"
    tmp_manifest.write_text(json.dumps({"uri": uri, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp_manifest, target / MANIFEST)


def verify_checksums(folder: Path) -> None:
    """Re-hash a cached folder against its manifest (slow for 14B weights; normal use checks sizes only)."""
    recorded = json.loads((folder / MANIFEST).read_text())["files"]
    for rel, info in recorded.items():
        if sha256_file(folder / rel) != info["sha256"]:
            raise CacheError(f"{folder / rel}: sha256 differs from the cache manifest; delete {folder} to refetch")
