"""``flaky://``: an fsspec filesystem over a local folder that fails or stalls a fraction of the calls made to it.

Benchmark-only fault injection (``benchmarks/bench_faults.py``). ``flaky:///abs/path`` is ``/abs/path`` on the local
disk, seen through a store that misbehaves like a remote one:

- a **fault**: the call raises a transient error of a configured kind (a reset connection, a timeout, S3 503
  ``SlowDown`` / 500 ``InternalError`` / 403 ``ExpiredToken`` exactly as s3fs raises them, ...). For a call that
  changes the store (``pipe_file``, ``mv``, ``rm``, ...) a share of the faults are *lost acknowledgements*: the change
  is made, then the error is raised (the request landed, its answer did not), so a retry meets its own earlier effect;
- a **stall**: the call sleeps a random time in ``[stall_min_s, stall_max_s]`` first, then succeeds (slow, not failed).

Only the outermost call counts (``exists`` calling ``info`` is one call). ``pipe_file`` is atomic (temp file +
rename), as a single PUT to an object store is. Whether the n-th call of operation ``op`` on ``path`` in a process is
hit is a hash of ``(seed, phase, op, path, n)`` (``path`` relative to ``root``): in the driver the same calls in the
same order get the same faults, whatever the threads interleave; worker processes add their pid, so a row retried on
another replica draws afresh (which replica reads what depends on scheduling anyway).

Every process that touches storage must call ``register()``: the driver itself, and the Ray workers through
``runtime_env={"worker_process_setup_hook": "flakyfs.register", "env_vars": {"PYTHONPATH": <this folder>, ...}}``.
The settings are a JSON file named by ``$FLAKYFS_CONTROL`` (re-read when it changes, so one Ray session can run a
fault-free baseline and then a faulty run)::

    {"phase": "faults", "rate": 0.1, "stall_share": 0.5, "stall_min_s": 0.2, "stall_max_s": 2.0,
     "ack_lost_share": 0.3, "kinds": ["connection_reset", ...], "seed": 0, "counts_dir": "/tmp/.../counts",
     "root": "/tmp/..."}   # paths are hashed relative to root, so a run in another tmp folder draws the same faults

Each process writes what it injected to ``<counts_dir>/<role>-<pid>.json`` (role: ``$FLAKYFS_ROLE`` or the argument
of ``register``), per phase: calls, stalls, faults by kind and by operation.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "flaky"
ENV_CONTROL = "FLAKYFS_CONTROL"
ENV_ROLE = "FLAKYFS_ROLE"
ENDPOINT = "http://storage.invalid"


# ------------------------------------------------------------------ fault kinds
def _client_error(code: str, status: int, message: str, operation: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, operation)  # type: ignore[arg-type]


def _s3(code: str, status: int, message: str) -> Callable[[str], BaseException]:
    """The exception s3fs raises for an S3 error answer (``translate_boto_error``: the ClientError is the cause)."""

    def make(op: str) -> BaseException:
        from s3fs.errors import translate_boto_error

        return translate_boto_error(_client_error(code, status, message, "PutObject" if op == "pipe_file" else op))

    return make


def _botocore_read_timeout(op: str) -> BaseException:
    from botocore.exceptions import ReadTimeoutError

    return ReadTimeoutError(endpoint_url=f"{ENDPOINT}/bucket/key")


def _aiohttp_disconnected(op: str) -> BaseException:
    import aiohttp

    return aiohttp.ServerDisconnectedError()


def _aiohttp_503(op: str) -> BaseException:
    import aiohttp
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    url = URL(f"{ENDPOINT}/bucket/key")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=503, message="Service Unavailable")


def _urllib3_protocol_error(op: str) -> BaseException:
    import urllib3

    return urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    )


def _requests_connection_error(op: str) -> BaseException:
    import requests

    return requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected())")


class HttpError(Exception):
    """Stand-in for ``gcsfs.retry.HttpError`` (gcsfs is not installed here): same name, ``code`` attribute."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AzureError(Exception):
    """Stand-in for ``azure.core.exceptions.AzureError`` (azure-core is not installed here)."""


class ServiceResponseError(AzureError):
    """Stand-in for ``azure.core.exceptions.ServiceResponseError``: the connection broke while reading the answer."""


