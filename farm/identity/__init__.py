"""Identity: face detection, embeddings and the identity-similarity metric (insightface and dlib recognizers).

Heavy back ends (dlib, onnxruntime/insightface) are imported only when a recognizer is built.
"""

from farm.identity.faces import Face, FaceDetector, FaceEmbedder, largest_face, norm_crop, pick_portrait_face
from farm.identity.recognizer import METRIC_COLUMNS, METRIC_FIELDS, Recognizer, build_recognizer

__all__ = [
    "METRIC_COLUMNS",
    "METRIC_FIELDS",
    "Face",
    "FaceDetector",
    "FaceEmbedder",
    "Recognizer",
    "build_recognizer",
    "largest_face",
    "norm_crop",
    "pick_portrait_face",
]
