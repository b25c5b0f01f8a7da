"""``identity``: the recognizer's portrait similarity (``farm.identity.recognizer``) plus temporal identity.

Each sampled frame's largest face is detected and embedded once; the portrait columns are the recognizer's own
(``summarize``, so numbers equal ``Recognizer.score_frames``), and the temporal columns compare each face with the
previous sampled frame that had one: ``identity_temporal_mean`` / ``identity_temporal_min`` (cosine). A face that
turns into another person mid-video shows as a low minimum even when the mean over the portrait looks fine.
Temporal identity needs no portrait; it is null with fewer than 2 frames with a face.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from farm.identity.faces import DEFAULT_MIN_FACE_SIZE, l2_normalize, largest_face
from farm.identity.recognizer import DEFAULT_FRAMES, METRIC_FIELDS, Recognizer, build_recognizer, summarize
from farm.metrics import Metric
from farm.metrics.sampling import consecutive_cosines, sample_indices
from farm.records import RowError

TEMPORAL_COLUMNS: dict[str, pa.DataType] = {
    "identity_temporal_mean": pa.float64(),
    "identity_temporal_min": pa.float64(),
}


class IdentityMetric(Metric):
    """An adapter over a ``Recognizer`` (dlib by default; ``insightface`` with a ``pack``)."""

    name = "identity"
    uses_portrait = True
    columns: ClassVar[dict[str, pa.DataType]] = {**{f.name: f.type for f in METRIC_FIELDS}, **TEMPORAL_COLUMNS}

    def __init__(
        self,
        recognizer: str = "dlib",
        pack: str | None = None,
        frames: int = DEFAULT_FRAMES,
        strict: bool = False,
        min_face_size: float = DEFAULT_MIN_FACE_SIZE,
        options: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if int(frames) < 1:
            raise ValueError(f"frames={frames} must be at least 1 (frames sampled per video)")
        self.recognizer_name, self.weights, self.frames = recognizer, pack, int(frames)
        self.strict, self.min_face_size = bool(strict), float(min_face_size)
        self.options, self.storage_options = dict(options or {}), storage_options
        self.recognizer: Recognizer | None = None

    @classmethod
    def from_recognizer(
        cls,
        recognizer: Recognizer,
        frames: int = DEFAULT_FRAMES,
        strict: bool = False,
        min_face_size: float = DEFAULT_MIN_FACE_SIZE,
    ) -> IdentityMetric:
        """Wrap a recognizer the caller already built (the worker's ``identity`` section and its portrait rules)."""
        metric = cls(recognizer=recognizer.kind, frames=frames, strict=strict, min_face_size=min_face_size)
        metric.recognizer = recognizer
        return metric

    def setup(self, device: str = "cpu") -> None:
        if self.recognizer is None:
            self.recognizer = build_recognizer(self.recognizer_name, self.weights, self.storage_options, **self.options)

    def _ready(self) -> Recognizer:
        if self.recognizer is None:
            raise RuntimeError("the identity metric is not set up; call setup() before score()")
        return self.recognizer

    def fingerprint(self) -> str:
        return self._ready().model_id

    def video_faces(self, frames: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Raw and unit embeddings of the largest face in each sampled frame that has one, and the frames sampled."""
        recognizer = self._ready()
        indices = sample_indices(len(frames), self.frames)
        raws: list[np.ndarray] = []
        for index in indices:
            image = np.ascontiguousarray(frames[int(index)])
            face = largest_face(recognizer.detector.detect(image))
            if face is not None:
                raws.append(np.asarray(recognizer.embedder.embed_raw(image, face), dtype=np.float32).reshape(-1))
        return raws, [l2_normalize(r) for r in raws], len(indices)

    def _portrait(self, portrait: np.ndarray | None) -> np.ndarray | None:
        """The portrait's raw embedding, or None when there is no portrait or no usable face in it."""
        if portrait is None:
            return None
        try:
            return self._ready().portrait_embedding(portrait, strict=self.strict, min_face_size=self.min_face_size)
        except RowError:  # the worker rejects such portraits before generation; here it is a missing input
            return None

    def score(self, frames: np.ndarray, portrait: np.ndarray | None, prompt: str) -> dict[str, Any]:
        return self.score_embedding(frames, self._portrait(portrait))

    def score_embedding(self, frames: np.ndarray, portrait_raw: np.ndarray | None) -> dict[str, Any]:
        """``score`` with the portrait's raw embedding already made (the worker embeds each portrait once, when it
        checks it before generation)."""
        raws, units, sampled = self.video_faces(frames)
        sims: list[float] = []
        dists: list[float] = []
        if portrait_raw is not None:
            portrait_unit = l2_normalize(portrait_raw)
            sims = [float(np.dot(u, portrait_unit)) for u in units]
            if self._ready().embedder.reports_distance:
                dists = [float(np.linalg.norm(r - portrait_raw)) for r in raws]
        out = summarize(sims, dists, sampled, self.fingerprint())
        if portrait_raw is None:  # face counts stand; the similarity columns stay null
            out.update(face_frames=len(units), face_rate=(len(units) / sampled) if sampled else 0.0)
        temporal = consecutive_cosines(units)
        out["identity_temporal_mean"] = float(np.mean(temporal)) if temporal else None
        out["identity_temporal_min"] = float(np.min(temporal)) if temporal else None
        return out
