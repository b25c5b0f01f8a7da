"""Motion: Farneback flow on synthetic clips whose true motion is known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from farm.metrics.motion import MotionMetric
from tests.metrics.helpers import moving_square


@pytest.fixture(scope="module")
def motion() -> MotionMetric:
    metric = MotionMetric(frame_pairs=8)
    metric.setup("cpu")
    return metric


def test_static_clip_is_flagged(motion: MotionMetric) -> None:
    m = motion.score(moving_square(9, speed=0), None, "")
    assert m["motion_mean"] == pytest.approx(0.0, abs=1e-3)
    assert m["motion_static"] is True and m["motion_pairs"] == 8


def test_magnitude_grows_with_speed(motion: MotionMetric) -> None:
    means = [motion.score(moving_square(9, speed), None, "")["motion_mean"] for speed in (1, 2, 4)]
    assert means[0] > motion.static_below and all(not np.isnan(x) for x in means)
    assert means[0] < means[1] < means[2]
    assert means[2] / means[0] == pytest.approx(4.0, rel=0.2)  # roughly linear in the true displacement


def test_moving_clip_is_not_static(motion: MotionMetric) -> None:
    assert motion.score(moving_square(9, speed=2), None, "")["motion_static"] is False


def test_resolution_does_not_change_the_number(motion: MotionMetric) -> None:
    """Pixels per frame are measured at the scaled width: twice the resolution, twice the pixels, same value."""
    small = moving_square(9, speed=2)
    large = np.stack([cv2.resize(f, (256, 192), interpolation=cv2.INTER_LINEAR) for f in small])
    a, b = motion.score(small, None, "")["motion_mean"], motion.score(large, None, "")["motion_mean"]
    assert b == pytest.approx(a, rel=0.05)


def test_fewer_than_two_frames_gives_null(motion: MotionMetric) -> None:
    m = motion.score(moving_square(1, speed=2), None, "")
    assert (m["motion_mean"], m["motion_static"], m["motion_pairs"]) == (None, None, 0)
    assert m["motion_model"] == motion.fingerprint()


def test_pairs_are_consecutive_frames_spread_over_the_video() -> None:
    from farm.metrics.sampling import frame_pairs

    assert frame_pairs(81, 4) == [(0, 1), (26, 27), (53, 54), (79, 80)]
    assert frame_pairs(3, 16) == [(0, 1), (1, 2)]
    assert frame_pairs(1, 16) == [] and frame_pairs(0, 16) == []


def test_threshold_and_width_are_in_the_fingerprint() -> None:
    assert MotionMetric(static_below=0.5).fingerprint() != MotionMetric(static_below=1.0).fingerprint()
    assert MotionMetric(width=256).fingerprint() != MotionMetric(width=128).fingerprint()
    with pytest.raises(ValueError, match="static_below=-1"):
        MotionMetric(static_below=-1)


def test_pinned_value(motion: MotionMetric) -> None:
    """An OpenCV or parameter change that moves the numbers fails here (and shows in ``motion_model``)."""
    assert motion.score(moving_square(9, speed=2), None, "")["motion_mean"] == pytest.approx(1.6132, abs=2e-3)
