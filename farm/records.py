"""The one result record per input row (``Record``), and the stable error codes it may carry.

Bad input is data: it becomes a record with ``status="failed"`` and an ``error_code``; only infrastructure faults
raise. ``Record`` is the single declaration of the result columns: the Arrow schema (``farm.results``) and the JSON
Schema users read (``schemas/result.schema.json``) are derived from its fields, and setting a name that is not a
column is an error, never a silent null column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import pyarrow as pa


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


def status_for(code: ErrorCode) -> Status:
    """What a row that cannot be made is recorded as: ``skipped`` for a row the manifest withholds (no confirmed
    rights), ``failed`` for everything else."""
    return Status.SKIPPED if code is ErrorCode.RIGHTS_NOT_CONFIRMED else Status.FAILED


class RowError(Exception):
    """A deterministic, per-row failure: recorded as ``failed`` with ``code``, never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class InfraError(Exception):
    """A fault of the machine or the network, not of the row (e.g. out of memory, a storage timeout): retried."""


CORE, IDENTITY, METRICS = "core", "identity", "metrics"  # METRICS: the plug-ins of ``farm.metrics``


def _column(arrow: pa.DataType, group: str = CORE, required: bool = False) -> Any:
    return field(default=None, metadata={"arrow": arrow, "group": group, "required": required})


@dataclass
class Record:
    """One committed result row: what was asked, what came out, how it was made (provenance), and its metrics.

    ``carried`` holds the manifest's own extra columns under their result names (``farm.results.carried_name``).
    Fingerprints (README "Resume"): ``request_fingerprint`` covers every input that ``farm run`` resolves before any
    GPU time (``model_config``, sampling parameters, seed, prompt, negative prompt, portrait URI); ``video_fingerprint``
    adds the portrait's content digest and the loaded weights' ``model_fingerprint``; ``metrics_fingerprint`` covers
    ``metrics_config`` and the recognizer's weights.
    """

    id: str | None = _column(pa.string(), required=True)
    row_id: str | None = _column(pa.string())  # the manifest row's id (a sweep files each config under id__config)
    config_id: str | None = _column(pa.string())  # the sweep configuration (farm.sweep), null without a sweep
    status: str | None = _column(pa.string(), required=True)
    error_code: str | None = _column(pa.string())
    error_message: str | None = _column(pa.string())
    video: str | None = _column(pa.string())
    portrait: str | None = _column(pa.string())
    prompt: str | None = _column(pa.string())
    negative_prompt: str | None = _column(pa.string())
    num_frames: int | None = _column(pa.int32())
    height: int | None = _column(pa.int32())
    width: int | None = _column(pa.int32())
    num_inference_steps: int | None = _column(pa.int32())
    guidance_scale: float | None = _column(pa.float64())
    guidance_scale_i: float | None = _column(pa.float64())
    ip_scale: float | None = _column(pa.float64())
    ref_scale: float | None = _column(pa.float64())
    fps: int | None = _column(pa.int32())
    seed: int | None = _column(pa.int64())
    rights_confirmed: bool | None = _column(pa.bool_())
    model: str | None = _column(pa.string())
    queue_s: float | None = _column(pa.float64())
    prepare_s: float | None = _column(pa.float64())
    generate_s: float | None = _column(pa.float64())
    encode_s: float | None = _column(pa.float64())
    score_s: float | None = _column(pa.float64())
    total_s: float | None = _column(pa.float64())
    replica: str | None = _column(pa.string())
    node: str | None = _column(pa.string())
    gpu_ids: str | None = _column(pa.string())
    attempts: int | None = _column(pa.int32())
    committed_at: Any = _column(pa.timestamp("ms", tz="UTC"))
    run_seq: int | None = _column(pa.int64())
    run_id: str | None = _column(pa.string())
    model_config: str | None = _column(pa.string())
    model_fingerprint: str | None = _column(pa.string())
    portrait_sha256: str | None = _column(pa.string())
    portrait_stamp: str | None = _column(pa.string())
    request_fingerprint: str | None = _column(pa.string())
    video_fingerprint: str | None = _column(pa.string())
    metrics_config: str | None = _column(pa.string())
    metrics_fingerprint: str | None = _column(pa.string())
    identity_mean: float | None = _column(pa.float64(), IDENTITY)
    identity_min: float | None = _column(pa.float64(), IDENTITY)
    identity_max: float | None = _column(pa.float64(), IDENTITY)
    identity_std: float | None = _column(pa.float64(), IDENTITY)
    identity_distance_mean: float | None = _column(pa.float64(), IDENTITY)
    identity_distance_min: float | None = _column(pa.float64(), IDENTITY)
    identity_distance_max: float | None = _column(pa.float64(), IDENTITY)
    face_frames: int | None = _column(pa.int32(), IDENTITY)
    frames_scored: int | None = _column(pa.int32(), IDENTITY)
    face_rate: float | None = _column(pa.float64(), IDENTITY)
    identity_model: str | None = _column(pa.string(), IDENTITY)
    identity_temporal_mean: float | None = _column(pa.float64(), METRICS)
    identity_temporal_min: float | None = _column(pa.float64(), METRICS)
    identity_facexlib_mean: float | None = _column(pa.float64(), METRICS)
    identity_facexlib_min: float | None = _column(pa.float64(), METRICS)
    identity_facexlib_frames: int | None = _column(pa.int32(), METRICS)
    identity_facexlib_model: str | None = _column(pa.string(), METRICS)
    motion_mean: float | None = _column(pa.float64(), METRICS)
    motion_static: bool | None = _column(pa.bool_(), METRICS)
    motion_pairs: int | None = _column(pa.int32(), METRICS)
    motion_model: str | None = _column(pa.string(), METRICS)
    clip_score: float | None = _column(pa.float64(), METRICS)
    clip_model: str | None = _column(pa.string(), METRICS)
    carried: dict[str, Any] = field(default_factory=dict)

    def set(self, **values: Any) -> Record:
        """Set result columns by name; a name that is not a column raises ``KeyError`` (a typo is never a column)."""
        unknown = sorted(set(values) - COLUMN_NAMES)
        if unknown:
            raise KeyError(f"{unknown} are not result columns; the columns are farm.records.Record's fields")
        for name, value in values.items():
            setattr(self, name, value)
        return self

    def fill(self, other: Record) -> Record:
        """Take every column ``other`` has a value for (not None); carried columns stay ours."""
        return self.set(**{f.name: getattr(other, f.name) for f in COLUMNS if getattr(other, f.name) is not None})

    def value(self, name: str) -> Any:
        """A column's value by result name: a Record column, else a carried one (None when absent)."""
        return getattr(self, name) if name in COLUMN_NAMES else self.carried.get(name)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Record:
        """A record from a results-table row: Record columns by name, every other column is carried."""
        own = {k: v for k, v in row.items() if k in COLUMN_NAMES}
        return cls(**own, carried={k: v for k, v in row.items() if k not in COLUMN_NAMES})


COLUMNS: tuple[Any, ...] = tuple(f for f in fields(Record) if "arrow" in f.metadata)
COLUMN_NAMES = frozenset(f.name for f in COLUMNS)


@dataclass
class Outcome:
    """What a replica returns for one row: the record fields it knows, and whether the failure is worth a retry
    (an infrastructure fault) with its traceback for the log. The driver completes the record."""

    record: Record
    retry: bool = False
    traceback: str | None = None
