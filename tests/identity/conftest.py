"""Real photos that installed packages ship, and the recognizers built once per session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm import storage


def load(uri: str) -> np.ndarray:
    return storage.read_image(uri)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(w * factor), round(h * factor)), Image.BICUBIC))


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return load("pkg://skimage/data/astronaut.png")


@pytest.fixture(scope="session")
def tom_hanks() -> np.ndarray:
    return load("pkg://insightface/data/images/Tom_Hanks_54745.png")


@pytest.fixture(scope="session")
def six_faces() -> np.ndarray:
    return load("pkg://insightface/data/images/t1.jpg")


@pytest.fixture(scope="session")
def dlib_recognizer():
    from farm.identity.recognizer import build_recognizer

    return build_recognizer("dlib")


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from farm.identity.tiny_pack import write_tiny_insightface_pack

    return write_tiny_insightface_pack(tmp_path_factory.mktemp("tiny_pack"), seed=0)


@pytest.fixture(scope="session")
def tiny_recognizer(tiny_pack: Path):
    from farm.identity.recognizer import build_recognizer

    return build_recognizer("insightface", str(tiny_pack))
