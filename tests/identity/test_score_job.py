"""Standalone scoring: mp4 files, frame folders and S3 objects in; one record per row out, bad rows as data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm.identity.recognizer import METRIC_COLUMNS
from farm.identity.score_job import frame_files, load_video_frames, score_rows
from farm.models.still import StillBackend
from farm.params import SamplingParams
from farm.records import ErrorCode, RowError
from farm.types import GenerationRequest, ModelSpec
from farm.video import encode_mp4, to_uint8

ASTRONAUT = "pkg://skimage/data/astronaut.png"
SIX_FACES = "pkg://insightface/data/images/t1.jpg"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> dict[str, str]:
    root = tmp_path_factory.mktemp("media")
    backend = StillBackend(ModelSpec(backend="still"))
    backend.setup("cpu")
    params = SamplingParams(num_frames=13, height=256, width=256, fps=8)
    frames = backend.generate(backend.prepare_subject(astronaut), GenerationRequest("s", "", "", params, 0))
    still = root / "still.mp4"
    still.write_bytes(encode_mp4(frames, 8))
    folder = root / "frames"
    folder.mkdir()
    for i, frame in enumerate(to_uint8(frames)):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")  # frame_10 must sort after frame_9
    noise = root / "noise.mp4"
    noise.write_bytes(encode_mp4(np.random.default_rng(0).random((9, 64, 64, 3), dtype=np.float32), 8))
    noise_png = root / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise_png)
    broken = root / "broken.mp4"
    broken.write_bytes(b"not a video")
    empty = root / "empty"
    empty.mkdir()
    return {k: str(v) for k, v in locals().items() if k in ("still", "folder", "noise", "noise_png", "broken", "empty")}


def test_frame_folder_reads_only_sampled_frames_in_natural_order(media: dict[str, str]) -> None:
    names = [Path(p).name for p in frame_files(media["folder"])]
    assert names == [f"frame_{i}.png" for i in range(13)]
    frames, total = load_video_frames(media["folder"], k=4)
    assert frames.shape == (4, 256, 256, 3) and total == 13
    full, total = load_video_frames(media["still"])
    assert full.shape == (13, 256, 256, 3) and total == 13
    assert np.abs(frames[0].astype(int) - full[0].astype(int)).mean() < 3  # png vs H.264 of the same frame
    for uri in (media["broken"], media["empty"], media["still"] + ".missing.mp4", ""):
        with pytest.raises(RowError) as err:
            load_video_frames(uri)
        assert err.value.code is ErrorCode.VIDEO_UNREADABLE


def test_score_rows_one_record_per_row(dlib_recognizer, media: dict[str, str]) -> None:
    rows = [
        {"id": "mp4", "portrait": ASTRONAUT, "video": media["still"]},
        {"id": "folder", "portrait": ASTRONAUT, "video": media["folder"]},
        {"id": "noise", "portrait": ASTRONAUT, "video": media["noise"]},
        {"id": "broken", "portrait": ASTRONAUT, "video": media["broken"]},
        {"id": "no_face", "portrait": media["noise_png"], "video": media["still"]},
        {"id": "no_portrait", "portrait": None, "video": media["still"]},
        {"id": "missing_portrait", "portrait": "/nonexistent/p.png", "video": media["still"]},
        {"id": "six", "portrait": SIX_FACES, "video": media["still"]},
    ]
    out = {r["id"]: r for r in score_rows(rows, dlib_recognizer, k=8)}
    assert list(out) == [r["id"] for r in rows]
    for record in out.values():
        assert set(METRIC_COLUMNS) <= set(record) and record["score_s"] >= 0
    for key in ("mp4", "folder"):
        r = out[key]
        assert r["status"] == "ok" and r["face_rate"] == 1.0 and r["frames_scored"] == 8
        assert r["identity_distance_mean"] < 0.25
    assert out["folder"]["identity_mean"] == pytest.approx(out["mp4"]["identity_mean"], abs=0.01)
    noise = out["noise"]
    assert noise["status"] == "ok" and noise["identity_mean"] is None and noise["face_rate"] == 0.0
    codes = {k: (r["status"], r["error_code"]) for k, r in out.items() if r["status"] != "ok"}
    assert codes == {
        "broken": ("failed", "video_unreadable"),
        "no_face": ("failed", "no_face"),
        "no_portrait": ("failed", "missing_portrait"),
        "missing_portrait": ("failed", "portrait_unreadable"),
    }
    assert out["six"]["status"] == "ok" and out["six"]["identity_distance_mean"] > 0.6  # largest face: not her
    strict = next(score_rows(rows[-1:], dlib_recognizer, k=2, strict=True))
    assert (strict["status"], strict["error_code"]) == ("failed", "multiple_faces")


def test_score_rows_from_s3(dlib_recognizer, media: dict[str, str], s3_bucket: str, s3_endpoint) -> None:
    import s3fs

    options = s3_endpoint["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    fs.put_file(media["still"], f"{s3_bucket}/videos/a.mp4")
    fs.put(media["folder"], f"{s3_bucket}/frames/a", recursive=True)
    from farm import storage

    fs.pipe_file(f"{s3_bucket}/portraits/a.png", storage.read_bytes(ASTRONAUT))
    rows = [
        {"id": "a", "portrait": f"{s3_bucket}/portraits/a.png", "video": f"{s3_bucket}/videos/a.mp4"},
        {"id": "b", "portrait": f"{s3_bucket}/portraits/a.png", "video": f"{s3_bucket}/frames/a"},
    ]
    out = list(score_rows(rows, dlib_recognizer, storage_options=options, k=4))
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert all(r["face_rate"] == 1.0 and r["identity_distance_mean"] < 0.25 for r in out)
