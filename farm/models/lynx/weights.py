"""Weights on disk: named errors, and remote checkpoints fetched once per node into a verified local cache.

A remote folder or file (any fsspec URI) goes through ``farm.cache`` into ``$FARM_CACHE/lynx/<digest of the URI>``
(default ``~/.cache/lynx-farm``): a file lock, atomic renames, sizes checked against the remote listing and a sha256
manifest written last, so replicas on one node share one verified copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from farm import cache, storage

CACHE_KIND = "lynx"
MANIFEST = cache.MANIFEST


def _rebuild(cls: type, message: str, state: dict[str, Any]) -> Exception:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class LynxWeightsError(Exception):
    """A checkpoint problem that names the file and what was expected there."""

    def __reduce__(self):  # picklable whatever a subclass's __init__ takes (errors cross process boundaries in Ray)
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


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


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a local safetensors file, as stored (its 8-byte length, then that many bytes)."""
    with open(path, "rb") as fh:
        return fh.read(int.from_bytes(fh.read(8), "little"))


def local_dir(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    """A local folder holding the checkpoint at ``uri``: the folder itself when local, else the node cache."""
    if storage.is_local(uri):
        _, path = storage.get_fs(uri)
        local = Path(path)
        if not local.is_dir():
            raise MissingWeightsFile(str(local), "checkpoint folder")
        return local
    try:
        return cache.fetch_folder(uri, CACHE_KIND, storage_options)
    except FileNotFoundError:
        raise MissingWeightsFile(uri, "checkpoint folder") from None
    except cache.CacheError as exc:
        raise LynxWeightsError(str(exc)) from exc


def local_file(uri: str, storage_options: dict[str, Any] | None = None, role: str = "weights") -> Path:
    """A local copy of the single file at ``uri``: the file itself when local, else the node cache."""
    if storage.is_local(uri):
        _, path = storage.get_fs(uri)
        local = Path(path)
        if not local.is_file():
            raise MissingWeightsFile(str(local), role)
        return local
    try:
        return cache.fetch_file(uri, CACHE_KIND, storage_options)
    except FileNotFoundError:
        raise MissingWeightsFile(uri, role) from None
    except cache.CacheError as exc:
        raise LynxWeightsError(str(exc)) from exc
