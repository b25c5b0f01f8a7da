"""Faces and the two contracts every recognizer is built from: a detector and an embedder.

A ``Face`` carries insightface's five keypoints (left eye, right eye, nose tip, mouth left, mouth right, in image
coordinates) whatever found it, so the same alignment (``norm_crop``) feeds ArcFace, the ``still`` baseline and the
Lynx conditioning. ``norm_crop`` is our own implementation of insightface's math (a least-squares similarity
transform of the keypoints onto the ArcFace 112 template), including the extended crop the official Lynx inference
uses for its reference image.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from farm.records import ErrorCode, RowError

# insightface's ArcFace template for a 112x112 crop (left eye, right eye, nose tip, mouth left, mouth right).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
DEFAULT_MIN_FACE_SIZE = 32


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in image pixels (compared by identity: its fields are arrays)."""

    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32, insightface order
    score: float

    @property
    def area(self) -> float:
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))

    @property
    def size(self) -> float:
        """The shorter side of the box: what ``face_too_small`` compares against."""
        return float(min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]))


def make_face(bbox: Iterable[float], kps: Iterable[Iterable[float]], score: float) -> Face:
    """Build a ``Face`` with the canonical dtypes and shapes (raises ``ValueError`` naming a bad shape)."""
    box = np.asarray(list(bbox), dtype=np.float32).reshape(-1)
    points = np.asarray(kps, dtype=np.float32)
    if box.shape != (4,) or points.shape != (5, 2):
        raise ValueError(f"a face needs bbox (4,) and kps (5, 2), got {box.shape} and {points.shape}")
    return Face(bbox=box, kps=points, score=float(score))


def largest_face(faces: Sequence[Face]) -> Face | None:
    """The face with the largest box (ties: the first, i.e. the detector's most confident order)."""
    best: Face | None = None
    for face in faces:
        if best is None or face.area > best.area:
            best = face
    return best


def pick_portrait_face(
    faces: Sequence[Face], strict: bool = False, min_face_size: float = DEFAULT_MIN_FACE_SIZE
) -> Face:
    """Apply the portrait rules before any GPU time: no face, several faces (strict), too small.

    Raises ``RowError`` with ``no_face`` / ``multiple_faces`` / ``face_too_small``.
    """
    if not faces:
        raise RowError(ErrorCode.NO_FACE, "no face was detected in the portrait; use a photo with one visible face")
    if strict and len(faces) > 1:
        raise RowError(
            ErrorCode.MULTIPLE_FACES,
            f"{len(faces)} faces were detected in the portrait and identity.strict is on; crop it to one person "
            "or turn strict off to use the largest face",
        )
    face = largest_face(faces)
    assert face is not None
    if face.size < min_face_size:
        raise RowError(
            ErrorCode.FACE_TOO_SMALL,
            f"the largest face is {face.size:.0f} px, smaller than min_face_size={min_face_size:g}; "
            "use a larger or closer portrait",
        )
    return face


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``; (2, 3) matrix.

    Umeyama's closed form without reflection, the estimator insightface uses through scikit-image.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1.0
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.array([[np.nan] * 3] * 2)
    if rank == 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            keep = sign[-1]
            sign[-1] = -1.0
            rot = u @ np.diag(sign) @ vt
            sign[-1] = keep
    else:
        rot = u @ np.diag(sign) @ vt
    var = src_c.var(axis=0).sum()
    scale = (s @ sign) / var if var > 0 else 1.0
    out = np.zeros((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = dst_mean - scale * rot @ src_mean
    return out


def template(size: int = 112, extend_ratio: float | None = None) -> np.ndarray:
    """The five-point target for a ``size`` x ``size`` crop.

    insightface's rule: sizes divisible by 112 scale the 112 template; sizes divisible by 128 scale it by size/128 and
    shift it 8*size/128 right; any other size scales by size/112. With ``extend_ratio`` (the Lynx reference crop) the
    112 template first moves down 10 px, then shrinks about its centre by ``extend_ratio`` (more context around the
    face for ratios below 1).
    """
    if size <= 0:
        raise ValueError(f"crop size={size} must be positive")
    base = ARCFACE_TEMPLATE.astype(np.float64).copy()
    if extend_ratio is not None:
        if extend_ratio <= 0:
            raise ValueError(f"extend_ratio={extend_ratio} must be positive (Lynx uses 0.8)")
        base[:, 1] += 10.0
        base = (base - 56.0) * extend_ratio + 56.0
    if size % 112 != 0 and size % 128 == 0:
        ratio, shift_x = size / 128.0, 8.0 * size / 128.0
    else:
        ratio, shift_x = size / 112.0, 0.0
    out = base * ratio
    out[:, 0] += shift_x
    return out


def alignment_matrix(kps: np.ndarray, size: int = 112, extend_ratio: float | None = None) -> np.ndarray:
    """The (2, 3) affine that ``norm_crop`` applies (image pixels -> crop pixels)."""
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"kps must have shape (5, 2), got {points.shape}")
    return similarity_transform(points, template(size, extend_ratio))


def norm_crop(
    image: np.ndarray,
    kps: np.ndarray,
    size: int = 112,
    extend_ratio: float | None = None,
    border_mode: int = cv2.BORDER_CONSTANT,
) -> np.ndarray:
    """Align a face to the ArcFace template: ``size`` x ``size`` crop, same dtype and channels as ``image``.

    Matches insightface's ``norm_crop`` (and Lynx's ``align_face`` with ``extend_ratio``); pixels outside the image are
    0 unless another OpenCV ``border_mode`` is asked for.
    """
    matrix = alignment_matrix(kps, size, extend_ratio)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderMode=border_mode, borderValue=0.0)


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """float32 unit vector (a zero vector stays zero rather than becoming NaN)."""
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def file_digest(paths: Iterable[str | Path], length: int = 12) -> str:
    """Short sha256 over the bytes of weight files, in the given order: the recognizer fingerprint."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


def check_image(image: np.ndarray) -> np.ndarray:
    """Accept RGB uint8 ``(H, W, 3)`` only; raise ``ValueError`` naming what was passed."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got dtype={arr.dtype} shape={arr.shape}")
    return np.ascontiguousarray(arr)


class FaceDetector(ABC):
    """Finds faces with five keypoints in an RGB uint8 image."""

    name: str

    @abstractmethod
    def fingerprint(self) -> str:
        """Short digest of the weights (goes into ``identity_model``)."""

    @abstractmethod
    def detect(self, image_rgb_uint8: np.ndarray) -> list[Face]:
        """All faces, most confident first."""


class FaceEmbedder(ABC):
    """Turns one face of an image into an identity vector."""

    name: str
    dim: int
    # True when euclidean distance between raw vectors is the recognizer's calibrated measure (dlib: 0.6).
    reports_distance: bool = False

    @abstractmethod
    def fingerprint(self) -> str:
        """Short digest of the weights (goes into ``identity_model``)."""

    @abstractmethod
    def embed(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        """float32 ``(dim,)`` L2-normalised embedding: cosine similarity is a dot product."""

    def embed_raw(self, image_rgb_uint8: np.ndarray, face: Face) -> np.ndarray:
        """The recognizer's own vector before normalisation: the space its distance threshold is calibrated in.

        Embedders whose distance is reported (``reports_distance``) override this; others may keep the unit vector.
        """
        return self.embed(image_rgb_uint8, face)
