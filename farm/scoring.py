"""``farm score``: identity metrics for videos made anywhere, resumable like a job.

The manifest has ``id``, ``portrait`` and ``video`` columns (any fsspec URIs; ``video`` is an mp4 or a folder of
frames); other columns are carried through. Rows are scored in worker processes (one recognizer each, loaded once)
and committed to ``OUT/results/`` with the same commit protocol as ``farm run``: a rerun skips committed ids.

The run always finishes with one record per row. Bad input is a ``failed`` record (from ``score_job``). A fault of
the machine is retried with the row alone in the pool: a worker that dies (``BrokenProcessPool``: the pool is
recreated and the rows it held are requeued), ``MemoryError``, a storage ``InfraError``. Only a fault of a row scored
alone is charged to it; after ``MAX_TRIES`` charges it is recorded ``poison`` (it kills workers) or ``infra_error``.
A filesystem the manifest needs but this machine lacks (``gs://`` without gcsfs) stops the run before anything is
scored, naming the package (``UnavailableFilesystem``, exit 2 in the CLI); an unknown protocol is the row's error.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from farm import fingerprints, results, secrets, storage, table
from farm.config import SpecError
from farm.manifest import Manifest, ManifestError, RowState, plan_rows
from farm.records import ErrorCode, InfraError, Record, Status
from farm.resume import settings_changes
from farm.storage import OutputLayout

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("id", "portrait", "video")
CHUNK_ROWS = 4
MAX_TRIES = 2  # faults charged to a row (each while it ran alone) before it is recorded failed
MAX_DEATHS = 10  # worker deaths in a row with no row finishing: the machine, not a row, is at fault
FAULT = "_fault"  # key of a worker's answer for a row that hit a machine fault instead of a record

_RECOGNIZER: Any = None
_SETTINGS: dict[str, Any] = {}
_PORTRAITS: OrderedDict[str, Any] = OrderedDict()  # per worker, across chunks: one detection per portrait
_INIT_ERROR: BaseException | None = None

ChunkScorer = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


class UnavailableFilesystem(ManifestError):
    """The manifest names URIs whose fsspec filesystem is not installed here (the message names the package)."""


class ScoreAborted(RuntimeError):
    """Worker processes keep dying before they finish any row: the machine, not a row, is at fault."""


class ChangedScores(SpecError):
    """Committed rows were scored with other settings (``--frames``, the recognizer ...); nothing was scored."""


class _InitFailed(Exception):
    """A worker could not load the recognizer; the parent re-raises ``original``."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


def _init_worker(recognizer: str, pack: str | None, storage_options: dict[str, Any], settings: dict[str, Any]) -> None:
    global _RECOGNIZER, _SETTINGS, _INIT_ERROR
    from farm.identity.recognizer import build_recognizer

    _SETTINGS = {"storage_options": storage_options, **settings}
    try:
        _RECOGNIZER = build_recognizer(recognizer, pack, storage_options=storage_options)
    except Exception as exc:  # noqa: BLE001 - reported by the first chunk, so the parent raises it (not a dead pool)
        _INIT_ERROR = exc


def _fault(row: dict[str, Any], kind: ErrorCode, message: str) -> dict[str, Any]:
    return {"id": row.get("id"), FAULT: {"code": kind.value, "message": message}}


