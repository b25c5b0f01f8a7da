"""Manifest: stream Parquet rows (file, directory or glob; local or remote), validate them, resolve parameters.

The driver never holds the whole manifest: rows come as record batches. Row problems are data (``RowError``), schema
problems are a ``ManifestError`` raised before any work starts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from farm import storage
from farm.models.base import GenerationRequest
from farm.params import SAMPLING_FIELDS, SamplingParams, check_seed, is_missing
from farm.records import ErrorCode, RowError

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "portrait", "prompt")
OPTIONAL_COLUMNS: tuple[str, ...] = ("negative_prompt", "seed", *SAMPLING_FIELDS, "rights_confirmed")
KNOWN_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DERIVED_SEED_MAX = 2**31 - 1


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (no files, missing column, wrong column type)."""


def _expand(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, list[str]]:
    fs, path = storage.get_fs(uri, storage_options)
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in fs.glob(path) if p.endswith(".parquet"))
    elif fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
        )
    elif fs.exists(path):
        files = [path]
    else:
        raise ManifestError(f"manifest {uri!r} does not exist")
    if not files:
        raise ManifestError(f"manifest {uri!r} matches no .parquet files")
    return fs, files


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


class Manifest:
    """A streamable view of one or more Parquet files with a unified schema."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        batch_rows: int = 8192,
        required: tuple[str, ...] = REQUIRED_COLUMNS,
        known: frozenset[str] = KNOWN_COLUMNS,
    ) -> None:
        self.uri = uri
        self.required = required
        self.known = known
        self.batch_rows = batch_rows
        self.fs, self.files = _expand(uri, storage_options)
        schemas = []
        self.num_rows = 0
        for f in self.files:
            try:
                meta = pq.read_metadata(f, filesystem=self.fs)
            except Exception as exc:  # noqa: BLE001 - any unreadable footer is a manifest error
                raise ManifestError(f"manifest file {f!r} is not readable Parquet: {exc}") from None
            schemas.append(meta.schema.to_arrow_schema())
            self.num_rows += meta.num_rows
        try:
            self.schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ManifestError(f"manifest files disagree on column types: {exc}") from None
        self.schema = pa.schema([f.remove_metadata() for f in self.schema])
        self._check_schema()
        self.dataset = pads.dataset(self.files, schema=self.schema, format="parquet", filesystem=self.fs)

    def _check_schema(self) -> None:
        names = set(self.schema.names)
        missing = [c for c in self.required if c not in names]
        if missing:
            raise ManifestError(
                f"manifest {self.uri!r} lacks required column(s) {missing}; it has {sorted(names)}"
            )
        for col in ("id", "portrait", "prompt", "negative_prompt", "video"):
            if col in names and not _is_string(self.schema.field(col).type):
                raise ManifestError(f"manifest column {col!r} must be string, got {self.schema.field(col).type}")
        if "rights_confirmed" in names:
            t = self.schema.field("rights_confirmed").type
            if not (pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise ManifestError(f"manifest column 'rights_confirmed' must be bool, got {t}")

    @property
    def extra_columns(self) -> list[str]:
        """Columns the farm does not interpret: carried through to the results untouched."""
        return [n for n in self.schema.names if n not in self.known]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        yield from self.dataset.to_batches(columns=columns, batch_size=self.batch_rows)

    def rows(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches():
            yield from batch.to_pylist()

    def duplicate_ids(self) -> set[str]:
        """Ids that occur more than once (one streaming pass over the ``id`` column only)."""
        seen: set[str] = set()
        dups: set[str] = set()
        for batch in self.batches(columns=["id"]):
            for value in batch.column(0).to_pylist():
                if value in seen:
                    dups.add(value)
                else:
                    seen.add(value)
        return dups


def derive_seed(base_seed: int, row_id: str) -> int:
    """A stable per-row seed when the manifest gives none: reruns and retries reproduce the same video."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (DERIVED_SEED_MAX + 1)


@dataclass(frozen=True)
class RowDefaults:
    """What a row falls back to: backend defaults overlaid with the job's ``defaults`` section."""

    params: SamplingParams
    negative_prompt: str
    base_seed: int
    require_rights_confirmed: bool = False


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RowError(ErrorCode.BAD_ID, f"id {value!r} must match [A-Za-z0-9._-]{{1,128}}")
    return value


def resolve_row(row: dict[str, Any], defaults: RowDefaults) -> GenerationRequest:
    """Validate one manifest row and resolve every value that will be used; ``RowError`` says what is wrong.

    Rights: ``rights_confirmed == False`` (or null when the job requires confirmation) raises a ``RowError`` with
    ``RIGHTS_NOT_CONFIRMED``, which the runtime records as ``skipped``.
    """
    row_id = check_id(row.get("id"))
    portrait = row.get("portrait")
    if not isinstance(portrait, str) or not portrait.strip():
        raise RowError(ErrorCode.MISSING_PORTRAIT, "portrait is empty")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(ErrorCode.EMPTY_PROMPT, "prompt is empty")
    rights = row.get("rights_confirmed")
    if rights is False or (rights is None and defaults.require_rights_confirmed):
        raise RowError(ErrorCode.RIGHTS_NOT_CONFIRMED, f"rights_confirmed is {rights!r}")
    overrides = {name: row[name] for name in SAMPLING_FIELDS if name in row and not is_missing(row[name])}
    try:
        params = defaults.params.with_overrides(overrides)
        seed = derive_seed(defaults.base_seed, row_id) if is_missing(row.get("seed")) else check_seed(row["seed"])
    except ValueError as exc:
        raise RowError(ErrorCode.BAD_PARAM, str(exc)) from None
    negative = row.get("negative_prompt")
    if is_missing(negative):
        negative = defaults.negative_prompt
    return GenerationRequest(id=row_id, prompt=prompt, negative_prompt=negative, params=params, seed=seed)
