"""Manifest: stream Parquet rows (file, directory or glob; local or remote), validate them, resolve parameters.

The driver never holds the whole manifest: rows come as record batches. Row problems are data (``RowError``), schema
problems are a ``ManifestError`` raised before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from farm import storage
from farm.faults import DEFAULT_RETRY, Fault, classify, handling, with_retries
from farm.params import SAMPLING_FIELDS, SamplingParams, check_seed, is_missing
from farm.records import ErrorCode, InfraError, RowError
from farm.results import carried_name
from farm.types import GenerationRequest

REQUIRED_COLUMNS: tuple[str, ...] = ("id", "portrait", "prompt")
OPTIONAL_COLUMNS: tuple[str, ...] = ("negative_prompt", "seed", *SAMPLING_FIELDS, "rights_confirmed")
KNOWN_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DERIVED_SEED_MAX = 2**31 - 1
UNDECODABLE = "\ufffd"  # what invalid UTF-8 in a text column reads as


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (no files, missing column, wrong column type)."""


def _visible(path: str, root: str) -> bool:
    """False for files under a folder or with a name starting with ``.`` or ``_`` (``_temporary/``, ``.cache/``,
    ``_SUCCESS``): writers such as Spark keep partial or duplicate copies there."""
    rel = path[len(root) :] if path.startswith(root) else path.rsplit("/", 1)[-1]
    return not any(part.startswith((".", "_")) for part in rel.strip("/").split("/"))


def _find_parquet(fs: Any, root: str) -> list[str]:
    root = root.rstrip("/")
    return [p for p in fs.find(root) if p.endswith(".parquet") and _visible(p, root)]


def _expand(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, list[str]]:
    """The manifest's files; storage faults are retried (``farm.faults``), then ``InfraError``."""
    return with_retries(lambda: _expand_once(uri, storage_options), f"listing manifest {uri!r}")


def _footer(fs: Any, path: str) -> pq.FileMetaData:
    """A file's Parquet footer, opened through fsspec itself: pyarrow's wrapper first asks ``isfile``, which fsspec
    answers False on *any* error, so a throttled or refused HEAD would read as a missing file (never retried)."""
    with fs.open(path, "rb") as fh:
        return pq.read_metadata(fh)


def _info(fs: Any, path: str) -> dict[str, Any] | None:
    """``fs.info(path)``, None when nothing is there. Not ``exists``/``isdir``: fsspec's answer False on any error
    would hide a storage fault; this raises it (for ``with_retries``)."""
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def _expand_once(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, list[str]]:
    fs, path = storage.get_fs(uri, storage_options)
    info = _info(fs, path)  # checked first: a real name may contain glob characters (``run[1]/m.parquet``)
    if info is not None:
        files = _find_parquet(fs, path) if info.get("type") == "directory" else [path]
    elif any(ch in path for ch in "*?["):
        # hidden/underscore names are skipped below the glob's literal prefix, as for a directory
        cut = min(i for i in (path.find(ch) for ch in "*?[") if i >= 0)
        root = path[:cut].rsplit("/", 1)[0]
        files = []
        for match, found in fs.glob(path, detail=True).items():
            if not _visible(match, root):
                continue
            if found.get("type") == "directory":  # a Spark-style ``x.parquet/`` folder of parts
                files.extend(_find_parquet(fs, match))
            elif match.endswith(".parquet"):
                files.append(match)
    else:
        raise ManifestError(f"manifest {uri!r} does not exist")
    files = sorted(set(files))  # ``**`` can match a folder and the files inside it: read each file once
    if not files:
        raise ManifestError(f"manifest {uri!r} matches no .parquet files")
    return fs, files


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _plain(field: pa.Field) -> pa.Field:
    """Drop field metadata and dictionary encoding: both are storage details (pandas categoricals are strings)."""
    t = field.type
    return pa.field(field.name, t.value_type if pa.types.is_dictionary(t) else t)  # nullable: other files may lack it


