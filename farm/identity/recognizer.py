"""Identity similarity of a video against its portrait, computed the way the field does.

Per video: sample ``k`` frames uniformly, take the largest face in each, embed it, and compare it with the portrait's
embedding (cosine; for dlib also the euclidean distance its 0.6 threshold is calibrated on). Frames without a face
are counted, not scored: with no face anywhere the similarity columns are null (never 0) and ``face_rate`` is 0.
The portrait embedding is computed once per portrait (an in-memory cache keyed by the pixels).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from farm.identity.faces import (
    DEFAULT_MIN_FACE_SIZE,
    Face,
    FaceDetector,
    FaceEmbedder,
    check_image,
    l2_normalize,
    largest_face,
    pick_portrait_face,
)
from farm.results import IDENTITY_FIELDS

RECOGNIZERS = ("dlib", "insightface")
DEFAULT_FRAMES = 16

# The metric columns every scored record carries: the identity part of the one result schema (farm.results).
METRIC_FIELDS: tuple[pa.Field, ...] = IDENTITY_FIELDS
METRIC_COLUMNS: tuple[str, ...] = tuple(f.name for f in METRIC_FIELDS)


def empty_metrics() -> dict[str, Any]:
    """Every metric column set to null (a row that was never scored)."""
    return dict.fromkeys(METRIC_COLUMNS)


def sample_indices(num_frames: int, k: int = DEFAULT_FRAMES) -> np.ndarray:
    """``k`` frame indices spread uniformly from the first to the last frame (all frames when there are fewer)."""
    if num_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    if k <= 0:
        raise ValueError(f"k={k} must be a positive number of frames to sample")
    if num_frames <= k:
        return np.arange(num_frames)
    return np.unique(np.round(np.linspace(0, num_frames - 1, k)).astype(np.int64))


def _frame_uint8(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return check_image(arr)


@dataclass(frozen=True)
class PortraitIdentity:
    """The portrait's chosen face and its embedding in the recognizer's native space."""

    face: Face
    embedding: np.ndarray
    num_faces: int


class Recognizer:
    """A detector and an embedder behind one scoring interface."""

    def __init__(self, kind: str, detector: FaceDetector, embedder: FaceEmbedder, cache_size: int = 256) -> None:
        self.kind = kind
        self.detector = detector
        self.embedder = embedder
        self._cache: OrderedDict[tuple, PortraitIdentity] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """``identity_model``: recognizer name plus the fingerprints of detector and embedder weights."""
        return (
            f"{self.kind}:{self.embedder.name}@{self.embedder.fingerprint()}"
            f"+{self.detector.name}@{self.detector.fingerprint()}"
        )

    # --- portraits --------------------------------------------------------------------------------------
    def analyze_portrait(
        self, image: np.ndarray, strict: bool = False, min_face_size: float = DEFAULT_MIN_FACE_SIZE
    ) -> PortraitIdentity:
        """Apply the portrait checks and embed the chosen face (cached per image content and rules).

        Raises ``RowError``: ``no_face``, ``multiple_faces`` (strict), ``face_too_small``.
        """
        image = check_image(image)
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.shape, bool(strict), float(min_face_size))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        faces = self.detector.detect(image)
        face = pick_portrait_face(faces, strict=strict, min_face_size=min_face_size)
        embedding = np.array(self.embedder.embed_raw(image, face), dtype=np.float32)
        embedding.setflags(write=False)  # shared through the cache
        result = PortraitIdentity(face=face, embedding=embedding, num_faces=len(faces))
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def portrait_embedding(
        self, image: np.ndarray, strict: bool = False, min_face_size: float = DEFAULT_MIN_FACE_SIZE
    ) -> np.ndarray:
        """The portrait's embedding to pass to ``score_frames`` (raw: dlib distances need the unnormalised vector)."""
        return self.analyze_portrait(image, strict=strict, min_face_size=min_face_size).embedding

    # --- videos -----------------------------------------------------------------------------------------
    def score_frames(
        self, frames: np.ndarray | Sequence[np.ndarray], portrait_emb: np.ndarray, k: int = DEFAULT_FRAMES
    ) -> dict[str, Any]:
        """The metric columns for one video: uint8 or float-in-[0, 1] frames ``(F, H, W, 3)`` vs the portrait."""
        portrait_raw = np.asarray(portrait_emb, dtype=np.float32).reshape(-1)
        if portrait_raw.shape[0] != self.embedder.dim:
            raise ValueError(
                f"portrait embedding has {portrait_raw.shape[0]} dims but {self.embedder.name} makes "
                f"{self.embedder.dim}; embed the portrait with the same recognizer"
            )
        portrait_unit = l2_normalize(portrait_raw)
        indices = sample_indices(len(frames), k)
        sims: list[float] = []
        dists: list[float] = []
        for index in indices:
            image = _frame_uint8(frames[int(index)])
            face = largest_face(self.detector.detect(image))
            if face is None:
                continue
            raw = self.embedder.embed_raw(image, face)
            sims.append(float(np.dot(l2_normalize(raw), portrait_unit)))
            if self.embedder.reports_distance:
                dists.append(float(np.linalg.norm(raw - portrait_raw)))
        return summarize(sims, dists, len(indices), self.model_id)


