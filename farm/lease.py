"""One writer per output: a run holds a renewed lease on its output, so a second concurrent run refuses to start.

Without it, two ``farm run``s into one output both do all the work (and both write a record for every id). The lease
is one small JSON object, ``<out>/_lease.json`` (``OutputLayout.lease``)::

    {"run_id", "host", "pid", "acquired_at", "renewed_at", "expires_at", "ttl_s", "token"}

Times are Unix seconds. The holder renews it every ``renew_every_s``, pushing ``expires_at`` to ``now + ttl_s``; a lease
whose ``expires_at`` has passed is stale (its run died or hung) and the next run takes it over. A lease whose holder
ran on this host and whose process is gone (a killed driver, rerun on the same machine) is stale at once.

How each change is made atomic (compare-and-swap on the whole object, the ``token`` says whose it is):

- **Local paths**: every change happens under an exclusive ``flock`` on ``_lease.json.lock`` beside it; creating uses
  ``os.link`` of a complete temp file (fails if the lease exists, even where ``flock`` does not lock), replacing uses a
  temp file + ``os.replace``, so readers see a whole lease or none. On a network filesystem, takeover and renewal are
  only as safe as its ``flock`` (NFSv4 locks are; a mount with ``nolock``/``local_lock`` is not across hosts).
- **S3** (s3fs): conditional writes. Create is ``PutObject If-None-Match: *``, renew/takeover ``PutObject If-Match:
  <etag>``, release ``DeleteObject If-Match: <etag>``; the loser gets 412 and re-reads. Every write is read back, so a
  store that silently ignores the condition headers is caught when the writes do not overlap too closely; for such
  S3-compatible stores pass ``conditional_writes=False``. A store that answers ``NotImplemented`` falls back by itself.
- **Other fsspec stores** (and ``conditional_writes=False``): check, write, wait ``settle_s``, read back. Residual race:
  a writer whose PUT lands after a rival's read-back (it stalled longer than ``settle_s`` between its check and its
  PUT) makes both believe they won; the next ``renew()`` of the overwritten one raises ``LeaseLost``, so both work
  for at most one ``renew_every_s``.

Clock: a lease is judged stale by the *reader's* wall clock against the *holder's* ``expires_at``. Clock skew between
hosts shortens or lengthens the lease by the skew, so ``ttl_s`` must be much larger than any skew (NTP keeps it well
under a second; the default ttl is 120 s). A takeover caused by skew or a long pause is still detected: the old
holder's next renew fails its compare-and-swap and raises ``LeaseLost``.

A lease is not a fence: a writer paused between ``check()`` and its write can still write once after losing it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from farm.faults import with_retries
from farm.storage import OutputLayout, get_fs, is_local

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: os.link still makes create exclusive; renew/takeover are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 120.0
DEFAULT_RENEW_EVERY_S = 30.0
DEFAULT_SETTLE_S = 1.0
_FIELDS = ("run_id", "host", "pid", "acquired_at", "renewed_at", "expires_at", "ttl_s", "token")


class LeaseError(Exception):
    """The output lease could not be taken, kept or read."""


class LeaseHeld(LeaseError):
    """Another live run holds the output: ``holder`` is its lease record."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(LeaseError):
    """This run no longer holds the output (taken over, or not renewable in time): stop committing results."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class _Conflict(Exception):
    """The lease changed under a compare-and-swap (or exists, for a create)."""


class _Unsupported(Exception):
    """The store refused a conditional request as not implemented."""


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _holder_died_here(holder: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone (a killed driver): no need to wait for expiry."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but not ours to signal
        return False
    return False


def holds_lease(holder: dict[str, Any] | None, run_id: str, now: float) -> bool:
    """Whether run ``run_id`` holds the output, judged from the lease read (``holder``): it is the holder, the lease
    has not expired, and its process is not known to be gone (same host)."""
    if not holder or holder.get("run_id") != run_id:
        return False
    expires = holder.get("expires_at")
    if isinstance(expires, (int, float)) and expires < now:
        return False
    return not _holder_died_here(holder)


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """``run R on host H (pid P), lease expires <iso> (in N s)`` for messages and ``farm status``."""
    expires = record.get("expires_at")
    when = "at an unknown time"
    if isinstance(expires, (int, float)):
        when = _iso(expires)
        if now is not None:
            left = expires - now
            when += f" (in {left:.0f} s)" if left >= 0 else f" ({-left:.0f} s ago)"
    return (
        f"run {record.get('run_id', '?')!s} on host {record.get('host', '?')!s} (pid {record.get('pid', '?')!s}), "
        f"lease expires {when}"
    )


# --------------------------------------------------------------------------------------------------------- stores
# A store reads the lease as (bytes, version) and changes it only if the version is still the one read.


class _LocalStore:
    """A local (or mounted network) path: flock-serialized read-check-write, os.link create, os.replace update."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _temp(self, data: bytes) -> str:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> Any:
        with self._locked():
            tmp = self._temp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise _Conflict() from None
            except OSError as exc:  # a filesystem without hard links: the flock alone serializes creators
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.exists(self.path):
                    raise _Conflict() from None
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return data

    def replace(self, data: bytes, version: Any) -> Any:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict()
            os.replace(self._temp(data), self.path)
        return data

    def delete(self, version: Any) -> None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                raise _Conflict()
            os.unlink(self.path)


