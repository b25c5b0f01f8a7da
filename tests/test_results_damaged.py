"""Readers of ``results/`` skip damaged or foreign parts with a warning naming the file; good parts still count."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm import storage
from farm.cli import main
from farm.records import Record
from farm.report import compare_outputs, export_results, status_text
from farm.results import result_schema, write_part
from farm.storage import OutputLayout
from farm.table import DamagedPart, committed_ids, read_results

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _good_parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "status": ["ok"], "committed_at": [T0]}), buf)
    return buf.getvalue()


def _truncated() -> bytes:
    return _good_parquet()[:-40]


def _not_parquet() -> bytes:
    return b"id,status\nx,ok\n"


def _empty() -> bytes:
    return b""


def _foreign_schema() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"name": ["x"], "value": [1.5]}), buf)
    return buf.getvalue()


def _numeric_ids() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2], "status": ["ok", "ok"]}), buf)
    return buf.getvalue()


DAMAGE: dict[str, Callable[[], bytes]] = {
    "truncated": _truncated,
    "not_parquet": _not_parquet,
    "empty": _empty,
    "foreign_schema": _foreign_schema,
    "numeric_ids": _numeric_ids,
}


def _output(tmp_path: Path, damage: str) -> tuple[OutputLayout, str]:
    """Two good parts (a: failed then ok, b: ok) and one damaged file that sorts between them."""
    layout = OutputLayout(str(tmp_path / "out"))
    schema = result_schema(pa.schema([("lang", pa.string())]))
    write_part(layout, 1, "r1", 0, [Record(id="a", status="failed", committed_at=T0, carried={"lang": "en"})], schema)
    later = T0 + dt.timedelta(seconds=1)
    write_part(
        layout, 3, "r3", 0, [Record(id="a", status="ok", committed_at=later), Record(id="b", status="ok")], schema
    )
    bad = storage.join(layout.log_dir, "part-00000002-r2-000000.parquet")
    storage.write_bytes_atomic(bad, DAMAGE[damage]())
    return layout, bad


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_committed_ids_skip_damaged_part(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    layout, bad = _output(tmp_path, damage)
    found: list[DamagedPart] = []
    with caplog.at_level(logging.WARNING, logger="farm"):
        assert committed_ids(layout, found) == {"a", "b"}
    assert [d.uri for d in found] == [bad]
    assert bad in caplog.text and "damaged result part" in caplog.text


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_read_results_skip_damaged_part(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    layout, bad = _output(tmp_path, damage)
    with caplog.at_level(logging.WARNING, logger="farm"):
        table = read_results(layout)
        some = read_results(layout, ["status", "lang"])
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert some.column_names == ["id", "status", "lang"]
    assert bad in caplog.text


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_status_results_compare_list_and_skip(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    layout, bad = _output(tmp_path, damage)
    text = status_text(layout.root)
    assert "records: 2" in text
    assert "damaged parts: 1" in text and bad in text
    lines = export_results(layout.root, None, "jsonl", None, None).splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b"]
    assert "a" in export_results(layout.root, None, "table", None, None)
    assert compare_outputs([layout.root, layout.root], None).splitlines()[1].split()[1:3] == ["2", "2"]
    with caplog.at_level(logging.WARNING, logger="farm"):
        assert main(["status", layout.root]) == 0
        assert main(["results", layout.root, "--format", "csv"]) == 0
        assert main(["compare", layout.root]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert bad in caplog.text


def test_only_damaged_parts_read_as_empty(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path / "out"))
    storage.write_bytes_atomic(storage.join(layout.log_dir, "x.parquet"), _not_parquet())
    assert committed_ids(layout) == set()
    assert read_results(layout, ["status"]).num_rows == 0
    assert "damaged parts: 1" in status_text(layout.root)


def test_a_folder_named_like_a_part_is_skipped(tmp_path: Path) -> None:
    layout, _ = _output(tmp_path, "empty")
    (Path(layout.log_dir) / "spark-export.parquet").mkdir()
    found: list[DamagedPart] = []
    assert read_results(layout, ["status"], found).column("id").to_pylist() == ["a", "b"]
    assert len(found) == 2 and any("spark-export.parquet" in d.uri for d in found)


def test_a_storage_fault_still_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a file that does not parse is skipped: a rerun must not redo committed rows because storage hiccuped."""
    layout, _ = _output(tmp_path, "truncated")

    def fail(uri: str, storage_options: object = None) -> bytes:
        raise TimeoutError(f"read timed out: {uri}")

    monkeypatch.setattr(storage, "read_bytes", fail)
    with pytest.raises(TimeoutError):
        committed_ids(layout)
