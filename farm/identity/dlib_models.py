"""The offline recognizer: dlib's HOG detector, its landmark predictors and its 128-d ResNet face descriptor.

The weights are the ones the ``face-recognition-models`` wheel ships; we locate them through the import system
without importing that package (its ``__init__`` imports the deprecated ``pkg_resources``). The descriptor's
euclidean distance is the calibrated measure (same person below 0.6), so ``reports_distance`` is on.
"""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path

import numpy as np

from farm import storage
from farm.identity.faces import (
    Face,
    FaceDetector,
    FaceEmbedder,
    check_image,
    file_digest,
    l2_normalize,
    make_face,
)

MODELS_PACKAGE = "face_recognition_models"
LANDMARKS_68 = "shape_predictor_68_face_landmarks.dat"
LANDMARKS_5 = "shape_predictor_5_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"
# HOG detection scores: real faces in the test photos score 0.2-2.8, while the false positives seen (a gloved hand
# in JPEG-compressed astronaut, bigger than the real face and so "largest") score 0.05-0.12.
DEFAULT_MIN_SCORE = 0.15


def _dlib():
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("the dlib recognizer needs dlib: pip install dlib-bin face-recognition-models") from exc
    return dlib


def model_path(filename: str) -> Path:
    """Path of one weight file inside the installed ``face-recognition-models`` package (found, not imported)."""
    try:
        return Path(storage.resolve_pkg_uri(f"{storage.PKG_SCHEME}{MODELS_PACKAGE}/models/{filename}"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"dlib weight file {filename} is missing ({exc}); pip install (or reinstall) face-recognition-models"
        ) from None


def _rectangle(bbox: np.ndarray):
    """Our exclusive x2/y2 box -> dlib's inclusive rectangle (the inverse of what ``DlibDetector`` builds)."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox)
    return _dlib().rectangle(x1, y1, x2 - 1, y2 - 1)


class DlibDetector(FaceDetector):
    """HOG face detector; the 68-point predictor gives insightface's five points (eye centres, nose tip, mouth corners).

    ``upsample`` doubles the image that many times before detecting (HOG finds faces from about 80 px; upsampling
    finds smaller ones at ~4x the cost and more false positives). ``min_score`` drops weak HOG detections.
    """

    name = "dlib-hog"

    def __init__(self, upsample: int = 0, min_score: float = DEFAULT_MIN_SCORE) -> None:
        dlib = _dlib()
        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(str(model_path(LANDMARKS_68)))
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    @cached_property
    def _digest(self) -> str:
        return file_digest([model_path(LANDMARKS_68)])

    def fingerprint(self) -> str:
        return f"hog-up{self.upsample}-s{self.min_score:g}+{self._digest}"

    def detect(self, image_rgb_uint8: np.ndarray) -> list[Face]:
        image = check_image(image_rgb_uint8)
        with self._lock:
            rects, scores, _ = self._detector.run(image, self.upsample, self.min_score)
            shapes = [self._landmarks(image, rect) for rect in rects]
        faces = []
        for rect, score, shape in zip(rects, scores, shapes):
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            kps = np.stack(
                [pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]],
            )
            bbox = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
            faces.append(make_face(bbox, kps, score))
        faces.sort(key=lambda f: -f.score)
        return faces


class DlibEmbedder(FaceEmbedder):
    """dlib's ResNet descriptor (128-d) on the chip its 5-point predictor aligns inside the face box."""

    name = "dlib-resnet"
    dim = 128
    reports_distance = True

    def __init__(self, num_jitters: int = 0) -> None:
        dlib = _dlib()
        self.num_jitters = int(num_jitters)
        self._landmarks = dlib.shape_predictor(str(model_path(LANDMARKS_5)))
        self._net = dlib.face_recognition_model_v1(str(model_path(RESNET)))
        self._lock = threading.Lock()

    @cached_property
    def _digest(self) -> str:
        return file_digest([model_path(LANDMARKS_5), model_path(RESNET)])

    def fingerprint(self) -> str:
        return self._digest

    def embed_raw(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        image = check_image(image_rgb_uint8)
        with self._lock:
            shape = self._landmarks(image, _rectangle(face.bbox))
            vector = self._net.compute_face_descriptor(image, shape, self.num_jitters)
        return np.asarray(vector, dtype=np.float32)

    def embed(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        return l2_normalize(self.embed_raw(image_rgb_uint8, face))
