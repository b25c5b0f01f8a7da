"""Whose fault is a storage error: the row's or the infrastructure's. One classifier, one bounded retry loop.

A row error is recorded and never retried, so only what is a property of the row may become one: the object is not
there (404, ``NoSuchKey``, a missing local file) or the bytes are not an image. Credentials that expired or are
refused (403, ``ExpiredToken``, ``AccessDenied``, ``InvalidAccessKeyId``), throttling (429, 503 ``SlowDown``), other
5xx answers, timeouts and broken connections are faults of the infrastructure: retried here with backoff and jitter,
then raised as ``InfraError`` (which the driver retries on another replica and never caches against the row).
"""

from __future__ import annotations

import errno
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from farm.records import InfraError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Fault(str, Enum):
    INFRA = "infra"  # the store, the network or the credentials: retry; never record against the row
    MISSING = "missing"  # the object is not there: a row error
    OTHER = "other"  # anything else (a bad argument, a conflict, a local permission): the caller's exception stands


MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"})
INFRA_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "403",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
)
# Transient exception classes of optional libraries, matched by name so that none of them has to be installed.
INFRA_CLASSES = frozenset(
    {
        "HTTPClientError",  # botocore: ReadTimeoutError, ConnectTimeoutError, EndpointConnectionError, ...
        "ConnectionError",  # botocore's own (EndpointConnectionError, ConnectTimeoutError), not the builtin
        "ConnectionClosedError",
        "NoCredentialsError",
        "CredentialRetrievalError",
        "ResponseParserError",
        "IncompleteRead",
        "ClientConnectionError",  # aiohttp: refused, reset, ServerDisconnected, ServerTimeoutError, ...
        "ClientPayloadError",
        "FSTimeoutError",  # fsspec
        "ProtocolError",  # urllib3: connection aborted mid-request
        "ServiceRequestError",  # azure-core: the request never reached the service
        "ServiceResponseError",  # azure-core: no (complete) answer
        "TransportError",  # google-auth / gcsfs transport failures
        "RetryError",  # google-api-core: its own retries ran out on a transient fault
    }
)
# Messages of transient states that libraries raise as plain RuntimeErrors.
INFRA_MESSAGES = ("session is closed", "connector is closed", "event loop is closed")
ROW_ERRNOS = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP})


def handling() -> BaseException | None:
    """The exception being handled where an operation starts (``sys.exc_info``): not evidence about that operation.
    Python chains it to whatever the operation raises (``__context__``), e.g. a listing that finds nothing while the
    caller's ``finally`` handles an earlier AccessDenied; ``classify`` must not read that 403 as this call's."""
    return sys.exc_info()[1]


def _chain(exc: BaseException, outer: BaseException | None = None) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it, each once: ``__cause__`` / ``__context__``, and exceptions carried in its
    arguments (urllib3's ``ProtocolError('Connection aborted.', ConnectionResetError(...))``); never ``outer`` (see
    ``handling``) or what is behind it."""
    seen: set[int] = {id(e) for e in _chain(outer)} if outer is not None else set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 16:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        todo.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))


def http_status(exc: BaseException) -> tuple[str, int | None]:
    """The error code and HTTP status an exception carries (botocore ``ClientError``, aiohttp responses)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(response.get("Error", {}).get("Code", "")), status if isinstance(status, int) else None
    for name in ("status", "status_code", "code"):  # aiohttp; azure-core; gcsfs HttpError, urllib's HTTPError
        status = getattr(exc, name, None)
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status < 600:
            return "", status
    return "", None


def classify(exc: BaseException, *, local: bool = False, outer: BaseException | None = None) -> Fault:
    """Whether ``exc`` (raised while talking to a store, or reading a local file when ``local``) is the
    infrastructure's fault, a missing object, or something else. The one place that decides this. ``outer``: the
    exception that was being handled when the failed operation started (``handling()``), left out of the evidence."""
    for inner in _chain(exc, outer):  # an answer of the store is the most specific evidence
        code, status = http_status(inner)
        if code in MISSING_CODES or status in (404, 410):
            return Fault.MISSING
        if code in INFRA_CODES or status in (401, 403, 408, 429) or (status is not None and status >= 500):
            return Fault.INFRA
    for inner in _chain(exc, outer):  # before "missing": fsspec's http info reports a timeout as FileNotFoundError
        if isinstance(inner, InfraError | TimeoutError | ConnectionError):
            return Fault.INFRA
        if any(cls.__name__ in INFRA_CLASSES for cls in type(inner).__mro__):
            return Fault.INFRA
        if isinstance(inner, RuntimeError) and any(m in str(inner).lower() for m in INFRA_MESSAGES):
            return Fault.INFRA
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return Fault.MISSING
    if isinstance(exc, PermissionError):
        # a remote 403 arrives as PermissionError (s3fs translates AccessDenied/ExpiredToken); locally it is the file
        return Fault.OTHER if local else Fault.INFRA
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno not in ROW_ERRNOS:
        return Fault.INFRA  # EIO, ESTALE, a store's own I/O error (an OSError without errno: a parser's, e.g. Arrow's)
    return Fault.OTHER


def describe(exc: BaseException, outer: BaseException | None = None) -> str:
    """``Type: message (code, HTTP status)``: the underlying reason, for messages and logs."""
    code, status = next(((c, s) for c, s in map(http_status, _chain(exc, outer)) if c or s), ("", None))
    extra = ", ".join(str(x) for x in (code, status) if x)
    return f"{type(exc).__name__}: {exc}" + (f" ({extra})" if extra and str(extra) not in str(exc) else "")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of infrastructure faults: ``attempts`` tries, full-jitter exponential backoff between them."""

    attempts: int = 3
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed try ``attempt`` (1-based): uniform in [0, min(max, base * 2**(attempt-1))]."""
        return rand() * min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def with_retries(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    local: bool = False,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """``fn()``, retried while it fails with an infrastructure fault; then ``InfraError`` naming ``what`` and the
    underlying error. Missing objects and other errors are raised unchanged at once."""
    outer = handling()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below; non-infra faults are re-raised as they are
            if classify(exc, local=local, outer=outer) is not Fault.INFRA:
                raise
            if attempt >= policy.attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise InfraError(f"{what} failed{tries}: {describe(exc, outer)}") from exc
            wait = policy.delay(attempt)
            log.warning("%s failed (attempt %d/%d, retrying in %.2f s): %s", what, attempt, policy.attempts, wait, exc)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - attempts >= 1
