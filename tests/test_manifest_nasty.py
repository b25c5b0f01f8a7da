"""Nasty manifests without Ray: each case states the behaviour we promise and checks it.

The promise: a manifest the farm cannot read as a whole is a ``ManifestError`` that names the file or column (the
CLI exits 2); a bad row is a row error with a stable ``error_code`` (a failed record at run time); nothing crashes;
columns the farm does not interpret come back in the results unchanged.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from farm import results, table
from farm.cli import main
from farm.manifest import Manifest, ManifestError, RowDefaults, derive_seed, resolve_row
from farm.params import SamplingParams
from farm.records import ErrorCode, Record, RowError
from farm.storage import OutputLayout
from farm.validate import validate_job
from tests.helpers import ASTRONAUT, rows, still_job, write_manifest

DEFAULTS = RowDefaults(SamplingParams(num_frames=5, height=32, width=48), "neg", base_seed=42)
INT64_MAX = 2**63 - 1


def _table(ids: list[Any], **columns: Any) -> pa.Table:
    n = len(ids)
    data = {"id": pa.array(ids, pa.string()), "portrait": pa.array([ASTRONAUT] * n), "prompt": pa.array(["p"] * n)}
    data.update({k: v if isinstance(v, pa.Array) else pa.array(v) for k, v in columns.items()})
    return pa.table(data)


def _write(path: Path, table: pa.Table, **kwargs: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return str(path)


def _outcome(row: dict[str, Any]) -> Any:
    """The resolved request, or the error code of the row."""
    try:
        return resolve_row(row, DEFAULTS)
    except RowError as exc:
        return exc.code


def _invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding raw bytes, as non-Arrow writers can produce (Arrow's own writers validate UTF-8)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(
        pa.string(),
        len(values),
        [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(b"".join(values))],
    )


# ---------------------------------------------------------------------------------------------------- ids, prompts
def test_lookalike_ids_unicode_prompts_and_huge_prompts(tmp_path: Path) -> None:
    """Ids follow ``[A-Za-z0-9._-]{1,128}`` (ASCII only): Unicode letters and digits, zero-width and full-width
    characters, a trailing newline -> ``bad_id``. ``.``, ``..``, ``-``, ``_`` match the pattern and are valid: a video
    is ``videos/<id>.mp4``, so the id is only ever a file-name stem and can never leave ``videos/``. Ids differing only
    by case are different ids (local Linux disks and object stores are case-sensitive). Prompts may hold any Unicode
    (emoji, RTL, bidi overrides, NUL) and be 100 KB long; they are passed on unchanged."""
    bad = ["émoji", "ab\u200b", "٣", "ＡＢＣ", "a\n", "a b", "a/b", "x" * 129, ""]
    good = [".", "..", "-", "_", "x" * 128, "Abc", "abc", "ABC"]
    huge = "🦊 مرحبا \u202eevil\u202c \x00 " + "é" * 50_000  # ~100 KB of UTF-8
    prompts = [huge if i == 0 else "ok" for i in range(len(bad + good))]
    manifest = write_manifest(
        tmp_path / "m.parquet", [{"id": i, "portrait": ASTRONAUT, "prompt": p} for i, p in zip(bad + good, prompts)]
    )
    got = {r["id"]: _outcome(r) for r in Manifest(manifest).rows()}
    assert {i: got[i] for i in bad} == dict.fromkeys(bad, ErrorCode.BAD_ID)
    assert all(got[i].id == i for i in good)
    assert len(got) == len(bad + good)  # case variants are distinct ids, not duplicates
    assert resolve_row({"id": "big", "portrait": ASTRONAUT, "prompt": huge}, DEFAULTS).prompt == huge
    layout = OutputLayout(str(tmp_path / "out"))
    videos = os.path.join(layout.root, "videos")
    for row_id in good:
        assert os.path.dirname(os.path.normpath(layout.video(row_id))) == videos

    report = validate_job(still_job(manifest, str(tmp_path / "out")))
    assert report.rows == len(bad + good) and report.valid == len(good)
    assert report.reasons == {"bad_id": len(bad)}


# ---------------------------------------------------------------------------------------------------- seeds, params
@pytest.mark.parametrize(
    ("column", "expected"),
    [
        # string column: digit strings are exact (no float rounding above 2**53); blank is not a number
        (
            pa.array(["7", " 8 ", str(INT64_MAX), "12345678901234567", "1e3", "-1", "abc", "", None]),
            [7, 8, INT64_MAX, 12345678901234567, 1000, "bad", "bad", "bad", "derived"],
        ),
        # float column: NaN is a missing value (pandas writes None as NaN), fractions and huge values are not seeds
        (pa.array([5.0, 5.5, float("nan"), 1e30, -0.0, float("inf")]), [5, "bad", "derived", "bad", 0, "bad"]),
        (pa.array([INT64_MAX, -1, -(2**63), None], pa.int64()), [INT64_MAX, "bad", "bad", "derived"]),
        (pa.array([2**64 - 1, 3], pa.uint64()), ["bad", 3]),
        (pa.array([decimal.Decimal("7.00"), decimal.Decimal("7.5")], pa.decimal128(10, 2)), [7, "bad"]),
        (pa.array([True, False]), ["bad", "bad"]),
        (pa.array([[1], None], pa.list_(pa.int64())), ["bad", "derived"]),
    ],
)
def test_seed_column_types(tmp_path: Path, column: pa.Array, expected: list[Any]) -> None:
    """A ``seed`` column of any type: whole numbers in [0, 2**63-1] are used exactly; null/NaN derive a stable seed
    from (job seed, id); anything else is ``bad_param`` naming the value."""
    ids = [f"r{i}" for i in range(len(column))]
    manifest = _write(tmp_path / "m.parquet", _table(ids, seed=column))
    for row, want in zip(Manifest(manifest).rows(), expected):
        got = _outcome(row)
        if want == "bad":
            assert got == ErrorCode.BAD_PARAM, (row["seed"], got)
            with pytest.raises(RowError, match="seed="):
                resolve_row(row, DEFAULTS)
        elif want == "derived":
            assert got.seed == derive_seed(42, row["id"]), row
        else:
            assert got.seed == want, (row["seed"], got)


def test_params_as_strings_and_nan_floats(tmp_path: Path) -> None:
    """Per-row parameters may come as strings (``"64"``, ``" 64 "``, ``"1e1"``): they are parsed. A float NaN is a
    missing value (the job default applies); a string ``"nan"``/``"inf"``, a non-number, a blank string or a fraction
    for an integer field is ``bad_param`` naming field and value."""
    table = _table(
        ["s64", "pad", "sixty", "blank", "null", "gnan", "ginf", "g1e1"],
        height=pa.array(["64", " 64 ", "sixty", "", None, None, None, None]),
        guidance_scale=pa.array([None, None, None, None, None, "nan", "inf", "1e1"]),
    )
    floats = _table(
        ["fnan", "f64", "frac", "gi_nan"],
        height=pa.array([float("nan"), 64.0, 64.5, None]),
        guidance_scale_i=pa.array([None, None, None, float("nan")]),
    )
    got = {
        r["id"]: _outcome(r)
        for t, name in ((table, "a"), (floats, "b"))
        for r in Manifest(_write(tmp_path / f"{name}.parquet", t)).rows()
    }
    assert got["s64"].params.height == got["pad"].params.height == got["f64"].params.height == 64
    assert got["g1e1"].params.guidance_scale == 10.0
    assert got["null"].params.height == got["fnan"].params.height == DEFAULTS.params.height
    assert got["gi_nan"].params.guidance_scale_i == DEFAULTS.params.guidance_scale_i
    for row_id in ("sixty", "blank", "gnan", "ginf", "frac"):
        assert got[row_id] == ErrorCode.BAD_PARAM, row_id
    with pytest.raises(RowError, match="height='sixty' is not a valid integer"):
        resolve_row({"id": "a", "portrait": "p", "prompt": "p", "height": "sixty"}, DEFAULTS)


def test_null_portrait_null_typed_columns_and_invalid_utf8(tmp_path: Path) -> None:
    """A null or blank portrait is ``missing_portrait``. Columns of Arrow type ``null`` (all values missing; what
    pandas writes for an all-None column) are accepted: a null ``id`` is ``bad_id`` for each row (never a
    ``duplicate_id`` of other missing ids). Invalid UTF-8 in a text column (written by a non-Arrow tool) never crashes
    the reader: it reads as U+FFFD, so such an id is ``bad_id`` and such a prompt ``bad_param``."""
    portraits = _table(["np", "bp"], portrait=pa.array([None, "  "], pa.string()))
    nulls = pa.table({"id": pa.nulls(2), "portrait": pa.array([ASTRONAUT] * 2), "prompt": pa.nulls(2)})
    utf = pa.table(
        {
            "id": _invalid_utf8([b"ok", b"\xff\xfeid", b"p2"]),
            "portrait": pa.array([ASTRONAUT] * 3),
            "prompt": _invalid_utf8([b"fine", b"p", b"bad \xc3("]),
        }
    )
    a = list(Manifest(_write(tmp_path / "a.parquet", portraits)).rows())
    assert [_outcome(r) for r in a] == [ErrorCode.MISSING_PORTRAIT] * 2
    n = Manifest(_write(tmp_path / "n.parquet", nulls))
    assert n.duplicate_ids() == set()
    assert [_outcome(r) for r in n.rows()] == [ErrorCode.BAD_ID] * 2
    u = Manifest(_write(tmp_path / "u" / "u.parquet", utf))
    assert u.duplicate_ids() == set()
    got = [_outcome(r) for r in u.rows()]
    assert got[0].prompt == "fine" and got[1:] == [ErrorCode.BAD_ID, ErrorCode.BAD_PARAM]
    report = validate_job(still_job(str(tmp_path / "n.parquet"), str(tmp_path / "out")))
    assert report.reasons == {"bad_id": 2}


# ---------------------------------------------------------------------------------------------------- files, dirs
def test_zero_row_manifests(tmp_path: Path) -> None:
    """A manifest with 0 rows (but the required columns) is valid and yields nothing. A 0-row file with no columns
    at all lacks the required columns: ``ManifestError``."""
    empty = _write(tmp_path / "e.parquet", _table([]))
    m = Manifest(empty)
    assert m.num_rows == 0 and list(m.rows()) == [] and m.duplicate_ids() == set()
    report = validate_job(still_job(empty, str(tmp_path / "out")))
    assert report.ok and report.rows == 0
    with pytest.raises(ManifestError, match="lacks required column"):
        Manifest(_write(tmp_path / "z" / "z.parquet", pa.table({})))


def test_directory_with_empty_odd_and_hidden_files(tmp_path: Path) -> None:
    """A directory is every ``*.parquet`` below it, sorted, except files under (or named with) a leading ``.`` or
    ``_`` (``_SUCCESS``, Spark's ``_temporary/`` partial copies, ``.ipynb_checkpoints/``): reading those would
    duplicate rows. Files with 0 rows contribute nothing, so their schemas (pandas writes an empty frame's columns as
    ``null`` or ``int64``) cannot conflict with the real files. A file with extra columns adds them (null elsewhere).
    A file *with rows* that lacks a required column is a ``ManifestError`` naming that file."""
    d = tmp_path / "d"
    _write(d / "a.parquet", _table(["a1", "a2"]))
    _write(d / "b.parquet", pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.float64())}))
    _write(d / "c.parquet", _table(["c1"], lang=["en"]))
    _write(d / "d.parquet", pa.table({}))
    _write(d / "sub" / "e.parquet", _table(["e1"]))
    _write(d / "_temporary" / "0" / "a.parquet", _table(["a1", "a2"]))
    _write(d / ".ipynb_checkpoints" / "a.parquet", _table(["a1"]))
    _write(d / "_hidden.parquet", _table(["a1"]))
    (d / "_SUCCESS").write_text("")
    (d / "notes.txt").write_text("not a manifest")
    m = Manifest(str(d), batch_rows=1)
    assert [r["id"] for r in m.rows()] == ["a1", "a2", "c1", "e1"]
    assert m.num_rows == 4 and m.extra_columns == ["lang"] and m.duplicate_ids() == set()
    assert [r["lang"] for r in m.rows()] == [None, None, "en", None]
    assert validate_job(still_job(str(d), str(tmp_path / "out"))).valid == 4

    _write(d / "f.parquet", pa.table({"id": ["f1"], "portrait": [ASTRONAUT]}))
    with pytest.raises(ManifestError, match=r"f\.parquet' lacks required column\(s\) \['prompt'\]"):
        Manifest(str(d))


def test_dictionary_and_large_string_columns(tmp_path: Path) -> None:
    """Dictionary encoding (pandas categoricals) and ``large_string`` are storage details: such ``id``, ``portrait``,
    ``prompt`` columns are strings, also when another file stores the same column plainly. A carried dictionary
    column comes back as its plain value type with the same values."""
    _write(
        tmp_path / "a.parquet",
        pa.table(
            {
                "id": pa.array(["a", "b"]).dictionary_encode(),
                "portrait": pa.array([ASTRONAUT] * 2).dictionary_encode(),
                "prompt": pa.array(["p", "q"], pa.large_string()),
                "lang": pa.array(["en", "fr"]).dictionary_encode(),
            }
        ),
    )
    _write(tmp_path / "b.parquet", _table(["c"], lang=pa.array(["de"], pa.large_string())))
    m = Manifest(str(tmp_path))
    assert [(_outcome(r).id, r["prompt"], r["lang"]) for r in m.rows()] == [
        ("a", "p", "en"),
        ("b", "q", "fr"),
        ("c", "p", "de"),
    ]
    assert m.schema.field("lang").type == pa.large_string()


def test_duplicate_ids_across_files_row_groups_and_case(tmp_path: Path) -> None:
    """Duplicates are found across files and row groups (one streaming pass over ``id``); no row of a duplicated id
    runs, and ``farm validate`` reports one ``duplicate_id`` finding per id, as ``farm run`` makes one failed record
    for it (both classify rows with ``plan_rows``). Ids differing only by case are distinct."""
    _write(tmp_path / "a.parquet", _table([f"r{i}" for i in range(10)] + ["Dup"]), row_group_size=3)
    _write(tmp_path / "b.parquet", _table(["r7", "dup", "r11"]))
    assert pq.read_metadata(tmp_path / "a.parquet").num_row_groups == 4
    m = Manifest(str(tmp_path), batch_rows=2)
    assert [r["id"] for r in m.rows()] == [f"r{i}" for i in range(10)] + ["Dup", "r7", "dup", "r11"]
    assert m.duplicate_ids() == {"r7"}
    report = validate_job(still_job(str(tmp_path), str(tmp_path / "out")))
    assert report.reasons == {"duplicate_id": 1} and report.valid == 12 and report.rows == 14


@pytest.mark.parametrize(
    ("bad_bytes", "fragment"),
    [
        (b"", "not readable Parquet"),
        (b"id,portrait,prompt\na,b,c\n", "not readable Parquet"),
        (b"PAR1" + b"\x00" * 64 + b"PAR1", "not readable Parquet"),
    ],
)
def test_corrupt_file_among_good_ones(tmp_path: Path, bad_bytes: bytes, fragment: str) -> None:
    """A file that is not Parquet (empty, CSV, garbage footer) among good files: ``ManifestError`` naming that file,
    before any row is read or any GPU time is spent; the CLI exits 2."""
    _write(tmp_path / "m" / "a.parquet", _table(["a"]))
    (tmp_path / "m" / "b.parquet").write_bytes(bad_bytes)
    _write(tmp_path / "m" / "c.parquet", _table(["c"]))
    with pytest.raises(ManifestError, match=f"b.parquet.*{fragment}|{fragment}.*b.parquet"):
        Manifest(str(tmp_path / "m"))
    assert main(["validate", str(_job_yaml(tmp_path, str(tmp_path / "m")))]) == 2


def test_corrupt_data_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file whose footer is fine but whose data pages are damaged is only found while reading: the reader raises
    ``ManifestError`` naming the file (``farm validate`` reads everything, so it exits 2 before any run)."""
    good = _write(tmp_path / "m" / "a.parquet", _table(["a"]))
    n = 3000
    path = _write(
        tmp_path / "m" / "b.parquet",
        _table([f"r{i}" for i in range(n)], text=[f"some text {i} " * 4 for i in range(n)]),
    )
    raw = bytearray(Path(path).read_bytes())
    for i in range(64, len(raw) // 2):
        raw[i] ^= 0x5A
    Path(path).write_bytes(bytes(raw))
    m = Manifest(str(tmp_path / "m"))
    with pytest.raises(ManifestError, match="b.parquet' cannot be read"):
        list(m.rows())
    assert main(["validate", str(_job_yaml(tmp_path, str(tmp_path / "m")))]) == 2
    assert "b.parquet" in capsys.readouterr().err
    assert len(list(Manifest(good).rows())) == 1


def test_globs_and_odd_paths(tmp_path: Path) -> None:
    """A glob matching nothing (or matching only non-Parquet files) is a ``ManifestError`` quoting the URI; a missing
    path says it does not exist. A glob matching a Spark-style ``x.parquet/`` folder reads the parts inside it; ``**``
    never reads a file twice. A real path containing glob characters (``run[1]``) is read literally."""
    _write(tmp_path / "d" / "a.parquet", _table(["a"]))
    (tmp_path / "d" / "b.csv").write_text("id\n")
    for pattern in ("*.nomatch.parquet", "zzz*", "*.csv"):
        with pytest.raises(ManifestError, match="matches no .parquet files"):
            Manifest(str(tmp_path / "d" / pattern))
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest(str(tmp_path / "nope" / "m.parquet"))
    _write(tmp_path / "spark" / "out.parquet" / "part-0.parquet", _table(["s0"]))
    _write(tmp_path / "spark" / "out.parquet" / "_temporary" / "part-0.parquet", _table(["s0"]))
    assert [r["id"] for r in Manifest(str(tmp_path / "spark" / "*.parquet")).rows()] == ["s0"]
    assert [r["id"] for r in Manifest(str(tmp_path / "**")).rows()] == ["a", "s0"]
    literal = _write(tmp_path / "run[1]" / "m.parquet", _table(["lit"]))
    assert [r["id"] for r in Manifest(literal).rows()] == ["lit"]
    assert [r["id"] for r in Manifest(str(tmp_path / "run[1]")).rows()] == ["lit"]


def test_schema_conflicts_name_the_files_and_columns(tmp_path: Path) -> None:
    """Files whose columns cannot be unified (timestamps in different zones, list vs string) or a file with one
    column name twice: ``ManifestError`` naming the files / the column. Promotable types (int32 vs int64, string vs
    large_string) are unified."""
    utc = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    _write(tmp_path / "tz" / "a.parquet", _table(["a"], when=pa.array([utc], pa.timestamp("us", tz="UTC"))))
    _write(tmp_path / "tz" / "b.parquet", _table(["b"], when=pa.array([utc], pa.timestamp("us", tz="Asia/Tokyo"))))
    with pytest.raises(ManifestError, match=r"disagree.*b\.parquet.*a\.parquet.*when"):
        Manifest(str(tmp_path / "tz"))
    twice = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array([ASTRONAUT]), pa.array(["p"]), pa.array([1]), pa.array([2])],
        names=["id", "portrait", "prompt", "x", "x"],
    )
    with pytest.raises(ManifestError, match=r"column\(s\) \['x'\] more than once"):
        Manifest(_write(tmp_path / "twice.parquet", twice))
    _write(tmp_path / "ok" / "a.parquet", _table(["a"], n=pa.array([1], pa.int32())))
    _write(tmp_path / "ok" / "b.parquet", _table(["b"], n=pa.array([2**40], pa.int64())))
    assert [r["n"] for r in Manifest(str(tmp_path / "ok")).rows()] == [1, 2**40]


