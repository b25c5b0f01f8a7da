from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from farm import storage
from farm.records import Record
from farm.results import result_schema, write_part
from farm.storage import OutputLayout
from farm.table import committed_ids, read_results
from farm.video import decode_video, encode_mp4, read_metadata


def test_pkg_uri_reads_shipped_portraits() -> None:
    img = storage.read_image("pkg://skimage/data/astronaut.png")
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="no file"):
        storage.read_bytes("pkg://skimage/data/nope.png")
    with pytest.raises(FileNotFoundError, match="not installed"):
        storage.read_bytes("pkg://no_such_package_xyz/a.png")


def test_atomic_write_local_leaves_no_temp(tmp_path: Path) -> None:
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes_atomic(uri, b"x" * 10)
    storage.write_bytes_atomic(uri, b"y")
    assert Path(uri).read_bytes() == b"y"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_s3_roundtrip(s3_bucket: str, s3_endpoint: dict[str, Any]) -> None:
    opts = s3_endpoint["storage_options"]
    layout = OutputLayout(f"{s3_bucket}/job", opts)
    storage.write_bytes_atomic(layout.video("x"), b"video", opts)
    assert storage.read_bytes(f"{s3_bucket}/job/videos/x.mp4", opts) == b"video"
    assert storage.list_files(f"{s3_bucket}/job/videos", ".mp4", opts) == [f"{s3_bucket}/job/videos/x.mp4"]


def test_encode_decode_and_ai_metadata() -> None:
    rng = np.random.default_rng(0)
    frames = np.zeros((9, 64, 96, 3), np.float32)
    frames[:, 16:48, 24:72] = rng.random((1, 32, 48, 3))
    data = encode_mp4(frames, 16, {"comment": "AI-generated video by Lynx full"})
    assert data[4:8] == b"ftyp"
    decoded, fps = decode_video(data)
    assert decoded.shape == (9, 64, 96, 3) and fps == 16.0
    assert np.abs(decoded.astype(float) / 255 - frames).mean() < 0.05
    assert read_metadata(data)["comment"] == "AI-generated video by Lynx full"
    odd, _ = decode_video(encode_mp4(np.zeros((1, 33, 47, 3), np.uint8), 8))
    assert odd.shape == (1, 34, 48, 3)  # padded to even for yuv420p
    with pytest.raises(ValueError, match="cannot decode"):
        decode_video(b"garbage")


def test_results_one_record_per_id_newest_wins(tmp_path: Path) -> None:
    layout = OutputLayout(str(tmp_path))
    schema = result_schema(pa.schema([("lang", pa.string()), ("status", pa.int64())]))
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    write_part(
        layout,
        1,
        "r1",
        0,
        [
            Record(id="a", status="failed", committed_at=t0, carried={"lang": "en", "input_status": 3}),
            Record(id="b", status="ok", committed_at=t0, carried={"lang": "de"}),
        ],
        schema,
    )
    later = Record(id="a", status="ok", committed_at=t0 + dt.timedelta(seconds=1))
    write_part(layout, 2, "r2", 0, [later], schema)
    assert committed_ids(layout) == {"a", "b"}
    table = read_results(layout)
    assert table.column("id").to_pylist() == ["a", "b"]
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert read_results(layout, ["lang"]).column_names == ["id", "lang"]
    assert read_results(OutputLayout(str(tmp_path / "empty"))).num_rows == 0