class HttpResponseError(AzureError):
    """Stand-in for ``azure.core.exceptions.HttpResponseError``: an error answer, status in ``status_code``."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.reason = message


# name -> (factory(op) -> exception, what it stands for)
KINDS: dict[str, tuple[Callable[[str], BaseException], str]] = {
    "connection_reset": (
        lambda op: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        "builtin ConnectionResetError (ECONNRESET)",
    ),
    "timeout": (lambda op: TimeoutError("The read operation timed out"), "builtin TimeoutError"),
    "s3_slowdown_503": (
        _s3("SlowDown", 503, "Please reduce your request rate."),
        "s3fs: OSError(EBUSY) from ClientError SlowDown / 503",
    ),
    "s3_internal_500": (
        _s3("InternalError", 500, "We encountered an internal error. Please try again."),
        "s3fs: OSError(EREMOTEIO) from ClientError InternalError / 500",
    ),
    "s3_expired_token_403": (
        _s3("ExpiredToken", 403, "The provided token has expired."),
        "s3fs: PermissionError from ClientError ExpiredToken / 403",
    ),
    "botocore_read_timeout": (_botocore_read_timeout, "botocore ReadTimeoutError (an HTTPClientError)"),
    "aiohttp_server_disconnected": (_aiohttp_disconnected, "aiohttp ServerDisconnectedError"),
    "aiohttp_503": (_aiohttp_503, "aiohttp ClientResponseError status 503"),
    "http_remote_disconnected": (
        lambda op: http.client.RemoteDisconnected("Remote end closed connection without response"),
        "http.client.RemoteDisconnected",
    ),
    "incomplete_read": (lambda op: http.client.IncompleteRead(b"", 4096), "http.client.IncompleteRead"),
    "nfs_estale": (lambda op: OSError(errno.ESTALE, "Stale file handle"), "OSError(ESTALE)"),
    "ssl_bad_record_mac": (
        lambda op: ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac"),
        "ssl.SSLError",
    ),
    "dns_temporary_failure": (
        lambda op: socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        "socket.gaierror EAI_AGAIN",
    ),
    "requests_connection_error": (_requests_connection_error, "requests.exceptions.ConnectionError"),
    "urllib3_protocol_error": (_urllib3_protocol_error, "urllib3 ProtocolError (Connection aborted.), raw"),
    "gcsfs_http_503": (
        lambda op: HttpError(503, "Service Unavailable"),
        "gcsfs HttpError code 503 (stand-in class of the same name)",
    ),
    "azure_service_response": (
        lambda op: ServiceResponseError("Connection aborted: connection reset by peer"),
        "azure-core ServiceResponseError (stand-in class of the same name)",
    ),
    "azure_http_503": (
        lambda op: HttpResponseError("Operation returned an invalid status 'Server Busy'", 503),
        "azure-core HttpResponseError status_code 503 (stand-in class of the same name)",
    ),
    "session_closed": (
        lambda op: RuntimeError("Session is closed"),
        "RuntimeError('Session is closed') (aiohttp session torn down under a call)",
    ),
}
# What a remote store realistically raises and farm.faults classifies as an infrastructure fault (the default run).
DEFAULT_KINDS = (
    "connection_reset",
    "timeout",
    "s3_slowdown_503",
    "s3_internal_500",
    "s3_expired_token_403",
    "botocore_read_timeout",
    "aiohttp_server_disconnected",
    "http_remote_disconnected",
    "nfs_estale",
)

# Operations that change the store: a share of their faults happen after the change (a lost acknowledgement).
MUTATING = frozenset({"pipe_file", "mv", "rm_file", "rm", "makedirs", "mkdir", "touch", "cp_file", "put_file", "rmdir"})
WRAPPED = (
    "open",
    "cat_file",
    "cat",
    "pipe_file",
    "info",
    "exists",
    "isdir",
    "isfile",
    "ls",
    "find",
    "glob",
    "walk",
    "size",
    "mv",
    "cp_file",
    "put_file",
    "get_file",
    "rm_file",
    "rm",
    "rmdir",
    "makedirs",
    "mkdir",
    "touch",
    "modified",
    "created",
)


# ------------------------------------------------------------------ the injector (one per process)
class Injector:
    def __init__(self) -> None:
        self.role = os.environ.get(ENV_ROLE, "worker")
        self.lock = threading.Lock()
        self.local = threading.local()
        self.control: dict[str, Any] = {}
        self._control_mtime: float | None = None
        self.seen: Counter[tuple[str, str, str]] = Counter()  # (phase, op, path) -> calls so far
        self.counts: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._last_dump = 0.0

    # settings
    def settings(self) -> dict[str, Any]:
        path = os.environ.get(ENV_CONTROL)
        if not path:
            return {}
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return self.control
        if mtime != self._control_mtime:
            with open(path) as fh:
                self.control = json.load(fh)
            self._control_mtime = mtime
        return self.control

    @property
    def salt(self) -> str:
        """The driver's draws are reproducible; each worker process draws its own (salted with its pid): otherwise a
        row retried on another replica would meet exactly the faults that failed it on the first one."""
        return "" if self.role == "driver" else str(os.getpid())

    def _draws(self, cfg: dict[str, Any], op: str, path: str) -> tuple[int, list[float]]:
        phase = str(cfg.get("phase", ""))
        with self.lock:
            self.seen[(phase, op, path)] += 1
            n = self.seen[(phase, op, path)]
        root = str(cfg.get("root") or "")
        name = path[len(root) :] if root and path.startswith(root) else path  # the same draws in any tmp folder
        digest = hashlib.sha256(f"{cfg.get('seed', 0)}|{self.salt}|{phase}|{op}|{name}|{n}".encode()).digest()
        return n, [int.from_bytes(digest[i : i + 4], "little") / 2**32 for i in range(0, 20, 4)]

    def _bucket(self, phase: str) -> dict[str, Any]:
        return self.counts.setdefault(
            phase,
            {
                "calls": 0,
                "calls_by_op": Counter(),
                "stalls": 0,
                "stall_s": 0.0,
                "stalls_by_op": Counter(),
                "faults": Counter(),
                "faults_by_op": Counter(),
                "ack_lost": 0,
                "ack_lost_by_op": Counter(),
            },
        )

    def call(self, op: str, path: Any, mutating: bool, fn: Callable[[], Any]) -> Any:
        if getattr(self.local, "depth", 0) > 0:  # an inner call of an outer one already decided: no second draw
            return fn()
        self.local.depth = 1
        try:
            return self._outer(op, str(path), mutating, fn)
        finally:
            self.local.depth = 0

    def _outer(self, op: str, path: str, mutating: bool, fn: Callable[[], Any]) -> Any:
        cfg = self.settings()
        phase = str(cfg.get("phase", "none"))
        rate = float(cfg.get("rate", 0.0))
        _, (hit, stall_or_fail, which, ack, length) = self._draws(cfg, op, path)
        with self.lock:
            bucket = self._bucket(phase)
            bucket["calls"] += 1
            bucket["calls_by_op"][op] += 1
        if hit >= rate:
            self._maybe_dump(cfg)
            return fn()
        if stall_or_fail < float(cfg.get("stall_share", 0.5)):
            lo, hi = float(cfg.get("stall_min_s", 0.2)), float(cfg.get("stall_max_s", 2.0))
            seconds = lo + (hi - lo) * length
            with self.lock:
                bucket["stalls"] += 1
                bucket["stall_s"] += seconds
                bucket["stalls_by_op"][op] += 1
            self._dump(cfg)
            time.sleep(seconds)
            return fn()
        kinds = list(cfg.get("kinds") or DEFAULT_KINDS)
        kind = kinds[min(len(kinds) - 1, int(which * len(kinds)))]
        lost_ack = mutating and ack < float(cfg.get("ack_lost_share", 0.3))
        with self.lock:
            bucket["faults"][kind] += 1
            bucket["faults_by_op"][op] += 1
            if lost_ack:
                bucket["ack_lost"] += 1
                bucket["ack_lost_by_op"][op] += 1
        self._dump(cfg)
        if lost_ack:
            fn()  # the change lands; its answer is lost
        raise KINDS[kind][0](op)

    # counters
    def _maybe_dump(self, cfg: dict[str, Any]) -> None:
        if time.monotonic() - self._last_dump > 0.5:
            self._dump(cfg)

    def _dump(self, cfg: dict[str, Any] | None = None) -> None:
        folder = (cfg or self.control).get("counts_dir")
        if not folder:
            return
        with self.lock:
            self._last_dump = time.monotonic()
            payload = {"role": self.role, "pid": os.getpid(), "phases": json.loads(json.dumps(self.counts))}
        try:
            os.makedirs(folder, exist_ok=True)
            target = os.path.join(folder, f"{self.role}-{os.getpid()}.json")
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "w") as fh:
                json.dump(payload, fh)
            os.replace(tmp, target)
        except OSError:
            pass


INJECTOR: Injector | None = None


def _wrap(op: str, base: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        mutating = op in MUTATING  # not open(): a write lands at close(), so a fault at open() loses nothing
        injector = INJECTOR
        if injector is None:
            return base(self, path, *args, **kwargs)
        return injector.call(op, path, mutating, lambda: base(self, path, *args, **kwargs))

    method.__name__ = op
    method.__doc__ = f"``{op}`` with fault injection (see the module docstring)."
    return method


class FlakyFileSystem(LocalFileSystem):
    """``flaky:///abs/path`` -> ``/abs/path``, through the process's ``Injector`` (the name is not
    ``LocalFileSystem``, so pyarrow goes through fsspec here instead of its own local filesystem)."""

    protocol = PROTOCOL
    root_marker = "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def pipe_file(self, path: Any, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """All or nothing, as one PUT: a temp file beside it, then rename."""
        path = self._strip_protocol(path)
        if mode == "create" and os.path.exists(path):
            raise FileExistsError(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.flaky-tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(value)
        os.replace(tmp, path)


for _op in WRAPPED:
    setattr(FlakyFileSystem, _op, _wrap(_op, getattr(FlakyFileSystem, _op)))


def register(role: str | None = None) -> None:
    """Make ``flaky://`` known to fsspec in this process and start counting (Ray's worker_process_setup_hook calls
    this with no argument; the role then comes from ``$FLAKYFS_ROLE``)."""
    global INJECTOR
    if role is not None:
        os.environ[ENV_ROLE] = role
    if INJECTOR is None:
        INJECTOR = Injector()
        atexit.register(INJECTOR._dump)
    elif role is not None:
        INJECTOR.role = role
    fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)


def flush() -> None:
    """Write this process's counters now."""
    if INJECTOR is not None:
        INJECTOR._dump()


def read_counts(folder: str) -> list[dict[str, Any]]:
    """Every process's counters from ``folder``."""
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as fh:
                    out.append(json.load(fh))
            except (OSError, ValueError):
                continue
    return out