def _score_chunk(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row, its record, or a ``FAULT`` answer for a fault of the machine (retried by the parent)."""
    from farm.identity.score_job import score_row

    if _INIT_ERROR is not None:
        raise _InitFailed(_INIT_ERROR)
    out = []
    for row in rows:
        try:
            out.append(score_row(row, _RECOGNIZER, _PORTRAITS, **_SETTINGS))
        except InfraError as exc:
            out.append(_fault(row, ErrorCode.INFRA, str(exc)))
        except MemoryError:
            _PORTRAITS.clear()
            out.append(_fault(row, ErrorCode.INFRA, "out of memory while scoring the row"))
        except Exception as exc:  # noqa: BLE001 - unexpected: retried alone, then recorded with its message
            out.append(_fault(row, ErrorCode.POISON, f"scoring raised {type(exc).__name__}: {exc}"))
    return out


@dataclass
class Entry:
    """A row on its way to a record, with the faults charged to it so far."""

    row: dict[str, Any]
    charged: int = 0


@dataclass
class Final:
    """A row whose faults exhausted its tries: record it failed with ``code``."""

    entry: Entry
    code: str
    message: str


class RowQueue:
    """Which rows go to the pool together, and what a fault costs (no processes here: unit-testable).

    Fresh rows go in chunks. A row caught in a fault becomes a suspect: suspects run one at a time with nothing else
    in flight, so a fault then is the row's own and is charged; ``max_tries`` charges make it ``Final``.
    """

    def __init__(self, rows: Iterator[tuple[dict[str, Any], ...]], max_tries: int = MAX_TRIES) -> None:
        self.fresh = rows
        self.suspects: deque[Entry] = deque()
        self.max_tries = max_tries
        self.exhausted = False

    def next_batch(self, inflight: int) -> list[Entry] | None:
        """The next rows to submit given ``inflight`` batches in flight; None: wait for one to finish (or done)."""
        if self.suspects:
            return [self.suspects.popleft()] if inflight == 0 else None
        if self.exhausted:
            return None
        chunk = next(self.fresh, None)
        if chunk is None:
            self.exhausted = True
            return None
        return [Entry(dict(row)) for row in chunk]

    def fault(self, entries: list[Entry], alone: bool, code: str, message: str) -> list[Final]:
        """``entries`` hit a fault; charged only when ``alone`` (the only row in flight). Returns those now final."""
        finals = []
        for entry in entries:
            entry.charged += int(alone)
            if entry.charged >= self.max_tries:
                finals.append(Final(entry, code, f"{message} (the row alone, {entry.charged} times)"))
            else:
                self.suspects.append(entry)
        return finals


def check_filesystems(manifest: Manifest) -> None:
    """Fail before scoring when a URI in the manifest needs an fsspec filesystem that is not installed.

    An unknown protocol is left to its row (``video_unreadable`` / ``portrait_unreadable``): bad input is data.
    """
    missing: dict[str, tuple[str, str, int]] = {}  # protocol -> (first uri, import error, rows)
    checked: dict[str, str | None] = {}
    for batch in manifest.batches(["portrait", "video"]):
        for column in batch.columns:
            for uri in column.to_pylist():
                protocol = storage.protocol_of(uri) if isinstance(uri, str) and uri else None
                if protocol is None:
                    continue
                if protocol not in checked:
                    try:
                        fsspec.get_filesystem_class(protocol)
                        checked[protocol] = None
                    except ImportError as exc:
                        checked[protocol] = str(exc)
                    except ValueError:
                        checked[protocol] = None  # unknown: the row's own error
                if checked[protocol] is not None:
                    first, why, rows = missing.get(protocol, (uri, checked[protocol], 0))
                    missing[protocol] = (first, why, rows + 1)
    if missing:
        parts = [f"{n} {p}:// URIs (first {u!r}): {why}" for p, (u, why, n) in sorted(missing.items())]
        raise UnavailableFilesystem(
            f"the manifest names {'; '.join(parts)}. Install the package named (e.g. pip install gcsfs for gs://) "
            "and rerun; nothing was scored"
        )


class _Pool:
    """The process pool, the rows in flight, and the rules of ``RowQueue`` applied to what comes back."""

    def __init__(
        self,
        make: Callable[[], ProcessPoolExecutor],
        scorer: ChunkScorer,
        capacity: int,
        commit: Callable[[dict[str, Any], dict[str, Any]], None],
        commit_final: Callable[[Final], None],
    ) -> None:
        self.make, self.scorer, self.capacity = make, scorer, capacity
        self.commit, self.commit_final = commit, commit_final
        self.executor = make()
        self.inflight: dict[Future[list[dict[str, Any]]], list[Entry]] = {}
        self.deaths = 0  # worker deaths since a row last got a record of its own

    def drain(self, queue: RowQueue, writer: results.ResultWriter) -> None:
        """Submit, collect and requeue until every row has a record."""
        while True:
            while len(self.inflight) < self.capacity:
                batch = queue.next_batch(len(self.inflight))
                if batch is None:
                    break
                try:
                    self.inflight[self.executor.submit(self.scorer, [dict(e.row) for e in batch])] = batch
                except BrokenProcessPool:  # a worker died while idle: nothing of this batch ran, none is charged
                    self._replace(batch, queue, alone=False)
            if not self.inflight:
                return
            finished, _ = wait(self.inflight, timeout=max(0.1, writer.due_in()), return_when=FIRST_COMPLETED)
            alone = sum(map(len, self.inflight.values())) == 1
            lost = [entry for fut in finished for entry in self._collect(fut, queue, alone)]
            if lost:
                self._replace(lost, queue, alone)
            writer.flush_if_due()

    def _collect(self, fut: Future[list[dict[str, Any]]], queue: RowQueue, alone: bool) -> list[Entry]:
        """Commit a finished future's records, requeue its faulted rows; returns its rows when the pool broke."""
        batch = self.inflight.pop(fut)
        try:
            answers = fut.result()
        except BrokenProcessPool:
            return batch
        except _InitFailed as exc:
            raise exc.original from None
        except Exception as exc:  # noqa: BLE001 - e.g. MemoryError outside a row, a result that can't be pickled
            code = ErrorCode.INFRA if isinstance(exc, MemoryError | InfraError) else ErrorCode.POISON
            for final in queue.fault(batch, alone, code.value, f"scoring the row raised {type(exc).__name__}: {exc}"):
                self.commit_final(final)
            return []
        for entry, answer in zip(batch, answers):
            if FAULT in answer:
                for final in queue.fault([entry], alone, answer[FAULT]["code"], answer[FAULT]["message"]):
                    self.commit_final(final)
            else:
                self.commit(entry.row, answer)
                self.deaths = 0
        return []

    def _replace(self, lost: list[Entry], queue: RowQueue, alone: bool) -> None:
        """A worker died: every future of this pool fails. Requeue the rows it held, start a fresh pool."""
        wait(self.inflight)
        for fut in list(self.inflight):
            lost.extend(self._collect(fut, queue, alone=False))
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.deaths += 1
        if self.deaths > MAX_DEATHS:
            raise ScoreAborted(
                f"scoring workers died {self.deaths} times without a row finishing; the machine is at fault "
                "(memory? the recognizer?). Committed rows are kept: rerun the same command to resume"
            )
        log.warning("a scoring worker died; %d row(s) requeued, each to run alone", len(lost))
        message = "the worker process died while scoring the row (SIGKILL, the OOM killer or a native crash)"
        for final in queue.fault(lost, alone and len(lost) == 1, ErrorCode.POISON.value, message):
            self.commit_final(final)
        self.executor = self.make()

    def close(self) -> None:
        self.executor.shutdown(wait=not self.inflight, cancel_futures=True)


INSIGHTFACE_NEEDS_PACK = (
    "--recognizer insightface needs --pack (an insightface model pack dir or URI, e.g. --pack ./models/antelopev2); "
    "or use --recognizer dlib, which needs no pack"
)


def _already_scored(layout: OutputLayout, metrics: str, retry_failed: bool, rescore_changed: bool) -> set[str]:
    """The committed ids this run skips, from one read of the log: every committed id (``retry_failed``: the ok
    ones), less those scored with other settings than ``metrics``, which are refused (``ChangedScores``) unless
    ``rescore_changed``. Records without settings (older ones) count as unchanged."""
    committed = table.read_results(layout, ["status", "metrics_config"])
    moved = committed.filter(pc.fill_null(pc.not_equal(committed.column("metrics_config"), metrics), False))
    if moved.num_rows and not rescore_changed:
        changes = settings_changes("metrics", Counter(moved.column("metrics_config").to_pylist()), metrics)
        raise ChangedScores(
            f"output {layout.root!r} has {moved.num_rows:,} committed row(s) scored with other settings:\n"
            + "".join(f"  {line}\n" for line in changes)
            + "rerun with --rescore-changed to score them again (their records are replaced), or give another --output"
        )
    kept = committed.filter(pc.equal(committed.column("status"), Status.OK.value)) if retry_failed else committed
    return set(kept.column("id").to_pylist()) - set(moved.column("id").to_pylist())


def score_manifest(
    manifest_uri: str,
    output: str,
    recognizer: str = "dlib",
    pack: str | None = None,
    frames: int = 16,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    workers: int = 2,
    strict: bool = False,
    min_face_size: float = 32,
    retry_failed: bool = False,
    rescore_changed: bool = False,
    chunk_scorer: ChunkScorer = _score_chunk,
) -> dict[str, Any]:
    """Score every uncommitted row (``retry_failed``: and every row not ``ok``); returns counts.

    Bad rows and rows that keep faulting become ``failed`` records, never exceptions. Raises
    ``UnavailableFilesystem`` before scoring when the manifest needs a filesystem that is not installed,
    ``ScoreAborted`` when workers die without finishing any row. ``chunk_scorer`` is the module-level function the
    workers run per chunk (``_score_chunk``); tests pass one that kills its own worker to prove the pool survives.
    """
    if recognizer == "insightface" and not pack:
        raise ValueError(INSIGHTFACE_NEEDS_PACK)
    options = storage.bind_storage_options(storage_options, output, manifest_uri)
    secrets.remember({"storage_options": options})  # error messages in records never carry them
    manifest = Manifest(manifest_uri, options, required=SCORE_COLUMNS, known=frozenset(SCORE_COLUMNS))
    check_filesystems(manifest)
    layout = OutputLayout(output, options)
    extra = manifest.extra_columns
    schema = results.result_schema(pa.schema([manifest.schema.field(c) for c in extra]))
    model = f"score:{recognizer}"
    identity = {"recognizer": recognizer, "pack": pack, "frames": frames, "strict": strict}
    metrics = fingerprints.canonical({"identity": {**identity, "min_face_size": min_face_size}})
    done = _already_scored(layout, metrics, retry_failed, rescore_changed)
    writer = results.ResultWriter(layout, schema, table.next_run_seq(layout), every_rows=64, every_s=10.0)
    counts: Counter[str] = Counter()

    def commit(row: dict[str, Any], fields: dict[str, Any]) -> None:
        rec = Record(**fields, carried={results.carried_name(name): row.get(name) for name in extra})
        rec.set(model=rec.model or model, metrics_config=metrics)
        if rec.status == Status.OK.value:
            rec.metrics_fingerprint = fingerprints.metrics_fingerprint(metrics, {"identity_model": rec.identity_model})
        if rec.error_message:
            rec.error_message = secrets.scrub(rec.error_message)
        counts[rec.status] += 1
        writer.add(rec)
        bar.update(1)

    def commit_final(final: Final) -> None:
        row = final.entry.row
        log.warning("row %r recorded failed (%s): %s", row.get("id"), final.code, final.message)
        rec = {"id": row.get("id"), "status": Status.FAILED.value, "error_code": final.code}
        rec.update(error_message=final.message, portrait=row.get("portrait"), video=row.get("video"))
        commit(row, rec)

    def pending() -> Iterator[tuple[dict[str, Any], ...]]:
        chunk: list[dict[str, Any]] = []
        for state, key, row, error in plan_rows(manifest, done):
            if state is not RowState.TODO:
                counts["already_committed" if state is RowState.COMMITTED else "duplicate_rows"] += 1
                bar.update(1)
                continue
            if error is not None:
                commit(
                    row,
                    {
                        "id": key,
                        "status": Status.FAILED.value,
                        "error_code": error.code.value,
                        "error_message": error.message,
                        "portrait": row.get("portrait"),
                        "video": row.get("video"),
                    },
                )
                continue
            chunk.append(row)
            if len(chunk) == CHUNK_ROWS:
                yield tuple(chunk)
                chunk = []
        if chunk:
            yield tuple(chunk)

    settings = {"k": frames, "strict": strict, "min_face_size": min_face_size}
    bar = tqdm(total=manifest.num_rows, unit="video", disable=not progress, mininterval=0.5)

    def new_pool() -> ProcessPoolExecutor:
        initargs = (recognizer, pack, options, settings)
        return ProcessPoolExecutor(max(1, workers), initializer=_init_worker, initargs=initargs)

    pool = _Pool(new_pool, chunk_scorer, 2 * max(1, workers), commit, commit_final)
    try:
        pool.drain(RowQueue(pending()), writer)
    finally:
        pool.close()
        writer.flush()
        bar.close()
    return {"output": output, "counts": dict(counts)}
