"""Weights on disk: named errors, and remote checkpoints fetched once per node into a verified local cache.

A remote folder (any fsspec URI) is copied into ``$FARM_CACHE/lynx/<digest of the URI>`` (default
``~/.cache/lynx-farm``). Replicas on one node share it safely: one process copies under a file lock, every file is
written to a temporary name and renamed into place, sizes are checked against the remote listing and a sha256 of
every file is recorded in ``.farm-manifest.json``, written last; a folder without that manifest is never used.
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


class LynxWeightsError(Exception):
    """A checkpoint problem that names the file and what was expected there."""


class MissingWeightsFile(LynxWeightsError, FileNotFoundError):
    def __init__(self, path: str, role: str) -> None:
        super().__init__(f"missing {role} file {path!r}; point the {role} weights at a folder in the official layout")
        self.path = path


class WrongKeyError(LynxWeightsError, KeyError):
    def __init__(self, path: str, missing: list[str], unexpected: list[str], expected_shapes: dict[str, tuple]) -> None:
        parts = []
        if missing:
            shown = ", ".join(f"{k} {tuple(expected_shapes[k])}" for k in missing[:5])
            parts.append(f"missing keys {shown}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        super().__init__(f"{path}: " + "; ".join(parts) + " (is this the right file for this variant?)")
        self.path, self.missing, self.unexpected = path, missing, unexpected

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class WrongShapeError(LynxWeightsError, ValueError):
    def __init__(self, path: str, key: str, expected: tuple, got: tuple) -> None:
        super().__init__(f"{path}: tensor {key!r} has shape {tuple(got)}, expected {tuple(expected)}")
        self.path, self.key, self.expected, self.got = path, key, tuple(expected), tuple(got)


def require_file(folder: Path, name: str, role: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise MissingWeightsFile(str(path), role)
    return path


def check_state_dict(path: str, tensors: dict[str, Any], expected: dict[str, tuple]) -> None:
    """Compare a file's tensors with what the module expects; raise the named error for the first problem."""
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise WrongKeyError(path, missing, unexpected, expected)
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise WrongShapeError(path, key, tuple(shape), got)


def cache_root() -> Path:
    """``$FARM_CACHE`` or ``~/.cache/lynx-farm`` (the project's node cache), then ``lynx/``."""
    return Path(os.environ.get("FARM_CACHE") or Path.home() / ".cache" / "lynx-farm") / "lynx"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _valid(target: Path, listing: dict[str, int] | None) -> bool:
    manifest = target / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text())["files"]
    if listing is not None and {k: v["size"] for k, v in recorded.items()} != listing:
        return False  # the remote changed since it was cached
    return all((target / rel).is_file() and (target / rel).stat().st_size == v["size"] for rel, v in recorded.items())


def _remote_listing(uri: str, storage_options: dict[str, Any] | None) -> dict[str, int]:
    fs, path = storage.get_fs(uri, storage_options)
    prefix = path.rstrip("/") + "/"
    listing = {}
    for name, info in fs.find(path, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = name[len(prefix) :] if name.startswith(prefix) else os.path.basename(name)
        listing[rel] = int(info["size"])
    if not listing:
        raise MissingWeightsFile(uri, "checkpoint folder")
    return listing


def local_dir(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder holding the checkpoint at ``uri``: the folder itself when local, else the node cache."""
    if storage.is_local(uri):
        _, path = storage.get_fs(uri)
        local = Path(path)
        if not local.is_dir():
            raise MissingWeightsFile(str(local), "checkpoint folder")
        return local
    from filelock import FileLock

    target = cache_root() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    listing = _remote_listing(uri, storage_options)
    if _valid(target, listing):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not _valid(target, listing):
            _download(uri, target, listing, storage_options)
    return target


def local_file(uri: str, storage_options: dict[str, Any] | None = None, role: str = "weights") -> Path:
    """A local copy of the single file at ``uri``: the file itself when local, else the node cache (same lock,
    atomic rename, size check and sha256 manifest as folders; a changed remote size refetches it)."""
    if storage.is_local(uri):
        _, path = storage.get_fs(uri)
        local = Path(path)
        if not local.is_file():
            raise MissingWeightsFile(str(local), role)
        return local
    from filelock import FileLock

    fs, path = storage.get_fs(uri, storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise MissingWeightsFile(uri, role) from None
    if info.get("type", "file") != "file":
        raise MissingWeightsFile(uri, role)
    name = os.path.basename(path.rstrip("/"))
    listing = {name: int(info["size"])}
    target = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:20]
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
            raise LynxWeightsError(f"{uri}/{rel}: downloaded {got} bytes, the remote lists {size}; retry the fetch")
        os.replace(tmp, dest)
        files[rel] = {"size": size, "sha256": _sha256(dest)}
    tmp_manifest = target / f".{MANIFEST}.part"
    tmp_manifest.write_text(json.dumps({"uri": uri, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp_manifest, target / MANIFEST)


def verify_checksums(folder: Path) -> None:
    """Re-hash a cached folder against its manifest (slow for 14B weights; the loader checks sizes only)."""
    recorded = json.loads((folder / MANIFEST).read_text())["files"]
    for rel, info in recorded.items():
        if _sha256(folder / rel) != info["sha256"]:
            raise LynxWeightsError(
                f"{folder / rel}: sha256 differs from the cache manifest; delete {folder} to refetch"
            )
