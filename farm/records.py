"""The one result record per input row, and the stable error codes it may carry.

Bad input is data: it becomes a record with ``status="failed"`` and an ``error_code``; only infrastructure faults
raise.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class ErrorCode(str, Enum):
    """Stable, machine-readable reasons a row did not produce a video."""

    # manifest / input validation (deterministic, never retried)
    BAD_ID = "bad_id"
    DUPLICATE_ID = "duplicate_id"
    EMPTY_PROMPT = "empty_prompt"
    BAD_PARAM = "bad_param"
    MISSING_PORTRAIT = "missing_portrait"
    PORTRAIT_UNREADABLE = "portrait_unreadable"
    RIGHTS_NOT_CONFIRMED = "rights_not_confirmed"
    # portrait checks (deterministic)
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    FACE_TOO_SMALL = "face_too_small"
    # generation / output
    SAFETY_BLOCKED = "safety_blocked"
    GENERATION_ERROR = "generation_error"
    VIDEO_UNREADABLE = "video_unreadable"
    # infrastructure (retried, then recorded)
    POISON = "poison"
    TIMEOUT = "timeout"
    INFRA = "infra_error"


class RowError(Exception):
    """A deterministic, per-row failure: recorded as ``failed`` with ``code``, never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class InfraError(Exception):
    """A fault of the machine or the network, not of the row (e.g. out of memory, a storage timeout): retried."""
