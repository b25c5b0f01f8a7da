"""One clean table (issue 9): ``open_results`` and ``publish`` merge the record log into one row per id, the newest
in log order; ``check_carried_types`` keeps the log's column types mergeable; consolidation keeps every record."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import farm.publish
import farm.table
from farm import storage, table
from farm.cli import main
from farm.lease import LeaseHeld, OutputLease
from farm.publish import compact_output, publish
from farm.records import Record
from farm.results import ResultWriter, result_schema, write_part
from farm.storage import OutputLayout
from farm.table import SchemaDrift, check_carried_types, log_schema, open_results, read_results

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
CARRIED_1 = pa.schema([("campaign", pa.string()), ("priority", pa.int32())])
CARRIED_2 = pa.schema([("campaign", pa.string()), ("priority", pa.int64()), ("lang", pa.string())])
# id -> (status, campaign, priority, lang) after all three runs
EXPECTED = {
    "a": ("ok", "spring", 0, None),
    "b": ("ok", "spring", 10, "de"),
    "c": ("ok", "spring", 2, None),
    "d": ("ok", "spring", 30, "fr"),
    "e": ("ok", "spring", 4, None),
    "f": ("failed", "spring", 5, None),
    "g": ("ok", "spring", 6, None),
    "h": ("ok", "spring", 7, None),
    "i": ("ok", "summer", 8, "en"),
    "legacy-only": ("ok", "winter", None, None),
}


def _rec(row_id: str, status: str, **carried: Any) -> Record:
    code = "no_face" if status == "failed" else None
    return Record(id=row_id, status=status, error_code=code, video=f"videos/{row_id}.mp4", carried=carried)


def _run(layout: OutputLayout, run_seq: int, carried: pa.Schema, records: list[Record]) -> None:
    writer = ResultWriter(layout, result_schema(carried), run_seq, every_rows=3, run_id=f"run{run_seq}")
    for record in records:
        writer.add(record)
    writer.flush()


def _legacy_part(layout: OutputLayout) -> None:
    """A part written before the log moved: in results/, no run_seq column."""
    old = pa.table(
        {
            "id": ["a", "legacy-only"],
            "status": ["failed", "ok"],
            "committed_at": pa.array([T0, T0], pa.timestamp("us", tz="UTC")),
            "campaign": ["winter", "winter"],
        }
    )
    uri = storage.join(layout.results_dir, "part-00000-old.parquet")
    storage.write_bytes_atomic(uri, _parquet(old), layout.storage_options)


def _parquet(t: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    return sink.getvalue().to_pybytes()


def build_output(root: str, storage_options: dict[str, Any] | None = None) -> OutputLayout:
    """A legacy part, then run 1 (a..h, b/d/f failed), run 2 (retry: b ok, one row added, a new column ``lang``,
    ``priority`` widened to int64), run 3 (--retry-failed: d ok, f still failed)."""
    layout = OutputLayout(root, storage_options)
    _legacy_part(layout)
    run1 = [_rec(r, "failed" if r in "bdf" else "ok", campaign="spring", priority=i) for i, r in enumerate("abcdefgh")]
    _run(layout, 1, CARRIED_1, run1)
    run2 = [
        _rec("b", "ok", campaign="spring", priority=10, lang="de"),
        _rec("d", "failed", campaign="spring", priority=3, lang="fr"),
        _rec("f", "failed", campaign="spring", priority=5),
        _rec("i", "ok", campaign="summer", priority=8, lang="en"),
    ]
    _run(layout, 2, CARRIED_2, run2)
    _run(layout, 3, CARRIED_2, [_rec("d", "ok", campaign="spring", priority=30, lang="fr"), run2[2]])
    return layout


def as_dicts(t: pa.Table) -> dict[str, tuple[Any, ...]]:
    cols = [t.column(c).to_pylist() for c in ("id", "status", "campaign", "priority", "lang")]
    return {row[0]: tuple(row[1:]) for row in zip(*cols, strict=True)}


def _log_records(layout: OutputLayout) -> int:
    return sum(pq.read_metadata(p).num_rows for p in layout.log_parts())


def test_open_results_one_row_per_id_newest_in_log_order(tmp_path: Path) -> None:
    layout = build_output(str(tmp_path / "out"))
    got = open_results(layout.root)
    assert got.column("id").to_pylist() == sorted(EXPECTED)
    assert as_dicts(got) == EXPECTED
    core = result_schema().names
    assert got.column_names[: len(core)] == core
    assert got.column_names[len(core) :] == ["campaign", "priority", "lang"]
    assert got.schema.field("priority").type == pa.int64()  # widened in run 2
    assert got.schema.equals(log_schema(layout))
    assert got.column("run_seq").to_pylist()[got.column("id").to_pylist().index("legacy-only")] is None


def test_open_results_reads_the_log_when_the_published_table_is_stale(tmp_path: Path) -> None:
    layout = build_output(str(tmp_path / "out"))
    publish(layout)
    _run(layout, 4, CARRIED_2, [_rec("f", "ok", campaign="spring", priority=5)])  # a run that crashed before publish
    assert as_dicts(open_results(layout.root))["f"][0] == "ok"
    assert as_dicts(pq.read_table(layout.published))["f"][0] == "failed"


def test_open_results_names_a_missing_output(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no Lynx Farm output") as err:
        open_results(str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing") in str(err.value)


def test_newest_wins_by_run_seq_not_by_clock(tmp_path: Path) -> None:
    """Run 1's host clock was an hour fast: its record still loses to run 2's."""
    layout = OutputLayout(str(tmp_path / "out"))
    schema = result_schema()
    fast = Record(id="x", status="failed", committed_at=T0 + dt.timedelta(hours=1), run_seq=1, run_id="r1")
    write_part(layout, 1, "r1", 0, [fast], schema)
    write_part(layout, 2, "r2", 0, [Record(id="x", status="ok", committed_at=T0, run_seq=2, run_id="r2")], schema)
    assert open_results(layout.root).column("status").to_pylist() == ["ok"]
    publish(layout)
    assert pq.read_table(layout.published).column("status").to_pylist() == ["ok"]


def test_publish_writes_one_clean_file(tmp_path: Path) -> None:
    layout = build_output(str(tmp_path / "out"))
    records = _log_records(layout)
    summary = publish(layout)
    assert os.listdir(layout.results_dir) == ["results.parquet"]  # legacy part moved out, no temp file left
    assert summary["legacy_parts_moved"] == 1 and summary["ids_published"] == len(EXPECTED)
    assert summary["records_in_log"] == records == _log_records(layout)
    assert os.path.basename(layout.log_parts()[0]).startswith("part-00000000-legacy-part-00000-old")
    published = pq.read_table(layout.published)
    assert published.equals(read_results(layout))  # the log merged in memory
    meta = pq.ParquetFile(layout.published).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert publish(layout)["ids_published"] == len(EXPECTED)  # again: same table
    assert pq.read_table(layout.published).equals(published)


def test_a_reader_listing_during_publish_never_sees_two_files(tmp_path: Path) -> None:
    layout = build_output(str(tmp_path / "out"))
    publish(layout)
    seen: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(sorted(p.name for p in Path(layout.results_dir).glob("*.parquet")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(5):
            publish(layout)
    finally:
        stop.set()
        watcher.join()
    assert seen and all(names == ["results.parquet"] for names in seen)


def test_check_carried_types_refuses_a_clash(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    _run(layout, 1, pa.schema([("campaign", pa.int64())]), [_rec("a", "ok", campaign=7), _rec("b", "ok", campaign=8)])
    with pytest.raises(SchemaDrift) as err:
        check_carried_types(layout, pa.schema([("campaign", pa.string())]))
    message = str(err.value)
    assert "'campaign'" in message and "string" in message and "int64" in message
    assert "1 earlier part(s)" in message and "new output" in message and "Cast the manifest column" in message
    _run(layout, 2, pa.schema([("big", pa.int64())]), [_rec("c", "ok", big=2**60 + 1)])
    with pytest.raises(SchemaDrift, match="'big'"):  # a 64-bit integer into a float would lose digits
        check_carried_types(layout, pa.schema([("big", pa.float64())]))
    check_carried_types(layout, pa.schema([("big", pa.int64()), ("campaign", pa.int32())]))


@pytest.mark.parametrize(
    ("before", "now"),
    [
        (pa.int32(), pa.int64()),
        (pa.int64(), pa.int32()),
        (pa.null(), pa.string()),
        (pa.string(), pa.null()),
        (pa.int32(), pa.float64()),
        (pa.string(), pa.large_string()),
        (pa.timestamp("ms"), pa.timestamp("us")),
    ],
)
def test_check_carried_types_accepts_widening(tmp_path: Path, before: pa.DataType, now: pa.DataType) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    _run(layout, 1, pa.schema([("x", before)]), [_rec("a", "ok")])
    check_carried_types(layout, pa.schema([("x", now), ("brand_new", pa.string())]))
    _run(layout, 2, pa.schema([("x", now)]), [_rec("b", "ok")])
    publish(layout)
    kind = pq.read_schema(layout.published).field("x").type
    assert kind == (pa.string() if pa.types.is_null(before) and pa.types.is_null(now) else kind)
    assert pq.read_table(layout.published).num_rows == 2


def test_a_clash_already_in_the_log_is_published_as_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    _run(layout, 1, pa.schema([("campaign", pa.int64())]), [_rec("a", "ok", campaign=7)])
    _run(layout, 2, pa.schema([("campaign", pa.string())]), [_rec("b", "ok", campaign="spring")])
    with caplog.at_level(logging.WARNING, logger="farm"):
        publish(layout)
    assert "campaign" in caplog.text and "text" in caplog.text
    published = pq.read_table(layout.published)
    assert published.schema.field("campaign").type == pa.string()
    assert published.column("campaign").to_pylist() == ["7", "spring"]


def test_consolidation_keeps_every_record_and_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(farm.publish, "MAX_LOG_PARTS", 4)
    monkeypatch.setattr(farm.publish, "TARGET_PART_ROWS", 5)
    layout = build_output(str(tmp_path / "out"))
    expected = open_results(layout.root)
    records = _log_records(layout)
    before = len(layout.log_parts())
    summary = publish(layout)
    assert summary["parts_consolidated"] == before and summary["parts_written"] < before
    assert len(layout.log_parts()) == summary["parts_written"] == summary["parts_after"]
    assert _log_records(layout) == records  # superseded records stay: the log is the audit trail
    assert open_results(layout.root).equals(expected)
    assert table.next_run_seq(layout) == 4
    _run(layout, 4, CARRIED_2, [_rec("f", "ok", campaign="spring", priority=5)])  # a later run still wins
    assert as_dicts(open_results(layout.root))["f"][0] == "ok"
    assert publish(layout)["parts_consolidated"] == 0  # only one new part since


def test_a_crash_between_writing_and_deleting_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(farm.publish, "MAX_LOG_PARTS", 4)
    monkeypatch.setattr(farm.publish, "TARGET_PART_ROWS", 5)
    layout = build_output(str(tmp_path / "out"))
    expected = as_dicts(open_results(layout.root))
    deleted: list[str] = []

    def crash(uri: str, options: object) -> None:
        if len(deleted) == 3:
            raise KeyboardInterrupt("power cut")
        deleted.append(uri)
        os.remove(uri)

    monkeypatch.setattr(farm.publish, "_delete", crash)
    with pytest.raises(KeyboardInterrupt):
        publish(layout)
    assert as_dicts(open_results(layout.root)) == expected  # duplicates, resolved the same
    monkeypatch.undo()
    publish(layout)
    assert as_dicts(pq.read_table(layout.published)) == expected


def test_compact_output_refuses_while_a_run_holds_the_lease(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layout = build_output(str(tmp_path / "out"))
    running = OutputLease(layout, run_id="a-running-job").acquire()
    with pytest.raises(LeaseHeld):
        compact_output(layout.root)
    assert main(["compact", layout.root]) == 5
    assert not Path(layout.published).exists()
    running.release()
    assert compact_output(layout.root)["ids_published"] == len(EXPECTED)
    assert not Path(layout.lease).exists() or OutputLease(layout).read() is None


def test_publish_on_s3(s3_bucket: str, s3_endpoint: dict[str, Any]) -> None:
    opts = s3_endpoint["storage_options"]
    layout = build_output(f"{s3_bucket}/job", opts)
    expected = open_results(layout.root, opts)
    summary = compact_output(layout.root, opts)
    assert summary["legacy_parts_moved"] == 1 and summary["ids_published"] == len(EXPECTED)
    assert storage.list_files(layout.results_dir, "", opts) == [layout.published]
    fs, path = storage.get_fs(layout.published, opts)
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).equals(expected)
    assert as_dicts(expected) == EXPECTED


def test_open_results_reads_the_published_table_while_it_is_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``publish``, ``open_results`` reads the one published file (no merge, memory of the table only) and
    gets what the merge gives; once a run adds a part, the published file is stale and the log is merged again."""
    layout = build_output(str(tmp_path / "out"))
    publish(layout)
    merged = read_results(layout)
    monkeypatch.setattr(farm.table, "merge_in_memory", _no_merge)
    assert open_results(layout.root).equals(merged)
    monkeypatch.undo()
    _run(layout, 5, CARRIED_2, [_rec("f", "failed", campaign="spring", priority=5)])
    monkeypatch.setattr(farm.table, "merge_in_memory", _no_merge)
    with pytest.raises(AssertionError, match="merged"):
        open_results(layout.root)


def _no_merge(*args: object) -> None:
    raise AssertionError("the log was merged although the published table is current")
