"""One nasty manifest through the real driver (session Ray cluster, `still` backend), then a rerun.

Behaviour promised (see tests/test_manifest_nasty.py for each case on its own): every input id ends with exactly one
record; bad rows are failed/skipped records with a stable ``error_code`` and no video; good rows with odd but valid
ids (``.``, ``..``, ``-``, case variants) get their own video inside ``videos/``; strings are parsed as parameters
(``seed="9223372036854775807"``, ``height="64"``) exactly; unknown columns of any type come back unchanged (those
named like result columns as ``input_<name>``); 0-row files and ``_temporary/`` copies add no rows; rerunning does
nothing and still leaves one record per id.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from farm.manifest import Manifest, record_key
from farm.runtime.driver import run_job
from farm.storage import OutputLayout
from farm.table import read_results
from tests.helpers import ASTRONAUT, still_job

pytestmark = pytest.mark.usefixtures("ray_cluster")

INT64_MAX = 2**63 - 1
HUGE = "🦊 مرحبا \u202eevil\u202c " + "ж" * 50_000  # ~100 KB of UTF-8
WHEN = dt.datetime(2024, 3, 31, 1, 30, tzinfo=dt.timezone.utc)

# id -> (seed, height, prompt, portrait, expected status or error code)
ROWS_A: list[tuple[Any, ...]] = [
    ("Abc", None, None, "p", ASTRONAUT, "ok"),
    ("aBc", None, None, "p", ASTRONAUT, "ok"),
    (".", None, None, "p", ASTRONAUT, "ok"),
    ("..", None, None, "p", ASTRONAUT, "ok"),
    ("-", None, None, "p", ASTRONAUT, "ok"),
    ("big", None, None, HUGE, ASTRONAUT, "ok"),
    ("seedmax", str(INT64_MAX), None, "p", ASTRONAUT, "ok"),
    ("seedneg", "-1", None, "p", ASTRONAUT, "bad_param"),
    ("h64", None, "64", "p", ASTRONAUT, "ok"),
    ("hbad", None, "sixty", "p", ASTRONAUT, "bad_param"),
    ("émoji", None, None, "p", ASTRONAUT, "bad_id"),  # recorded as "<bad id HASH>"
    ("noportrait", None, None, "p", None, "missing_portrait"),
    (None, None, None, "p", ASTRONAUT, "bad_id"),  # recorded as "<bad id HASH>"
    ("dup", None, None, "first", ASTRONAUT, "duplicate_id"),
    ("blank", None, None, " \t", ASTRONAUT, "empty_prompt"),
]
ROWS_B: list[tuple[Any, ...]] = [
    ("dup", None, None, "second", ASTRONAUT, "duplicate_id"),
    ("zz", None, None, "p", ASTRONAUT, "ok"),
]


def _write_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """The nasty manifest folder; returns the carried-through values each id must come back with."""
    n = len(ROWS_A)
    a = pa.table(
        {
            "id": pa.array([r[0] for r in ROWS_A], pa.string()),
            "portrait": pa.array([r[4] for r in ROWS_A], pa.string()),
            "prompt": pa.array([r[3] for r in ROWS_A], pa.string()),
            "seed": pa.array([r[1] for r in ROWS_A], pa.string()),
            "height": pa.array([r[2] for r in ROWS_A], pa.string()),
            "lang": pa.array([f"l{i % 3}" for i in range(n)]).dictionary_encode(),
            "tags": pa.array([[f"t{i}"] * (i % 3) for i in range(n)], pa.list_(pa.string())),
            "meta": pa.array(
                [{"k": i, "v": None} for i in range(n)], pa.struct([("k", pa.int64()), ("v", pa.string())])
            ),
            "status": pa.array([f"mine-{i}" for i in range(n)]),
            "when": pa.array([WHEN + dt.timedelta(hours=i) for i in range(n)], pa.timestamp("us", tz="Asia/Kolkata")),
            "price": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(9, 2)),
            "blob": pa.array([bytes([i, 255]) for i in range(n)]),
            "far": pa.array([300_000_000_000_000 + i for i in range(n)], pa.timestamp("ms")),  # beyond year 9999
        }
    )
    b = pa.table(
        {
            "id": [r[0] for r in ROWS_B],
            "portrait": [r[4] for r in ROWS_B],
            "prompt": pa.array([r[3] for r in ROWS_B], pa.large_string()),
            "lang": ["lb", "lb"],
            "video": ["theirs.mp4", None],
            "attempts": pa.array([7, 8], pa.int8()),
        }
    )
    (root / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(a, root / "a.parquet", row_group_size=4)
    pq.write_table(a, root / "_temporary" / "0" / "a.parquet")  # a writer's leftover copy: must be ignored
    pq.write_table(b, root / "b.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), root / "c.parquet")  # 0 rows, odd type
    carried: dict[str, dict[str, Any]] = {}
    for row in Manifest(str(root)).rows():
        row_id = record_key(row)
        carried.setdefault(row_id, row)
    return carried


def test_nasty_manifest_end_to_end_and_rerun(tmp_path: Path) -> None:
    manifest = tmp_path / "m"
    manifest.mkdir()
    source = _write_manifest(manifest)
    out = tmp_path / "out"
    job = still_job(str(manifest), str(out), resources={"replicas": 2, "cpus_per_replica": 0.25})
    summary = run_job(job, progress=False)

    table = read_results(OutputLayout(str(out)))
    recs = {r["id"]: r for r in table.drop_columns(["far"]).to_pylist()}  # "far" has no Python datetime
    expected = {record_key({"id": r[0], "portrait": r[4], "prompt": r[3]}): r[5] for r in ROWS_A + ROWS_B}
    assert len(recs) == table.num_rows == len(expected) == len(source)
    assert set(recs) == set(expected)
    for row_id, want in expected.items():
        rec = recs[row_id]
        if want == "ok":
            assert rec["status"] == "ok" and rec["error_code"] is None, rec["error_message"]
            assert os.path.dirname(rec["video"]) == str(out / "videos")
            assert Path(rec["video"]).is_file() and Path(rec["video"]).stat().st_size > 0
        else:
            assert (rec["status"], rec["error_code"], rec["video"]) == ("failed", want, None), row_id
    ok = [i for i, w in expected.items() if w == "ok"]
    assert len({recs[i]["video"] for i in ok}) == len(ok) == 9  # case variants get their own videos
    assert Path(recs["."]["video"]).name == "..mp4" and Path(recs[".."]["video"]).name == "...mp4"
    assert recs["seedmax"]["seed"] == INT64_MAX and recs["h64"]["height"] == 64
    assert recs["big"]["prompt"] == HUGE
    assert "seed=-1" in recs["seedneg"]["error_message"] and "sixty" in recs["hbad"]["error_message"]
    assert recs["dup"]["prompt"] == "first"
    assert summary.counts["ok"] == len(ok) and summary.rows_seen == len(ROWS_A) + len(ROWS_B)

    # carried-through columns, exactly as the manifest holds them (the far timestamp stays an Arrow value)
    for row_id, row in source.items():
        rec = table.filter(pc.equal(table.column("id"), row_id))
        for name in ("lang", "tags", "meta", "when", "price", "blob"):
            assert rec.column(name).to_pylist() == [row[name]], (row_id, name)
        assert rec.column("input_status").to_pylist() == [row["status"]]
        assert rec.column("input_video").to_pylist() == [row["video"]]
        assert rec.column("input_attempts").to_pylist() == [row["attempts"]]
        far = None if row["far"] is None else row["far"].cast(pa.int64()).as_py()
        assert rec.column("far").cast(pa.int64()).to_pylist() == [far]
    assert table.schema.field("when").type == pa.timestamp("us", tz="Asia/Kolkata")
    assert table.schema.field("price").type == pa.decimal128(9, 2)

    # rerun: everything is committed, nothing is redone, still one record per id
    again = run_job(
        still_job(str(manifest), str(out), resources={"replicas": 1, "cpus_per_replica": 0.25}), progress=False
    )
    assert again.already_committed == len(ROWS_A) + len(ROWS_B) and sum(again.counts.values()) == 0
    parts = OutputLayout(str(out)).log_parts()
    assert sum(pq.read_metadata(p).num_rows for p in parts) == len(expected)
