"""The job spec (``jobs/*.yaml``): one validated pydantic model; its JSON Schema is ``schemas/job.schema.json``."""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm import secrets, storage
from farm.faults import RetryPolicy
from farm.images import ImageLimits
from farm.params import SAMPLING_FIELDS, check_field, check_seed, coerce
from farm.secrets import REDACTED
from farm.types import LoraSpec, ModelSpec

LORA_ROLE = "lora"  # the one weights role that is a list


class SpecError(ValueError):
    """A job spec problem; the message names the field and the bad value."""


def did_you_mean(value: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` when ``value`` is a near miss of one of ``choices``, else ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _checked_param(where: str, name: str, value: Any) -> None:
    """``ValueError`` naming ``where`` when ``value`` is no valid ``name`` (a sampling parameter or seed)."""
    try:
        if name == "seed":
            check_seed(value)
        else:
            check_field(name, coerce(name, value))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraEntry(_Strict):
    """One entry of ``model.weights.lora`` (a bare string is ``{path: <it>}``)."""

    path: str = Field(description="A LoRA .safetensors file (diffusers, Wan or kohya keys): local path or fsspec URI")
    scale: float = Field(default=1.0, description="Strength; 0 = the base model", allow_inf_nan=False)
    fuse: bool = Field(default=True, description="Merge into the weights once (no cost per step) or run beside them")


def _lora_entries(item: Any) -> list[Any]:
    """``weights.lora`` as a list of ``{path, ...}`` mappings, or a ValueError naming the entry and the fix."""
    items = [item] if isinstance(item, str) else item
    if not isinstance(items, list):
        kind = type(item).__name__
        raise ValueError(f"model.weights.{LORA_ROLE} must be a list of {{path, scale, fuse}} or one path, not a {kind}")
    known = list(LoraEntry.model_fields)
    entries = []
    for index, entry in enumerate(items):
        entry = {"path": entry} if isinstance(entry, str) else entry
        where = f"model.weights.{LORA_ROLE}[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{where} needs a path: {{path: <a .safetensors file>, scale: 1.0}}")
        for key in entry:
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, known)}; known: {', '.join(known)}")
        entries.append(entry)
    return entries


class ModelSection(_Strict):
    backend: str = Field(description="Backend name: lynx | still | simulated")
    variant: str | None = Field(default=None, description="Backend variant, e.g. lynx: full | lite")
    weights: dict[str, str | list[LoraEntry]] = Field(
        default_factory=dict,
        description="Role -> local path or fsspec URI (lynx: base, adapter, arcface, face_pack); "
        "lora: a list of {path, scale, fuse} applied in order",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto = bf16 on GPU, fp32 on CPU"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific options")

    @field_validator("weights", mode="before")
    @classmethod
    def _only_lora_is_a_list(cls, value: Any) -> Any:
        """One message per mistake (pydantic's union errors would list every branch)."""
        if not isinstance(value, dict):
            return value
        out = dict(value)
        for role, item in value.items():
            if role == LORA_ROLE:
                out[role] = _lora_entries(item)
            elif not isinstance(item, str):
                raise ValueError(
                    f"model.weights.{role} must be one path or URI; only model.weights.{LORA_ROLE} is a list"
                )
        return out

    def weight_uris(self) -> dict[str, str]:
        """Role -> URI of the weights files and folders (LoRAs are ``loras()``)."""
        return {role: uri for role, uri in self.weights.items() if role != LORA_ROLE}

    def loras(self) -> tuple[LoraSpec, ...]:
        return tuple(LoraSpec(e.path, e.scale, e.fuse) for e in self.weights.get(LORA_ROLE, []))

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from farm.models import BACKENDS  # the registry only: no backend module is imported here

        if value not in BACKENDS:
            raise ValueError(
                f"unknown backend {value!r}{did_you_mean(value, BACKENDS)}; choose one of {sorted(BACKENDS)}"
            )
        return value

    def to_spec(self, storage_options: dict[str, Any] | None = None) -> ModelSpec:
        return ModelSpec(
            backend=self.backend,
            variant=self.variant,
            weights=self.weight_uris(),
            dtype=self.dtype,
            options=dict(self.options),
            storage_options=dict(storage_options or {}),
            loras=self.loras(),
        )


class Defaults(_Strict):
    """Job-wide sampling defaults; unset values fall back to the backend's own defaults."""

    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_i: float | None = None
    ip_scale: float | None = None
    ref_scale: float | None = None
    fps: int | None = None
    two_pass_guidance: bool = Field(
        default=False, description="Drop the ID-only guidance pass (guidance_scale_i unset) for every row"
    )
    negative_prompt: str | None = Field(default=None, description="None = the backend's official negative prompt")
    seed: int = Field(default=42, description="Base seed; rows without a seed get one derived from it and their id")

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @model_validator(mode="after")
    def _in_range(self) -> Defaults:
        for name, value in self.overrides().items():
            if value is not None:
                check_field(name, coerce(name, value))
        return self

    def overrides(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in (*SAMPLING_FIELDS, "fps") if getattr(self, name) is not None}
        if self.two_pass_guidance:
            out["guidance_scale_i"] = None
        return out


class Resources(_Strict):
    gpus_per_replica: float = Field(
        default=1.0,
        ge=0,
        description="GPUs pinned per replica (0 = CPU replicas; lynx: 2-3 run a step's guidance passes on "
        "separate GPUs)",
    )
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs reserved per replica actor")
    replicas: int | Literal["all"] = Field(
        default="all",
        description="Target number of replicas, or 'all' = every GPU the cluster has or its autoscaler can scale to, "
        "/ gpus_per_replica (README: 'Elastic clusters'). Replicas that cannot be placed yet wait for room",
    )
    allow_cpu: bool = Field(
        default=False,
        description="On a cluster without GPUs, run replicas on CPU instead of waiting for GPU nodes (always allowed "
        "on the embedded local Ray that the farm starts itself)",
    )
    in_flight_per_replica: int = Field(
        default=3, ge=1, le=64, description="Rows queued per replica so prep/encode overlap generation"
    )

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"replicas={value} must be >= 1 or 'all'")
        return value


class Identity(_Strict):
    enabled: bool = True
    recognizer: Literal["dlib", "insightface"] = "dlib"
    pack: str | None = Field(default=None, description="insightface model pack dir or URI (recognizer=insightface)")
    frames: int = Field(default=16, ge=1, le=1024, description="Frames sampled uniformly per video")
    strict: bool = Field(default=False, description="Fail portraits with several faces (multiple_faces)")
    per_frame_json: bool = Field(
        default=False,
        description="Also write metrics/<id>.json with per-frame similarities (the results table has the summary)",
    )
    min_face_size: int = Field(default=32, ge=0, description="Smallest portrait face side in pixels (face_too_small)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Recognizer options: dlib upsample (1 finds ~40 px faces, ~4x slower), min_score, num_jitters; "
        "insightface det_size, det_thresh, threads",
    )

    @model_validator(mode="after")
    def _pack(self) -> Identity:
        if self.enabled and self.recognizer == "insightface" and not self.pack:
            raise ValueError("identity.pack is required when identity.recognizer is 'insightface'")
        return self


class Runtime(_Strict):
    progress_every_s: float = Field(
        default=30.0,
        gt=0,
        description="When stderr is not a terminal (Ray Jobs, nohup, CI): a plain progress line this often, and at "
        "each phase change",
    )
    heartbeat_s: float = Field(
        default=30.0,
        gt=0,
        description="How often a running job refreshes its _job.json entry (farm status reads it; a heartbeat older "
        "than 3x this means the driver is gone)",
    )
    verify_portraits: bool = Field(
        default=True,
        description="On a rerun, check that each committed row's portrait file still holds the bytes its video was "
        "made from (one stat/HEAD per distinct portrait; bytes read only when its stamp moved)",
    )
    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per row across infrastructure faults")
    row_timeout_s: float = Field(default=3600.0, gt=0, description="A row running longer is retried elsewhere")
    commit_every_rows: int = Field(default=256, ge=1, description="Results are committed in parts of this many rows")
    commit_every_s: float = Field(default=15.0, gt=0, description="... or at least this often")
    require_rights_confirmed: bool = Field(
        default=False, description="Skip rows whose rights_confirmed is not true (false rows are always skipped)"
    )
    check_portraits: bool = Field(default=False, description="`farm validate`: also open every portrait")
    max_replica_restarts: int = Field(default=50, ge=0, description="Give up after this many replica deaths")
    infra_abort_after: int = Field(
        default=10,
        ge=0,
        description="Stop the job (exit 3) when this many rows in a row fail on infrastructure faults (storage, "
        "network, credentials, out of memory) after all their attempts; a plain rerun redoes them. 0: never stop",
    )
    start_timeout_s: float = Field(
        default=1800.0, gt=0, description="Abort if no replica is ready (placed and loaded) for this long"
    )
    node_loss_grace_s: float = Field(
        default=120.0,
        gt=0,
        description="How long an unreachable replica is probed before it counts as lost with its node",
    )
    max_failed_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="farm run exits 4 (Ray Jobs: FAILED) when more than this fraction of the rows this run "
        "recorded failed (skipped rows do not count)",
    )
    lease_ttl_s: float = Field(
        default=120.0,
        ge=5,
        description="The output lease: a run that stops renewing it for this long can be taken over by another",
    )
    allowed_portrait_roots: list[str] = Field(
        default_factory=list,
        description="When set, a portrait outside these prefixes (e.g. s3://bucket/portraits/, pkg://skimage/) is "
        "bad_param; compared after normalising ('..' cannot escape; local paths resolved with realpath)",
    )
    max_portrait_pixels: int = Field(
        default=40_000_000, ge=1, description="Portraits with more pixels are refused from their header, undecoded"
    )
    max_portrait_bytes: int = Field(
        default=50_000_000, ge=1, description="Portrait files larger than this are refused (reads stop at the limit)"
    )
    storage_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Tries of a portrait read on infrastructure faults (expired credentials, throttling, 5xx, "
        "timeouts), with jittered backoff, before the row is handed back to the driver as an infrastructure fault",
    )
    inject_faults: dict[Literal["crash", "hang", "oom", "delay"], dict[str, float]] = Field(
        default_factory=dict,
        description="Chaos drills and tests only: kind -> {row id: n}. crash/hang/oom hit the row's first n "
        "dispatches (crash = SIGKILL the replica, hang = never return, oom = an out-of-memory fault); delay sleeps "
        "n seconds in generation",
    )


class JobSpec(_Strict):
    """A whole job: what to read, where to write, which model, how to sample, on what resources."""

    name: str = "job"
    manifest: str = Field(description="Parquet file, directory or glob; local path or fsspec URI")
    output: str = Field(description="Output root; local path or fsspec URI")
    output_shared: bool = Field(
        default=False,
        description="A local-path output is on storage every node sees (NFS, a shared volume); required for a "
        "local output on a cluster of several nodes",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ...}, https: {headers: {...}}}. The flat "
        "form ({endpoint_url: ...}) applies to the output's protocol only (the manifest's when the output is local). "
        "Default timeouts (connect 10 s, read 60 s) apply unless given here (s3: config_kwargs.connect_timeout / "
        "read_timeout; http(s): client_kwargs.timeout)",
    )
    model: ModelSection
    defaults: Defaults = Field(default_factory=Defaults)
    resources: Resources = Field(default_factory=Resources)
    identity: Identity = Field(default_factory=Identity)
    metrics: list[dict[str, Any]] = Field(
        default_factory=list,
        description="More metrics per video (farm.metrics), e.g. [{name: motion}, {name: clip, weights: <CLIP dir>}, "
        "{name: identity_facexlib, weights: <IR-SE50 .pth>}]; identity itself is the identity section",
    )
    runtime: Runtime = Field(default_factory=Runtime)
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="A parameter grid run with every row: sampling parameters, seed, variant, options.<backend "
        "option> or lora.<i>.scale -> list of values, e.g. {guidance_scale: [3.0, 5.0], seed: [42, 43]} "
        "(README 'Sweeps')",
    )

    @model_validator(mode="after")
    def _check_sweep(self) -> JobSpec:
        """Every swept name can be swept and every value is in range (a bad grid is a spec error, not bad rows)."""
        from farm.sweep import LORA_SCALE, ROW_PARAMS, check_sweep

        check_sweep(self.sweep)
        for name, values in self.sweep.items():
            if name in ROW_PARAMS:
                for value in values:
                    _checked_param(f"sweep.{name}", name, value)
            elif lora := LORA_SCALE.match(name):
                self._check_lora_scales(name, int(lora.group(1)), values)
        return self

    def _check_lora_scales(self, name: str, index: int, values: list[Any]) -> None:
        count = len(self.model.loras())
        if index >= count:
            have = f"only {count} (model.weights.lora)" if count else "none: add model.weights.lora"
            raise ValueError(f"sweep.{name}: the job has no LoRA number {index} (counting from 0); it has {have}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"sweep.{name}: {value!r} is not a LoRA scale (a finite number, e.g. 0.5)")

    def configs(self) -> list[Any]:
        """The sweep's configurations (``farm.sweep.Config``); [] when the job has no sweep."""
        from farm.sweep import expand

        return expand(self.sweep)

    def with_model_values(self, values: dict[str, Any]) -> JobSpec:
        """This job with a config's model values applied (``variant``, backend options), for one model group."""
        from farm.sweep import LORA_SCALE

        if not values:
            return self
        variant = values.get("variant", self.model.variant)
        options = {k: v for k, v in values.items() if k != "variant" and not LORA_SCALE.match(k)}
        weights = dict(self.model.weights)
        if LORA_ROLE in weights:
            scales = {int(m.group(1)): v for k, v in values.items() if (m := LORA_SCALE.match(k))}
            weights[LORA_ROLE] = [
                entry.model_copy(update={"scale": float(scales.get(i, entry.scale))})
                for i, entry in enumerate(weights[LORA_ROLE])
            ]
        update = {"variant": variant, "options": {**self.model.options, **options}, "weights": weights}
        return self.model_copy(update={"model": self.model.model_copy(update=update)})

    @model_validator(mode="after")
    def _check_metrics(self) -> JobSpec:
        """Every entry names a known metric with known options (built without loading any weights)."""
        from farm.metrics import build_metrics

        if any(isinstance(m, dict) and m.get("name") == "identity" for m in self.metrics):
            raise ValueError("metrics: 'identity' is configured by the identity section; remove it from metrics")
        build_metrics(self.metrics)
        return self

    @model_validator(mode="after")
    def _scope_storage_options(self) -> JobSpec:
        self.storage_options = storage.bind_storage_options(self.storage_options, self.output, self.manifest)
        return self

    def portrait_policy(self) -> storage.PortraitPolicy:
        """How replicas read portraits: the ``runtime`` limits, retries and allowed roots."""
        rt = self.runtime
        return storage.PortraitPolicy(
            limits=ImageLimits(max_pixels=rt.max_portrait_pixels, max_bytes=rt.max_portrait_bytes),
            retry=RetryPolicy(attempts=rt.storage_attempts),
            allowed_roots=tuple(rt.allowed_portrait_roots),
        )

    def model_spec(self) -> ModelSpec:
        """The model section as the backend sees it, with the job's ``storage_options`` for remote weights."""
        return self.model.to_spec(self.storage_options)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: {_unknown_key(item['loc'])}")
            continue
        value = item.get("input")
        hidden = "storage_options" in item["loc"] or any(secrets.is_credential_key(p) for p in item["loc"])
        shown = ""
        if not isinstance(value, dict) and (hidden or repr(value) not in item["msg"]):
            shown = secrets.strip_userinfo(f" (got {REDACTED if hidden else value!r})")
        lines.append(f"  {where}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """An unknown spec key, with the closest known key of its section (keys are checked: typos must not pass)."""
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "unknown key"
        model = field.annotation
    section = ".".join(str(p) for p in loc[:-1]) or "the top level"
    hint = did_you_mean(str(loc[-1]), model.model_fields) or f"; the keys of {section} are {sorted(model.model_fields)}"
    return f"unknown key{hint}; see schemas/job.schema.json"


def parse_job(data: dict[str, Any], source: str = "<dict>") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source)) from None


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML job spec; ``overrides`` (from CLI flags) replace top-level/nested keys before validation.

    Relative local paths (``manifest``, ``output``, ``model.weights``, ``identity.pack``) are made absolute against
    the current directory when the spec is loaded, so replicas on any node (whose own working directory differs) read
    and write the same files. Under ``ray job submit --working-dir`` the current directory is Ray's temporary copy,
    deleted after the job: a relative ``output`` is refused there.
    """
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec {path}: expected a mapping at the top level, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    _absolute_paths(data, str(path))
    return parse_job(data, str(path))


def _read_yaml(path: str | Path) -> Any:
    """The spec file's YAML; a missing/unreadable file or a syntax error is a ``SpecError`` naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"job spec {str(path)!r} not found: give the path of a YAML job spec (see jobs/)") from None
    except IsADirectoryError:
        raise SpecError(f"job spec {str(path)!r} is a directory: give the path of a YAML file in it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"job spec {str(path)!r} cannot be read as UTF-8 text: {exc}") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_error(path, exc)) from None


def _yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    """``invalid YAML in job.yaml, line 3 column 5: <problem>``: the file's own position, not ``<unicode string>``.
    No snippet of the line: it could hold a credential that never parsed, so no scrubber knows it."""
    mark = getattr(exc, "problem_mark", None)
    where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or "syntax error"
    context = getattr(exc, "context", None)
    fix = "fix the syntax there (indentation, a missing ':' or space after it, an unclosed quote or bracket)"
    return f"invalid YAML in {path}{where}: {problem}" + (f" ({context})" if context else "") + f"; {fix}"


RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_working_dir() -> str | None:
    """The ``--working-dir`` of the Ray Job this process is the entrypoint of, if any."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return (json.loads(raw).get("runtime_env") or {}).get("working_dir") or None
    except (ValueError, AttributeError):
        return None


def _absolute_weights(value: Any) -> Any:
    """A weights path made absolute; in a LoRA list each entry's path (a string or ``{path: ...}``)."""
    if isinstance(value, list):
        return [_absolute_weights(e) for e in value]
    if isinstance(value, dict) and "path" in value:
        return {**value, "path": _absolute_weights(value["path"])}
    return os.path.abspath(value) if _is_relative_local(value) else value


def _is_relative_local(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "://" not in value and not os.path.isabs(value)


def _absolute_paths(data: dict[str, Any], source: str) -> None:
    """Relative local paths -> absolute (see ``load_job``); refuse an output that would vanish with Ray's copy."""
    if _is_relative_local(data.get("output")) and ray_job_working_dir():
        raise SpecError(
            f"invalid job spec {source}: output {data['output']!r} is a relative path, and this `farm run` runs "
            f"inside the Ray Job's temporary copy of --working-dir ({os.getcwd()}), which Ray deletes after the job. "
            "Give an object-store URI (s3://bucket/out) or an absolute path on storage every node sees "
            "(with output_shared: true), in the spec or with --output"
        )
    for key in ("manifest", "output"):
        if _is_relative_local(data.get(key)):
            data[key] = os.path.abspath(data[key])
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), dict):
        model["weights"] = {k: _absolute_weights(v) for k, v in model["weights"].items()}
    identity = data.get("identity")
    if isinstance(identity, dict) and _is_relative_local(identity.get("pack")):
        identity["pack"] = os.path.abspath(identity["pack"])
    runtime = data.get("runtime")
    if isinstance(runtime, dict) and isinstance(runtime.get("allowed_portrait_roots"), list):
        roots = runtime["allowed_portrait_roots"]
        runtime["allowed_portrait_roots"] = [os.path.abspath(r) if _is_relative_local(r) else r for r in roots]


def job_schema() -> dict[str, Any]:
    """The JSON Schema written to ``schemas/job.schema.json`` (a test keeps the file in sync)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Lynx Farm job spec"
    return schema
