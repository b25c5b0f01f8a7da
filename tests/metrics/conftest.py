"""Real photos that installed packages ship, tiny random weights written here, and videos made from them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from farm import storage


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return storage.read_image("pkg://skimage/data/astronaut.png")


@pytest.fixture(scope="session")
def other_person(astronaut: np.ndarray) -> np.ndarray:
    """Tom Hanks (a 112 px aligned crop in insightface's data) enlarged onto a grey frame of the astronaut's size."""
    face = cv2.resize(storage.read_image("pkg://insightface/data/images/Tom_Hanks_54745.png"), (224, 224))
    frame = np.full_like(astronaut, 128)
    top, left = (frame.shape[0] - 224) // 2, (frame.shape[1] - 224) // 2
    frame[top : top + 224, left : left + 224] = face
    return frame


@pytest.fixture(scope="session")
def tiny_arcface(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from farm.models.lynx.arcface import ARCFACE_FILE, write_tiny_irse50

    return write_tiny_irse50(tmp_path_factory.mktemp("arcface") / ARCFACE_FILE, seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from farm.metrics.tiny_clip import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def all_specs(tiny_arcface: Path, tiny_clip: Path) -> list[dict]:
    """One spec per registered metric, with tiny weights and few frames (fast)."""
    return [
        {"name": "identity", "frames": 4},
        {"name": "identity_facexlib", "weights": str(tiny_arcface), "frames": 4},
        {"name": "motion", "frame_pairs": 4},
        {"name": "clip", "weights": str(tiny_clip), "frames": 4},
    ]


@pytest.fixture(scope="session")
def all_metrics(all_specs: list[dict]) -> list:
    from farm.metrics import build_metrics

    metrics = build_metrics(all_specs)
    for metric in metrics:
        metric.setup("cpu")
    return metrics