def column_values(column: pa.Array) -> list[Any]:
    """Python values of one column, never raising for one bad value: invalid UTF-8 (files from non-Arrow writers)
    is decoded with U+FFFD; a value Python cannot hold (a timestamp past year 9999) stays an Arrow scalar, which is
    written back unchanged if carried through and fails the row check if the farm reads it."""
    try:
        return column.to_pylist()
    except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
        out: list[Any] = []
        for scalar in column:
            try:
                out.append(scalar.as_py())
            except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
                if isinstance(scalar, (pa.StringScalar, pa.LargeStringScalar)):
                    out.append(scalar.as_buffer().to_pybytes().decode("utf-8", "replace"))
                else:
                    out.append(scalar)
        return out


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` in ``schema``: columns this file lacks become nulls, narrower or dictionary types are cast."""
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        arrays.append(column if column.type == field.type else column.cast(field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


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
        self.fs, files = _expand(uri, storage_options)
        per_file: list[tuple[str, int, pa.Schema]] = []
        for f in files:
            try:
                meta = with_retries(lambda f=f: _footer(self.fs, f), f"reading manifest {f!r}")
                schema = meta.schema.to_arrow_schema()
            except InfraError:
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable footer is a manifest error
                raise ManifestError(f"manifest file {f!r} is not readable Parquet: {exc}") from None
            repeated = sorted(n for n, count in Counter(schema.names).items() if count > 1)
            if repeated:
                raise ManifestError(f"manifest file {f!r} has column(s) {repeated} more than once; rename them")
            per_file.append((f, meta.num_rows, pa.schema([_plain(fld) for fld in schema])))
        # Files without rows add nothing, so their (often type-less) schemas must not veto the others'.
        used = [entry for entry in per_file if entry[1] > 0] or per_file
        self.files = [f for f, _, _ in used]
        self.num_rows = sum(n for _, n, _ in used)
        self.schema = used[0][2]
        for f, n, schema in used:
            lacking = [c for c in self.required if c not in schema.names]
            if n > 0 and lacking:
                raise ManifestError(f"manifest file {f!r} lacks required column(s) {lacking}; it has {schema.names}")
            try:
                self.schema = pa.unify_schemas([self.schema, schema], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise ManifestError(
                    f"manifest files disagree on column types: {f!r} does not match {self.files[0]!r}: {exc}"
                ) from None
        self._check_schema()

    @property
    def dataset(self) -> pads.Dataset:
        """The files as one Arrow dataset (for callers that want Arrow's scanner; ``batches`` does not use it)."""
        return pads.dataset(self.files, schema=self.schema, format="parquet", filesystem=self.fs)

    def _check_schema(self) -> None:
        names = set(self.schema.names)
        missing = [c for c in self.required if c not in names]
        if missing:
            raise ManifestError(f"manifest {self.uri!r} lacks required column(s) {missing}; it has {sorted(names)}")
        for col in ("id", "portrait", "prompt", "negative_prompt", "video"):
            if col in names and not _is_string(self.schema.field(col).type):
                raise ManifestError(f"manifest column {col!r} must be string, got {self.schema.field(col).type}")
        if "rights_confirmed" in names:
            t = self.schema.field("rights_confirmed").type
            if not (pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise ManifestError(f"manifest column 'rights_confirmed' must be bool, got {t}")
        carried: dict[str, str] = {}
        for name in self.extra_columns:
            target = carried_name(name)
            if target in carried:
                raise ManifestError(
                    f"manifest columns {carried[target]!r} and {name!r} would both be carried to the results as "
                    f"{target!r}; rename one of them"
                )
            carried[target] = name

    @property
    def extra_columns(self) -> list[str]:
        """Columns the farm does not interpret: carried through to the results untouched."""
        return [n for n in self.schema.names if n not in self.known]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches in the unified schema, one file at a time, so a damaged file is named (``ManifestError``).

        Read with ``ParquetFile`` rather than the dataset scanner, which reserves column names (``__filename``).
        """
        names = self.schema.names if columns is None else columns
        schema = pa.schema([self.schema.field(n) for n in names])
        for path in self.files:
            yield from self._file_batches(path, names, schema)

    def _file_batches(self, path: str, names: list[str], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """One file's batches; a storage fault mid-file reopens it and skips the batches already given (retried as
        ``farm.faults`` says, then ``InfraError``); a damaged file is a ``ManifestError`` naming it."""
        given = 0
        outer = handling()
        for attempt in range(1, DEFAULT_RETRY.attempts + 1):
            try:
                with self.fs.open(path, "rb") as fh:
                    parquet = pq.ParquetFile(fh)
                    have = set(parquet.schema_arrow.names)  # a property that rebuilds the schema: read it once
                    present = [n for n in names if n in have]
                    for i, batch in enumerate(parquet.iter_batches(batch_size=self.batch_rows, columns=present)):
                        if i >= given:
                            yield _conform(batch, schema)
                            given += 1
                return
            except Exception as exc:  # noqa: BLE001 - classified: storage faults retried, damage named
                if classify(exc, outer=outer) is Fault.INFRA:
                    if attempt < DEFAULT_RETRY.attempts:
                        time.sleep(DEFAULT_RETRY.delay(attempt))
                        continue
                    raise InfraError(f"reading manifest {path!r} failed after {attempt} attempts: {exc}") from exc
                if isinstance(exc, OSError | ValueError | pa.ArrowException):
                    raise ManifestError(f"manifest file {path!r} cannot be read: {exc}") from None
                raise

    def rows(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches():
            try:
                yield from batch.to_pylist()
                continue
            except (ValueError, OverflowError, ArithmeticError, pa.ArrowException):
                pass  # a value Python cannot hold: convert column by column, value by value where needed
            columns = [column_values(col) for col in batch.columns]
            names = batch.schema.names
            for i in range(batch.num_rows):
                yield {name: col[i] for name, col in zip(names, columns)}

    def duplicate_ids(self) -> set[str]:
        """Ids that occur more than once (one streaming pass over the ``id`` column only).

        Missing and empty ids are not duplicates of each other: each such row is its own ``bad_id`` record.
        """
        seen: set[str] = set()
        dups: set[str] = set()
        for batch in self.batches(columns=["id"]):
            for value in column_values(batch.column(0)):
                if not isinstance(value, str) or not value:
                    continue
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
    allowed_portrait_roots: tuple[str, ...] = ()  # runtime.allowed_portrait_roots; empty = any portrait


def record_key(row: dict[str, Any]) -> str:
    """The id a row's record is filed under: its own id when valid, else ``<bad id HASH>``, HASH a digest of what
    the row holds (its raw id, portrait and prompt), so the key does not move when other rows are inserted or removed.

    Valid ids cannot contain ``<`` or spaces, so such a key never collides with a real id.
    """
    raw_id = row.get("id")
    if isinstance(raw_id, str) and ID_PATTERN.fullmatch(raw_id):
        return raw_id
    content = json.dumps([repr(raw_id), repr(row.get("portrait")), repr(row.get("prompt"))])
    return f"<bad id {hashlib.sha256(content.encode()).hexdigest()[:12]}>"


class RowState(str, Enum):
    COMMITTED = "committed"  # its id already has a committed record: nothing to do
    REPEAT = "repeat"  # a later row of a duplicated id: that id's one record is made for its first row
    TODO = "todo"  # needs a record: work, or (with an error) a failed record


Planned = tuple[RowState, str, dict[str, Any], RowError | None]
SWEEP_ROW, SWEEP_CONFIG = "_farm_row_id", "_farm_config_id"  # what a sweep adds to each row it expands


def plan_rows(manifest: Manifest, done: set[str], configs: Sequence[Any] = ()) -> Iterator[Planned]:
    """Every manifest row once (with a sweep: once per config), with the key its record is filed under and an
    id-level error, if any; rows whose key is in ``done`` come as ``COMMITTED``.

    One pass over the ``id`` column first finds duplicated ids; each gets exactly one ``duplicate_id`` record.
    Rows whose id is missing or invalid get ``bad_id``, filed under ``record_key`` (a second row of identical content
    gets `` #2`` in its key). ``configs`` (``farm.sweep.Config``): each row is planned once per config under
    ``<key>__<config_id>``, the config's values over the row's own. Shared by ``farm run``, ``farm validate`` and
    ``farm score`` so all keep the one-record-per-id rule the same way.
    """
    for state, key, row, error in _plan_manifest_rows(manifest):
        for key_now, row_now in _per_config(key, row, configs):
            if key_now in done:
                yield RowState.COMMITTED, key_now, row_now, None
            else:
                yield state, key_now, row_now, error


def _per_config(key: str, row: dict[str, Any], configs: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    if not configs:
        yield key, row
        return
    for config in configs:
        values = {**row, **config.row_values(), SWEEP_ROW: key, SWEEP_CONFIG: config.id}
        yield f"{key}__{config.id}", values


def _plan_manifest_rows(manifest: Manifest) -> Iterator[Planned]:
    duplicates = manifest.duplicate_ids()
    reported: set[str] = set()
    bad_keys: Counter[str] = Counter()
    for row in manifest.rows():
        key = record_key(row)
        if key != row.get("id"):
            bad_keys[key] += 1
            key = key if bad_keys[key] == 1 else f"{key[:-1]} #{bad_keys[key]}>"
        if key in duplicates:
            if key in reported:
                yield RowState.REPEAT, key, row, None
                continue
            reported.add(key)
            yield RowState.TODO, key, row, RowError(ErrorCode.DUPLICATE_ID, f"id {key!r} occurs more than once")
            continue
        error = None
        if key != row.get("id"):
            try:
                check_id(row.get("id"))
            except RowError as exc:
                error = exc
        yield RowState.TODO, key, row, error


def check_id(value: Any) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise RowError(ErrorCode.BAD_ID, f"id {value!r} must match [A-Za-z0-9._-]{{1,128}}")
    return value


def resolve_keyed(key: str, row: dict[str, Any], defaults: RowDefaults) -> GenerationRequest:
    """``resolve_row`` for a row filed under ``key`` (``plan_rows``): resolved as its manifest row (a sweep's row
    keeps its own id, so a derived seed is the same in every config), the request filed under ``key``."""
    request = resolve_row({**row, "id": row.get(SWEEP_ROW, key)}, defaults)
    return request if request.id == key else replace(request, id=key)


def resolve_row(row: dict[str, Any], defaults: RowDefaults) -> GenerationRequest:
    """Validate one manifest row and resolve every value that will be used; ``RowError`` says what is wrong.

    Rights: ``rights_confirmed == False`` (or null when the job requires confirmation) raises a ``RowError`` with
    ``RIGHTS_NOT_CONFIRMED``, which the runtime records as ``skipped``. A portrait outside
    ``defaults.allowed_portrait_roots`` (when set) is ``BAD_PARAM``, so ``farm validate`` and ``farm run`` agree.
    """
    row_id = check_id(row.get("id"))
    portrait = row.get("portrait")
    if not isinstance(portrait, str) or not portrait.strip():
        raise RowError(ErrorCode.MISSING_PORTRAIT, "portrait is empty")
    storage.check_allowed_root(portrait, defaults.allowed_portrait_roots)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(ErrorCode.EMPTY_PROMPT, "prompt is empty")
    for name in ("prompt", "negative_prompt"):
        if isinstance(row.get(name), str) and UNDECODABLE in row[name]:
            raise RowError(ErrorCode.BAD_PARAM, f"{name} is not valid UTF-8 text (the file stores undecodable bytes)")
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
