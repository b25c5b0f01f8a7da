from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.manifest import Manifest, ManifestError, RowDefaults, derive_seed, resolve_row
from farm.params import SamplingParams
from farm.records import ErrorCode, RowError
from tests.helpers import rows, write_manifest

DEFAULTS = RowDefaults(SamplingParams(), "neg", base_seed=42)


def test_streams_file_dir_and_glob(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_manifest(tmp_path / "d" / "a.parquet", rows(3))
    write_manifest(tmp_path / "d" / "b.parquet", [{**r, "id": r["id"] + "b", "lang": "en"} for r in rows(2)])
    (tmp_path / "d" / "_SUCCESS").write_text("")
    for uri in (str(tmp_path / "d"), str(tmp_path / "d" / "*.parquet")):
        m = Manifest(uri, batch_rows=2)
        assert m.num_rows == 5
        assert m.extra_columns == ["lang"]
        got = list(m.rows())
        assert [r["id"] for r in got] == ["row-000", "row-001", "row-002", "row-000b", "row-001b"]
        assert got[0]["lang"] is None and got[-1]["lang"] == "en"
    assert len(list(Manifest(str(tmp_path / "d" / "a.parquet")).rows())) == 3


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        (pa.table({"id": ["a"], "prompt": ["p"]}), "lacks required column"),
        (pa.table({"id": [1], "portrait": ["p"], "prompt": ["p"]}), "column 'id' must be string"),
        (pa.table({"id": ["a"], "portrait": ["p"], "prompt": ["p"], "rights_confirmed": ["yes"]}), "must be bool"),
    ],
)
def test_schema_errors(tmp_path: Path, table: pa.Table, fragment: str) -> None:
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=fragment):
        Manifest(str(tmp_path / "m.parquet"))


def test_missing_empty_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no .parquet files"):
        Manifest(str(tmp_path / "empty"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="not readable Parquet"):
        Manifest(str(tmp_path / "bad.parquet"))


def test_conflicting_types_across_files(tmp_path: Path) -> None:
    write_manifest(tmp_path / "a.parquet", [{**rows(1)[0], "extra": 1}])
    write_manifest(tmp_path / "b.parquet", [{**rows(1)[0], "extra": "x"}])
    with pytest.raises(ManifestError, match="disagree"):
        Manifest(str(tmp_path))


def test_duplicate_ids(tmp_path: Path) -> None:
    data = rows(4)
    data[3]["id"] = data[1]["id"]
    m = Manifest(write_manifest(tmp_path / "m.parquet", data), batch_rows=1)
    assert m.duplicate_ids() == {"row-001"}


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"id": "has space"}, ErrorCode.BAD_ID),
        ({"id": "x" * 129}, ErrorCode.BAD_ID),
        ({"id": "a/b"}, ErrorCode.BAD_ID),
        ({"id": None}, ErrorCode.BAD_ID),
        ({"prompt": "   "}, ErrorCode.EMPTY_PROMPT),
        ({"prompt": None}, ErrorCode.EMPTY_PROMPT),
        ({"portrait": ""}, ErrorCode.MISSING_PORTRAIT),
        ({"num_frames": 10}, ErrorCode.BAD_PARAM),
        ({"guidance_scale": 99.0}, ErrorCode.BAD_PARAM),
        ({"seed": -5}, ErrorCode.BAD_PARAM),
        ({"rights_confirmed": False}, ErrorCode.RIGHTS_NOT_CONFIRMED),
    ],
)
def test_row_errors(patch: dict, code: ErrorCode) -> None:
    with pytest.raises(RowError) as err:
        resolve_row({**rows(1)[0], **patch}, DEFAULTS)
    assert err.value.code == code


def test_resolution_order_and_seed() -> None:
    row = {**rows(1)[0], "height": 64, "width": 96, "seed": 7, "negative_prompt": None}
    req = resolve_row(row, DEFAULTS)
    assert (req.params.height, req.params.width, req.params.num_frames, req.seed) == (64, 96, 81, 7)
    assert req.negative_prompt == "neg"
    plain = resolve_row(rows(1)[0], DEFAULTS)
    assert plain.seed == derive_seed(42, "row-000") == resolve_row(rows(1)[0], DEFAULTS).seed
    assert derive_seed(42, "row-000") != derive_seed(43, "row-000")
    strict = RowDefaults(SamplingParams(), "", 0, require_rights_confirmed=True)
    with pytest.raises(RowError, match="rights_confirmed"):
        resolve_row(rows(1)[0], strict)
    assert resolve_row({**rows(1)[0], "rights_confirmed": True}, strict).id == "row-000"