def summarize(sims: Sequence[float], dists: Sequence[float], frames_scored: int, model_id: str) -> dict[str, Any]:
    """Metric columns from per-frame similarities (and distances, when the recognizer reports them)."""
    out = empty_metrics()
    out.update(
        face_frames=len(sims),
        frames_scored=int(frames_scored),
        face_rate=(len(sims) / frames_scored) if frames_scored else 0.0,
        identity_model=model_id,
    )
    if sims:
        arr = np.asarray(sims, dtype=np.float64)
        out.update(
            identity_mean=float(arr.mean()),
            identity_min=float(arr.min()),
            identity_max=float(arr.max()),
            identity_std=float(arr.std()),
        )
    if dists:
        arr = np.asarray(dists, dtype=np.float64)
        out.update(
            identity_distance_mean=float(arr.mean()),
            identity_distance_min=float(arr.min()),
            identity_distance_max=float(arr.max()),
        )
    return out


def build_recognizer(
    name: str, pack: str | None = None, storage_options: dict[str, Any] | None = None, **options: Any
) -> Recognizer:
    """``dlib`` (offline, the embedded default; weights ship in a wheel, ``pack`` is ignored) or ``insightface``.

    ``insightface`` needs ``pack``: a folder, zip or fsspec URI of an insightface model pack.

    ``options``: dlib ``upsample``, ``min_score``, ``num_jitters``; insightface ``det_size``, ``det_thresh``,
    ``threads``.
    """
    if name == "dlib":
        from farm.identity.dlib_models import DEFAULT_MIN_SCORE, DlibDetector, DlibEmbedder

        detector = DlibDetector(
            upsample=int(options.get("upsample", 0)), min_score=float(options.get("min_score", DEFAULT_MIN_SCORE))
        )
        embedder = DlibEmbedder(num_jitters=int(options.get("num_jitters", 0)))
        return Recognizer("dlib", detector, embedder)
    if name == "insightface":
        if not pack:
            raise ValueError("the insightface recognizer needs a model pack: set identity.pack to a folder or URI")
        from farm.identity.insightface_pack import DEFAULT_DET_SIZE, load_insightface_pack

        detector, embedder = load_insightface_pack(
            pack,
            storage_options,
            det_size=tuple(options.get("det_size", DEFAULT_DET_SIZE)),
            det_thresh=float(options.get("det_thresh", 0.5)),
            threads=options.get("threads"),
        )
        return Recognizer("insightface", detector, embedder)
    raise ValueError(f"unknown recognizer {name!r}; choose one of {list(RECOGNIZERS)}")
