"""The plain data every layer shares: what a model is (``ModelSpec``), what one replica of it needs
(``ReplicaResources``) and one resolved row (``GenerationRequest``).

A bottom module: it imports nothing of the farm but ``params``, so ``config``, ``manifest``, ``runtime`` and the
backends can all use these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from farm.params import SamplingParams


@dataclass(frozen=True)
class ReplicaResources:
    """What one replica of a backend needs; the runtime turns this into actor options."""

    gpus: float = 1.0
    cpus: float = 1.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of ``model.weights.lora``: a ``.safetensors`` file, its strength, merged into the weights or not."""

    path: str  # local path or fsspec URI
    scale: float = 1.0  # 0 = the base model
    fuse: bool = True  # merge once (no cost per step) or keep a low-rank side path (base weights untouched)


@dataclass(frozen=True)
class ModelSpec:
    """The model section of a job spec, as plain data (``farm.config`` builds it)."""

    backend: str
    variant: str | None = None
    weights: dict[str, str] = field(default_factory=dict)  # role -> path or fsspec URI
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 ; auto = bf16 on GPU, fp32 on CPU
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific knobs
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for remote weight URIs
    loras: tuple[LoraSpec, ...] = ()  # model.weights.lora, applied in order after the weights load


@dataclass(frozen=True)
class GenerationRequest:
    """One row, resolved: every value here is the one actually used (it goes into the result record)."""

    id: str
    prompt: str
    negative_prompt: str
    params: SamplingParams
    seed: int
