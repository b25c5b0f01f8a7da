"""Known answers with real faces and dlib's shipped weights (CPU, offline)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from farm.identity.dlib_models import LANDMARKS_5, LANDMARKS_68, RESNET, DlibDetector, model_path
from farm.records import ErrorCode, RowError
from tests.identity.conftest import jpeg, rescale

SAME_PERSON = 0.6  # dlib's calibrated threshold on euclidean distance


def crop_around(image: np.ndarray, bbox: np.ndarray, pad: int = 60) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in bbox)
    return np.ascontiguousarray(image[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad])


def test_weights_found_without_importing_the_package() -> None:
    code = (
        "import sys; from farm.identity.dlib_models import model_path;"
        f"[model_path(n) for n in ({LANDMARKS_5!r}, {LANDMARKS_68!r}, {RESNET!r})];"
        "assert 'face_recognition_models' not in sys.modules and 'pkg_resources' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert model_path(RESNET).stat().st_size > 1_000_000
    with pytest.raises(FileNotFoundError, match="missing"):
        model_path("nope.dat")


def test_keypoints_in_insightface_order(dlib_recognizer, astronaut: np.ndarray) -> None:
    faces = dlib_recognizer.detector.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    left_eye, right_eye, nose, mouth_left, mouth_right = face.kps
    assert left_eye[0] < nose[0] < right_eye[0]
    assert mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    x1, y1, x2, y2 = face.bbox
    assert np.all((face.kps[:, 0] > x1) & (face.kps[:, 0] < x2) & (face.kps[:, 1] > y1) & (face.kps[:, 1] < y2))


def test_same_face_scores_clearly_above_different_people(dlib_recognizer, astronaut, tom_hanks, six_faces) -> None:
    rec = dlib_recognizer
    portrait = rec.portrait_embedding(astronaut)
    same = {
        "flip": astronaut[:, ::-1],
        "rescale_0.8": rescale(astronaut, 0.8),
        "rescale_1.5": rescale(astronaut, 1.5),
        "jpeg_q40": jpeg(astronaut, 40),
    }
    others = {"tom_hanks": tom_hanks}
    for i, face in enumerate(rec.detector.detect(six_faces)):
        others[f"t1_{i}"] = crop_around(six_faces, face.bbox)
    assert len(others) == 7

    def score(image: np.ndarray) -> dict:
        return rec.score_frames(np.ascontiguousarray(image)[None], portrait, k=1)

    same_scores = {name: score(img) for name, img in same.items()}
    other_scores = {name: score(img) for name, img in others.items()}
    for name, m in {**same_scores, **other_scores}.items():
        assert m["face_frames"] == 1, name
    same_dist = [m["identity_distance_mean"] for m in same_scores.values()]
    other_dist = [m["identity_distance_mean"] for m in other_scores.values()]
    assert max(same_dist) < 0.35 < SAME_PERSON < min(other_dist)
    # cosine is compressed for dlib but still separates the two groups
    same_cos = [m["identity_mean"] for m in same_scores.values()]
    assert min(same_cos) > max(m["identity_mean"] for m in other_scores.values())


def test_six_face_photo_largest_or_strict(dlib_recognizer, six_faces: np.ndarray) -> None:
    faces = dlib_recognizer.detector.detect(six_faces)
    assert len(faces) == 6
    chosen = dlib_recognizer.analyze_portrait(six_faces)
    assert chosen.num_faces == 6
    assert chosen.face.area == max(f.area for f in faces)
    with pytest.raises(RowError) as err:
        dlib_recognizer.portrait_embedding(six_faces, strict=True)
    assert err.value.code is ErrorCode.MULTIPLE_FACES


def test_portrait_without_face_or_too_small(dlib_recognizer, astronaut: np.ndarray) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with pytest.raises(RowError) as err:
        dlib_recognizer.portrait_embedding(noise)
    assert err.value.code is ErrorCode.NO_FACE
    with pytest.raises(RowError) as err:
        dlib_recognizer.portrait_embedding(astronaut, min_face_size=200)
    assert err.value.code is ErrorCode.FACE_TOO_SMALL


def test_embedding_contract(dlib_recognizer, astronaut: np.ndarray) -> None:
    face = dlib_recognizer.detector.detect(astronaut)[0]
    unit = dlib_recognizer.embedder.embed(astronaut, face)
    raw = dlib_recognizer.embedder.embed_raw(astronaut, face)
    assert unit.dtype == np.float32 and unit.shape == (128,)
    assert np.linalg.norm(unit) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw), atol=1e-6)


def test_upsampling_finds_smaller_faces(astronaut: np.ndarray) -> None:
    small = rescale(astronaut, 0.6)  # the face is ~53 px, below HOG's ~80 px window
    assert DlibDetector(upsample=0).detect(small) == []
    assert len(DlibDetector(upsample=1).detect(small)) >= 1
