"""Public, single-call entry points (the README's fidelity interface). Models are cached per (base, adapter,
variant, dtype, device) in this process, so repeated calls do not reload weights.

    frames = generate_from_embedding(base, adapter, "full", embedding_512, aligned_face_256, prompt, negative,
                                     SamplingParams(...), seed)          # float32 (F, H, W, 3) in [0, 1]
    frames = generate_from_portrait(base, adapter, "full", portrait_rgb, face_pack, prompt, ..., arcface=irse50_pth)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from farm.models.lynx.face import LynxSubject, prepare_subject
from farm.models.lynx.loader import load_lynx
from farm.models.lynx.pipeline import OFFICIAL_NEGATIVE_PROMPT, LynxPipeline, Options
from farm.params import SamplingParams

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` = bf16 on GPU, fp32 on CPU (the official scripts default to bf16 on GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@lru_cache(maxsize=2)
def _pipeline(base: str, adapter: str, variant: str, dtype: torch.dtype, device: str, options: Options):
    return LynxPipeline(load_lynx(base, adapter, variant, dtype=dtype, device=device), options)


def get_pipeline(
    base: str,
    adapter: str,
    variant: str = "full",
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    options: Options | None = None,
) -> LynxPipeline:
    """A loaded pipeline (kept for the next call with the same arguments)."""
    return _pipeline(base, adapter, variant, resolve_dtype(dtype, device), device, options or Options())


def generate_from_embedding(
    base: str,
    adapter: str,
    variant: str,
    face_embedding: np.ndarray,
    aligned_face: np.ndarray | None,
    prompt: str,
    negative_prompt: str | None = None,
    params: SamplingParams | None = None,
    seed: int = 42,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    options: Options | None = None,
) -> np.ndarray:
    """One video from a precomputed 512-d face embedding (the official one is unit-norm: ``IRSE50Embedder``) and a
    256x256 aligned face (RGB uint8; full only).

    ``negative_prompt=None`` uses the official one; ``params=None`` uses the variant's official defaults.
    Returns float32 frames ``(F, H, W, 3)`` in [0, 1].
    """
    pipe = get_pipeline(base, adapter, variant, dtype, device, options)
    params = params or default_params(variant)
    negative = OFFICIAL_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    return pipe.generate(face_embedding, aligned_face, prompt, negative, params, seed)


def generate_from_portrait(
    base: str,
    adapter: str,
    variant: str,
    portrait: np.ndarray,
    face_pack: str | None,
    prompt: str,
    negative_prompt: str | None = None,
    params: SamplingParams | None = None,
    seed: int = 42,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    face_detector: str = "insightface",
    storage_options: dict[str, Any] | None = None,
    arcface: str | None = None,
) -> np.ndarray:
    """One video from a portrait (RGB uint8): largest face, 5 keypoints, a unit 512-d identity vector.

    ``arcface`` (facexlib's ``recognition_arcface_ir_se50.pth``, path or URI) is the official embedder; without it
    the insightface ``face_pack``'s ArcFace embeds, L2-normalised, with a warning. ``face_pack`` provides the
    detector (``face_detector="insightface"``) and may be None with ``arcface`` and ``face_detector="dlib"``.
    Raises ``farm.records.RowError(NO_FACE)`` when no face is found (before any DiT work).
    """
    subject: LynxSubject = prepare_subject(portrait, face_pack, face_detector, storage_options, arcface)
    return generate_from_embedding(
        base,
        adapter,
        variant,
        subject.embedding,
        subject.aligned_face,
        prompt,
        negative_prompt,
        params,
        seed,
        dtype,
        device,
    )


def default_params(variant: str) -> SamplingParams:
    """The official scripts' defaults: full 81 frames at 16 fps with 3-pass guidance; lite 121 at 24, 2-pass."""
    if variant == "lite":
        return SamplingParams(num_frames=121, fps=24, guidance_scale_i=None)
    return SamplingParams()
