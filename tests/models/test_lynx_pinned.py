"""Pinned numbers on the tiny checkpoint: a dependency upgrade that moves the frames fails CI.

The exact fidelity test (official code against ours) needs the official sources and is skipped in CI, so these
literals are what notices a torch/diffusers/transformers upgrade that changes the numbers (diffusers' own pipeline
tests pin an ``expected_slice`` the same way). One small request per variant (seed 42, 5 frames 32x64, 2 steps; full
with 3-pass guidance, lite with 2-pass), fp32 on the CPU, through ``LynxBackend`` as a replica runs it.

The literals were written by this module's ``__main__`` on the code of the commit that added them (ours is within
2e-6 of the official code on the CPU, see ``test_lynx_fidelity.py``). If a test here fails after an upgrade, first
run the fidelity harness against the official code; only when it still agrees, regenerate with
``python -m tests.models.test_lynx_pinned`` and paste its output here, saying in the commit which upgrade moved them.

Options that must not change the frames are checked against the same literals; ``step_cache`` (an approximation)
against a measured bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from farm.models.lynx.backend import LynxBackend
from farm.models.lynx.face import LynxSubject
from farm.types import GenerationRequest, ModelSpec
from tests.models.lynx_helpers import FAST, NEGATIVE, PROMPT, adapter_dir, base_dir, inputs

SEED = 42
PARAMS = {
    "full": dataclasses.replace(FAST, width=64),  # 3-pass guidance, as the official full script
    "lite": dataclasses.replace(FAST, width=64, guidance_scale_i=None),  # 2-pass, as the official lite script
}
# fp32 on the CPU agrees with itself across machines to ~1e-6; 1e-4 stays clear of that and of kernel choices
# (e.g. attention_backend: 1.8e-6), while a real change of the numbers moves them by 1e-3 or more.
ATOL = 1e-4

# frames[0, -3:, -3:, :].flatten(): the first frame's bottom-right 3x3 pixels, RGB in [0, 1]
EXPECTED_FRAMES_SLICE = {
    "full": [
        0.61097330, 0.37372035, 0.35355264, 0.61648327, 0.40297243, 0.45131826, 0.60844868, 0.46491742, 0.33741722,
        0.58226824, 0.35505620, 0.36482289, 0.55170959, 0.37136918, 0.40452912, 0.51502246, 0.43869868, 0.40762940,
        0.43916732, 0.43249804, 0.48435789, 0.41690338, 0.40597862, 0.50379652, 0.47533017, 0.45405081, 0.45367256,
    ],
    "lite": [
        0.59442455, 0.37709159, 0.33573940, 0.61898100, 0.41608346, 0.44351628, 0.60779321, 0.46083447, 0.33764526,
        0.59675270, 0.37026334, 0.35796458, 0.57019961, 0.36758113, 0.41132528, 0.52871352, 0.44070110, 0.39914569,
        0.43541938, 0.44255131, 0.49279651, 0.40978739, 0.40960822, 0.51034468, 0.46608996, 0.45786235, 0.45344749,
    ],
}  # fmt: skip
EXPECTED_FRAMES_MEAN = {"full": 0.54321080, "lite": 0.54329801}
# latents[0, :, -1, -1, -1]: every channel at the last latent position, before the VAE
EXPECTED_LATENTS_SLICE = {
    "full": [
        1.81291926, -0.64127147, 0.57108939, -0.75222170, -0.51467007, -1.31344604, -0.81498343, -0.84654200,
        1.36603272, -0.82772660, 1.57040679, 0.55350643, 0.13759816, -0.72002500, -1.01420009, 1.99940264,
    ],
    "lite": [
        1.23569894, -1.66436648, 0.82571805, -0.74364650, -1.08330107, -0.50845271, -1.10767603, -3.07214427,
        2.40464258, -0.65318698, 1.59489357, 0.84392875, 0.09344946, -0.58480906, -1.18204486, 2.61025238,
    ],
}  # fmt: skip
EXPECTED_LATENTS_MEAN = {"full": 0.03660173, "lite": 0.06730240}

# step_cache changes the frames. Measured on this request (2 steps, so only the 2nd can reuse blocks): thresholds up
# to 0.1 skip nothing here (deviation 0); lite at 0.2: max 0.0903, mean 0.0080 from the pinned frames.
STEP_CACHE_THRESHOLD = 0.2
STEP_CACHE_BOUND = {"max": 0.095, "mean": 0.0085}


def backend(variant: str, **options) -> LynxBackend:
    spec = ModelSpec(
        backend="lynx", variant=variant, weights={"base": base_dir(), "adapter": adapter_dir(variant)}, options=options
    )
    b = LynxBackend(spec)
    b.setup("cpu")
    return b


def subject() -> LynxSubject:
    embedding, face = inputs(0)
    return LynxSubject(embedding=embedding, aligned_face=face, num_faces=1, kps=np.zeros((5, 2), np.float32))


def frames_of(b: LynxBackend) -> np.ndarray:
    request = GenerationRequest(
        id="pinned", prompt=PROMPT, negative_prompt=NEGATIVE, params=PARAMS[b.variant], seed=SEED
    )
    return b.generate(subject(), request)


def assert_pinned(frames: np.ndarray, variant: str, atol: float = ATOL) -> None:
    assert frames.shape == (5, 32, 64, 3)
    np.testing.assert_allclose(frames[0, -3:, -3:, :].flatten(), EXPECTED_FRAMES_SLICE[variant], atol=atol, rtol=0)
    assert float(frames.mean()) == pytest.approx(EXPECTED_FRAMES_MEAN[variant], abs=atol)


_BASELINE: dict[str, np.ndarray] = {}


def baseline(variant: str) -> np.ndarray:
    """The default backend's frames (computed once per process): options are also compared on every pixel."""
    if variant not in _BASELINE:
        _BASELINE[variant] = frames_of(backend(variant))
    return _BASELINE[variant]


