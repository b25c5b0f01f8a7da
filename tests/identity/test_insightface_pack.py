"""The insightface code path with a tiny random-weight pack: routing, shapes, types, loading from dir/zip/S3.

Random weights give meaningless numbers, so these tests assert structure and plumbing; real numbers are dlib's.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from farm.identity.faces import Face, norm_crop
from farm.identity.insightface_pack import InsightFaceDetector, InsightFaceEmbedder, load_insightface_pack
from farm.identity.recognizer import METRIC_COLUMNS
from farm.identity.tiny_pack import DETECTOR_FILE, LANDMARK_FILE, RECOGNIZER_FILE, write_tiny_insightface_pack

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def test_tiny_pack_is_deterministic(tmp_path: Path, tiny_pack: Path) -> None:
    again = write_tiny_insightface_pack(tmp_path / "again", seed=0)
    other = write_tiny_insightface_pack(tmp_path / "other", seed=1)
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):
        assert (again / name).read_bytes() == (tiny_pack / name).read_bytes()
        assert (other / name).read_bytes() != (tiny_pack / name).read_bytes()
    only_rec = write_tiny_insightface_pack(tmp_path / "rec_only", seed=0, with_detector=False)
    assert sorted(p.name for p in only_rec.glob("*.onnx")) == [RECOGNIZER_FILE]


def test_insightface_model_zoo_routes_the_tiny_files(tiny_pack: Path) -> None:
    from insightface.model_zoo import SCRFD, ArcFaceONNX, get_model

    det = get_model(str(tiny_pack / DETECTOR_FILE), providers=["CPUExecutionProvider"])
    rec = get_model(str(tiny_pack / RECOGNIZER_FILE), providers=["CPUExecutionProvider"])
    assert isinstance(det, SCRFD) and det.use_kps and det.fmc == 3 and det._num_anchors == 2
    assert isinstance(rec, ArcFaceONNX) and rec.input_size == (112, 112)
    assert (rec.input_mean, rec.input_std) == (127.5, 127.5)
    from farm.identity.tiny_pack import build_landmarks

    (tiny_pack.parent / "lmk").mkdir(exist_ok=True)
    lmk_file = tiny_pack.parent / "lmk" / LANDMARK_FILE
    lmk_file.write_bytes(build_landmarks(np.random.default_rng(0)).SerializeToString())
    lmk = get_model(str(lmk_file), providers=["CPUExecutionProvider"])
    assert lmk.taskname == "landmark_2d_106"


def test_detect_and_embed_return_the_contract_types(tiny_recognizer, astronaut: np.ndarray) -> None:
    detector, embedder = tiny_recognizer.detector, tiny_recognizer.embedder
    assert isinstance(detector, InsightFaceDetector) and isinstance(embedder, InsightFaceEmbedder)
    faces = detector.detect(astronaut)
    assert faces, "seed 0's random detector fires on the astronaut photo"
    for face in faces:
        assert isinstance(face, Face)
        assert face.bbox.shape == (4,) and face.bbox.dtype == np.float32
        assert face.kps.shape == (5, 2) and face.kps.dtype == np.float32
        assert 0.5 <= face.score <= 1.0
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    assert detector.detect(np.full((640, 640, 3), 127, np.uint8)) == []  # a flat image (no padding) fires nothing
    vec = embedder.embed(astronaut, faces[0])
    assert vec.shape == (512,) and vec.dtype == np.float32 and embedder.dim == 512
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(vec, embedder.embed(astronaut, faces[0]))


def test_embedder_feeds_arcface_a_bgr_aligned_crop(tiny_recognizer, astronaut: np.ndarray) -> None:
    """Same number as running the ONNX graph by hand on our own alignment of the BGR image."""
    import onnxruntime

    embedder = tiny_recognizer.embedder
    face = tiny_recognizer.detector.detect(astronaut)[0]
    crop = norm_crop(cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR), face.kps, 112)
    blob = ((crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]  # BGR->RGB, NCHW
    session = onnxruntime.InferenceSession(embedder.model.model_file, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": blob})[0][0]
    np.testing.assert_allclose(embedder.embed_raw(astronaut, face), expected, rtol=1e-4, atol=1e-4)


def test_recognizer_scores_with_insightface_columns(tiny_recognizer, astronaut: np.ndarray) -> None:
    portrait = tiny_recognizer.portrait_embedding(astronaut)
    frames = np.stack([astronaut, astronaut[:, ::-1], np.full_like(astronaut, 127)])
    m = tiny_recognizer.score_frames(frames, portrait, k=16)
    assert set(m) == set(METRIC_COLUMNS)
    assert (m["face_frames"], m["frames_scored"]) == (2, 3)
    assert -1.0 <= m["identity_min"] <= m["identity_mean"] <= m["identity_max"] <= 1.0 + 1e-6
    assert m["identity_distance_mean"] is None  # cosine only for ArcFace
    assert m["identity_model"].startswith("insightface:arcface:rec_tiny@")


def test_nested_zip_pack_with_extra_models(tmp_path: Path, tiny_pack: Path, monkeypatch) -> None:
    """antelopev2-style: files one folder down inside a zip, beside models that are neither detector nor ArcFace."""
    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    pack = write_tiny_insightface_pack(tmp_path / "with_landmarks", seed=0, with_landmarks=True)
    assert sorted(p.name for p in pack.glob("*.onnx"))[0] == LANDMARK_FILE  # routed first, must be skipped
    archive = tmp_path / "antelope_tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in pack.glob("*.onnx"):
            zf.write(path, f"antelope_tiny/{path.name}")
    detector, embedder = load_insightface_pack(str(archive))
    assert detector.name == "scrfd:det_tiny" and embedder.name == "arcface:rec_tiny"
    assert detector.fingerprint() == load_insightface_pack(str(tiny_pack))[0].fingerprint()


def test_pack_without_detector_is_named(tmp_path: Path) -> None:
    folder = write_tiny_insightface_pack(tmp_path / "rec_only", with_detector=False)
    with pytest.raises(FileNotFoundError, match="no SCRFD detector"):
        load_insightface_pack(str(folder))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_insightface_pack(str(tmp_path / "missing"))


def test_remote_pack_is_fetched_once(tmp_path: Path, tiny_pack: Path, s3_bucket: str, s3_endpoint, monkeypatch) -> None:
    import s3fs

    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "cache"))
    options = s3_endpoint["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    uri = f"{s3_bucket}/packs/tiny"
    for name in (DETECTOR_FILE, RECOGNIZER_FILE):
        fs.put_file(str(tiny_pack / name), f"{uri}/{name}")
    detector, embedder = load_insightface_pack(uri, options)
    assert isinstance(detector, InsightFaceDetector) and embedder.dim == 512
    cached = list((tmp_path / "cache").rglob("*.onnx"))
    assert sorted(p.name for p in cached) == [DETECTOR_FILE, RECOGNIZER_FILE]
    fs.rm(uri, recursive=True)  # the second load must come from the local cache
    detector2, _ = load_insightface_pack(uri, options)
    assert detector2.fingerprint() == detector.fingerprint()
    shutil.rmtree(tmp_path / "cache")


def test_v2_manifest_pack_names_its_files(tmp_path: Path, tiny_pack: Path, astronaut: np.ndarray) -> None:
    """insightface's task manifest (version 2) picks the files, and a pinned sha256 is checked."""
    import hashlib
    import json

    pack = tmp_path / "v2"
    shutil.copytree(tiny_pack, pack)
    digest = hashlib.sha256((pack / DETECTOR_FILE).read_bytes()).hexdigest()
    (pack / "MODEL.LICENSE").write_text("test weights\n")
    manifest = {
        "manifest_version": 2,
        "model_id": "tiny_v2",
        "license": "MODEL.LICENSE",
        "tasks": {"detection": {"file": DETECTOR_FILE, "sha256": digest}, "recognition": {"file": RECOGNIZER_FILE}},
    }
    (pack / "manifest.json").write_text(json.dumps(manifest))
    detector, embedder = load_insightface_pack(str(pack))
    faces = detector.detect(astronaut)
    assert faces and embedder.embed(astronaut, faces[0]).shape == (512,)
    manifest["tasks"]["detection"]["sha256"] = "0" * 64
    (pack / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        load_insightface_pack(str(pack))