# ---------------------------------------------------------------------------------------------------- carried columns
def _carried_table(n: int) -> dict[str, pa.Array]:
    far = pa.array([300_000_000_000] + [None] * (n - 1), pa.timestamp("s"))  # year 11476: no Python datetime
    paris = dt.datetime(2024, 3, 31, 2, 30, tzinfo=dt.timezone.utc)
    return {
        "tags": pa.array([["a", "b"], [], None][:n], pa.list_(pa.string())),
        "meta": pa.array(
            [{"k": 1, "v": "x"}, None, {"k": None, "v": "y"}][:n], pa.struct([("k", pa.int64()), ("v", pa.string())])
        ),
        "attrs": pa.array([[("a", 1)], None, []][:n], pa.map_(pa.string(), pa.int64())),
        "when": pa.array([paris, None, paris][:n], pa.timestamp("us", tz="Europe/Paris")),
        "far": far,
        "price": pa.array([decimal.Decimal("1.23"), None, decimal.Decimal("-0.01")][:n], pa.decimal128(10, 2)),
        "blob": pa.array([b"\x00\xff", None, b""][:n], pa.binary()),
        "big": pa.array([2**64 - 1, 0, None][:n], pa.uint64()),
        "nothing": pa.nulls(n),
        "status": pa.array(["mine", None, "x"][:n]),
        "video": pa.array(["v.mp4", "w", None][:n]),
        "attempts": pa.array([9, None, 1][:n], pa.int16()),
        "committed_at": pa.array(["then", None, None][:n]),
        "_order": pa.array([3, 2, 1][:n]),
        "__filename": pa.array(["f", "g", "h"][:n]),
        "größe 📏": pa.array([1.5, None, float("nan")][:n]),
        "": pa.array(["empty name", None, None][:n]),
    }


