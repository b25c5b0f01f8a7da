"""Face geometry: the alignment must match insightface's / Lynx's to within a gray level."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import transform as sktransform

from farm.identity.faces import (
    ARCFACE_TEMPLATE,
    alignment_matrix,
    check_image,
    largest_face,
    make_face,
    norm_crop,
    pick_portrait_face,
    similarity_transform,
    template,
)
from farm.records import ErrorCode, RowError


def reference_align(image: np.ndarray, kps: np.ndarray, size: int, extend_ratio: float | None) -> np.ndarray:
    """The official Lynx ``align_face`` math, computed independently (scikit-image's estimator, cv2 warp)."""
    dst = ARCFACE_TEMPLATE.astype(np.float32).copy()
    if extend_ratio is not None:
        dst[:, 1] = dst[:, 1] + 10
        dst = (dst - 112 / 2) * extend_ratio + 112 / 2
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    else:
        assert size % 128 == 0
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    dst = dst * ratio
    dst[:, 0] += shift
    tform = sktransform.SimilarityTransform.from_estimate(kps, dst)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    out = cv2.warpAffine(bgr, tform.params[0:2, :], (size, size), borderValue=0.0)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


ASTRONAUT_KPS = np.array([[203.5, 102.5], [246.5, 104.5], [225.0, 127.0], [201.0, 140.0], [245.0, 141.0]], np.float32)


@pytest.mark.parametrize("size", [112, 224, 256, 512])
@pytest.mark.parametrize("extend_ratio", [None, 0.8])
def test_norm_crop_matches_official_math(astronaut: np.ndarray, size: int, extend_ratio: float | None) -> None:
    ours = norm_crop(astronaut, ASTRONAUT_KPS, size, extend_ratio)
    ref = reference_align(astronaut, ASTRONAUT_KPS, size, extend_ratio)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_norm_crop_matches_insightface_function(astronaut: np.ndarray) -> None:
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(astronaut[:, :, ::-1])
    for size in (112, 256):
        theirs = face_align.norm_crop(bgr, ASTRONAUT_KPS, image_size=size)
        ours = norm_crop(bgr, ASTRONAUT_KPS, size)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_norm_crop_fills_outside_with_zero() -> None:
    image = np.full((100, 100, 3), 200, np.uint8)
    kps = np.array([[10, 10], [20, 10], [15, 15], [11, 20], [19, 20]], np.float32)  # a tiny face near the corner
    out = norm_crop(image, kps, 112, extend_ratio=0.3)
    assert out[0, 0].tolist() == [0, 0, 0] and out.max() == 200


def test_similarity_transform_recovers_a_known_transform() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


def test_similarity_transform_matches_scikit_image_on_noisy_points() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        src = rng.uniform(0, 500, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))
        ref = sktransform.SimilarityTransform.from_estimate(src, dst).params[:2]
        np.testing.assert_allclose(similarity_transform(src, dst), ref, atol=1e-8)


def test_template_rules() -> None:
    np.testing.assert_allclose(template(112), ARCFACE_TEMPLATE, atol=1e-5)
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE * 2, atol=1e-4)
    # 256 follows insightface's 128 rule: scale by 2 and shift 16 px right.
    np.testing.assert_allclose(template(256), ARCFACE_TEMPLATE * 2 + np.array([16.0, 0.0]), atol=1e-4)
    extended = template(112, extend_ratio=0.8)
    np.testing.assert_allclose(extended[:, 1], (ARCFACE_TEMPLATE[:, 1] + 10 - 56) * 0.8 + 56, atol=1e-4)
    with pytest.raises(ValueError, match="extend_ratio"):
        template(112, extend_ratio=0)


def test_alignment_maps_keypoints_onto_template() -> None:
    kps = template(112) * 1.5 + np.array([30.0, 40.0])  # an exact similarity of the template
    matrix = alignment_matrix(kps, 112)
    mapped = kps @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, template(112), atol=1e-4)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        alignment_matrix(np.zeros((4, 2)), 112)


def _face(x1: float, y1: float, x2: float, y2: float, score: float = 0.9):
    return make_face((x1, y1, x2, y2), np.zeros((5, 2)), score)


def test_face_dtypes_and_largest() -> None:
    small, big = _face(0, 0, 10, 10), _face(50, 50, 90, 80)
    assert big.bbox.dtype == np.float32 and big.kps.shape == (5, 2) and big.kps.dtype == np.float32
    assert big.area == 40 * 30 and big.size == 30
    assert largest_face([small, big]) is big
    assert largest_face([]) is None
    with pytest.raises(ValueError, match="bbox"):
        make_face((1, 2, 3), np.zeros((5, 2)), 1.0)


def test_portrait_rules() -> None:
    small, big = _face(0, 0, 20, 20), _face(50, 50, 150, 160)
    assert pick_portrait_face([small, big]) is big
    with pytest.raises(RowError) as err:
        pick_portrait_face([])
    assert err.value.code is ErrorCode.NO_FACE
    with pytest.raises(RowError) as err:
        pick_portrait_face([small, big], strict=True)
    assert err.value.code is ErrorCode.MULTIPLE_FACES
    with pytest.raises(RowError) as err:
        pick_portrait_face([small], min_face_size=32)
    assert err.value.code is ErrorCode.FACE_TOO_SMALL and "20 px" in err.value.message


def test_check_image_names_the_problem() -> None:
    with pytest.raises(ValueError, match="float32"):
        check_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        check_image(np.zeros((4, 4), np.uint8))
