"""The scorer: sampling, null semantics, portrait cache, and the still-video ceiling through the real encoder."""

from __future__ import annotations

import numpy as np
import pytest

from farm.identity.recognizer import (
    METRIC_COLUMNS,
    METRIC_FIELDS,
    Recognizer,
    build_recognizer,
    sample_indices,
    summarize,
)
from farm.models.still import StillBackend
from farm.params import SamplingParams
from farm.types import GenerationRequest, ModelSpec
from farm.video import decode_video, encode_mp4


def test_sample_indices_uniform() -> None:
    idx = sample_indices(81, 16)
    assert len(idx) == 16 and idx[0] == 0 and idx[-1] == 80
    gaps = np.diff(idx)
    assert gaps.min() >= 5 and gaps.max() <= 6
    assert sample_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(0, 16).size == 0
    with pytest.raises(ValueError, match="k=0"):
        sample_indices(10, 0)


def test_summarize_statistics_and_nulls() -> None:
    sims, dists = [0.9, 0.7, 0.8], [0.2, 0.4, 0.3]
    m = summarize(sims, dists, 4, "x")
    assert m["identity_mean"] == pytest.approx(np.mean(sims))
    assert m["identity_std"] == pytest.approx(np.std(sims))
    assert (m["identity_min"], m["identity_max"]) == (0.7, 0.9)
    assert m["identity_distance_max"] == 0.4 and m["identity_distance_mean"] == pytest.approx(0.3)
    assert (m["face_frames"], m["frames_scored"], m["face_rate"]) == (3, 4, 0.75)
    empty = summarize([], [], 4, "x")
    assert all(empty[c] is None for c in METRIC_COLUMNS if c.startswith("identity_") and c != "identity_model")
    assert (empty["face_frames"], empty["face_rate"], empty["identity_model"]) == (0, 0.0, "x")
    assert set(m) == set(METRIC_COLUMNS)


def test_metric_fields_match_result_schema() -> None:
    results = pytest.importorskip("farm.results")
    assert METRIC_FIELDS is results.IDENTITY_FIELDS


def test_noise_video_gives_null_similarity(dlib_recognizer: Recognizer, astronaut: np.ndarray) -> None:
    portrait = dlib_recognizer.portrait_embedding(astronaut)
    noise = np.random.default_rng(1).random((20, 96, 128, 3), dtype=np.float32)
    m = dlib_recognizer.score_frames(noise, portrait, k=16)
    assert m["identity_mean"] is None and m["identity_distance_mean"] is None and m["identity_std"] is None
    assert (m["face_frames"], m["frames_scored"], m["face_rate"]) == (0, 16, 0.0)
    assert m["identity_model"].startswith("dlib:dlib-resnet@")


@pytest.fixture(scope="module")
def still_video(astronaut: np.ndarray) -> np.ndarray:
    backend = StillBackend(ModelSpec(backend="still"))
    backend.setup("cpu")
    params = SamplingParams(num_frames=17, height=320, width=320, fps=16)
    frames = backend.generate(backend.prepare_subject(astronaut), GenerationRequest("a", "", "", params, 0))
    return frames


def test_still_video_scores_near_its_ceiling(dlib_recognizer: Recognizer, astronaut, still_video) -> None:
    portrait = dlib_recognizer.portrait_embedding(astronaut)
    decoded, fps = decode_video(encode_mp4(still_video, 16))
    assert decoded.shape == (17, 320, 320, 3) and fps == 16
    m = dlib_recognizer.score_frames(decoded, portrait, k=8)
    assert (m["face_frames"], m["frames_scored"], m["face_rate"]) == (8, 8, 1.0)
    # the ceiling: far inside dlib's same-person threshold, close to a photo compared with its own JPEG
    assert m["identity_distance_max"] < 0.25
    assert m["identity_mean"] > 0.98 and m["identity_std"] < 0.01


def test_float_and_uint8_frames_score_alike(dlib_recognizer: Recognizer, astronaut, still_video) -> None:
    portrait = dlib_recognizer.portrait_embedding(astronaut)
    as_uint8 = (np.clip(still_video[:3], 0, 1) * 255 + 0.5).astype(np.uint8)
    a = dlib_recognizer.score_frames(still_video[:3], portrait)
    b = dlib_recognizer.score_frames(as_uint8, portrait)
    assert a == b


def test_portrait_embedding_is_computed_once(astronaut: np.ndarray) -> None:
    rec = build_recognizer("dlib")
    calls = []
    detect = rec.detector.detect
    rec.detector.detect = lambda image: calls.append(1) or detect(image)  # type: ignore[method-assign]
    first = rec.portrait_embedding(astronaut)
    second = rec.portrait_embedding(astronaut.copy())
    assert len(calls) == 1 and np.array_equal(first, second)
    rec.portrait_embedding(astronaut, strict=True)  # other rules -> checked again
    assert len(calls) == 2


def test_wrong_embedding_size_is_named(dlib_recognizer: Recognizer, still_video) -> None:
    with pytest.raises(ValueError, match="512 dims"):
        dlib_recognizer.score_frames(still_video[:1], np.ones(512, np.float32))


def test_build_recognizer_errors() -> None:
    with pytest.raises(ValueError, match="unknown recognizer 'arcface'"):
        build_recognizer("arcface")
    with pytest.raises(ValueError, match="pack"):
        build_recognizer("insightface", None)


def test_concurrent_scoring_matches_sequential(dlib_recognizer: Recognizer, astronaut, still_video) -> None:
    """The runtime scores in threads beside generation; shared dlib objects must not mix up results."""
    from concurrent.futures import ThreadPoolExecutor

    portrait = dlib_recognizer.portrait_embedding(astronaut)
    clips = [still_video[i : i + 3] for i in (0, 5, 10, 14)]
    sequential = [dlib_recognizer.score_frames(c, portrait) for c in clips]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda c: dlib_recognizer.score_frames(c, portrait), clips))
    assert threaded == sequential