class _VerifyStore:
    """Any fsspec store, no conditional writes: check, write, wait ``settle_s``, read back (see module docstring)."""

    def __init__(self, fs: Any, path: str, settle_s: float) -> None:
        self.fs = fs
        self.path = path
        self.settle_s = settle_s

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _verified(self, data: bytes) -> Any:
        """The version of the lease if it is ``data`` now, else ``_Conflict`` (someone wrote after us)."""
        current = self.read()
        if current is None or current[0] != data:
            raise _Conflict()
        return current[1]

    def _expect(self, version: Any) -> None:
        current = self.read()
        if current is None or current[1] != version:
            raise _Conflict()

    def _write_verified(self, data: bytes) -> Any:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.settle_s)
        return self._verified(data)

    def create(self, data: bytes) -> Any:
        if self.read() is not None:
            raise _Conflict()
        return self._write_verified(data)

    def replace(self, data: bytes, version: Any) -> Any:
        self._expect(version)
        return self._write_verified(data)

    def delete(self, version: Any) -> None:
        self._expect(version)
        self.fs.rm_file(self.path)


def _s3_code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs-translated exception ('' when there is none)."""
    response = getattr(exc.__cause__, "response", None) or getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class _S3Store(_VerifyStore):
    """S3 via s3fs: versions are ETags; create/replace/delete carry If-None-Match / If-Match.

    A store that answers ``NotImplemented`` to a condition makes this store fall back to write-then-verify (the
    parent class, still with ETag versions) for the rest of the run.
    """

    def __init__(self, fs: Any, path: str, settle_s: float) -> None:
        super().__init__(fs, path, settle_s)
        self.bucket, self.key, _ = fs.split_path(path)
        self.conditional = True

    def read(self) -> tuple[bytes, Any] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, Any]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _call(self, method: str, **kwargs: Any) -> None:
        try:
            self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except (FileExistsError, FileNotFoundError):  # 412 on If-None-Match; 404: the object is gone
            raise _Conflict() from None
        except OSError as exc:
            code = _s3_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise _Conflict() from None
            if code == "NotImplemented":
                raise _Unsupported() from exc
            raise

    def _unsupported(self, what: str) -> None:
        self.conditional = False
        log.warning(
            "s3://%s/%s: the store does not implement conditional %s; the output lease falls back to "
            "write-then-verify (see farm.lease)",
            self.bucket,
            self.key,
            what,
        )

    def create(self, data: bytes) -> Any:
        if self.conditional:
            try:
                self._call("put_object", Body=data, IfNoneMatch="*")
                return self._verified(data)
            except _Unsupported:
                self._unsupported("writes")
        return super().create(data)

    def replace(self, data: bytes, version: Any) -> Any:
        if self.conditional:
            try:
                self._call("put_object", Body=data, IfMatch=version)
                return self._verified(data)
            except _Unsupported:
                self._unsupported("writes")
        return super().replace(data, version)

    def delete(self, version: Any) -> None:
        if self.conditional:
            try:
                self._call("delete_object", IfMatch=version)
                return
            except _Unsupported:  # conditional PUT but not DELETE: read-check-delete for this one call
                pass
        super().delete(version)


class _Retrying:
    """A store whose calls retry storage faults (``farm.faults``: throttling, 5xx, timeouts, expired tokens) before
    they count; a conflict is an answer, not a fault, and passes at once. A lost acknowledgement of a conditional
    write shows up as a conflict on the retry, and the caller re-reads and finds its own token."""

    def __init__(self, store: Any, uri: str) -> None:
        self._inner, self._uri = store, uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in ("read", "create", "replace", "delete"):
            return method
        return lambda *args: with_retries(lambda: method(*args), f"lease {name} of {self._uri}")


def _store_for(
    uri: str, storage_options: dict[str, Any] | None, conditional_writes: bool | None, settle_s: float
) -> _LocalStore | _S3Store | _VerifyStore:
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        return _LocalStore(path)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "s3" in protocols and hasattr(fs, "call_s3") and conditional_writes is not False:
        return _S3Store(fs, path, settle_s)
    return _VerifyStore(fs, path, settle_s)


# ---------------------------------------------------------------------------------------------------------- lease


class OutputLease:
    """The lease of one run on one output: ``acquire()`` once, keep it renewed, ``check()`` before each commit.

    ``clock`` (Unix seconds) is injectable for tests; ``settle_s`` is the read-back delay of stores without
    conditional writes; ``conditional_writes=None`` uses them where the store has them (S3), ``False`` never.
    ``on_lost`` is called (from the renewal thread) with the ``LeaseLost`` when a renewal finds the lease taken.
    """

    def __init__(
        self,
        output: OutputLayout | str,
        storage_options: dict[str, Any] | None = None,
        run_id: str | None = None,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        renew_every_s: float = DEFAULT_RENEW_EVERY_S,
        clock: Callable[[], float] = time.time,
        settle_s: float = DEFAULT_SETTLE_S,
        conditional_writes: bool | None = None,
        on_lost: Callable[[LeaseLost], None] | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s={ttl_s!r}: must be > 0 seconds (default {DEFAULT_TTL_S:g})")
        if not 0 < renew_every_s < ttl_s:
            raise ValueError(
                f"lease renew_every_s={renew_every_s!r} with ttl_s={ttl_s!r}: renew_every_s must be > 0 "
                f"and less than ttl_s (about ttl_s / 4) so the lease is renewed before it expires"
            )
        if isinstance(output, OutputLayout):
            storage_options = output.storage_options if storage_options is None else storage_options
            self.layout = OutputLayout(output.root, storage_options)
        else:
            self.layout = OutputLayout(output, storage_options)
        self.uri = self.layout.lease
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.ttl_s = float(ttl_s)
        self.renew_every_s = float(renew_every_s)
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.on_lost = on_lost
        self._clock = clock
        store = _store_for(self.uri, self.layout.storage_options, conditional_writes, settle_s)
        self._store = _Retrying(store, self.uri)
        self._mutex = threading.RLock()
        self._record: dict[str, Any] | None = None
        self._lost: LeaseLost | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    @property
    def held(self) -> bool:
        """True between a successful ``acquire()`` and ``release()``/a detected loss."""
        return self._record is not None and self._lost is None

    @property
    def lost(self) -> LeaseLost | None:
        """The ``LeaseLost`` a renewal recorded, or None while the lease is (as far as we know) ours."""
        return self._lost

    @property
    def expires_at(self) -> float | None:
        return None if self._record is None else self._record["expires_at"]

    def read(self) -> dict[str, Any] | None:
        """The lease on the output now (anyone's), or None."""
        current = self._read()
        return None if current is None else current[0]

    # ------------------------------------------------------------------ operations

    def acquire(self) -> OutputLease:
        """Take the output: create the lease, or take over a stale one. ``LeaseHeld`` if another live run has it."""
        with self._mutex:
            for _ in range(5):
                now = self._clock()
                current = self._read()
                if current is not None and current[0].get("token") == self.token:
                    self._lost = None
                    self._renew_locked(current)
                    return self
                record = self._new_record(now)
                data = self._encode(record)
                try:
                    if current is None:
                        self._store.create(data)
                    elif current[0]["expires_at"] <= now or _holder_died_here(current[0]):
                        log.warning(
                            "taking over the stale lease on %s: %s", self.layout.root, describe_holder(current[0], now)
                        )
                        self._store.replace(data, current[1])
                    else:
                        raise LeaseHeld(self._held_message(current[0], now), current[0])
                except _Conflict:
                    continue  # someone changed it meanwhile (or our own write was retried): read it again
                self._record, self._lost = record, None
                return self
            current = self._read()
            if current is not None and current[0].get("token") == self.token:  # our write won after all
                self._record, self._lost = current[0], None
                return self
            holder = current[0] if current is not None else {}
            raise LeaseHeld(self._held_message(holder, self._clock()) + " (it kept changing while we tried)", holder)

    def renew(self) -> None:
        """Push ``expires_at`` to now + ttl_s. ``LeaseLost`` if the lease is no longer ours (it then stays lost)."""
        with self._mutex:
            if self._lost is not None:
                raise self._lost
            if self._record is None:
                raise LeaseError(f"renew() of the lease on {self.layout.root} before acquire(): call acquire() first")
            self._renew_locked(self._read())

    def check(self) -> None:
        """Call before committing results: raises ``LeaseLost`` if the lease is lost or cannot be shown to be ours.

        Cheap while the renewal thread keeps up; when less than a quarter of the ttl is left it renews right here,
        and if that fails on storage errors, raises ``LeaseLost`` (not recorded: a later renewal may still succeed).
        """
        if self._lost is not None:
            raise self._lost
        if self._record is None:
            raise LeaseError(f"check() of the lease on {self.layout.root} before acquire(): call acquire() first")
        if self._clock() < self._record["expires_at"] - self.ttl_s / 4:
            return
        try:
            self.renew()
        except LeaseLost:
            raise
        except (OSError, LeaseError) as exc:
            raise LeaseLost(
                f"the lease on {self.layout.root} is about to expire or has expired "
                f"({_iso(self._record['expires_at'])}) and could not be renewed: {type(exc).__name__}: "
                f"{exc}. Do not commit results until a renewal succeeds; if the storage stays "
                f"unreachable another run may take the output over"
            ) from exc

    def release(self) -> bool:
        """Stop renewing and delete the lease if it is still ours; True if it was deleted."""
        self.stop()
        with self._mutex:
            if self._record is None:
                return False
            try:
                for _ in range(3):
                    current = self._read()
                    if current is None or current[0].get("token") != self.token:
                        return False
                    try:
                        self._store.delete(current[1])
                        return True
                    except _Conflict:
                        continue
                return False
            finally:
                self._record = None

    # ------------------------------------------------------------------ renewal thread

    def start_renewing(self) -> None:
        """Renew every ``renew_every_s`` on a daemon thread until ``stop()``/``release()`` or a loss."""
        if self._record is None:
            raise LeaseError(f"start_renewing() on {self.layout.root} before acquire(): call acquire() first")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="farm-lease-renew", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the renewal thread (the lease stays on the output until it expires or ``release()``)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _renew_loop(self) -> None:
        wait = self.renew_every_s
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.renew_every_s
            except LeaseLost as lost:
                log.error("%s", lost)
                if self.on_lost is not None:
                    self.on_lost(lost)
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: retry sooner; check() guards commits meanwhile
                log.warning(
                    "renewing the lease on %s failed (retrying): %s: %s", self.layout.root, type(exc).__name__, exc
                )
                wait = self.renew_every_s / 4

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - do not hide the error that ended the run; the lease then just expires
            if exc is None:
                raise
            log.exception("releasing the lease on %s failed; it expires by itself", self.layout.root)

    # ------------------------------------------------------------------ internals

    def _new_record(self, now: float) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": round(now, 3),
            "renewed_at": round(now, 3),
            "expires_at": round(now + self.ttl_s, 3),
            "ttl_s": self.ttl_s,
            "token": self.token,
        }

    @staticmethod
    def _encode(record: dict[str, Any]) -> bytes:
        return json.dumps(record, indent=2, sort_keys=True).encode()

    def _read(self) -> tuple[dict[str, Any], Any] | None:
        """The current lease and its version; a lease that is not valid JSON is re-read briefly, then refused."""
        for attempt in range(3):
            current = self._store.read()
            if current is None:
                return None
            data, version = current
            try:
                record = json.loads(data)
                if (
                    isinstance(record, dict)
                    and all(key in record for key in _FIELDS)
                    and isinstance(record["expires_at"], (int, float))
                ):
                    return record, version
            except ValueError:
                pass
            if attempt < 2:
                time.sleep(0.05)
        raise LeaseError(
            f"{self.uri} is not a lease this farm wrote (fields {list(_FIELDS)} in JSON expected, "
            f"got {data[:200]!r}). If no run is writing to {self.layout.root}, delete that file"
        )

    def _renew_locked(self, current: tuple[dict[str, Any], Any] | None) -> None:
        for _ in range(3):
            if current is None or current[0].get("token") != self.token:
                raise self._lose(current[0] if current is not None else None)
            now = self._clock()
            record = dict(current[0], renewed_at=round(now, 3), expires_at=round(now + self.ttl_s, 3), ttl_s=self.ttl_s)
            data = self._encode(record)
            try:
                self._store.replace(data, current[1])
                self._record = record
                return
            except _Conflict:
                current = self._read()  # taken over (lost), or still ours: our retried write landed, or try again
                if current is not None and current[0] == record:
                    self._record = record
                    return
        raise LeaseError(f"renewing the lease on {self.layout.root}: it kept changing while still ours; retrying")

    def _lose(self, holder: dict[str, Any] | None) -> LeaseLost:
        """Record the loss (it is final: the driver must stop committing) and return it for raising."""
        now = self._clock()
        who = f"it now belongs to {describe_holder(holder, now)}" if holder else "it was deleted"
        self._lost = LeaseLost(
            f"lost the lease on output {self.layout.root} (run {self.run_id} on host {self.host}): {who}. Stop "
            f"committing results to it. This happens when a run is not renewed within ttl_s={self.ttl_s:g} s (paused, "
            f"or the storage was unreachable) and another run took the output over; raise the ttl if such pauses are "
            f"expected",
            holder,
        )
        return self._lost

    def _held_message(self, holder: dict[str, Any], now: float) -> str:
        expires = holder.get("expires_at")
        after = _iso(expires) if isinstance(expires, (int, float)) else "its expiry"
        return (
            f"output {self.layout.root} is in use: {describe_holder(holder, now)}. Two runs writing one output "
            f"would both do all the work. Wait for that run to finish, or stop it; if it died, the next run after "
            f"{after} takes the output over automatically (lease file: {self.uri})"
        )
