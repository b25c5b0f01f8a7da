"""Portrait bytes -> RGB uint8, within limits: pixel count checked from the header before decoding, high bit
depths scaled (not clipped) to 8 bits, images larger than needed reduced while or right after decoding."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class ImageLimits:
    """What a portrait may cost (``runtime.max_portrait_pixels`` / ``max_portrait_bytes``).

    ``max_side``: a decoded image whose longer side exceeds it is reduced by an integer factor (JPEG: by the decoder
    itself, via ``draft``; other formats right after decoding, before any copy), so later stages never hold more.
    """

    max_pixels: int = 40_000_000
    max_bytes: int = 50_000_000
    max_side: int = 4096


DEFAULT_LIMITS = ImageLimits()


class ImageRefused(ValueError):
    """The bytes may be a fine image, but one over a configured limit; the message names the limit."""


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Image bytes -> RGB uint8 ``(H, W, 3)`` (EXIF orientation applied, first frame of animations)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if width * height > limits.max_pixels:
            raise ImageRefused(
                f"{width}x{height} is {width * height / 1e6:.1f} Mpx, over the limit of {limits.max_pixels / 1e6:g} "
                "Mpx (runtime.max_portrait_pixels); downscale the image or raise the limit"
            )
        full_scale = 65535.0 if img.mode in GRAY16_MODES else None  # reduce() turns I;16 into I: remember the depth
        factor = _factor(img.size, limits.max_side)
        if factor > 1 and img.format == "JPEG":
            img.draft(img.mode, (math.ceil(width / factor), math.ceil(height / factor)))  # DCT scaling: 1/2..1/8
        img.load()
        reduced = _reduce(img, _factor(img.size, limits.max_side))
        return to_rgb8(ImageOps.exif_transpose(reduced), full_scale)


def _factor(size: tuple[int, int], max_side: int) -> int:
    return max(1, math.ceil(max(size) / max_side)) if max_side > 0 else 1


def _reduce(img: object, factor: int) -> object:
    from PIL import Image

    assert isinstance(img, Image.Image)
    if factor <= 1:
        return img
    if img.mode in GRAY16_MODES:  # Pillow reduces I and F but not I;16
        img = img.convert("I")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img.reduce(factor)


def to_rgb8(img: object, full_scale: float | None = None) -> np.ndarray:
    """A decoded PIL image -> RGB uint8. 16-bit, 32-bit integer and float images are scaled to 0..255 (from
    ``full_scale``, or the range their values imply), not clipped; 8-bit modes go through ``convert``."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    if img.mode in (*GRAY16_MODES, "I", "F"):
        arr = np.asarray(img)
        gray = scale_to_uint8(arr, 65535.0 if img.mode in GRAY16_MODES else full_scale)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def scale_to_uint8(arr: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """Map a high-bit-depth or float array onto uint8: ``full_scale`` -> 255 when known; otherwise by the range the
    values say they use: floats within [0, 1] are unit intensities, values within [0, 255] are 8-bit, within
    [0, 65535] 16-bit, anything else (negative, larger) is stretched min..max. NaN and infinities become 0."""
    values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if full_scale is None:
        if low < 0 or high > 65535:
            full_scale = None
        elif high <= 1.0 and arr.dtype.kind == "f":
            full_scale = 1.0
        else:
            full_scale = 255.0 if high <= 255 else 65535.0
    if full_scale is None:
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    else:
        values *= 255.0 / full_scale
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
