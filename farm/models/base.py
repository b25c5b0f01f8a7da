"""The backend contract every video model implements (Lynx full/lite, the ``still`` baseline, ``simulated``).

A backend is constructed from its ``ModelSpec`` anywhere (cheap, no weights), declares the resources one replica
needs, loads once per replica in ``setup``, turns a portrait into a reusable ``subject`` on the CPU in
``prepare_subject`` (this is where ``no_face`` is raised), and turns a subject plus a request into frames in
``generate``. The runtime maps resources onto Ray; backends never import Ray.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from farm.config import did_you_mean
from farm.fingerprints import model_config
from farm.params import SamplingParams
from farm.types import GenerationRequest, ModelSpec, ReplicaResources


class Backend(ABC):
    """Base class of every video backend."""

    name: ClassVar[str]
    # ``model.options`` that change speed or memory but never a video: left out of ``output_config``, so turning
    # them on does not make a rerun redo committed rows.
    SPEED_OPTIONS: ClassVar[frozenset[str]] = frozenset()
    TAKES_LORAS: ClassVar[bool] = False  # whether ``model.weights.lora`` means anything to this backend
    OPTIONS: ClassVar[frozenset[str]] = frozenset()  # every ``model.options`` key the backend reads

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        if spec.loras and not self.TAKES_LORAS:
            raise ValueError(f"backend {self.name!r} takes no LoRAs; drop model.weights.lora (LoRAs are for lynx)")
        for key in sorted(set(spec.options) - self.OPTIONS):
            raise ValueError(
                f"model.options.{key}: the {self.name} backend has no such option{did_you_mean(key, self.OPTIONS)}; "
                f"its options: {', '.join(sorted(self.OPTIONS)) or 'none'}"
            )

    # --- declared without loading anything ---------------------------------------------------------------
    def resources(self, gpus_per_replica: float = 1.0) -> ReplicaResources:
        """Resources of one replica. The job spec's ``gpus_per_replica`` is passed in; CPU-only backends ignore it."""
        return ReplicaResources(gpus=gpus_per_replica, cpus=1.0)

    @abstractmethod
    def default_params(self) -> SamplingParams:
        """The backend's own defaults (e.g. Lynx full: 81 frames at 16 fps; lite: 121 at 24)."""

    def default_negative_prompt(self) -> str:
        return ""

    def describe(self) -> str:
        """Human name written into mp4 metadata and ``_job.json``, e.g. ``"Lynx full (Wan2.1-T2V-14B)"``."""
        return self.name if self.spec.variant is None else f"{self.name} {self.spec.variant}"

    def check_weights(self, deep: bool = False) -> list[str]:
        """Problems with ``spec.weights`` (and options naming files), one line each naming the role, the URI, what is
        wrong and the fix; empty = loadable. Cheap: nothing is loaded and torch is not imported; ``deep`` also reads
        file headers (range reads on remote storage). Run by ``farm validate`` and before ``farm run`` starts replicas,
        so a typo costs no GPU time. Default: nothing to check."""
        return []

    def approximations(self) -> list[str]:
        """The opt-in settings that make this backend's videos differ from its reference inference (a LoRA, another
        sampler, quantization ...), one short phrase each; the pre-flight shows them. Default: none."""
        return []

    def output_config(self) -> str:
        """The settings that shape this backend's videos, as canonical JSON (``farm.fingerprints.model_config``)."""
        options = {k: v for k, v in self.spec.options.items() if k not in self.SPEED_OPTIONS | {"storage_options"}}
        weights: dict[str, Any] = dict(self.spec.weights)
        if self.spec.loras:  # ``fuse`` is left out: merged or beside, the same update (bf16 rounding aside)
            weights["lora"] = [{"path": lora.path, "scale": lora.scale} for lora in self.spec.loras]
        return model_config(self.name, self.spec.variant, self.spec.dtype, weights, options)

    # --- per replica -------------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, device: str) -> None:
        """Load weights once per replica onto ``device`` (``"cpu"`` or ``"cuda"``/``"cuda:N"``)."""

    def fingerprint(self) -> str:
        """A short, stable digest of the loaded weights/config; recorded in ``_job.json``. Valid after setup."""
        return ""

    @abstractmethod
    def prepare_subject(self, image: np.ndarray) -> Any:
        """CPU-side, per portrait: RGB uint8 ``(H, W, 3)`` -> whatever ``generate`` needs (cached per portrait).

        Raises ``farm.records.RowError`` for deterministic portrait problems (``no_face`` ...).
        """

    @abstractmethod
    def generate(self, subject: Any, request: GenerationRequest) -> np.ndarray:
        """Return float32 frames ``(F, H, W, 3)`` in ``[0, 1]``."""

    def postprocess(self, frames: np.ndarray, request: GenerationRequest) -> np.ndarray:
        """CPU-side work on finished frames, run outside the model lock so it overlaps the next row's generation
        (e.g. a safety classifier raising ``RowError(SAFETY_BLOCKED)``). Default: nothing."""
        return frames

    def teardown(self) -> None:  # noqa: B027 - optional hook
        """Release the replica's memory (called when an actor is retired)."""
