"""The identity adapter: the recognizer's numbers unchanged, plus temporal identity across frames."""

from __future__ import annotations

import numpy as np
import pytest

from farm.identity.recognizer import METRIC_COLUMNS
from farm.metrics.identity import IdentityMetric
from tests.metrics.helpers import jitter


@pytest.fixture(scope="module")
def identity() -> IdentityMetric:
    metric = IdentityMetric(frames=6)
    metric.setup("cpu")
    return metric


@pytest.fixture(scope="module")
def same_person(astronaut: np.ndarray) -> np.ndarray:
    return jitter(astronaut, 12, seed=0)


@pytest.fixture(scope="module")
def switching(astronaut: np.ndarray, other_person: np.ndarray) -> np.ndarray:
    """The astronaut for the first half, another person for the second."""
    return np.concatenate([jitter(astronaut, 6, seed=1), jitter(other_person, 6, seed=2)])


def test_portrait_columns_equal_the_recognizer(identity: IdentityMetric, astronaut, same_person) -> None:
    ours = identity.score(same_person, astronaut, "")
    recognizer = identity.recognizer
    theirs = recognizer.score_frames(same_person, recognizer.portrait_embedding(astronaut), k=identity.frames)
    assert {c: ours[c] for c in METRIC_COLUMNS} == theirs
    assert ours["face_frames"] == 6 and ours["identity_model"] == identity.fingerprint()


def test_temporal_identity_drops_when_the_face_changes(identity: IdentityMetric, astronaut, same_person, switching):
    steady = identity.score(same_person, astronaut, "")
    switched = identity.score(switching, astronaut, "")
    assert switched["face_frames"] == 6  # both people are found in every sampled frame
    assert steady["identity_temporal_min"] > 0.97
    assert switched["identity_temporal_min"] < steady["identity_temporal_min"] - 0.05
    assert switched["identity_temporal_mean"] < steady["identity_temporal_mean"]
    # the switch is one bad transition among five: the mean hides it, the minimum does not
    assert switched["identity_temporal_min"] < switched["identity_temporal_mean"]
    assert -1.0 <= switched["identity_temporal_min"] <= 1.0


def test_no_portrait_keeps_temporal_and_face_counts(identity: IdentityMetric, same_person) -> None:
    m = identity.score(same_person, None, "")
    assert m["identity_mean"] is None and m["identity_min"] is None and m["identity_distance_mean"] is None
    assert (m["face_frames"], m["frames_scored"], m["face_rate"]) == (6, 6, 1.0)
    assert m["identity_temporal_min"] is not None


def test_portrait_without_a_face_is_a_missing_input(identity: IdentityMetric, same_person) -> None:
    grey = np.full((200, 200, 3), 128, np.uint8)
    m = identity.score(same_person, grey, "")
    assert m["identity_mean"] is None and m["face_frames"] == 6


def test_no_face_in_the_video_gives_nulls(identity: IdentityMetric, astronaut) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 96, 128, 3), dtype=np.uint8)
    m = identity.score(noise, astronaut, "")
    assert m["identity_mean"] is None and m["identity_temporal_mean"] is None and m["identity_temporal_min"] is None
    assert (m["face_frames"], m["face_rate"]) == (0, 0.0)


def test_one_face_frame_has_no_temporal_value(identity: IdentityMetric, astronaut) -> None:
    m = identity.score(astronaut[None], astronaut, "")
    assert m["face_frames"] == 1 and m["identity_mean"] is not None
    assert m["identity_temporal_mean"] is None and m["identity_temporal_min"] is None


def test_wraps_a_recognizer_the_worker_already_has(identity: IdentityMetric, astronaut, same_person) -> None:
    wrapped = IdentityMetric.from_recognizer(identity.recognizer, frames=6)
    wrapped.setup("cpu")  # keeps the given recognizer
    assert wrapped.recognizer is identity.recognizer
    assert wrapped.score(same_person, astronaut, "") == identity.score(same_person, astronaut, "")


def test_score_before_setup_says_so() -> None:
    with pytest.raises(RuntimeError, match="call setup"):
        IdentityMetric().score(np.zeros((2, 8, 8, 3), np.uint8), None, "")


def test_insightface_recognizer_through_the_spec(tmp_path, astronaut, same_person) -> None:
    from farm.identity.tiny_pack import write_tiny_insightface_pack
    from farm.metrics import build_metric

    pack = write_tiny_insightface_pack(tmp_path / "pack", seed=0)
    metric = build_metric({"name": "identity", "recognizer": "insightface", "pack": str(pack), "frames": 3})
    metric.setup("cpu")
    m = metric.score(same_person, astronaut, "")
    assert set(m) == set(metric.columns) and m["identity_model"].startswith("insightface:")
    assert m["identity_distance_mean"] is None  # only dlib reports a calibrated distance
