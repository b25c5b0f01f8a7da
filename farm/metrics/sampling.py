"""Which frames a metric looks at, and the similarity summaries several metrics share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from farm.identity.recognizer import sample_indices

__all__ = ["consecutive_cosines", "frame_pairs", "sample_indices"]


def frame_pairs(num_frames: int, k: int) -> list[tuple[int, int]]:
    """Up to ``k`` pairs of consecutive frames ``(i, i + 1)``, spread uniformly over the video (none below 2 frames)."""
    if num_frames < 2:
        return []
    return [(int(i), int(i) + 1) for i in sample_indices(num_frames - 1, k)]


def consecutive_cosines(units: Sequence[np.ndarray]) -> list[float]:
    """Cosine of each unit vector with the one before it (empty below two vectors)."""
    return [float(np.dot(a, b)) for a, b in zip(units, units[1:], strict=False)]
