"""``still``: a calibration baseline, not a model. It films the aligned portrait with a slow zoom.

Its videos go through the same encoder and scorer as Lynx's, so its identity scores are the ceiling the metric can
reach after H.264 compression and re-detection: a job can run it beside Lynx in a sweep to read Lynx's scores
against that ceiling. No ML besides the face detector; CPU only.

Options (``model.options``): ``recognizer`` (``dlib`` default, or ``insightface`` with ``pack``) picks the detector
used to align the portrait; ``strict`` and ``min_face_size`` apply the portrait checks; ``extend_ratio`` (default
0.6: head and shoulders; Lynx's reference crop uses a tighter 0.8) sets how much of the frame's shorter side the
face fills; ``zoom`` (default 0.08) is the total zoom over the clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from farm import storage
from farm.identity.faces import DEFAULT_MIN_FACE_SIZE, FaceDetector, norm_crop, pick_portrait_face
from farm.models.base import Backend
from farm.params import SamplingParams
from farm.types import GenerationRequest, ReplicaResources

# The aligned portrait keeps more context than the frame shows (face at CONTEXT_RATIO of the template) so the frame
# can be filled from real pixels; 672 = 6 x 112 keeps the template centred (insightface's 112 rule).
CONTEXT_RATIO = 0.4
PORTRAIT_SIZE = 672
DEFAULT_EXTEND = 0.6
DEFAULT_ZOOM = 0.08


@dataclass(frozen=True)
class StillSubject:
    """The aligned portrait (square, uint8, face centred at ``CONTEXT_RATIO`` of the ArcFace template)."""

    portrait: np.ndarray
    num_faces: int


class StillBackend(Backend):
    name = "still"
    OPTIONS = frozenset({"recognizer", "pack", "strict", "min_face_size", "extend_ratio", "zoom", "storage_options"})

    def resources(self, gpus_per_replica: float = 1.0) -> ReplicaResources:
        return ReplicaResources(gpus=0.0, cpus=1.0)

    def default_params(self) -> SamplingParams:
        return SamplingParams(num_frames=33, height=480, width=480, num_inference_steps=1, fps=16)

    def describe(self) -> str:
        return "still baseline (aligned portrait, slow zoom; no generative model)"

    def _options(self) -> dict[str, Any]:
        return dict(self.spec.options)

    def check_weights(self, deep: bool = False) -> list[str]:
        """No model weights; with ``recognizer: insightface`` the pack must exist."""
        options = self._options()
        if options.get("recognizer", "dlib") != "insightface":
            return []
        pack = options.get("pack") or self.spec.weights.get("insightface")
        if not pack:
            return ["still backend: recognizer=insightface needs options.pack (an insightface pack URI)"]
        try:
            if storage.exists(pack, self.spec.storage_options or None):
                return []
        except Exception as exc:  # noqa: BLE001 - a storage fault is a finding
            return [f"still backend: cannot check options.pack {pack!r} ({type(exc).__name__}: {exc})"]
        return [f"still backend: options.pack {pack!r} does not exist; point it at an insightface pack"]

    def _make_detector(self) -> FaceDetector:
        options = self._options()
        if options.get("recognizer", "dlib") == "insightface":
            from farm.identity.insightface_pack import load_insightface_pack

            pack = options.get("pack") or self.spec.weights.get("insightface")
            if not pack:
                raise ValueError("still backend: recognizer=insightface needs options.pack (an insightface pack URI)")
            return load_insightface_pack(pack)[0]
        from farm.identity.dlib_models import DlibDetector

        return DlibDetector()

    def setup(self, device: str) -> None:
        self.device = device
        self._detector = self._make_detector()

    def _ensure_detector(self) -> FaceDetector:
        # prepare_subject may run in a CPU worker whose copy of the backend never saw setup().
        if getattr(self, "_detector", None) is None:
            self._detector = self._make_detector()
        return self._detector

    def fingerprint(self) -> str:
        options = self._options()
        detector = self._ensure_detector()
        return (
            f"still-v1:{detector.name}@{detector.fingerprint()}:"
            f"ext{options.get('extend_ratio', DEFAULT_EXTEND)}:zoom{options.get('zoom', DEFAULT_ZOOM)}"
        )

    def prepare_subject(self, image: np.ndarray) -> StillSubject:
        options = self._options()
        faces = self._ensure_detector().detect(image)
        face = pick_portrait_face(
            faces,
            strict=bool(options.get("strict", False)),
            min_face_size=float(options.get("min_face_size", DEFAULT_MIN_FACE_SIZE)),
        )
        portrait = norm_crop(image, face.kps, PORTRAIT_SIZE, CONTEXT_RATIO, border_mode=cv2.BORDER_REPLICATE)
        return StillSubject(portrait=portrait, num_faces=len(faces))

    def generate(self, subject: StillSubject, request: GenerationRequest) -> np.ndarray:
        """Frames ``(F, H, W, 3)`` float32 in [0, 1]: the face framed like Lynx's reference crop, zooming in slowly."""
        options = self._options()
        extend = float(options.get("extend_ratio", DEFAULT_EXTEND))
        zoom = float(options.get("zoom", DEFAULT_ZOOM))
        if extend <= 0 or zoom < 0:
            raise ValueError(f"still backend: extend_ratio={extend} must be > 0 and zoom={zoom} >= 0")
        params = request.params
        height, width, count = params.height, params.width, params.num_frames
        side = float(min(height, width))
        base = side / PORTRAIT_SIZE * extend / CONTEXT_RATIO
        source = subject.portrait
        if base < 1.0:  # shrink once with area averaging, so small frames don't alias
            n = max(2, int(round(PORTRAIT_SIZE * base)))
            source = cv2.resize(source, (n, n), interpolation=cv2.INTER_AREA)
            base *= PORTRAIT_SIZE / n
        centre = source.shape[0] / 2.0
        frames = np.empty((count, height, width, 3), dtype=np.float32)
        for t in range(count):
            scale = base * (1.0 + zoom * (t / (count - 1) if count > 1 else 0.0))
            matrix = np.array(
                [[scale, 0.0, width / 2.0 - scale * centre], [0.0, scale, height / 2.0 - scale * centre]],
                dtype=np.float64,
            )
            frame = cv2.warpAffine(
                source, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            frames[t] = frame.astype(np.float32) / 255.0
        return frames