@pytest.fixture
def restore_attention_backend() -> Iterator[None]:
    """diffusers makes a model's attention backend the process's active one: put the one found back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    found = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(found)


# ------------------------------------------------------------------------------------------------ the pinned numbers
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_latents_and_frames_match_the_pinned_values(variant: str) -> None:
    b = backend(variant)
    embedding, face = inputs(0)
    latents = b.pipeline.generate_latents(embedding, face, PROMPT, NEGATIVE, PARAMS[variant], SEED)
    assert tuple(latents.shape) == (1, 16, 2, 4, 8)
    np.testing.assert_allclose(latents[0, :, -1, -1, -1].numpy(), EXPECTED_LATENTS_SLICE[variant], atol=ATOL, rtol=0)
    assert float(latents.mean()) == pytest.approx(EXPECTED_LATENTS_MEAN[variant], abs=ATOL)
    assert_pinned(b.pipeline.decode(latents), variant)
    assert_pinned(baseline(variant), variant)  # the backend's own generate: same request, same numbers


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_cache_hits_keep_the_pinned_values(variant: str) -> None:
    """The second video of the same request reuses prompt embeddings, ID tokens and reference buffers."""
    b = backend(variant)
    first = frames_of(b)
    second = frames_of(b)
    assert b.pipeline.prompt_cache.hits > 0 and b.pipeline.id_cache.hits > 0
    if variant == "full":
        assert b.pipeline.ref_cache.hits > 0
    np.testing.assert_array_equal(second, first)
    assert_pinned(second, variant)


# ------------------------------------------------------------------------------------------------ options, same numbers
SAME_FRAMES = [
    {"batch_guidance": False},
    {"prompt_cache_size": 0, "subject_cache_size": 0, "ref_cache_size": 0},
    {"schedule": "official"},
    {"vae_tiling": True},  # at 32x64 the decode fits one tile: checks that the option keeps the path, not the tiles
    {"cpu_offload": True},  # a no-op off CUDA (the offloaded path itself: test_lynx.py)
    {"step_cache": 0.05},  # below what this request's residuals move: nothing is reused
]


@pytest.mark.parametrize("variant", ["full", "lite"])
@pytest.mark.parametrize("options", SAME_FRAMES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_that_keep_the_frames(variant: str, options: dict) -> None:
    frames = frames_of(backend(variant, **options))
    assert_pinned(frames, variant)
    np.testing.assert_allclose(frames, baseline(variant), atol=1e-5, rtol=0)  # measured: <= 1.2e-6


# Those that run on a CPU; _native_efficient and _native_cudnn are CUDA kernels, flash/sage/xformers need packages.
CPU_ATTENTION_BACKENDS = ["native", "_native_math", "_native_flash", "flex"]


@pytest.mark.parametrize("variant", ["full", "lite"])
@pytest.mark.parametrize("name", CPU_ATTENTION_BACKENDS)
def test_attention_backends_keep_the_frames(variant: str, name: str, restore_attention_backend) -> None:
    frames = frames_of(backend(variant, attention_backend=name))
    assert_pinned(frames, variant)
    np.testing.assert_allclose(frames, baseline(variant), atol=1e-5, rtol=0)  # measured: <= 1.8e-6 (math, flex)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_compiled_blocks_keep_the_frames(variant: str) -> None:
    """``compile: true`` with inductor (~15 s per variant on 2 cores): measured 1.3e-6 from the pinned run."""
    import torch

    torch._dynamo.reset()
    try:
        frames = frames_of(backend(variant, compile=True))
    finally:
        torch._dynamo.reset()
    assert_pinned(frames, variant)
    np.testing.assert_allclose(frames, baseline(variant), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ step_cache
def test_step_cache_deviation_stays_within_its_measured_bound() -> None:
    """lite, threshold 0.2: the 2nd step reuses blocks, so the frames move, by no more than was measured."""
    frames = frames_of(backend("lite", step_cache=STEP_CACHE_THRESHOLD))
    deviation = np.abs(frames - baseline("lite"))
    assert float(deviation.max()) > 1e-3, "the cache reused nothing: the measured bound no longer describes it"
    assert float(deviation.max()) <= STEP_CACHE_BOUND["max"]
    assert float(deviation.mean()) <= STEP_CACHE_BOUND["mean"]


def test_step_cache_on_full_records_every_reference_state() -> None:
    """Each reference record pass runs every block (the cache is reset before it), and each guidance pass is
    compared only with itself (one cache context per pass): full with a step cache records all reference states and
    its frames move from the exact ones no more than lite's do. (Before, the zero-image record pass shared a cache
    context with the other 1-sample passes, skipped blocks 1.. and failed: no reference states recorded.)"""
    b = backend("full", step_cache=STEP_CACHE_THRESHOLD)
    frames = frames_of(b)
    assert np.isfinite(frames).all()
    assert float(np.abs(frames - baseline("full")).max()) <= STEP_CACHE_BOUND["max"] * 2
    again = frames_of(b)  # a second video on the same replica: nothing cached from the first one carries over
    np.testing.assert_allclose(again, frames, atol=1e-6, rtol=0)


def main() -> None:  # pragma: no cover - regenerates the literals above
    np.set_printoptions(precision=8, floatmode="fixed", linewidth=118)
    for variant in ("full", "lite"):
        b = backend(variant)
        embedding, face = inputs(0)
        latents = b.pipeline.generate_latents(embedding, face, PROMPT, NEGATIVE, PARAMS[variant], SEED)
        frames = b.pipeline.decode(latents)
        print(f"{variant} EXPECTED_FRAMES_SLICE {frames[0, -3:, -3:, :].flatten()!r}")
        print(f"{variant} EXPECTED_FRAMES_MEAN {float(frames.mean()):.8f}")
        print(f"{variant} EXPECTED_LATENTS_SLICE {latents[0, :, -1, -1, -1].numpy()!r}")
        print(f"{variant} EXPECTED_LATENTS_MEAN {float(latents.mean()):.8f}")


if __name__ == "__main__":  # pragma: no cover
    main()
