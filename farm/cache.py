"""The node-local cache: remote folders (weights, model packs) fetched once per node and verified.

``fetch_folder(uri, kind)`` copies a remote folder (any fsspec URI) into ``$FARM_CACHE/<kind>/<digest of the URI>``
(default ``~/.cache/lynx-farm``). Replicas on one node share it safely: one process copies under a file lock, every
file is written to a temporary name and renamed into place, sizes are checked against the remote listing and a
sha256 of every file is recorded in ``.farm-manifest.json``, written last; a folder without that manifest, or whose
manifest no longer matches the remote listing, is never used.

Remote keys are hostile input: each becomes a local name only through ``safe_relpath`` (normalised, never absolute,
never above the folder, never the cache's own manifest), and two keys that normalise to one name are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

from farm import storage

MANIFEST = ".farm-manifest.json"


class CacheError(OSError):
    """A remote folder could not be copied faithfully (the message names the file)."""


class UnsafeNameError(CacheError):
    """A remote key or archive member whose local name would leave its folder, or clash with another one."""


def safe_relpath(name: str, source: str, folder: Path | str) -> str:
    """``name`` (a key relative to ``source``) as a normalised relative POSIX path that stays inside ``folder``.

    Empty and ``.`` parts are dropped and ``a/../b`` becomes ``b``; an absolute name, one that climbs above the
    folder, one with a NUL byte and the cache's own manifest are refused with ``UnsafeNameError`` naming both.
    """

    def refuse(why: str) -> UnsafeNameError:
        return UnsafeNameError(
            f"{name!r} in {source!r} {why}; the local folder is {folder}. Rename or delete it at the source"
        )

    if "\x00" in name:
        raise refuse("holds a NUL byte")
    if name.startswith("/"):
        raise refuse("is an absolute path")
    norm = posixpath.normpath(name)
    if norm in (".", "") or norm == ".." or norm.startswith("../"):
        raise refuse("would be written outside the folder" if ".." in norm else "names no file")
    if norm.split("/", 1)[0].startswith(MANIFEST):
        raise refuse(f"would overwrite the cache's own {MANIFEST}")
    return norm


def check_collisions(names: dict[str, str], source: str, folder: Path | str) -> None:
    """Refuse two keys with one local name (``names``: local name -> original key), or a file that is a folder."""
    for local, key in names.items():
        parent = posixpath.dirname(local)
        while parent:
            if parent in names:
                raise UnsafeNameError(
                    f"{names[parent]!r} in {source!r} is a file but {key!r} needs it as a folder; the local "
                    f"folder is {folder}. Rename one of them at the source"
                )
            parent = posixpath.dirname(parent)


def claim_name(names: dict[str, str], local: str, key: str, source: str, folder: Path | str) -> None:
    if local in names:
        raise UnsafeNameError(
            f"{names[local]!r} and {key!r} in {source!r} both become {local!r} in {folder}; rename one at the source"
        )
    names[local] = key


def node_cache(kind: str) -> Path:
    """``$FARM_CACHE`` or ``~/.cache/lynx-farm``, then ``kind``."""
    return Path(os.environ.get("FARM_CACHE") or Path.home() / ".cache" / "lynx-farm") / kind


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remote_files(
    uri: str, storage_options: dict[str, Any] | None = None, folder: Path | str = "the cache"
) -> dict[str, tuple[str, int]]:
    """Local relative name -> (remote path, size) of every file below ``uri`` ({} when there is none).

    Raises ``UnsafeNameError`` for a key that would land outside ``folder`` or clash with another key.
    """
    fs, path = storage.get_fs(uri, storage_options)
    prefix = path.rstrip("/") + "/"
    found: dict[str, tuple[str, int]] = {}
    names: dict[str, str] = {}
    for name, info in sorted(fs.find(path, detail=True).items()):
        if info.get("type", "file") != "file":
            continue
        key = name[len(prefix) :].lstrip("/") if name.startswith(prefix) else posixpath.basename(name)
        local = safe_relpath(key, uri, folder)
        claim_name(names, local, key, uri, folder)
        found[local] = (name, int(info["size"]))
    check_collisions(names, uri, folder)
    return found


def remote_listing(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Local relative name -> size of every file below ``uri`` ({} when there is none)."""
    return {rel: size for rel, (_, size) in remote_files(uri, storage_options).items()}


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
        files = remote_files(uri, storage_options, target)
    except UnsafeNameError:
        raise  # a hostile or clashing key: never fall back to a copy, say which key
    except OSError:  # unreachable right now: a verified copy is as good as the remote
        files = {}
    listing = {rel: size for rel, (_, size) in files.items()}
    if not listing:
        if _valid(target, None):
            return target
        raise FileNotFoundError(f"{uri!r} holds no files (and no verified copy is cached)")
    if _valid(target, listing):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _valid(target, listing):
            _download(uri, target, listing, storage_options, sources={rel: src for rel, (src, _) in files.items()})
    return target


def fetch_file(uri: str, kind: str, storage_options: dict[str, Any] | None = None) -> Path:
    """The local copy of the single remote file ``uri``, with the same guarantees as ``fetch_folder``."""
    from filelock import FileLock

    fs, path = storage.get_fs(uri, storage_options)
    target = node_cache(kind) / hashlib.sha256(uri.encode()).hexdigest()[:20]
    name = safe_relpath(posixpath.basename(path.rstrip("/")), uri, target)
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
    root = target.resolve()
    files = {}
    for rel, size in sorted(listing.items()):
        dest = target / safe_relpath(rel, uri, target)
        if not dest.parent.resolve().is_relative_to(root):  # e.g. a symlinked subfolder planted in the cache
            raise UnsafeNameError(f"{rel!r} in {uri!r} resolves to {dest.parent.resolve()}, outside {root}")
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
