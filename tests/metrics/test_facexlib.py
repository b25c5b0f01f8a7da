"""identity_facexlib with a tiny random IR-SE ArcFace in the official file layout: shapes, determinism, nulls.

With random weights the similarities mean nothing (same person > other person is not expected): only the plumbing is
checked here; the embedder itself is checked against facexlib in tests/models/test_lynx_arcface.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm.metrics import build_metric
from farm.metrics.facexlib import FacexlibIdentityMetric
from tests.metrics.helpers import jitter


def _metric(weights: Path, frames: int = 4) -> FacexlibIdentityMetric:
    metric = build_metric({"name": "identity_facexlib", "weights": str(weights), "frames": frames})
    metric.setup("cpu")
    return metric


@pytest.fixture(scope="module")
def facexlib(tiny_arcface: Path) -> FacexlibIdentityMetric:
    return _metric(tiny_arcface)


@pytest.fixture(scope="module")
def video(astronaut: np.ndarray) -> np.ndarray:
    return jitter(astronaut, 8, seed=3)


def test_values_in_range_and_counted(facexlib: FacexlibIdentityMetric, astronaut, video) -> None:
    m = facexlib.score(video, astronaut, "")
    assert m["identity_facexlib_frames"] == 4
    assert -1.0 <= m["identity_facexlib_min"] <= m["identity_facexlib_mean"] <= 1.0
    assert m["identity_facexlib_model"].startswith("arcface-irse50@") and "+dlib" in m["identity_facexlib_model"]


def test_deterministic_across_calls_and_loads(facexlib, tiny_arcface: Path, astronaut, video) -> None:
    first = facexlib.score(video, astronaut, "")
    assert facexlib.score(video, astronaut.copy(), "") == first
    assert _metric(tiny_arcface).score(video, astronaut, "") == first


def test_the_portrait_scores_one_against_itself(facexlib: FacexlibIdentityMetric, astronaut) -> None:
    """The same pixels go through the same detector, crop and network: cosine 1 whatever the weights."""
    m = facexlib.score(np.stack([astronaut, astronaut]), astronaut, "")
    assert m["identity_facexlib_mean"] == pytest.approx(1.0, abs=1e-5)


def test_missing_inputs_give_nulls(facexlib: FacexlibIdentityMetric, astronaut, video) -> None:
    no_portrait = facexlib.score(video, None, "")
    assert (no_portrait["identity_facexlib_mean"], no_portrait["identity_facexlib_min"]) == (None, None)
    assert no_portrait["identity_facexlib_frames"] == 4
    faceless = np.full((120, 120, 3), 128, np.uint8)
    assert facexlib.score(video, faceless, "")["identity_facexlib_mean"] is None
    noise = np.random.default_rng(0).integers(0, 256, size=(4, 96, 96, 3), dtype=np.uint8)
    m = facexlib.score(noise, astronaut, "")
    assert (m["identity_facexlib_mean"], m["identity_facexlib_frames"]) == (None, 0)


def test_fingerprint_follows_the_weights(tmp_path: Path, tiny_arcface: Path) -> None:
    from farm.models.lynx.arcface import ARCFACE_FILE, write_tiny_irse50

    other = write_tiny_irse50(tmp_path / "other" / ARCFACE_FILE, seed=1)
    same = write_tiny_irse50(tmp_path / "same" / ARCFACE_FILE, seed=0)
    base = _metric(tiny_arcface).fingerprint()
    assert _metric(same).fingerprint() == base
    assert _metric(other).fingerprint() != base


def test_bad_weights_are_named(tmp_path: Path) -> None:
    from farm.models.lynx.weights import LynxWeightsError

    with pytest.raises(FileNotFoundError, match="arcface"):
        _metric(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not torch")
    with pytest.raises(LynxWeightsError, match="junk.pth"):
        _metric(junk)
