"""``identity_facexlib``: face resemblance with facexlib's IR-SE50 ArcFace, the network Lynx conditions on and the
one its paper's "ID (facexlib)" column is measured with, so our numbers sit next to the published ones.

``weights`` is ``recognition_arcface_ir_se50.pth`` (the file ``model.weights.arcface`` points at; any fsspec URI).
Per sampled frame the largest face is detected (dlib by default: offline, ships in a wheel; or an insightface pack's
SCRFD), aligned with insightface's 112 ``norm_crop`` at the official precision and embedded (``IRSE50Embedder``);
the columns are the mean and minimum cosine against the portrait's largest face, and how many sampled frames had a
face. The detector differs from facexlib's RetinaFace, so values can differ slightly from the paper's on hard frames.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from farm.identity.faces import FaceDetector, FaceEmbedder, check_image, largest_face
from farm.metrics import Metric
from farm.metrics.sampling import sample_indices

DETECTORS = ("dlib", "insightface")
DEFAULT_FRAMES = 16
PORTRAIT_CACHE = 64


def build_detector(detector: str, pack: str | None, storage_options: dict[str, Any] | None) -> FaceDetector:
    """The face detector that picks each frame's face (dlib, or the SCRFD of an insightface ``pack``)."""
    if detector == "dlib":
        from farm.identity.dlib_models import DlibDetector

        return DlibDetector()
    from farm.identity.insightface_pack import load_insightface_pack

    return load_insightface_pack(pack, storage_options)[0]


class FacexlibIdentityMetric(Metric):
    """Mean / min ArcFace (IR-SE50) cosine of the video's faces against the portrait's face."""

    name = "identity_facexlib"
    device = "gpu"
    uses_portrait = True
    columns: ClassVar[dict[str, pa.DataType]] = {
        "identity_facexlib_mean": pa.float64(),
        "identity_facexlib_min": pa.float64(),
        "identity_facexlib_frames": pa.int32(),
        "identity_facexlib_model": pa.string(),
    }

    def __init__(
        self,
        weights: str | None = None,
        frames: int = DEFAULT_FRAMES,
        detector: str = "dlib",
        pack: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not weights:
            raise ValueError("needs weights: the IR-SE50 ArcFace file recognition_arcface_ir_se50.pth (path or URI)")
        if detector not in DETECTORS:
            raise ValueError(f"detector={detector!r} is unknown; choose one of {list(DETECTORS)}")
        if detector == "insightface" and not pack:
            raise ValueError("detector 'insightface' needs pack: an insightface model pack folder or URI")
        if int(frames) < 1:
            raise ValueError(f"frames={frames} must be at least 1 (frames sampled per video)")
        self.weights, self.frames, self.detector_name, self.pack = weights, int(frames), detector, pack
        self.storage_options = storage_options
        self.detector: FaceDetector | None = None
        self.embedder: FaceEmbedder | None = None
        self._portraits: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()  # replicas score in threads

    def setup(self, device: str = "cpu") -> None:
        from farm.models.lynx.arcface import irse50_embedder

        options = json.dumps(self.storage_options, sort_keys=True) if self.storage_options else None
        self.embedder = irse50_embedder(self.weights, options, device)
        self.detector = build_detector(self.detector_name, self.pack, self.storage_options)

    def _ready(self) -> tuple[FaceDetector, FaceEmbedder]:
        if self.detector is None or self.embedder is None:
            raise RuntimeError("the identity_facexlib metric is not set up; call setup() before score()")
        return self.detector, self.embedder

    def fingerprint(self) -> str:
        detector, embedder = self._ready()
        return f"{embedder.name}@{embedder.fingerprint()}+{detector.name}@{detector.fingerprint()}"

    def embed_largest(self, image: np.ndarray) -> np.ndarray | None:
        """Unit embedding of the image's largest face, or None without a face."""
        detector, embedder = self._ready()
        image = check_image(image)
        face = largest_face(detector.detect(image))
        return None if face is None else np.asarray(embedder.embed(image, face), dtype=np.float32).reshape(-1)

    def portrait_embedding(self, portrait: np.ndarray) -> np.ndarray | None:
        """The portrait's unit embedding (None without a face), cached by pixels: rows share portraits."""
        image = check_image(portrait)
        key = hashlib.sha1(image.tobytes()).hexdigest() + str(image.shape)
        with self._lock:
            if key in self._portraits:
                return self._portraits[key]
        embedding = self.embed_largest(image)
        with self._lock:
            self._portraits[key] = embedding
            while len(self._portraits) > PORTRAIT_CACHE:
                self._portraits.popitem(last=False)
        return embedding

    def score(self, frames: np.ndarray, portrait: np.ndarray | None, prompt: str) -> dict[str, Any]:
        found = [self.embed_largest(frames[int(i)]) for i in sample_indices(len(frames), self.frames)]
        units = [u for u in found if u is not None]
        out = self.empty()
        out["identity_facexlib_frames"] = len(units)
        reference = None if portrait is None else self.portrait_embedding(portrait)
        if reference is not None and units:
            sims = np.array([float(np.dot(u, reference)) for u in units], dtype=np.float64)
            out.update(identity_facexlib_mean=float(sims.mean()), identity_facexlib_min=float(sims.min()))
        return out
