"""Assembling a row's one ``Record`` in ``farm run``: what was asked (from the manifest row and its resolved
request), what the replica reported, and the fingerprints a rerun compares (``farm.resume``).

The driver decides *when* a row gets its record; this module decides *what* the record says, in one place for every
outcome (an invalid row, a row that failed on a replica, a finished row, a rescored row).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from farm import fingerprints, secrets
from farm.manifest import SWEEP_CONFIG, SWEEP_ROW
from farm.records import COLUMNS, IDENTITY, METRICS, ErrorCode, Record, Status
from farm.results import carried_name
from farm.types import GenerationRequest

# URIs a record carries lose their URL password as they are committed (error messages lose every secret value too;
# carried manifest columns stay verbatim).
URI_FIELDS = ("portrait", "video")
METRIC_COLUMNS = tuple(c.name for c in COLUMNS if c.metadata["group"] in (IDENTITY, METRICS))
MODEL_COLUMNS = tuple(name for name in METRIC_COLUMNS if name.endswith("_model"))  # which model made each metric


class RecordMaker:
    """Builds the records of one run; ``model_config`` / ``metrics_config`` are this run's canonical settings."""

    def __init__(self, model_name: str, model_config: str, metrics_config: str, carried: list[str]) -> None:
        self.model_name = model_name
        self.model_config = model_config
        self.metrics_config = metrics_config
        self.carried = carried

    def base(self, row: dict[str, Any], request: GenerationRequest | None, fingerprint: str | None = None) -> Record:
        """What the row asked for. ``fingerprint``: the request fingerprint of a row that could not be resolved."""
        rights = row.get("rights_confirmed")
        rec = Record(
            id=row.get("id"),
            row_id=row.get(SWEEP_ROW, row.get("id")),
            config_id=row.get(SWEEP_CONFIG),
            portrait=row.get("portrait"),
            prompt=row.get("prompt"),
            model=self.model_name,
            model_config=self.model_config,
            metrics_config=self.metrics_config,
            rights_confirmed=rights if isinstance(rights, bool) else None,
            request_fingerprint=fingerprint,
            carried={carried_name(name): row.get(name) for name in self.carried},
        )
        if request is not None:
            rec.set(**request.params.as_dict(), prompt=request.prompt, negative_prompt=request.negative_prompt)
            rec.set(seed=request.seed, request_fingerprint=self.request_fingerprint(request, row["portrait"]))
        return rec

    def request_fingerprint(self, request: GenerationRequest, portrait: str) -> str:
        return fingerprints.request_fingerprint(self.model_config, request, portrait)

    def invalid(self, raw_row: dict[str, Any], key: str, code: ErrorCode, message: str, status: Status) -> Record:
        """A row that never reached a replica; fingerprinted by what it holds, so editing it makes a rerun redo it."""
        fingerprint = fingerprints.invalid_fingerprint(self.model_config, raw_row)
        rec = self.base({**raw_row, "id": key}, None, fingerprint)
        return rec.set(status=status.value, error_code=code.value, error_message=message, attempts=0)

    def failed(
        self, row: dict[str, Any], request: GenerationRequest, attempts: int, code: ErrorCode, msg: str
    ) -> Record:
        rec = self.base(row, request)
        return rec.set(status=Status.FAILED.value, error_code=code.value, error_message=msg, attempts=attempts)

    def finished(
        self, row: dict[str, Any], request: GenerationRequest, reported: Record, attempts: int, weights: str | None
    ) -> Record:
        """A row a replica finished (ok, or failed for the row's own reason); ``weights``: that replica's model
        fingerprint."""
        rec = self.base(row, request).fill(reported)
        rec.attempts = attempts
        if rec.status != Status.OK.value:
            rec.video = None
            return rec
        return self._fingerprinted(rec, weights)

    def rescored(self, row: dict[str, Any], old: Record, reported: Record) -> Record:
        """An ``ok`` row scored again from its committed video: its old record with new metrics (no stale value
        survives: every metric column is cleared first) and this run's carried columns."""
        rec = replace(old, carried=self.base(row, None).carried)
        rec.set(**dict.fromkeys(METRIC_COLUMNS), metrics_config=self.metrics_config, error_code=None)
        if reported.status != Status.OK.value:
            return rec.set(
                status=reported.status, error_code=reported.error_code, video=None, error_message=reported.error_message
            )
        rec.set(**{name: getattr(reported, name) for name in (*METRIC_COLUMNS, "score_s", "replica", "node")})
        rec.metrics_fingerprint = fingerprints.metrics_fingerprint(self.metrics_config, scored_by(rec))
        return rec

    def _fingerprinted(self, rec: Record, weights: str | None) -> Record:
        rec.model_fingerprint = weights
        rec.video_fingerprint = fingerprints.video_fingerprint(rec.request_fingerprint, rec.portrait_sha256, weights)
        rec.metrics_fingerprint = fingerprints.metrics_fingerprint(self.metrics_config, scored_by(rec))
        return rec


def scored_by(rec: Record) -> dict[str, str | None]:
    """The ``<metric>_model`` columns of a record: the models (with weight digests) its metrics came from."""
    return {name: getattr(rec, name) for name in MODEL_COLUMNS}


def scrubbed(rec: Record) -> Record:
    """``rec`` as it may be written: no secret value in its error message, no URL password in its URIs."""
    if isinstance(rec.error_message, str):
        rec.error_message = secrets.scrub(rec.error_message)
    for name in URI_FIELDS:
        value = getattr(rec, name)
        if isinstance(value, str):
            setattr(rec, name, secrets.strip_userinfo(value))
    return rec
