"""Lynx end to end on the tiny checkpoint, through the same loader as real weights (CPU, fp32 unless stated)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from farm.models.lynx.pipeline import LynxPipeline, Options
from farm.models.lynx.samplers import official_flow_sigmas
from farm.params import SamplingParams
from tests.models.lynx_helpers import FAST, FAST_2PASS, NEGATIVE, PROMPT, SMALL, inputs, pipeline


def run(variant: str, params: SamplingParams = FAST, seed: int = 42, emb_seed: int = 0, **kw) -> np.ndarray:
    emb, face = inputs(emb_seed)
    return pipeline(variant).generate(emb, face, PROMPT, NEGATIVE, params, seed, **kw)


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_end_to_end_non_square(variant: str) -> None:
    frames = run(variant, SMALL)
    assert frames.shape == (9, 64, 96, 3)  # (F, H, W, 3): a height/width swap would give 96x64
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0
    assert frames.std() > 0.01  # not a constant image
    assert np.abs(frames[0] - frames[-1]).max() > 0  # frames differ over time


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_seed_determinism(variant: str) -> None:
    a = run(variant, seed=7)
    b = run(variant, seed=7)
    c = run(variant, seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_batched_guidance_equals_unbatched(variant: str) -> None:
    for params in (FAST, FAST_2PASS):
        batched = run(variant, params, batch_guidance=True)
        single = run(variant, params, batch_guidance=False)
        np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_forward_counts_three_vs_two_pass() -> None:
    pipe = pipeline("full")
    steps = FAST.num_inference_steps
    emb, face = inputs(123)  # a fresh portrait: the two reference passes are not cached yet
    pipe.reset_counters()
    three = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 1, batch_guidance=False)
    assert pipe.dit_forwards == 2 + 3 * steps  # 2 reference passes + cond/uncond/ID-only per step
    pipe.reset_counters()
    two = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST_2PASS, 1, batch_guidance=False)
    assert pipe.dit_forwards == 2 * steps  # references reused (same face and seed)
    pipe.reset_counters()
    pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 1, batch_guidance=True)
    assert (pipe.dit_forwards, pipe.dit_samples) == (steps, 3 * steps)
    assert np.abs(three - two).max() > 1e-3  # guidance_scale_i changes the result


def test_guidance_formula_reduces_to_two_pass() -> None:
    # With guidance_scale_i == guidance_scale the ID-only pass cancels: u + g(i - u) + g(c - i) = u + g(c - u).
    same = dataclasses.replace(FAST, guidance_scale_i=FAST.guidance_scale)
    np.testing.assert_allclose(run("full", same), run("full", FAST_2PASS), atol=1e-4, rtol=0)


def test_identity_and_reference_condition_the_video() -> None:
    base = run("full")
    assert np.abs(base - run("full", emb_seed=5)).max() > 1e-3  # another face -> another video
    no_ref = run("full", dataclasses.replace(FAST, ref_scale=0.0))
    assert np.abs(base - no_ref).max() > 1e-3


def test_lite_ip_scale_zero_disables_the_id_adapter() -> None:
    # Ours honours ip_scale=0 (the official lite code silently turns 0 into 1.0): the face then has no effect.
    off = dataclasses.replace(FAST_2PASS, ip_scale=0.0)
    np.testing.assert_array_equal(run("lite", off, emb_seed=0), run("lite", off, emb_seed=9))
    assert np.abs(run("lite", FAST_2PASS, emb_seed=0) - run("lite", FAST_2PASS, emb_seed=9)).max() > 1e-3


def test_official_schedule_is_default_and_differs_from_diffusers() -> None:
    pipe = pipeline("lite")
    assert [int(t) for t in pipe._scheduler(4, 0).timesteps] == [999, 899, 749, 499]  # diffusers 0.33.1's
    other = LynxPipeline(pipe.model, Options(schedule="diffusers"))
    assert [int(t) for t in other._scheduler(4, 0).timesteps] == [999, 900, 750, 500]
    assert official_flow_sigmas(4)[0] == pytest.approx(0.999)
    emb, face = inputs(0)
    alt = other.generate(emb, face, PROMPT, NEGATIVE, FAST_2PASS, 42)
    assert np.abs(alt - run("lite", FAST_2PASS)).max() > 1e-4
    with pytest.raises(ValueError, match="schedule"):
        LynxPipeline(pipe.model, Options(schedule="karras"))


def test_prompt_and_reference_reuse_is_lossless() -> None:
    pipe = pipeline("full")
    emb, face = inputs(77)
    pipe.clear_caches()
    first = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 3)
    hits = pipe.ref_cache.hits
    again = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 3)
    assert pipe.ref_cache.hits == hits + 2 and pipe.prompt_cache.hits > 0
    pipe.clear_caches()
    cold = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 3)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, cold)


def test_bf16_runs_and_stays_close_to_fp32() -> None:
    from farm.models.lynx.loader import load_lynx
    from tests.models.lynx_helpers import adapter_dir, base_dir

    model = load_lynx(base_dir(), adapter_dir("full"), "full", dtype=torch.bfloat16)
    assert model.transformer.blocks[0].attn1.processor.to_k_ref.weight.dtype == torch.bfloat16
    emb, face = inputs(0)
    params = dataclasses.replace(FAST, num_inference_steps=2)
    frames = LynxPipeline(model).generate(emb, face, PROMPT, NEGATIVE, params, 42)
    assert frames.dtype == np.float32 and np.isfinite(frames).all()
    assert np.abs(frames - run("full", params)).mean() < 0.1


def test_bad_inputs_name_the_value() -> None:
    pipe = pipeline("full")
    emb, face = inputs(0)
    with pytest.raises(ValueError, match="512"):
        pipe.generate(emb[:100], face, PROMPT, NEGATIVE, FAST, 1)
    with pytest.raises(ValueError, match="aligned_face"):
        pipe.generate(emb, None, PROMPT, NEGATIVE, FAST, 1)
    with pytest.raises(ValueError, match="uint8"):
        pipe.generate(emb, face.astype(np.float32), PROMPT, NEGATIVE, FAST, 1)
    with pytest.raises(ValueError, match="num_frames"):
        pipe.generate(emb, face, PROMPT, NEGATIVE, dataclasses.replace(FAST, num_frames=10), 1)


def test_cpu_offload_keeps_the_numbers() -> None:
    from farm.models.lynx.loader import apply_cpu_offload, load_lynx
    from tests.models.lynx_helpers import adapter_dir, base_dir

    model = apply_cpu_offload(load_lynx(base_dir(), adapter_dir("full"), "full"), "cpu")
    emb, face = inputs(0)
    frames = LynxPipeline(model).generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    np.testing.assert_allclose(frames, run("full"), atol=1e-5, rtol=0)


def test_step_cache_is_opt_in_and_runs() -> None:
    from farm.models.lynx.loader import load_lynx
    from tests.models.lynx_helpers import adapter_dir, base_dir

    model = load_lynx(base_dir(), adapter_dir("lite"), "lite")
    cached = LynxPipeline(model, Options(step_cache=10.0))  # a huge threshold: blocks after the first are reused
    emb, face = inputs(0)
    params = dataclasses.replace(FAST_2PASS, num_inference_steps=4)
    frames = cached.generate(emb, face, PROMPT, NEGATIVE, params, 42)
    assert frames.shape == (5, 32, 48, 3) and np.isfinite(frames).all()
    assert np.abs(frames - run("lite", params)).max() > 1e-4  # documented: the step cache changes the frames


def test_batched_guidance_falls_back_when_the_batch_does_not_fit() -> None:
    pipe = LynxPipeline(pipeline("full").model)
    real_forward = pipe._forward

    def forward(latents, timestep, text, samples, context, transformer):
        if samples > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(latents, timestep, text, samples, context, transformer)

    pipe._forward = forward
    emb, face = inputs(0)
    frames = pipe.generate(emb, face, PROMPT, NEGATIVE, FAST, 42)
    assert pipe._batch_fits is False
    np.testing.assert_allclose(frames, run("full", batch_guidance=False), atol=1e-6, rtol=0)
