"""``motion``: how much a video moves, as mean dense optical flow (OpenCV Farneback), the measure data filters and
benchmarks such as OpenS2V-Eval's motion score use to catch near-static "videos" (a portrait that barely breathes
scores high on identity and means nothing).

Up to ``frame_pairs`` pairs of consecutive frames spread over the video are converted to grayscale, resized to
``width`` pixels wide (aspect kept, so the number is comparable across resolutions), and Farneback's flow is
computed with OpenCV's tutorial parameters. ``motion_mean`` is the mean flow magnitude over pixels and pairs, in
pixels per frame at ``width``; ``motion_static`` is ``motion_mean < static_below``. The default 0.5 px/frame at
256 px wide is about 0.2% of the frame width per frame (8 px per second at 16 fps): camera and subject both still
to the eye. Calibrate it on your own videos; it is part of ``motion_model`` so a changed threshold is visible.
"""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa

from farm.metrics import Metric
from farm.metrics.sampling import frame_pairs

DEFAULT_PAIRS = 16
DEFAULT_WIDTH = 256
DEFAULT_STATIC_BELOW = 0.5
# pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags: OpenCV's dense optical flow tutorial values
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def to_gray(frame: np.ndarray, width: int) -> np.ndarray:
    """RGB uint8 frame -> grayscale resized to ``width`` pixels wide (height by aspect, at least 1)."""
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    height = max(1, round(h * width / w))
    if (w, h) == (width, height):
        return gray
    interpolation = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def flow_magnitude(prev_gray: np.ndarray, next_gray: np.ndarray) -> float:
    """Mean Farneback flow magnitude between two grayscale frames, in pixels."""
    flow = cv2.calcOpticalFlowFarneback(prev_gray, next_gray, None, *FARNEBACK)
    return float(np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2).mean())


class MotionMetric(Metric):
    """Mean optical-flow magnitude and a near-static flag; no weights, CPU."""

    name = "motion"
    columns: ClassVar[dict[str, pa.DataType]] = {
        "motion_mean": pa.float64(),
        "motion_static": pa.bool_(),
        "motion_pairs": pa.int32(),
        "motion_model": pa.string(),
    }

    def __init__(
        self, frame_pairs: int = DEFAULT_PAIRS, width: int = DEFAULT_WIDTH, static_below: float = DEFAULT_STATIC_BELOW
    ) -> None:
        if int(frame_pairs) < 1:
            raise ValueError(f"frame_pairs={frame_pairs} must be at least 1")
        if int(width) < 16:
            raise ValueError(f"width={width} is too small for optical flow; use 128 or more (default 256)")
        if float(static_below) < 0:
            raise ValueError(f"static_below={static_below} must be >= 0 (pixels per frame at width {width})")
        self.frame_pairs, self.width, self.static_below = int(frame_pairs), int(width), float(static_below)

    def fingerprint(self) -> str:
        return f"opencv-farneback-{cv2.__version__}@w{self.width},static<{self.static_below:g}"

    def setup(self, device: str = "cpu") -> None:
        """Nothing to load."""

    def score(self, frames: np.ndarray, portrait: np.ndarray | None, prompt: str) -> dict[str, Any]:
        pairs = frame_pairs(len(frames), self.frame_pairs)
        out = self.empty()
        out["motion_pairs"] = len(pairs)
        if not pairs:
            return out
        gray: dict[int, np.ndarray] = {}
        for index in sorted({i for pair in pairs for i in pair}):
            gray[index] = to_gray(frames[index], self.width)
        mean = float(np.mean([flow_magnitude(gray[a], gray[b]) for a, b in pairs]))
        out.update(motion_mean=mean, motion_static=mean < self.static_below)
        return out
