"""Every URI the farm touches goes through here: fsspec filesystems, atomic writes, the output layout.

Nothing else in the package concatenates URIs. Besides fsspec protocols, ``pkg://<package>/<path>`` names a data
file that an installed Python package ships (the embedded demo uses scikit-image's astronaut and insightface's photos).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from farm.records import ErrorCode, InfraError, RowError

PKG_SCHEME = "pkg://"


def resolve_pkg_uri(uri: str) -> str:
    """``pkg://skimage/data/astronaut.png`` -> the local path of that file inside the installed package."""
    rest = uri[len(PKG_SCHEME) :]
    package, _, inner = rest.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{uri}: package {package!r} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / inner
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(f"{uri}: no file {inner!r} inside package {package!r}")


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``uri``; ``storage_options`` apply to remote protocols only."""
    if uri.startswith(PKG_SCHEME):
        uri = resolve_pkg_uri(uri)
    protocol = fsspec.core.split_protocol(uri)[0]
    options = dict(storage_options or {}) if protocol not in (None, "file", "local") else {}
    return url_to_fs(uri, **options)


def is_local(uri: str) -> bool:
    return uri.startswith(PKG_SCHEME) or fsspec.core.split_protocol(uri)[0] in (None, "file", "local")


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI (local path or ``proto://bucket/key``) with ``/``."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        out = posixpath.join(out, part.strip("/")) if out else part
    return out


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    return fs.exists(path)


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write so that readers see either nothing or the whole file.

    Local: write a sibling temp file, fsync, rename. Object stores: a single PUT is already all-or-nothing.
    """
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def list_files(uri: str, suffix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix`` (sorted); [] if the folder is absent."""
    fs, path = get_fs(uri, storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    protocol = fsspec.core.split_protocol(uri)[0]
    out = []
    for name in names:
        if not name.endswith(suffix) or posixpath.basename(name).startswith("."):
            continue
        out.append(name if protocol in (None, "file", "local") else f"{protocol}://{name}")
    return sorted(out)


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> RGB uint8 ``(H, W, 3)`` (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))


def read_portrait(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """A portrait for a row: ``RowError`` when the row points at nothing usable (missing, not an image),
    ``InfraError`` when fetching failed for reasons of the network or the store (worth a retry, never cached)."""
    if not uri:
        raise RowError(ErrorCode.MISSING_PORTRAIT, "the row has no portrait; give an image URI")
    try:
        data = read_bytes(uri, storage_options)
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError) as exc:
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} cannot be read: {exc}") from None
    except OSError as exc:
        raise InfraError(f"fetching portrait {uri!r} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return decode_image(data)
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the bytes are not a usable image
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} is not a readable image: {exc}") from None


def read_image(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Read and decode the image at ``uri`` to RGB uint8 ``(H, W, 3)``."""
    return decode_image(read_bytes(uri, storage_options))


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs live (documented in README):

    ``<root>/videos/<id>.mp4``, ``<root>/results/part-<run>-<seq>.parquet``, ``<root>/_job.json``,
    ``<root>/_lease.json`` (which run writes this output now; see ``farm.lease``).
    """

    root: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Local roots become absolute so that the URIs written into records work from any directory.
        if is_local(self.root) and not self.root.startswith(PKG_SCHEME):
            object.__setattr__(self, "root", os.path.abspath(fsspec.core.strip_protocol(self.root)))

    def video(self, row_id: str) -> str:
        return join(self.root, "videos", f"{row_id}.mp4")

    def metrics(self, row_id: str) -> str:
        return join(self.root, "metrics", f"{row_id}.json")

    @property
    def results_dir(self) -> str:
        return join(self.root, "results")

    def results_part(self, run_id: str, seq: int) -> str:
        return join(self.results_dir, f"part-{run_id}-{seq:06d}.parquet")

    @property
    def job_json(self) -> str:
        return join(self.root, "_job.json")

    @property
    def lease(self) -> str:
        return join(self.root, "_lease.json")

    def result_parts(self) -> list[str]:
        return list_files(self.results_dir, ".parquet", self.storage_options)

    def read_json(self, uri: str) -> dict[str, Any]:
        """A JSON file under this output ({} when it does not exist yet or is not JSON)."""
        try:
            return json.loads(read_bytes(uri, self.storage_options))
        except (FileNotFoundError, ValueError):
            return {}

    def write_json(self, uri: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        write_bytes_atomic(uri, data, self.storage_options)
