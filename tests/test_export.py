"""`farm export`: the --where parser, selection rules, the three layouts read back by their real readers
(webdataset, Hugging Face datasets, pyarrow), resume after an interruption, S3, and what the card may not leak."""

from __future__ import annotations

import io
import json
import re
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from farm import storage
from farm.export import ExportError, export_output, shards
from farm.export.formats import encode_key
from farm.export.select import select
from farm.export.where import parse_where, tokenize
from farm.results import result_schema
from farm.storage import OutputLayout
from farm.video import encode_mp4

SECRET = "s3cr3t-value-never-written"
RUN_ID = "20261126T120000-abcdef"
IDS = ["a.b.c", "clip-01", "clip-02", "clip.03", "clip-04", "clip_05", "fail-1", "noright", "x-07"]


def _mp4(seed: int) -> bytes:
    frames = np.random.default_rng(seed).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    return encode_mp4(frames, 8, {"comment": "AI-generated video"}, preset="ultrafast")


def _record(layout: OutputLayout, i: int, row_id: str) -> dict[str, Any]:
    ok = row_id != "fail-1"
    return {
        "id": row_id,
        "status": "ok" if ok else "failed",
        "error_code": None if ok else "no_face",
        "video": layout.video(row_id) if ok else None,
        "portrait": "pkg://skimage/data/astronaut.png",
        "prompt": f"a person waves, take {i}",
        "num_frames": 3,
        "fps": 8,
        "seed": i,
        "model": "still",
        "identity_mean": None if row_id == "x-07" else 0.5 + i / 20,
        "face_rate": 1.0,
        "rights_confirmed": False if row_id == "noright" else (None if i % 2 else True),
        "shot": f"shot {i}",
    }


def make_output(root: str, options: dict[str, Any] | None = None, ids: list[str] = IDS) -> OutputLayout:
    """A small real output: tiny mp4s, one log part in the result schema (with a carried column and the nullable
    rights_confirmed), and a _job.json whose spec holds a credential."""
    layout = OutputLayout(root, options)
    extra = [pa.field("shot", pa.string())]
    if "rights_confirmed" not in result_schema().names:  # older schemas carried it from the manifest
        extra.insert(0, pa.field("rights_confirmed", pa.bool_()))
    schema = result_schema(pa.schema(extra))
    records = []
    for i, row_id in enumerate(ids):
        record = {**_record(layout, i, row_id), "run_seq": 1, "run_id": RUN_ID}
        if record["video"]:
            storage.write_bytes_atomic(record["video"], _mp4(i), options)
        records.append(record)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema), buf)
    storage.write_bytes_atomic(layout.log_part(1, RUN_ID, 0), buf.getvalue(), options)
    job = {
        "name": "export-test",
        "farm_version": "0.1.0",
        "spec": {"output": root, "storage_options": {"key": "AKIA", "secret": SECRET}},
        "model": {"backend": "still", "variant": None, "description": "still baseline", "fingerprint": "fp-123"},
        "runs": [{"run_id": RUN_ID, "run_seq": 1, "status": "finished"}],
    }
    layout.write_json(layout.job_json, job)
    return layout


@pytest.fixture()
def output(tmp_path: Path) -> OutputLayout:
    return make_output(str(tmp_path / "out"))


# ------------------------------------------------------------------ where
SCHEMA = pa.schema(
    [("id", pa.string()), ("status", pa.string()), ("identity_mean", pa.float64()), ("flag", pa.bool_())]
)
TABLE = pa.table(
    {"id": ["a", "b", "c", "d"], "status": ["ok", "ok", "failed", "ok"], "identity_mean": [0.7, None, 0.9, 0.2]}
).append_column("flag", pa.array([True, None, False, True]))


def _where(text: str) -> list[str]:
    expr = parse_where(text, SCHEMA)
    return TABLE.filter(ds.dataset(TABLE).to_table(columns={"m": expr}).column("m")).column("id").to_pylist()


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("status = 'ok' AND identity_mean >= 0.6", ["a"]),
        ("status <> 'ok' or identity_mean < 0.5", ["c", "d"]),
        ("NOT (identity_mean > 0.5)", ["d"]),  # null stays out: unknown is not true
        ("identity_mean IS NULL", ["b"]),
        ("identity_mean is not null and flag", ["a", "d"]),
        ("status IN ('failed', 'skipped')", ["c"]),
        ("identity_mean NOT IN (0.7, 0.9)", ["d"]),
        ("\"status\" = 'ok' AND 0.5 > identity_mean", ["d"]),
        ("flag = FALSE OR flag = TRUE AND id != 'a'", ["c", "d"]),
        ("id = 'it''s'", []),
    ],
)
def test_where_selects_with_sql_semantics(text: str, ids: list[str]) -> None:
    assert _where(text) == ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("identty_mean > 0.6", "unknown column 'identty_mean' at position 0; did you mean 'identity_mean'?"),
        ("status = 'ok' AND", "expected a column name or a value, found 'the end' at position 17"),
        ("status = 1", "column 'status' is string; a number (1) cannot be compared"),
        ("status = NULL", "write `column IS NULL`"),
        ("(status = 'ok'", "expected ')'"),
        ("status ; drop", "unexpected character ';' at position 7"),
        ("__import__('os')", "unknown column '__import__'"),
        ("   ", "--where is empty"),
    ],
)
def test_where_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_where(text, SCHEMA)
    assert message in str(info.value)
    if "unknown column" in message:
        assert "available columns: id, status, identity_mean, flag" in str(info.value)


