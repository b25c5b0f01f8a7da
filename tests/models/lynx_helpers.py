"""Shared pieces of the Lynx tests: one tiny checkpoint and one loaded pipeline per variant, per test process."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, LynxPipeline, Options
from farm.models.lynx.random_model import WAN_T2V_14B
from farm.params import SamplingParams

PROMPT = "A woman smiles at her laptop in a bright modern office, handheld camera."
NEGATIVE = OFFICIAL_NEGATIVE_PROMPT
# Non-square on purpose: a height/width mix-up changes the shape.
SMALL = SamplingParams(num_frames=9, height=64, width=96, num_inference_steps=4, guidance_scale_i=2.0)
SMALL_2PASS = SamplingParams(num_frames=9, height=64, width=96, num_inference_steps=4, guidance_scale_i=None)
# What most tests use: still non-square, still 2 latent frames, 2 steps (UniPC's multistep path runs).
FAST = SamplingParams(num_frames=5, height=32, width=48, num_inference_steps=2, guidance_scale_i=2.0)
FAST_2PASS = dataclasses.replace(FAST, guidance_scale_i=None)

# The Wan2.1-T2V-14B transformer config (the official Lynx adapters' sizes are checked against it on meta).
WAN14B = WAN_T2V_14B


@lru_cache(maxsize=1)
def tiny_checkpoint() -> Path:
    """The tiny checkpoint (seed 0), written once per test process."""
    from farm.models.lynx.tiny import make_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="lynx-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_checkpoint(root / "ckpt", seed=0)


def base_dir() -> str:
    from farm.models.lynx.tiny import BASE_DIRNAME

    return str(tiny_checkpoint() / BASE_DIRNAME)


def adapter_dir(variant: str) -> str:
    return str(tiny_checkpoint() / f"lynx_{variant}")


@lru_cache(maxsize=4)
def pipeline(variant: str, batch_guidance: bool = True) -> LynxPipeline:
    from farm.models.lynx.loader import load_lynx

    return LynxPipeline(load_lynx(base_dir(), adapter_dir(variant), variant), Options(batch_guidance=batch_guidance))


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 512-d embedding (ArcFace-like scale) and a 256x256 aligned face."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(512) * 20).astype(np.float32), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


def always_block(frames: np.ndarray) -> bool:
    """A stand-in safety classifier for the hook test: blocks everything."""
    return True


def block_if_brighter_than(threshold: str):
    """A stand-in classifier factory (the ``safety_model`` is its argument)."""
    limit = float(threshold)
    return lambda frames: float(np.mean(frames)) > limit