def _run_without_ray(manifest: Manifest, output: Path) -> pa.Table:
    """What the driver does with rows (carry extras, commit parts), minus the replicas; returns the merged results."""
    extra = manifest.extra_columns
    schema = results.result_schema(pa.schema([manifest.schema.field(c) for c in extra]))
    layout = OutputLayout(str(output))
    writer = results.ResultWriter(layout, schema, 1, every_rows=2)
    for row in manifest.rows():
        try:
            request = resolve_row(row, DEFAULTS)
            rec: dict[str, Any] = {"id": request.id, "status": "ok", "seed": request.seed, "prompt": request.prompt}
        except RowError as exc:
            rec = {"id": row["id"], "status": "failed", "error_code": exc.code.value}
        rec.update({results.carried_name(c): row[c] for c in extra})
        writer.add(Record.from_row(rec))
    writer.flush()
    return table.read_results(layout)


def test_nested_and_reserved_name_columns_carried_through(tmp_path: Path) -> None:
    """Columns the farm does not interpret are carried through with their values and types (list, struct, map,
    timestamp with zone, a timestamp beyond Python's datetime, decimal, binary, uint64, null, any name). Dictionary
    encoding is the only thing dropped. A column named like a result column (``status``, ``video``, ``attempts``,
    ``committed_at``, ...) is carried as ``input_<name>``. Rows of every outcome keep their carried values."""
    carried = _carried_table(3)
    table = pa.table(
        {"id": ["ok", "bad id", "big"], "portrait": [ASTRONAUT] * 3, "prompt": ["p", "p", "🦊" * 25_000], **carried}
    )
    m = Manifest(_write(tmp_path / "m.parquet", table, row_group_size=2), batch_rows=2)
    assert m.extra_columns == list(carried)
    got = _run_without_ray(m, tmp_path / "out")
    assert got.column("id").to_pylist() == ["bad id", "big", "ok"]
    assert got.column("status").to_pylist() == ["failed", "ok", "ok"]
    assert got.column("prompt").to_pylist()[1] == "🦊" * 25_000
    order = [1, 2, 0]  # results are sorted by id
    for name, column in carried.items():
        out = results.carried_name(name)
        assert out == (f"input_{name}" if name in results.RESERVED else name)
        stored = m.schema.field(name).type  # as Parquet keeps it (it has no seconds unit: timestamp[s] -> [ms])
        assert stored == column.type or name == "far", name
        if pa.types.is_null(stored):  # an all-null column is read back as text: no reader has to guess a type
            stored = pa.string()
        assert got.schema.field(out).type == stored, name
        have, want = got.column(out).combine_chunks(), column.cast(stored).take(order)
        # NaN != NaN in equals(); the printed form shows NaN, null and the values exactly
        assert have.equals(want) or (pa.types.is_floating(stored) and have.to_string() == want.to_string()), name
    assert "input_status" in got.column_names and got.column("input_status").to_pylist()[2] == "mine"