def test_where_compares_timestamps_with_iso_text() -> None:
    schema = pa.schema([("committed_at", pa.timestamp("ms", tz="UTC"))])
    table = pa.table({"committed_at": pa.array([0, 2_000_000_000_000], pa.timestamp("ms", tz="UTC"))})
    expr = parse_where("committed_at >= '2030-01-01'", schema)
    assert ds.dataset(table).to_table(columns={"m": expr}).column("m").to_pylist() == [False, True]
    with pytest.raises(ExportError, match="'yesterday' is not an ISO date/time"):
        parse_where("committed_at > 'yesterday'", schema)


BIG_SEEDS = pa.table(
    {
        "id": ["a", "b", "c", "d"],
        "status": ["ok"] * 4,
        "video": ["v"] * 4,
        "seed": pa.array([834959276, 1, 2**53 + 1, None], pa.int64()),
    }
)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("seed > 0.5", ["a", "b", "c"]),
        ("seed >= 1e3", ["a", "c"]),
        ("seed < 1.5", ["b"]),
        ("seed <= 1.0", ["b"]),
        ("seed = 1.0", ["b"]),
        ("seed != 1.0", ["a", "c"]),
        ("seed <> 834959276.0", ["b", "c"]),
        ("0.5 < seed", ["a", "b", "c"]),
        ("seed IN (1.0, 2.5)", ["b"]),
        ("seed NOT IN (1.0, 834959276.0)", ["c"]),
        ("seed = 9007199254740993", ["c"]),  # an integer literal still compares exactly, past 2**53
        ("seed > 0.5 AND seed IN (1, 834959276)", ["a", "b"]),
    ],
)
def test_float_literals_compare_with_large_integer_columns(text: str, ids: list[str]) -> None:
    """Arrow narrows 0.5 to float32 and then refuses to cast a seed past 2**24 to it: the filter must still work."""
    assert select(BIG_SEEDS, text).table.column("id").to_pylist() == ids


def test_tokenize_keeps_positions() -> None:
    assert [(t.kind, t.pos) for t in tokenize("a>=1")] == [("word", 0), ("op", 1), ("number", 3), ("end", 4)]


# ------------------------------------------------------------------ webdataset
def test_webdataset_round_trips_through_webdataset_and_hf(output: OutputLayout, tmp_path: Path) -> None:
    dest = str(tmp_path / "wds")
    summary = export_output(output.root, "webdataset", dest, shard_size=3)
    expected = ["a.b.c", "clip-01", "clip-02", "clip-04", "clip.03", "clip_05", "x-07"]  # byte order
    assert summary["counts"] == {
        "records": 9,
        "selected": 7,
        "not_ok": 1,
        "excluded_rights": 1,
        "excluded_filter": 0,
        "missing_video": 0,
        "exported": 7,
    }
    assert summary["shards"] == 3
    tars = sorted(str(p) for p in Path(dest).glob("shard-*.tar"))
    assert [Path(t).name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    import webdataset as wds

    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["json"] and json.loads(s["json"])["id"] for s in samples] == expected
    assert [urllib.parse.unquote(s["__key__"]) for s in samples] == expected
    first = samples[0]
    record = json.loads(first["json"])
    assert first["mp4"] == (Path(output.root) / "videos" / "a.b.c.mp4").read_bytes()
    assert first["txt"].decode() == record["prompt"] == "a person waves, take 0"
    assert record["shot"] == "shot 0"
    assert record["provenance"]["model"]["fingerprint"] == "fp-123"
    assert record["provenance"]["run_id"] == record["run_id"]
    assert record["provenance"]["output"] == output.root

    from datasets import Video, load_dataset

    hf = load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "hf-cache"))
    hf = hf.cast_column("mp4", Video(decode=False))  # decoding needs torchcodec; the bytes are what matter
    assert [row["json"]["id"] for row in hf] == expected
    assert hf[0]["mp4"]["bytes"] == first["mp4"]
    assert hf[0]["txt"] == "a person waves, take 0"


