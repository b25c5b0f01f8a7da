"""Fingerprints: short digests of everything that determines a row's video and its metrics (README "Resume").

A rerun into an existing output compares the fingerprints its records carry with the ones this spec and manifest
give (``farm.resume``), so a changed spec never silently keeps results made another way. Every value is hashed
through one canonical JSON form, so equal inputs always give equal digests whatever their Python types.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from farm.params import SAMPLING_FIELDS
from farm.secrets import redact, strip_userinfo
from farm.types import GenerationRequest

LENGTH = 16  # hex digits: 64 bits, no accidental collision among billions of rows


def canonical(value: Any) -> str:
    """One JSON text per value: sorted keys, no spaces, ints and equal floats written the same way."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()[:LENGTH]


def model_config(
    backend: str, variant: str | None, dtype: str, weights: dict[str, Any], output_options: dict[str, Any]
) -> str:
    """The model settings that shape a video, as canonical JSON: backend, variant, dtype, weight URIs (without
    credentials) and the backend options that change outputs (``Backend.SPEED_OPTIONS`` are left out). Credential
    values are hidden by key (``farm.secrets.redact``): rotating a key is not a change, and records never hold one."""
    settings = {"backend": backend, "variant": variant, "dtype": dtype, "weights": weights, "options": output_options}
    return canonical(redact(settings))


def metrics_config(job: Any) -> str:
    """The metric settings of a job (``identity`` without the output-format switch), as canonical JSON."""
    identity = job.identity
    settings = identity.model_dump(mode="json", exclude={"per_frame_json"}) if identity.enabled else None
    if not job.metrics:  # the form records made before metric plug-ins carry: they stay comparable
        return canonical({"identity": settings})
    return canonical(redact({"identity": settings, "metrics": job.metrics}))


def request_values(request: GenerationRequest, portrait: str) -> dict[str, Any]:
    """What a resolved row asks for: every sampling parameter, seed, prompts and the portrait URI."""
    return {
        **{name: getattr(request.params, name) for name in (*SAMPLING_FIELDS, "fps")},
        "seed": request.seed,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "portrait": strip_userinfo(portrait),
    }


def request_fingerprint(model_config_json: str, request: GenerationRequest, portrait: str) -> str:
    """Everything ``farm run`` resolves before any GPU time: the model settings and the row's resolved request."""
    return digest({"model": model_config_json, "request": request_values(request, portrait)})


def invalid_fingerprint(model_config_json: str, row: dict[str, Any]) -> str:
    """A row that cannot run (bad id, bad parameter, rights not confirmed): a digest of what it holds, so any edit
    to it (a fixed parameter, confirmed rights) makes the rerun redo it."""
    held = {name: value for name, value in row.items() if name in INVALID_ROW_FIELDS}
    return digest({"model": model_config_json, "invalid_row": {k: repr(v) for k, v in sorted(held.items())}})


INVALID_ROW_FIELDS = frozenset(
    ("id", "portrait", "prompt", "negative_prompt", "seed", "rights_confirmed", *SAMPLING_FIELDS, "fps")
)


def video_fingerprint(request_fp: str, portrait_sha256: str | None, model_fingerprint: str | None) -> str:
    """The request plus what was only known on the replica: the portrait's bytes and the loaded weights."""
    return digest({"request": request_fp, "portrait_sha256": portrait_sha256, "weights": model_fingerprint})


def metrics_fingerprint(metrics_config_json: str, models: dict[str, str | None]) -> str:
    """The metrics settings plus the models that scored (``<metric>_model`` columns: names with weights digests)."""
    return digest({"metrics": metrics_config_json, **{k: v for k, v in sorted(models.items()) if v is not None}})
