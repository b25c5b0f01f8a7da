"""What a secret looks like, in one place: specs are redacted before they are written, and secret values are scrubbed
out of free text (log lines, error messages) before it leaves the process.

Rules (README "Credentials"):

- A key that names a credential, anywhere in a spec, has its value replaced by ``***``: any word of the key (split at
  ``_``, ``-``, ``.`` and camelCase, case-insensitive) is one of ``CREDENTIAL_WORDS``, or the whole key is one of
  ``CREDENTIAL_KEYS`` (``AWS_SECRET_ACCESS_KEY``, ``apiKey``, ``x-api-key``, ``Authorization``, ``sessionToken`` ...).
- Under ``storage_options`` (the job's, ``model.options.storage_options``, any depth, flat or per protocol) every
  value is hidden unless its key is in ``VISIBLE_OPTIONS`` (endpoint, region, timeouts, flags: settings, not
  credentials). Nested mappings (``s3``, ``https``, ``client_kwargs``, ``config_kwargs``, ``headers``) stay visible as
  structure and are redacted by the same rules.
- Everywhere, the password of a URL's userinfo is removed: ``https://user:pass@host`` -> ``https://user:***@host``.
- Every value hidden by these rules that is at least ``MIN_SCRUB_LEN`` characters long is remembered for the life of
  the process; ``scrub`` replaces it (and its URL-encoded form) in any text, and ``install_log_filter`` applies
  ``scrub`` to every record of the ``farm`` loggers.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
MIN_SCRUB_LEN = 6  # shorter hidden values are redacted where they are set, but not searched for in free text
OPTIONS_KEY = "storage_options"

CREDENTIAL_WORDS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "session",
        "private",
        "cookie",
        "bearer",
        "sas",
    }
)
CREDENTIAL_KEYS = frozenset(
    {
        "apikey",
        "accesskey",
        "secretkey",
        "privatekey",
        "keyfile",
        "sessiontoken",
        "authtoken",
        "connectionstring",
        "connstr",
    }
)
VISIBLE_OPTIONS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "region",
        "anon",
        "use_ssl",
        "verify",
        "requester_pays",
        "version_aware",
        "profile",
        "project",
        "account_name",
        "signature_version",
        "addressing_style",
        "default_block_size",
        "default_cache_type",
        "default_fill_cache",
        "block_size",
        "cache_regions",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_concurrency",
        "timeout",
        "connect_timeout",
        "read_timeout",
        "retries",
        "max_attempts",
        "mode",
    }
)

_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<password>[^/\s@]+)@")


def is_credential_key(key: Any) -> bool:
    """``key``, ``aws_secret_access_key``, ``apiKey``, ``X-Auth-Token``, ``client_secret`` (not ``client_kwargs``)."""
    if not isinstance(key, str):
        return False
    words = [w.lower() for w in _WORDS.findall(key)]
    return bool(CREDENTIAL_WORDS.intersection(words)) or re.sub(r"[\W_]", "", key.lower()) in CREDENTIAL_KEYS


def strip_userinfo(text: str, found: set[str] | None = None) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (a user alone stays: ``sftp://user@host``)."""

    def hide(match: re.Match[str]) -> str:
        if found is not None:
            found.add(urllib.parse.unquote(match["password"]))
            found.add(match["password"])
        return f"{match['head']}:{REDACTED}@"

    return _USERINFO.sub(hide, text)


def redact(value: Any, found: set[str] | None = None, in_options: bool = False) -> Any:
    """A JSON-like copy of ``value`` with credentials hidden (the module's rules); hidden strings go to ``found``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            hide = is_credential_key(key) or (in_options and not isinstance(item, dict) and key not in VISIBLE_OPTIONS)
            if hide and item not in (None, ""):
                _collect(item, found)
                out[key] = REDACTED
            else:
                out[key] = redact(item, found, in_options or key == OPTIONS_KEY)
        return out
    if isinstance(value, (list, tuple)):
        return [redact(item, found, in_options) for item in value]
    if isinstance(value, str):
        return strip_userinfo(value, found)
    return value


def _collect(value: Any, found: set[str] | None) -> None:
    """Every string inside a hidden value (a hidden mapping or list hides all of its strings)."""
    if found is None:
        return
    if isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, found)
    elif isinstance(value, (str, bytes)):
        found.add(value.decode(errors="replace") if isinstance(value, bytes) else value)


class Scrubber:
    """Replaces known secret values (and URL passwords) in text; ``remember`` adds the values a spec hides."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        fresh = {v for v in values if isinstance(v, str) and len(v) >= MIN_SCRUB_LEN}
        fresh |= {urllib.parse.quote(v, safe="") for v in fresh} | {urllib.parse.quote_plus(v) for v in fresh}
        with self._lock:
            if fresh <= self._values:
                return
            self._values |= fresh
            alternatives = sorted(self._values, key=len, reverse=True)  # longest first: no partial leftovers
            self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))

    def remember(self, spec: Any) -> None:
        found: set[str] = set()
        redact(spec, found)
        self.add(found)

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        return strip_userinfo(text)


_PROCESS = Scrubber()


def remember(spec: Any) -> None:
    """Remember, for this process, every value ``redact`` hides in ``spec`` (a job spec, a ``storage_options``)."""
    _PROCESS.remember(spec)


def scrub(text: str) -> str:
    """``text`` without any secret value this process was told about, and without URL passwords."""
    return _PROCESS.scrub(text)


def redact_spec(spec: Any) -> Any:
    """``redact`` plus ``scrub`` of every remaining string: what may be written next to the results."""
    return _scrub_strings(redact(spec))


def _scrub_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_strings(v) for v in value]
    return scrub(value) if isinstance(value, str) else value


class ScrubFilter(logging.Filter):
    """Scrubs a log record's message and traceback text (it never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: leave it to the handler to report
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


_FILTER = ScrubFilter()


def install_log_filter(root: str = "farm") -> None:
    """Scrub every record of ``root`` and of the ``root.*`` loggers that exist now (filters do not inherit)."""
    names = [root] + [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(f"{root}.")]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


__all__ = [
    "REDACTED",
    "ScrubFilter",
    "Scrubber",
    "install_log_filter",
    "is_credential_key",
    "redact",
    "redact_spec",
    "remember",
    "scrub",
    "strip_userinfo",
]
