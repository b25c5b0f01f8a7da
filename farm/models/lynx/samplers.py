"""How the denoising loop walks from noise to a video (``options.sampler``), and at which noise levels.

* ``unipc`` (default, the official Lynx inference): Wan's flow-matching UniPC multistep solver. ``schedule``:
  ``official`` = the unshifted sigmas diffusers 0.33.1 used (``1 - 1/N`` spacing; the official frames),
  ``diffusers`` = the installed diffusers' own spacing.
* ``euler``: first-order flow-matching Euler (diffusers' ``FlowMatchEulerDiscreteScheduler``) on the same sigmas:
  what most step-distilled LoRA workflows run.
* ``distill``: the sampler step-distilled (DMD-style) Wan2.1 models were trained for, e.g. the 4-step CFG-distilled
  LoRAs: timesteps ``1000 (1 - k/N)`` for ``k < N`` (4 steps: 1000, 750, 500, 250) mapped through the shift; at each
  step the model's flow prediction gives the clean latents ``x0 = x - sigma v``, which are noised again to the next
  level with fresh noise (``(1 - sigma') x0 + sigma' eps``; the last step returns ``x0``). The fresh noise comes
  from a CPU generator seeded ``seed + 2`` (the video's own seed; ``seed + 1`` is the reference image's), so a seed
  gives the same video.

``flow_shift`` (default: the base's scheduler config, 3.0 for Wan2.1-T2V; the distilled LoRAs were trained with 5.0)
shifts every sampler's sigmas toward the noisy end: ``shift s / (1 + (shift - 1) s)``. Every sampler but ``unipc``
with the official schedule changes the frames from the official code's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SAMPLERS = ("unipc", "euler", "distill")
SCHEDULES = ("official", "diffusers")
NUM_TRAIN_TIMESTEPS = 1000


def official_flow_sigmas(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The unshifted flow sigmas diffusers 0.33.1 uses (1 - 1/N down to 1/n steps); the scheduler shifts them."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)
    return np.flip(1.0 - alphas)[:-1].copy()


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def check_sampler(sampler: str, schedule: str, flow_shift: float | None) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of {SAMPLERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; choose one of {SCHEDULES}")
    if flow_shift is not None and not (isinstance(flow_shift, int | float) and 0 < float(flow_shift) <= 100):
        raise ValueError(f"flow_shift={flow_shift!r} must be a number above 0 (Wan2.1: 3.0; distilled LoRAs: 5.0)")


class DistillSampler:
    """The step-distilled sampler (module doc): predict the clean latents, noise them again to the next level."""

    def __init__(self, steps: int, shift: float, seed: int, device: torch.device) -> None:
        fractions = 1.0 - np.arange(steps) / steps  # 1000, 750, 500, 250 for 4 steps, as fractions of 1000
        self.sigmas = [float(s) for s in shift_sigmas(fractions, shift)]
        self.timesteps = torch.tensor(self.sigmas, dtype=torch.float32, device=device) * NUM_TRAIN_TIMESTEPS
        self.generator = torch.Generator().manual_seed(seed + 2) if seed >= 0 else None
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = False):
        sigma = self.sigmas[self._index]
        clean = sample.float() - sigma * model_output.float()
        self._index += 1
        if self._index < len(self.sigmas):
            nxt = self.sigmas[self._index]
            noise = torch.randn(clean.shape, generator=self.generator, dtype=torch.float32).to(clean.device)
            clean = (1 - nxt) * clean + nxt * noise
        return (clean.to(sample.dtype),)


def make_sampler(
    sampler: str,
    schedule: str,
    scheduler_config: Any,
    steps: int,
    device: torch.device,
    flow_shift: float | None = None,
    seed: int = 0,
):
    """A fresh sampler for one video: ``.timesteps`` and ``.step(noise, t, latents, return_dict=False)``."""
    check_sampler(sampler, schedule, flow_shift)
    shift = float(flow_shift) if flow_shift is not None else float(scheduler_config.get("flow_shift", 3.0))
    if sampler == "distill":
        return DistillSampler(steps, shift, seed, device)
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    else:
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler.from_config(scheduler_config, flow_shift=shift)
    if schedule == "official":
        sigmas = official_flow_sigmas(steps, scheduler.config.num_train_timesteps)
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)
    return scheduler
