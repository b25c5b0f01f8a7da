"""Every URI the farm touches goes through here: fsspec filesystems, atomic writes, the output layout.

Nothing else in the package concatenates URIs. Besides fsspec protocols, ``pkg://<package>/<path>`` names a data
file that an installed Python package ships (the embedded demo uses scikit-image's astronaut and insightface's photos).

Remote calls get connect/read timeouts (``remote_options``); faults are classified by ``farm.faults`` (infrastructure:
retried with backoff, then ``InfraError``; a missing object or a bad image: the row's ``RowError``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import posixpath
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from farm import faults, images
from farm.faults import DEFAULT_RETRY, Fault, RetryPolicy, classify, describe, with_retries
from farm.images import DEFAULT_LIMITS, ImageLimits
from farm.records import ErrorCode, InfraError, RowError

PKG_SCHEME = "pkg://"
LOCAL_PROTOCOLS = (None, "file", "local")
# Protocols that name the same filesystem: per-protocol storage_options given for one apply to the others.
PROTOCOL_FAMILIES = (("s3", "s3a"), ("http", "https"), ("gs", "gcs"), ("abfs", "abfss", "az"))
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
S3FS_TRIES = 2  # s3fs's own loop per call (network errors, SlowDown); farm.faults retries around it (default 5)
T = TypeVar("T")


def resolve_pkg_uri(uri: str) -> str:
    """``pkg://skimage/data/astronaut.png`` -> the local path of that file inside the installed package.

    A path that leaves the package (``pkg://skimage/../../etc/passwd``) is refused with ``ValueError``.
    """
    rest = uri[len(PKG_SCHEME) :]
    package, _, inner = rest.partition("/")
    if not all(part.isidentifier() for part in package.split(".")):
        raise ValueError(f"{uri}: {package!r} is not a package name; give pkg://<package>/<path>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{uri}: package {package!r} is not installed")
    for location in spec.submodule_search_locations:
        root = os.path.realpath(location)
        candidate = os.path.realpath(os.path.join(root, inner))
        if os.path.commonpath([root, candidate]) != root:
            raise ValueError(f"{uri}: {inner!r} leads outside package {package!r}; give a path inside it")
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{uri}: no file {inner!r} inside package {package!r}")


def protocol_of(uri: str) -> str | None:
    """``s3``, ``https``, ... ; None for a local path (``file://`` and ``pkg://`` count as local)."""
    if uri.startswith(PKG_SCHEME):
        return None
    protocol = fsspec.core.split_protocol(uri)[0]
    return None if protocol in LOCAL_PROTOCOLS else protocol.lower()


def anchored(uri: str) -> str:
    """A local path as any process reads it: ``~`` expanded and a relative path made absolute against this process's
    directory (replicas run in other working directories, on other nodes); a ``file://`` prefix is kept. Remote
    and ``pkg://`` URIs come back as given."""
    if not is_local(uri) or uri.startswith(PKG_SCHEME):
        return uri
    scheme = next((p for p in ("file://", "local://") if uri.startswith(p)), "")
    path = os.path.expanduser(uri[len(scheme) :])
    return scheme + (path if os.path.isabs(path) else os.path.abspath(path))


def _family(protocol: str) -> tuple[str, ...]:
    return next((f for f in PROTOCOL_FAMILIES if protocol in f), (protocol,))


def is_per_protocol(storage_options: dict[str, Any] | None) -> bool:
    """Whether ``storage_options`` is keyed by protocol (``{s3: {...}, https: {...}}``) rather than flat.

    Raises ``ValueError`` for a mix of both forms (which keys would go where is anyone's guess).
    """
    if not storage_options:
        return False
    known = set(fsspec.available_protocols())
    scoped = {k for k, v in storage_options.items() if k in known and isinstance(v, dict)}
    if scoped and len(scoped) != len(storage_options):
        flat = sorted(set(storage_options) - scoped)
        raise ValueError(
            f"storage_options mixes per-protocol sections {sorted(scoped)} with flat options {flat}; "
            f"move {flat} under the protocol they are for (e.g. {{s3: {{...}}}})"
        )
    return bool(scoped)


def bind_storage_options(storage_options: dict[str, Any] | None, *uris: str) -> dict[str, Any]:
    """Flat ``storage_options`` -> ``{protocol: options}`` for the protocol of the first remote URI in ``uris`` (a
    job passes its output, then its manifest), so that S3 options never reach an ``https://`` portrait. Per-protocol
    options, and flat ones when none of ``uris`` is remote, are returned as they are."""
    options = dict(storage_options or {})
    if not options or is_per_protocol(options):
        return options
    protocol = next((p for p in map(protocol_of, uris) if p), None)
    return {protocol: options} if protocol else options


def options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec options (before timeouts) for ``uri``: its protocol's section of per-protocol options (or that
    of a protocol of the same family, e.g. ``s3a`` for ``s3``), all of flat options, nothing for local paths."""
    protocol = protocol_of(uri)
    if protocol is None or not storage_options:
        return {}
    if not is_per_protocol(storage_options):
        return dict(storage_options)
    for name in (protocol, *_family(protocol)):
        if name in storage_options:
            return dict(storage_options[name])
    return {}


def remote_options(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus default connect/read timeouts for ``protocol``; values the user gave win."""
    family = _family(protocol)
    if "s3" in family:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})  # s3fs and farm.faults retry
        return {**options, "config_kwargs": config}
    if "http" in family:
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        timeout = client.get("timeout")
        defaults = {"connect": CONNECT_TIMEOUT_S, "sock_connect": CONNECT_TIMEOUT_S, "sock_read": READ_TIMEOUT_S}
        if timeout is None:
            client["timeout"] = aiohttp.ClientTimeout(total=None, **defaults)
        elif isinstance(timeout, dict):  # from YAML: {sock_read: 30, ...}
            client["timeout"] = aiohttp.ClientTimeout(**{"total": None, **defaults, **timeout})
        elif isinstance(timeout, int | float):  # from YAML: one number = the read timeout
            client["timeout"] = aiohttp.ClientTimeout(total=None, **{**defaults, "sock_read": float(timeout)})
        return {**options, "client_kwargs": client}
    if "gs" in family:
        return {"timeout": READ_TIMEOUT_S, **options}
    return options


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``uri``: remote protocols get their options (``options_for``) and
    default timeouts (``remote_options``); local paths none."""
    if uri.startswith(PKG_SCHEME):
        uri = resolve_pkg_uri(uri)
    protocol = protocol_of(uri)
    options = remote_options(protocol, options_for(uri, storage_options)) if protocol else {}
    fs, path = url_to_fs(uri, **options)
    if protocol and "s3" in _family(protocol) and hasattr(fs, "retries"):
        fs.retries = S3FS_TRIES  # not a constructor argument; every farm caller sets the same value
    return fs, path


def is_local(uri: str) -> bool:
    return protocol_of(uri) is None


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI (local path or ``proto://bucket/key``) with ``/``."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        out = posixpath.join(out, part.strip("/")) if out else part
    return out


def _remote(uri: str, what: str, fn: Callable[[], T], retry: RetryPolicy | None = None) -> T:
    """Run one remote call with bounded retries of infrastructure faults (local paths: once, errors as they are);
    ``retry`` defaults to ``farm.faults.DEFAULT_RETRY``, looked up at call time."""
    return fn() if is_local(uri) else with_retries(fn, f"{what} {uri!r}", retry or faults.DEFAULT_RETRY)


def _read_local(path: str) -> bytes:
    """A local file's bytes; FIFOs, devices and sockets are refused before anything could block or stream forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(f"{path!r} is not a regular file ({_kind(mode)})")
        return fh.read()


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"))
    kinds += ((stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        return _read_local(path)

    def read() -> bytes:
        with fs.open(path, "rb") as fh:
            return fh.read()

    return _remote(uri, "reading", read)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    return _remote(uri, "checking", lambda: fs.exists(path))


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write so that readers see either nothing or the whole file.

    Local: write a sibling temp file, fsync, rename. Object stores: a single PUT is already all-or-nothing; it is
    retried on infrastructure faults (throttling, 5xx, timeouts, expired credentials) with backoff.
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
    try:
        _remote(uri, "writing", lambda: fs.pipe_file(path, data))
    except FileNotFoundError as exc:  # a PUT cannot miss its key: the bucket (container) itself is gone
        raise InfraError(
            f"writing {uri!r} failed: its bucket does not exist ({describe(exc)}); was it deleted or mistyped? "
            "Create it or change the output, then rerun"
        ) from exc


def list_files(uri: str, suffix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Full URIs of the files directly under ``uri`` ending in ``suffix`` (sorted); [] if the folder is absent."""
    fs, path = get_fs(uri, storage_options)
    try:
        names = _remote(uri, "listing", lambda: fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    protocol = fsspec.core.split_protocol(uri)[0]
    out = []
    for name in names:
        if not name.endswith(suffix) or posixpath.basename(name).startswith("."):
            continue
        out.append(name if protocol in LOCAL_PROTOCOLS else f"{protocol}://{name}")
    return sorted(out)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Image bytes -> RGB uint8 ``(H, W, 3)`` (EXIF orientation applied; see ``farm.images``)."""
    return images.decode_image(data, limits)


# ---------------------------------------------------------------------- portraits
def normalize_location(uri: str) -> str:
    """``uri`` in the form prefixes are compared in: local paths resolved (``realpath``), ``..`` collapsed
    without escaping the root (``pkg://skimage/../../etc/passwd`` -> ``pkg://etc/passwd``), protocol lower-case."""
    if uri.startswith(PKG_SCHEME):
        return PKG_SCHEME + posixpath.normpath("/" + uri[len(PKG_SCHEME) :]).lstrip("/")
    protocol = protocol_of(uri)
    if protocol is None:
        return os.path.realpath(fsspec.core.strip_protocol(uri) if uri.startswith("file://") else uri)
    rest = uri.split("://", 1)[1] if "://" in uri else fsspec.core.split_protocol(uri)[1]
    return f"{_family(protocol)[0]}://" + posixpath.normpath("/" + rest).lstrip("/")


def check_allowed_root(uri: str, allowed_roots: tuple[str, ...] | list[str]) -> None:
    """``RowError(bad_param)`` unless ``uri`` lies under one of ``allowed_roots`` (no check when there are none)."""
    if not allowed_roots:
        return
    location = normalize_location(uri)
    for root in allowed_roots:
        prefix = normalize_location(root)
        if location == prefix or location.startswith(prefix.rstrip("/") + "/"):
            return
    raise RowError(
        ErrorCode.BAD_PARAM,
        f"portrait {uri!r} is outside runtime.allowed_portrait_roots {list(allowed_roots)}; "
        "move the image under one of them or add its prefix to the setting",
    )


@dataclass(frozen=True)
class PortraitPolicy:
    """How portraits are read: size limits, retries of storage faults, and where they may come from."""

    limits: ImageLimits = DEFAULT_LIMITS
    retry: RetryPolicy = DEFAULT_RETRY
    allowed_roots: tuple[str, ...] = ()


DEFAULT_PORTRAIT_POLICY = PortraitPolicy()


def _portrait_size(uri: str, storage_options: dict[str, Any] | None, retry: RetryPolicy) -> tuple[int | None, str]:
    """The portrait's size and version stamp from metadata (stat / HEAD), before any byte is read; refuses what is
    not a file."""
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise RowError(
                ErrorCode.PORTRAIT_UNREADABLE,
                f"portrait {uri!r} is {_kind(st.st_mode)}, not a regular file; give an image file",
            )
        return st.st_size, _local_stamp(st)
    info = _remote(uri, "reading", lambda: fs.info(path), retry)
    if info.get("type", "file") != "file":
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} is a {info.get('type')}, not a file")
    size = info.get("size")
    return (int(size) if size is not None else None), _remote_stamp(info)


def _local_stamp(st: os.stat_result) -> str:
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def _remote_stamp(info: dict[str, Any]) -> str:
    """What a store says identifies this version of an object: its ETag/hash, else size and modification time."""
    for key in ("ETag", "etag", "md5Hash", "content_md5", "version_id", "VersionId"):
        if info.get(key):
            return f"{key}={str(info[key]).strip(chr(34))}"
    modified = next((info[k] for k in ("LastModified", "last_modified", "mtime", "updated") if info.get(k)), None)
    return f"size={info.get('size')};modified={modified}"


def file_stamp(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The version stamp of a file (``farm.resume`` compares it with the one a record kept, without reading it)."""
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        return _local_stamp(os.stat(path))
    return _remote_stamp(_remote(uri, "checking", lambda: fs.info(path)))


def file_sha256(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    return hashlib.sha256(read_bytes(uri, storage_options)).hexdigest()


def _read_bounded(uri: str, storage_options: dict[str, Any] | None, max_bytes: int, retry: RetryPolicy) -> bytes:
    """Up to ``max_bytes + 1`` bytes of a remote file whose size its store does not tell."""
    fs, path = get_fs(uri, storage_options)

    def read() -> bytes:
        chunks: list[bytes] = []
        left = max_bytes + 1
        with fs.open(path, "rb") as fh:
            while left > 0 and (chunk := fh.read(min(left, 1 << 20))):  # a stream returns what has arrived
                chunks.append(chunk)
                left -= len(chunk)
        return b"".join(chunks)

    return _remote(uri, "reading", read, retry)


def _too_big(uri: str, size: int, limits: ImageLimits) -> RowError:
    return RowError(
        ErrorCode.PORTRAIT_UNREADABLE,
        f"portrait {uri!r} is {size} bytes or more, over the limit of {limits.max_bytes} bytes "
        "(runtime.max_portrait_bytes); shrink the file or raise the limit",
    )


@dataclass(frozen=True)
class PortraitFile:
    """A decoded portrait and which bytes it came from (records keep both, so a rerun notices a replaced file)."""

    image: np.ndarray
    sha256: str
    stamp: str


def read_portrait(
    uri: str, storage_options: dict[str, Any] | None = None, policy: PortraitPolicy = DEFAULT_PORTRAIT_POLICY
) -> np.ndarray:
    """A portrait for a row as RGB uint8 (``load_portrait`` without the provenance)."""
    return load_portrait(uri, storage_options, policy).image


def load_portrait(
    uri: str, storage_options: dict[str, Any] | None = None, policy: PortraitPolicy = DEFAULT_PORTRAIT_POLICY
) -> PortraitFile:
    """A portrait for a row: ``RowError`` when the row points at nothing usable (outside the allowed roots, missing,
    not a regular file, over a limit, not an image); ``InfraError`` when the store or network failed (expired or
    refused credentials, throttling, 5xx, timeouts: retried here first, then by the driver; never cached)."""
    if not uri:
        raise RowError(ErrorCode.MISSING_PORTRAIT, "the row has no portrait; give an image URI")
    check_allowed_root(uri, policy.allowed_roots)
    limits = policy.limits
    outer = faults.handling()
    try:
        size, stamp = _portrait_size(uri, storage_options, policy.retry)
        if size is not None and size > limits.max_bytes:
            raise _too_big(uri, size, limits)
        if size is None:
            data = _read_bounded(uri, storage_options, limits.max_bytes, policy.retry)
        else:
            data = read_bytes(uri, storage_options)
    except (RowError, InfraError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified: the infrastructure's fault or the row's
        if classify(exc, local=is_local(uri), outer=outer) is Fault.INFRA:
            raise InfraError(f"fetching portrait {uri!r} failed: {describe(exc, outer)}") from exc
        if isinstance(exc, FileNotFoundError):
            raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} does not exist") from None
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} cannot be read: {exc}") from None
    if len(data) > limits.max_bytes:
        raise _too_big(uri, len(data), limits)
    if not data:
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} is empty (0 bytes)")
    try:
        image = images.decode_image(data, limits)
    except MemoryError as exc:
        raise InfraError(f"out of memory decoding portrait {uri!r} ({len(data)} bytes)") from exc
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises, the bytes are not a usable image
        raise RowError(ErrorCode.PORTRAIT_UNREADABLE, f"portrait {uri!r} is not a readable image: {exc}") from None
    return PortraitFile(image, hashlib.sha256(data).hexdigest(), stamp)


def read_image(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Read and decode the image at ``uri`` to RGB uint8 ``(H, W, 3)``."""
    return images.decode_image(read_bytes(uri, storage_options))


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs live (documented in README):

    ``<root>/videos/<id>.mp4``; ``<root>/_log/part-<run_seq>-<run_id>-<n>.parquet`` (the append log of records);
    ``<root>/results/`` (the published table: one row per id, nothing else in the folder); ``<root>/_job.json``;
    ``<root>/_lease.json`` (which run writes this output now; see ``farm.lease``). Outputs written before the log
    moved kept their parts in ``<root>/results/part-*.parquet``: those are read as log parts until compacted.
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

    @property
    def published(self) -> str:
        """The one file of the published table (replaced atomically by each compaction)."""
        return join(self.results_dir, "results.parquet")

    @property
    def log_dir(self) -> str:
        return join(self.root, "_log")

    def log_part(self, run_seq: int, run_id: str, n: int) -> str:
        """Names sort in commit order: by run sequence, then the run's part number."""
        return join(self.log_dir, f"part-{run_seq:08d}-{run_id}-{n:06d}.parquet")

    @property
    def job_json(self) -> str:
        return join(self.root, "_job.json")

    @property
    def lease(self) -> str:
        return join(self.root, "_lease.json")

    def legacy_parts(self) -> list[str]:
        """Log parts of outputs written before the log moved to ``_log/`` (``results/part-*.parquet``)."""
        names = list_files(self.results_dir, ".parquet", self.storage_options)
        return [n for n in names if posixpath.basename(n).startswith("part-")]

    def log_parts(self) -> list[str]:
        """Every part of the append log, oldest first (legacy parts, then ``_log/`` in name order)."""
        return self.legacy_parts() + list_files(self.log_dir, ".parquet", self.storage_options)

    def read_json(self, uri: str) -> dict[str, Any]:
        """A JSON file under this output ({} when it does not exist yet or is not JSON)."""
        try:
            return json.loads(read_bytes(uri, self.storage_options))
        except (FileNotFoundError, ValueError):
            return {}

    def write_json(self, uri: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        write_bytes_atomic(uri, data, self.storage_options)
