"""Synthetic videos for the metric tests."""

from __future__ import annotations

import cv2
import numpy as np


def jitter(image: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` frames of ``image``, each shifted by up to 3 px and brightened a little: a nearly still video."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        dx, dy = rng.integers(-3, 4, size=2)
        matrix = np.float32([[1, 0, dx], [0, 1, dy]])
        moved = cv2.warpAffine(image, matrix, image.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
        frames.append(np.clip(moved.astype(np.int16) + rng.integers(-6, 7), 0, 255).astype(np.uint8))
    return np.stack(frames)


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture: enough structure for optical flow to lock on."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def moving_square(count: int, speed: float, size: tuple[int, int] = (96, 128), side: int = 64) -> np.ndarray:
    """A textured square sliding right by ``speed`` px per frame over a grey background (``speed=0``: static)."""
    height, width = size
    patch = texture(side, side, seed=1)
    frames = []
    for t in range(count):
        frame = np.full((height, width, 3), 100, dtype=np.uint8)
        x, y = int(round(8 + speed * t)) % (width - side), (height - side) // 2
        frame[y : y + side, x : x + side] = patch
        frames.append(frame)
    return np.stack(frames)
