"""Lynx's face preprocessing, as the official inference does it, on the farm's face API.

Largest face -> its 5 keypoints -> a 512-d UNIT identity vector from the 112 ``norm_crop`` and the extended aligned
crop (template moved down 10 px and shrunk by 0.8) at 256x256 for the Ref-adapter. The official embedder is facexlib's
IR-SE50 ArcFace (``arcface.py``, weights role ``arcface``), whose output is L2-normalised. Without that file the
insightface pack's ArcFace embeds instead, L2-normalised to the same unit scale (its raw norm is ~20), with a
warning: it is another network, so identity conditioning is not the official one. Detection uses the pack's SCRFD
or dlib (``face_detector="dlib"``, which the demo uses with the tiny random-weight pack).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from farm.identity.faces import ARCFACE_TEMPLATE, FaceDetector, FaceEmbedder, check_image, largest_face
from farm.models.lynx.arcface import arcface_crop as arcface_crop  # re-exported: callers took it from here
from farm.models.lynx.arcface import irse50_embedder, official_similarity
from farm.records import ErrorCode, RowError

log = logging.getLogger(__name__)

REF_EXTEND_RATIO = 0.8
REF_SIZE = 256
DETECTORS = ("insightface", "dlib")


@dataclass(frozen=True)
class LynxSubject:
    """What generation needs from a portrait (small, picklable: computed on CPU workers, cached per portrait)."""

    embedding: np.ndarray  # (512,) float32, unit norm
    aligned_face: np.ndarray  # (256, 256, 3) uint8
    num_faces: int
    kps: np.ndarray  # (5, 2)


_WARNED: set[str] = set()


def warn_unofficial_embedder(face_pack: str) -> None:
    """Say once per pack and process that identity conditioning does not use the embedder Lynx was trained on."""
    if face_pack in _WARNED:
        return
    _WARNED.add(face_pack)
    log.warning(
        "lynx: no weights.arcface given, so the insightface pack %r embeds the face (L2-normalised); Lynx was "
        "trained on facexlib's IR-SE50 ArcFace: set weights.arcface to recognition_arcface_ir_se50.pth for "
        "official identity conditioning",
        face_pack,
    )


@lru_cache(maxsize=4)
def face_models(
    face_pack: str | None,
    face_detector: str = "insightface",
    storage_options_json: str | None = None,
    arcface: str | None = None,
) -> tuple[FaceDetector, FaceEmbedder]:
    """(detector, embedder) once per process; storage options come as JSON so the call can be cached.

    The embedder is the official IR-SE50 when ``arcface`` is given, else the pack's ArcFace (a warning is logged).
    The pack is needed for its detector (``insightface``) or, without ``arcface``, for its ArcFace.
    """
    if face_detector not in DETECTORS:
        raise ValueError(f"face_detector={face_detector!r} is unknown; choose one of {DETECTORS}")
    needs_pack = face_detector == "insightface" or not arcface
    if needs_pack and not face_pack:
        raise ValueError(
            "lynx needs model.weights.face_pack (an insightface pack) for "
            + ("its face detector" if face_detector == "insightface" else "its ArcFace (or give weights.arcface)")
        )
    options = json.loads(storage_options_json) if storage_options_json else None
    detector = embedder = None
    if needs_pack:
        from farm.identity.insightface_pack import load_insightface_pack

        detector, embedder = load_insightface_pack(face_pack, options)
    if face_detector == "dlib":
        from farm.identity.dlib_models import DlibDetector

        detector = DlibDetector()
    if arcface:
        embedder = irse50_embedder(arcface, storage_options_json)
    else:
        warn_unofficial_embedder(str(face_pack))
    return detector, embedder


def reference_crop(image: np.ndarray, kps: np.ndarray, size: int = REF_SIZE) -> np.ndarray:
    """The Ref-adapter's aligned face: the ArcFace template moved down 10 px and shrunk by 0.8 about the centre,
    scaled to ``size`` (insightface's 112/128 rule), then a similarity warp with black borders.

    Template and estimator follow the official code's precision (float32 template, scikit-image's estimator): a
    matrix off by ~1e-5 px already changes edge pixels by up to 3 levels through OpenCV's fixed-point sampling.
    """
    dst = ARCFACE_TEMPLATE.astype(np.float32).copy()
    dst[:, 1] = dst[:, 1] + np.float32(10)
    dst = (dst - np.float32(56)) * np.float32(REF_EXTEND_RATIO) + np.float32(56)
    if size % 112 == 0:
        dst = dst * np.float32(size / 112.0)
    else:
        dst = dst * np.float32(size / 128.0)
        dst[:, 0] += np.float32(8.0 * size / 128.0)
    matrix = official_similarity(np.asarray(kps, dtype=np.float32), dst)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderValue=0.0)


def subject_from_image(image: np.ndarray, detector: FaceDetector, embedder: FaceEmbedder) -> LynxSubject:
    """Detect, pick the largest face, embed (unit vector, as the official encoder returns) and align;
    ``RowError(NO_FACE)`` if nothing is found."""
    image = check_image(image)
    faces = detector.detect(image)
    face = largest_face(faces)
    if face is None:
        raise RowError(ErrorCode.NO_FACE, f"no face found in the portrait ({image.shape[1]}x{image.shape[0]} px)")
    embedding = np.asarray(embedder.embed(image, face), dtype=np.float32).reshape(-1)  # unit, per the contract
    aligned = reference_crop(image, face.kps)
    return LynxSubject(embedding=embedding, aligned_face=aligned, num_faces=len(faces), kps=np.asarray(face.kps))


def prepare_subject(
    image: np.ndarray,
    face_pack: str | None,
    face_detector: str = "insightface",
    storage_options: dict[str, Any] | None = None,
    arcface: str | None = None,
) -> LynxSubject:
    """Portrait -> ``LynxSubject`` with the models of ``face_models`` (loaded once per process)."""
    key = json.dumps(storage_options, sort_keys=True) if storage_options else None
    detector, embedder = face_models(face_pack, face_detector, key, arcface)
    return subject_from_image(image, detector, embedder)
