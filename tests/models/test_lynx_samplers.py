"""``options.sampler`` / ``flow_shift`` (``samplers.py``): the step-distilled sampler's noise levels and step, Euler
on the shifted sigmas, and whole videos on the tiny checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from farm.models.lynx.pipeline import LynxPipeline, Options
from farm.models.lynx.samplers import DistillSampler, make_sampler, shift_sigmas
from tests.models.lynx_helpers import FAST, NEGATIVE, PROMPT, inputs, pipeline

DISTILLED = dataclasses.replace(FAST, num_inference_steps=4, guidance_scale=1.0)  # how a 4-step LoRA runs


def test_distill_levels_are_the_distilled_models_timesteps() -> None:
    sampler = DistillSampler(4, shift=5.0, seed=0, device=torch.device("cpu"))
    # 1000, 750, 500, 250 through the shift: 5 s / (1 + 4 s)
    assert sampler.sigmas == pytest.approx([1.0, 0.9375, 5 / 6, 0.625])
    assert sampler.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.333, 625.0], rel=1e-5)
    unshifted = DistillSampler(4, shift=1.0, seed=0, device=torch.device("cpu"))
    assert unshifted.timesteps.tolist() == pytest.approx([1000, 750, 500, 250])


def test_distill_step_predicts_clean_latents_and_noises_them_again() -> None:
    sampler = DistillSampler(2, shift=1.0, seed=7, device=torch.device("cpu"))  # sigmas 1.0, 0.5
    x = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    v = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + 2))
    first = sampler.step(v, sampler.timesteps[0], x)[0]
    torch.testing.assert_close(first, 0.5 * (x - 1.0 * v) + 0.5 * noise)
    last = sampler.step(v, sampler.timesteps[1], first)[0]
    torch.testing.assert_close(last, first - 0.5 * v)  # the last step returns the clean prediction


def test_euler_and_unipc_take_the_shift() -> None:
    config = pipeline("lite").model.scheduler.config
    euler = make_sampler("euler", "official", config, 4, torch.device("cpu"), flow_shift=5.0)
    sigmas = shift_sigmas(np.array([0.999, 0.74925, 0.4995, 0.24975]), 5.0)
    np.testing.assert_allclose(euler.sigmas[:-1].numpy(), sigmas, rtol=1e-4)
    unipc_default = make_sampler("unipc", "official", config, 4, torch.device("cpu"))
    unipc_shifted = make_sampler("unipc", "official", config, 4, torch.device("cpu"), flow_shift=5.0)
    assert unipc_shifted.timesteps[1] > unipc_default.timesteps[1]


@pytest.mark.parametrize("sampler", ["euler", "distill"])
def test_other_samplers_make_their_own_reproducible_videos(sampler: str) -> None:
    base = pipeline("full")
    pipe = LynxPipeline(base.model, Options(sampler=sampler, flow_shift=5.0))
    emb, face = inputs(0)
    frames = pipe.generate(emb, face, PROMPT, NEGATIVE, DISTILLED, 3)
    assert np.isfinite(frames).all() and frames.shape == (5, 32, 48, 3)
    np.testing.assert_array_equal(frames, pipe.generate(emb, face, PROMPT, NEGATIVE, DISTILLED, 3))
    official = base.generate(emb, face, PROMPT, NEGATIVE, DISTILLED, 3)
    assert np.abs(frames - official).max() > 1e-3


@pytest.mark.parametrize(
    ("options", "fragment"),
    [({"sampler": "dpm"}, "sampler='dpm'"), ({"flow_shift": 0}, "flow_shift=0"), ({"flow_shift": "x"}, "flow_shift")],
)
def test_bad_sampler_options_are_refused_when_the_job_is_read(options, fragment) -> None:
    from farm.models.lynx.backend import LynxBackend
    from farm.types import ModelSpec

    with pytest.raises(ValueError, match=fragment):
        LynxBackend(ModelSpec(backend="lynx", variant="full", weights={"base": "b", "adapter": "a"}, options=options))
