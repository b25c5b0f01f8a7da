"""``farm score``: identity metrics for videos made anywhere, resumable like a job.

The manifest has ``id``, ``portrait`` and ``video`` columns (any fsspec URIs; ``video`` is an mp4 or a folder of
frames); other columns are carried through. Rows are scored in worker processes (one recognizer each, loaded once)
and committed to ``OUT/results/`` with the same commit protocol as ``farm run``: a rerun skips committed ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from farm import results
from farm.manifest import Manifest, RowState, plan_rows
from farm.records import Status
from farm.storage import OutputLayout

SCORE_COLUMNS = ("id", "portrait", "video")
CHUNK_ROWS = 4

_RECOGNIZER: Any = None
_SETTINGS: dict[str, Any] = {}


def _init_worker(recognizer: str, pack: str | None, storage_options: dict[str, Any], settings: dict[str, Any]) -> None:
    global _RECOGNIZER, _SETTINGS
    from farm.identity.recognizer import build_recognizer

    _RECOGNIZER = build_recognizer(recognizer, pack, storage_options=storage_options)
    _SETTINGS = {"storage_options": storage_options, **settings}


def _score_chunk(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from farm.identity.score_job import score_rows

    return list(score_rows(rows, _RECOGNIZER, **_SETTINGS))


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
) -> dict[str, Any]:
    """Score every uncommitted row; returns counts. Bad rows become ``failed`` records, never exceptions."""
    if recognizer == "insightface" and not pack:
        raise ValueError("--recognizer insightface needs --pack (an insightface model pack dir or URI)")
    options = dict(storage_options or {})
    manifest = Manifest(manifest_uri, options, required=SCORE_COLUMNS, known=frozenset(SCORE_COLUMNS))
    layout = OutputLayout(output, options)
    extra = manifest.extra_columns
    schema = results.result_schema(pa.schema([manifest.schema.field(c) for c in extra]))
    writer = results.ResultWriter(layout, schema, every_rows=64, every_s=10.0)
    done = results.committed_ids(layout)
    counts: Counter[str] = Counter()
    model = f"score:{recognizer}"

    def commit(row: dict[str, Any], rec: dict[str, Any]) -> None:
        for name in extra:
            rec[results.carried_name(name)] = row.get(name)
        rec.setdefault("model", model)
        counts[rec["status"]] += 1
        writer.add(rec)
        bar.update(1)

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
    try:
        with ProcessPoolExecutor(
            max(1, workers), initializer=_init_worker, initargs=(recognizer, pack, options, settings)
        ) as pool:
            inflight: dict[Future[list[dict[str, Any]]], tuple[dict[str, Any], ...]] = {}
            chunks = pending()
            exhausted = False
            while True:
                while not exhausted and len(inflight) < 2 * max(1, workers):
                    chunk = next(chunks, None)
                    if chunk is None:
                        exhausted = True
                        break
                    inflight[pool.submit(_score_chunk, [dict(r) for r in chunk])] = chunk
                if not inflight:
                    break
                finished, _ = wait(inflight, timeout=max(0.1, writer.due_in()), return_when=FIRST_COMPLETED)
                for fut in finished:
                    rows = inflight.pop(fut)
                    for row, rec in zip(rows, fut.result()):
                        commit(row, rec)
                writer.flush_if_due()
    finally:
        writer.flush()
        bar.close()
    return {"output": output, "counts": dict(counts)}
