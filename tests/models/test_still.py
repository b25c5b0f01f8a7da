"""The `still` calibration baseline: CPU-only, no ML, a centred aligned portrait that zooms in slowly."""

from __future__ import annotations

import numpy as np
import pytest

from farm import storage
from farm.identity.dlib_models import DlibDetector
from farm.models import build_backend
from farm.models.still import StillBackend, StillSubject
from farm.params import SamplingParams
from farm.records import ErrorCode, RowError
from farm.types import GenerationRequest, ModelSpec


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return storage.read_image("pkg://skimage/data/astronaut.png")


@pytest.fixture(scope="module")
def backend() -> StillBackend:
    b = build_backend(ModelSpec(backend="still"))
    assert isinstance(b, StillBackend)
    b.setup("cpu")
    return b


@pytest.fixture(scope="module")
def detector() -> DlibDetector:
    return DlibDetector()


def request(frames: int, height: int, width: int) -> GenerationRequest:
    params = SamplingParams(num_frames=frames, height=height, width=width, fps=16)
    return GenerationRequest(id="r", prompt="ignored", negative_prompt="", params=params, seed=0)


def test_declares_cpu_only(backend: StillBackend) -> None:
    res = backend.resources(gpus_per_replica=1.0)
    assert res.gpus == 0 and res.cpus == 1
    assert "baseline" in backend.describe()
    assert backend.fingerprint().startswith("still-v1:dlib-hog@")
    backend.default_params().check()


@pytest.mark.parametrize(("height", "width"), [(256, 256), (240, 416), (416, 240), (32, 48)])
def test_frames_shape_range_and_determinism(backend: StillBackend, astronaut: np.ndarray, height, width) -> None:
    subject = backend.prepare_subject(astronaut)
    frames = backend.generate(subject, request(9, height, width))
    assert frames.shape == (9, height, width, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.05
    np.testing.assert_array_equal(frames, backend.generate(subject, request(9, height, width)))


def test_face_is_centred_and_zooms_in(backend: StillBackend, detector: DlibDetector, astronaut: np.ndarray) -> None:
    frames = backend.generate(backend.prepare_subject(astronaut), request(17, 240, 416))
    first = detector.detect((frames[0] * 255 + 0.5).astype(np.uint8))
    last = detector.detect((frames[-1] * 255 + 0.5).astype(np.uint8))
    assert len(first) == 1 and len(last) == 1
    centre_x = (first[0].bbox[0] + first[0].bbox[2]) / 2
    assert abs(centre_x - 208) < 20
    eyes_x = first[0].kps[:2, 0]
    assert eyes_x[0] < 208 < eyes_x[1]
    growth = last[0].kps[1, 0] - last[0].kps[0, 0]
    assert growth / (first[0].kps[1, 0] - first[0].kps[0, 0]) == pytest.approx(1.08, abs=0.04)  # default zoom 8%


def test_subject_and_portrait_checks(backend: StillBackend, astronaut: np.ndarray) -> None:
    subject = backend.prepare_subject(astronaut)
    assert isinstance(subject, StillSubject) and subject.portrait.shape == (672, 672, 3) and subject.num_faces == 1
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    with pytest.raises(RowError) as err:
        backend.prepare_subject(noise)
    assert err.value.code is ErrorCode.NO_FACE
    six = storage.read_image("pkg://insightface/data/images/t1.jpg")
    assert backend.prepare_subject(six).num_faces == 6
    strict = StillBackend(ModelSpec(backend="still", options={"strict": True}))
    with pytest.raises(RowError) as err:
        strict.prepare_subject(six)  # works without setup(): CPU workers may hold an un-set-up copy
    assert err.value.code is ErrorCode.MULTIPLE_FACES


def test_options_are_checked(astronaut: np.ndarray) -> None:
    bad = StillBackend(ModelSpec(backend="still", options={"zoom": -1}))
    with pytest.raises(ValueError, match="zoom=-1"):
        bad.generate(bad.prepare_subject(astronaut), request(5, 64, 64))
    with pytest.raises(ValueError, match="options.pack"):
        StillBackend(ModelSpec(backend="still", options={"recognizer": "insightface"})).setup("cpu")


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_insightface_detector_option(tmp_path, astronaut: np.ndarray) -> None:
    from farm.identity.tiny_pack import write_tiny_insightface_pack

    pack = write_tiny_insightface_pack(tmp_path / "pack", seed=0)
    b = StillBackend(ModelSpec(backend="still", options={"recognizer": "insightface", "pack": str(pack)}))
    b.setup("cpu")
    assert b.fingerprint().startswith("still-v1:scrfd:det_tiny@")
    frames = b.generate(b.prepare_subject(astronaut), request(5, 64, 64))  # random detector: plumbing only
    assert frames.shape == (5, 64, 64, 3)
