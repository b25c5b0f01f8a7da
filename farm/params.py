"""Sampling parameters: one dataclass, one place for their ranges.

Resolution order for every row: backend defaults < job ``defaults`` < the row's own columns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from decimal import Decimal
from typing import Any

# The parameters a manifest row may override (besides ``seed`` and ``negative_prompt``).
SAMPLING_FIELDS: tuple[str, ...] = (
    "num_frames",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_i",
    "ip_scale",
    "ref_scale",
)

INT_FIELDS = frozenset({"num_frames", "height", "width", "num_inference_steps", "fps"})
NULLABLE_FIELDS = frozenset({"guidance_scale_i"})

# Inclusive ranges; (lo, hi). Extra structural rules live in ``check``.
RANGES: dict[str, tuple[float, float]] = {
    "num_frames": (1, 1025),
    "height": (16, 2048),
    "width": (16, 2048),
    "num_inference_steps": (1, 1000),
    "guidance_scale": (0.0, 50.0),
    "guidance_scale_i": (0.0, 50.0),
    "ip_scale": (0.0, 10.0),
    "ref_scale": (0.0, 10.0),
    "fps": (1, 120),
}

SEED_RANGE = (0, 2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    """Everything the denoising loop needs besides prompts, conditioning and seed."""

    num_frames: int = 81
    height: int = 480
    width: int = 832
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_i: float | None = 2.0  # None -> two-pass guidance (no ID-only pass)
    ip_scale: float = 1.0
    ref_scale: float = 1.0
    fps: int = 16

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingParams:
        """Return a copy with the non-missing values of ``overrides`` applied (values are coerced, then checked)."""
        known = {f.name for f in fields(self)}
        clean: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in known or is_missing(value):
                continue
            clean[name] = coerce(name, value)
        out = replace(self, **clean)
        out.check()
        return out

    def check(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range field and its value."""
        for f in fields(self):
            check_field(f.name, getattr(self, f.name))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def guidance_passes(self) -> int:
        """Transformer passes per denoising step: 1 without guidance (``guidance_scale <= 1``, e.g. a CFG-distilled
        LoRA), 2 with it, 3 with the ID-only pass (``guidance_scale_i``)."""
        if self.guidance_scale <= 1.0:
            return 1
        return 3 if self.guidance_scale_i is not None else 2


def check_field(name: str, value: Any) -> None:
    """Range and structural rules of one (already coerced) field; ``ValueError`` names the field and value."""
    if value is None and name in NULLABLE_FIELDS:
        return
    lo, hi = RANGES[name]
    if not (lo <= value <= hi):
        raise ValueError(f"{name}={value!r} is out of range [{lo}, {hi}]")
    if name == "num_frames" and (value - 1) % 4 != 0:
        raise ValueError(f"num_frames={value} must be 4k+1 (the Wan VAE compresses time by 4)")
    if name in ("height", "width") and value % 16 != 0:
        raise ValueError(f"{name}={value} must be a multiple of 16")


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def coerce(name: str, value: Any) -> Any:
    """Coerce a manifest/job value to the field's type; ``ValueError`` names the field and the value."""
    if name == "guidance_scale_i" and is_missing(value):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a number, not a boolean")
    try:
        if name in INT_FIELDS:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {'integer' if name in INT_FIELDS else 'number'}") from None
    if math.isnan(out) or math.isinf(out):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return out


def check_seed(value: Any) -> int:
    """Validate a seed column value; ``ValueError`` names it."""
    if isinstance(value, bool):
        raise ValueError(f"seed={value!r} must be an integer")
    try:
        if isinstance(value, str):
            value = value.strip()
            # exact for digit strings: float() would round seeds above 2**53 to a different seed
            seed = int(value) if value.lstrip("+-").isdigit() else _integral(float(value))
        elif isinstance(value, (int, Decimal)):
            seed = _integral(value)
        else:
            seed = _integral(float(value))
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        raise ValueError(f"seed={value!r} is not an integer") from None
    if not (SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise ValueError(f"seed={seed} is out of range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    return seed


def _integral(value: float | int | Decimal) -> int:
    """``value`` as an int if it is a whole number (``7.0``, ``Decimal('7.00')``); ``ValueError`` otherwise."""
    if isinstance(value, int):
        return value
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if isinstance(value, Decimal) and value != value.to_integral_value():
        raise ValueError(value)
    return int(value)