def test_carried_name_collision_is_a_manifest_error(tmp_path: Path) -> None:
    """``status`` is carried as ``input_status``; a manifest that also has ``input_status`` would get two result
    columns of one name, so it is refused up front naming both columns."""
    table = _table(["a"], status=["x"], input_status=["y"])
    with pytest.raises(ManifestError, match="'status' and 'input_status' would both be carried"):
        Manifest(_write(tmp_path / "m.parquet", table))


def test_results_survive_an_edited_manifest_between_runs(tmp_path: Path) -> None:
    """Resume after the user changed the manifest: parts of the earlier run carry ``extra`` as int64, the later run
    as string and adds ``lang``. Reading never fails: exactly one record per id (newest wins), a column whose type
    changed is merged as text, a column missing from older parts is null there; asking for a column no part has
    returns it all-null."""
    layout = OutputLayout(str(tmp_path / "out"))
    first = results.result_schema(pa.schema([pa.field("extra", pa.int64())]))
    second = results.result_schema(pa.schema([pa.field("extra", pa.string()), pa.field("lang", pa.string())]))
    w1 = results.ResultWriter(layout, first, 1)
    for i in range(3):
        w1.add(Record(id=f"r{i}", status="failed", carried={"extra": i}))
    w1.flush()
    w2 = results.ResultWriter(layout, second, 2)
    w2.add(Record(id="r1", status="ok", carried={"extra": "one", "lang": "en"}))
    w2.flush()
    got = table.read_results(layout)
    assert got.column("id").to_pylist() == ["r0", "r1", "r2"]
    assert got.column("status").to_pylist() == ["failed", "ok", "failed"]
    assert got.column("extra").to_pylist() == ["0", "one", "2"]
    assert got.column("lang").to_pylist() == [None, "en", None]
    assert table.read_results(layout, ["lang"]).column_names == ["id", "lang"]
    assert table.read_results(layout, ["nobody"]).column("nobody").null_count == 3
    assert table.committed_ids(layout) == {"r0", "r1", "r2"}


