"""The ``lynx`` farm backend and the public entry points on the tiny checkpoint (dlib finds the face; the tiny
insightface pack's random-weight ArcFace embeds it, as in the embedded demo)."""

from __future__ import annotations

import numpy as np
import pytest

from farm import storage
from farm.models import build_backend
from farm.models.lynx.api import generate_from_embedding, generate_from_portrait
from farm.models.lynx.backend import LynxBackend
from farm.models.lynx.face import LynxSubject
from farm.records import ErrorCode, RowError
from farm.types import GenerationRequest, ModelSpec
from tests.models.lynx_helpers import FAST, NEGATIVE, PROMPT, adapter_dir, base_dir, tiny_checkpoint

ASTRONAUT = "pkg://skimage/data/astronaut.png"


def spec(variant: str = "full", **options) -> ModelSpec:
    weights = {"base": base_dir(), "adapter": adapter_dir(variant), "face_pack": str(tiny_checkpoint() / "insightface")}
    return ModelSpec(backend="lynx", variant=variant, weights=weights, options={"face_detector": "dlib", **options})


@pytest.fixture(scope="module")
def backend() -> LynxBackend:
    b = build_backend(spec(safety_classifier="tests.models.lynx_helpers:block_if_brighter_than", safety_model="0.99"))
    assert isinstance(b, LynxBackend)
    b.setup("cpu")
    return b


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return storage.read_image(ASTRONAUT)


def request(params=FAST, seed: int = 42) -> GenerationRequest:
    return GenerationRequest(id="r1", prompt=PROMPT, negative_prompt=NEGATIVE, params=params, seed=seed)


def test_defaults_follow_the_official_scripts() -> None:
    full, lite = LynxBackend(spec("full")), LynxBackend(spec("lite"))
    p = full.default_params()
    assert (p.num_frames, p.height, p.width, p.num_inference_steps, p.fps) == (81, 480, 832, 50, 16)
    assert (p.guidance_scale, p.guidance_scale_i, p.ip_scale, p.ref_scale) == (5.0, 2.0, 1.0, 1.0)
    q = lite.default_params()
    assert (q.num_frames, q.fps, q.guidance_scale, q.guidance_scale_i) == (121, 24, 5.0, None)
    assert full.default_negative_prompt().startswith("Bright tones, overexposed")
    assert "Lynx full" in full.describe() and "Lynx lite" in lite.describe()


def test_spec_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="'medium'"):
        LynxBackend(ModelSpec(backend="lynx", variant="medium", weights={"base": "b", "adapter": "a"}))
    with pytest.raises(ValueError, match="tea_cache"):
        LynxBackend(spec(tea_cache=True))
    with pytest.raises(ValueError, match="weights.adapter"):
        LynxBackend(ModelSpec(backend="lynx", variant="full", weights={"base": "b"}))


def test_portrait_to_video(backend: LynxBackend, astronaut: np.ndarray) -> None:
    subject = backend.prepare_subject(astronaut)
    assert isinstance(subject, LynxSubject) and subject.num_faces == 1
    assert subject.embedding.shape == (512,) and subject.embedding.dtype == np.float32
    assert subject.aligned_face.shape == (256, 256, 3) and subject.aligned_face.dtype == np.uint8
    frames = backend.generate(subject, request())
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.float32
    assert backend.postprocess(frames, request()) is frames  # the stand-in classifier lets it through
    assert len(backend.fingerprint()) == 16 and backend.fingerprint() == backend.fingerprint()
    # The public entry point from a portrait gives the same frames as the backend.
    direct = generate_from_portrait(
        base_dir(),
        adapter_dir("full"),
        "full",
        astronaut,
        str(tiny_checkpoint() / "insightface"),
        PROMPT,
        NEGATIVE,
        FAST,
        42,
        face_detector="dlib",
    )
    np.testing.assert_allclose(direct, frames, atol=1e-6, rtol=0)
    embedded = generate_from_embedding(
        base_dir(), adapter_dir("full"), "full", subject.embedding, subject.aligned_face, PROMPT, NEGATIVE, FAST, 42
    )
    np.testing.assert_array_equal(embedded, direct)


def test_no_face_fails_the_row_before_generation(backend: LynxBackend) -> None:
    blank = np.full((240, 320, 3), 128, dtype=np.uint8)
    backend.pipeline.reset_counters()
    with pytest.raises(RowError) as info:
        backend.prepare_subject(blank)
    assert info.value.code is ErrorCode.NO_FACE
    assert backend.pipeline.dit_forwards == 0


def test_safety_hook_records_a_blocked_row() -> None:
    from farm.models.lynx.backend import load_safety_classifier

    b = LynxBackend(spec(safety_classifier="tests.models.lynx_helpers:always_block"))
    b._safety = load_safety_classifier("tests.models.lynx_helpers:always_block", None)  # what setup() does
    frames = np.zeros((5, 32, 48, 3), dtype=np.float32)
    with pytest.raises(RowError) as info:
        b.postprocess(frames, request())
    assert info.value.code is ErrorCode.SAFETY_BLOCKED
    with pytest.raises(ValueError, match="package.module:callable"):
        load_safety_classifier("no_colon_here", None)
    # Off unless configured.
    assert LynxBackend(spec()).postprocess(frames, request()) is frames