def test_keys_round_trip_every_id_character() -> None:
    for row_id in ["a.b", "..x", "a_b-c.d", "%weird"]:
        assert urllib.parse.unquote(encode_key(row_id)) == row_id
        assert "." not in encode_key(row_id)


def test_where_narrows_but_never_widens(output: OutputLayout, tmp_path: Path) -> None:
    dest = str(tmp_path / "wds")
    where = "identity_mean > 0.62 OR status = 'failed' OR id = 'noright'"
    summary = export_output(output.root, "webdataset", dest, where=where)
    manifest = json.loads((Path(dest) / "export.json").read_text())
    ids = [i for shard in manifest["shards"] for i in shard["ids"]]
    assert ids == ["clip-04", "clip.03", "clip_05"]  # never the failed row, never the one without rights
    assert summary["counts"]["exported"] == 3
    assert manifest["counts"]["excluded_filter"] == 4 and manifest["counts"]["excluded_rights"] == 1
    assert manifest["filter"]["where"] == where
    assert manifest["filter"]["effective"] == (
        f"status = 'ok' AND video IS NOT NULL AND rights_confirmed IS NOT FALSE AND ({where})"
    )


def test_unknown_column_is_refused_before_writing(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "wds"
    with pytest.raises(ValueError, match="unknown column 'identity' .*did you mean"):
        export_output(output.root, "webdataset", str(dest), where="identity > 0.5")
    assert not dest.exists()


# ------------------------------------------------------------------ hf and parquet
def test_hf_layout_loads_with_datasets(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "hf"
    export_output(output.root, "hf", str(dest), shard_size=4)
    files = sorted(p.name for p in (dest / "data").iterdir())
    assert files == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    readme = (dest / "README.md").read_text()
    assert readme.startswith("---\nconfigs:\n- config_name: default\n")

    from datasets import load_dataset

    hf = load_dataset(str(dest), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert hf.num_rows == 7
    row = hf[0]
    assert row["id"] == "a.b.c"
    assert row["caption"] == row["prompt"]
    assert row["video"] == (Path(output.root) / "videos" / "a.b.c.mp4").read_bytes()
    assert row["source_video"] == output.video("a.b.c")
    assert row["shot"] == "shot 0"


def test_parquet_layout_has_relative_video_paths(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "pq"
    export_output(output.root, "parquet", str(dest))
    table = pq.read_table(dest / "data")
    assert table.column("id").to_pylist()[:2] == ["a.b.c", "clip-01"]
    for row_id, rel in zip(table.column("id").to_pylist(), table.column("video").to_pylist(), strict=True):
        assert rel == f"videos/{row_id}.mp4"
        assert (dest / rel).read_bytes() == (Path(output.root) / "videos" / f"{row_id}.mp4").read_bytes()
    assert table.schema.field("rights_confirmed").type == pa.bool_()


# ------------------------------------------------------------------ card and manifest
def test_card_and_manifest_say_what_is_inside_and_leak_nothing(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "wds"
    options = {"client_kwargs": {"region_name": "x"}, "token": "tok-" + SECRET}
    export_output(output.root, "webdataset", str(dest), shard_size=4, storage_options=options)
    readme = (dest / "README.md").read_text()
    manifest = json.loads((dest / "export.json").read_text())
    assert "AI-generated content" in readme
    assert "fp-123" in readme and "still baseline" in readme
    assert "| 9 | 7 | 1 | 1 | 0 | 0 |" in readme
    assert "| identity_mean | 6 |" in readme
    for path in dest.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    shard = manifest["shards"][0]
    assert shard["file"] == "shard-000000.tar"
    assert shard["ids"] == ["a.b.c", "clip-01", "clip-02", "clip-04"]
    video = shard["videos"][0]
    data = (Path(output.root) / "videos" / "a.b.c.mp4").read_bytes()
    assert video == {"id": "a.b.c", "sha256": shards.digest(data), "bytes": len(data)}
    assert manifest["metrics"]["identity_mean"]["count"] == 6
    assert manifest["metrics"]["face_rate"]["mean"] == 1.0
    assert manifest["source"] == output.root and manifest["farm_version"]


def test_missing_video_is_counted_listed_and_warned(
    output: OutputLayout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (Path(output.root) / "videos" / "clip-02.mp4").unlink()
    dest = tmp_path / "wds"
    summary = export_output(output.root, "webdataset", str(dest))
    assert summary["missing_videos"] == ["clip-02"]
    assert summary["counts"]["missing_video"] == 1 and summary["counts"]["exported"] == 6
    manifest = json.loads((dest / "export.json").read_text())
    assert manifest["missing_videos"] == [{"id": "clip-02", "video": output.video("clip-02")}]
    assert "have no video file" in caplog.text and "clip-02" in caplog.text
    with tarfile.open(dest / "shard-000000.tar") as tar:
        assert "clip-02.mp4" not in tar.getnames()


# ------------------------------------------------------------------ resume
def _contents(dest: Path) -> dict[str, bytes]:
    """Every file's bytes; export.json and the card's line with the export time compared without the time."""
    out = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    manifest = json.loads(out.pop("export.json"))
    manifest.pop("created_at")
    out["export.json"] = json.dumps(manifest, sort_keys=True).encode()
    out["README.md"] = re.sub(rb" at \S+\n", b"\n", out["README.md"])
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "hf", "parquet"])
def test_interrupted_export_resumes_to_the_same_bytes(
    output: OutputLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    whole = tmp_path / "whole"
    export_output(output.root, fmt, str(whole), shard_size=3)

    dest = tmp_path / "resumed"
    real = shards.publish
    calls: list[str] = []

    def failing(uri: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(uri)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(shards, "publish", failing)
    monkeypatch.setattr("farm.export.formats.publish", failing)
    with pytest.raises(OSError, match="disk went away"):
        export_output(output.root, fmt, str(dest), shard_size=3)
    first = next(p for p in dest.rglob("*") if p.is_file() and p.name.startswith(("shard-000000", "train-0", "part-0")))
    stamp = first.stat().st_mtime_ns
    monkeypatch.undo()

    summary = export_output(output.root, fmt, str(dest), shard_size=3)
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2
    assert first.stat().st_mtime_ns == stamp
    assert _contents(dest) == _contents(whole)
    again = export_output(output.root, fmt, str(dest), shard_size=3)
    assert again["shards_skipped"] == 3


def test_a_source_that_grew_is_reexported_without_stale_shards(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "hf"
    export_output(output.root, "hf", str(dest), shard_size=4)
    make_output(output.root, ids=[*IDS, "y-08", "y-09"])  # a later run added rows
    summary = export_output(output.root, "hf", str(dest), shard_size=4)
    assert summary["stale_files_removed"] == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    files = sorted(p.name for p in (dest / "data").iterdir())
    assert files == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert pq.read_table(dest / "data").num_rows == 9


def test_other_settings_into_the_same_destination_are_refused(output: OutputLayout, tmp_path: Path) -> None:
    dest = tmp_path / "wds"
    export_output(output.root, "webdataset", str(dest), shard_size=3)
    with pytest.raises(ValueError, match="holds another export .*'shard_size': 3.*give a new --to"):
        export_output(output.root, "webdataset", str(dest), shard_size=4)
    with pytest.raises(ValueError, match="'where': None"):
        export_output(output.root, "webdataset", str(dest), shard_size=3, where="face_rate > 0.5")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty \\(notes.txt\\) and holds no export plan"):
        export_output(output.root, "hf", str(stranger))


def test_cli_exports_and_prints_the_summary(
    output: OutputLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from farm.cli import main

    dest = tmp_path / "cli"
    args = ["export", output.root, "--format", "parquet", "--to", str(dest), "--where", "face_rate >= 1"]
    assert main([*args, "--shard-size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 4 and summary["counts"]["exported"] == 7
    assert (dest / "videos" / "a.b.c.mp4").exists() and (dest / "README.md").exists()


def test_shard_size_must_be_positive(output: OutputLayout, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--shard-size 0 must be at least 1"):
        export_output(output.root, "webdataset", str(tmp_path / "x"), shard_size=0)


# ------------------------------------------------------------------ object stores
def test_s3_source_and_destination_round_trip(s3_endpoint: dict[str, Any], s3_bucket: str, tmp_path: Path) -> None:
    options = s3_endpoint["storage_options"]
    source = make_output(f"{s3_bucket}/out", options)
    dest = f"{s3_bucket}/export"
    summary = export_output(source.root, "webdataset", dest, shard_size=4, storage_options=options)
    assert summary["counts"]["exported"] == 7
    again = export_output(source.root, "webdataset", dest, shard_size=4, storage_options=options)
    assert again["shards_skipped"] == 2

    fs, _ = storage.get_fs(dest, options)
    manifest = json.loads(storage.read_bytes(f"{dest}/export.json", options))
    data = storage.read_bytes(f"{dest}/shard-000000.tar", options)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert names[:3] == ["a%2Eb%2Ec.json", "a%2Eb%2Ec.mp4", "a%2Eb%2Ec.txt"]
    assert manifest["shards"][0]["bytes"] == len(data)
    assert SECRET.encode() not in storage.read_bytes(f"{dest}/README.md", options)
    assert "testing" not in storage.read_bytes(f"{dest}/export.json", options).decode()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dest.removeprefix("s3://"))) == [
        "README.md",
        "_export_plan.json",
        "_index",
        "export.json",
        "shard-000000.tar",
        "shard-000001.tar",
    ]