def _job_yaml(tmp_path: Path, manifest: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "manifest": manifest,
                "output": str(tmp_path / "out"),
                "model": {"backend": "still"},
                "identity": {"enabled": False},
            }
        )
    )
    return path


def test_cli_exit_codes_for_nasty_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``farm validate``: a manifest it cannot read -> exit 2 with ``error:`` naming the problem; bad rows -> exit 1
    with per-reason counts; a nasty but valid manifest -> exit 0."""
    job = _job_yaml(tmp_path, str(tmp_path / "nothing-*.parquet"))
    assert main(["validate", str(job)]) == 2
    assert "matches no .parquet files" in capsys.readouterr().err
    clash = _write(tmp_path / "clash.parquet", _table(["a"], status=["x"], input_status=["y"]))
    assert main(["validate", str(job), "--manifest", clash]) == 2
    assert "input_status" in capsys.readouterr().err
    bad = write_manifest(tmp_path / "bad.parquet", rows(2) + [{"id": "..", "portrait": None, "prompt": "p"}])
    assert main(["validate", str(job), "--manifest", bad]) == 1
    assert any(line.split() == ["missing_portrait", "1"] for line in capsys.readouterr().out.splitlines())
    nested = _write(
        tmp_path / "nested.parquet",
        pa.table({"id": ["a", "b", "c"], "portrait": [ASTRONAUT] * 3, "prompt": ["p"] * 3, **_carried_table(3)}),
    )
    assert main(["validate", str(job), "--manifest", nested]) == 0
    assert "carried-through columns: tags, meta" in capsys.readouterr().out


def test_remote_folder_glob_and_literal(s3_bucket: str, s3_endpoint: dict[str, Any]) -> None:
    """The same discovery rules on an object store (moto S3 on loopback): a prefix reads its visible parts only, a
    glob reads matching parts and Spark-style folders, a key with glob characters is read literally."""
    import s3fs

    opts = s3_endpoint["storage_options"]
    fs = s3fs.S3FileSystem(**opts)

    def put(key: str, ids: list[str]) -> None:
        with fs.open(f"{s3_bucket}/{key}", "wb") as fh:
            pq.write_table(_table(ids), fh)

    put("m/a.parquet", ["a"])
    put("m/sub/b.parquet", ["b"])
    put("m/_temporary/0/a.parquet", ["a"])
    put("m/.hidden/a.parquet", ["a"])
    put("m/run[1].parquet", ["lit"])
    assert [r["id"] for r in Manifest(f"{s3_bucket}/m", opts).rows()] == ["a", "lit", "b"]  # sorted keys
    assert [r["id"] for r in Manifest(f"{s3_bucket}/m/*.parquet", opts).rows()] == ["a", "lit"]
    assert [r["id"] for r in Manifest(f"{s3_bucket}/m/run[1].parquet", opts).rows()] == ["lit"]
    with pytest.raises(ManifestError, match="matches no .parquet files"):
        Manifest(f"{s3_bucket}/m/zzz*.parquet", opts)
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest(f"{s3_bucket}/nothing/here.parquet", opts)


def test_validate_counts_rows_withheld_by_rights_as_skipped_not_invalid(tmp_path: Path) -> None:
    """Found by a README walkthrough: ``farm validate`` exited 1 for rows ``farm run`` only skips."""
    data = rows(2) + [{"id": "norights", "portrait": ASTRONAUT, "prompt": "p", "rights_confirmed": False}]
    report = validate_job(still_job(write_manifest(tmp_path / "m.parquet", data), str(tmp_path / "out")))
    assert report.ok and report.valid == 2 and dict(report.skipped) == {"rights_not_confirmed": 1}
    text = report.render()
    assert "invalid: 0" in text and "skipped by farm run (not invalid): 1 rights_not_confirmed" in text
