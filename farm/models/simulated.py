"""``simulated``: a benchmark-only backend that sleeps a fixed "GPU time" per row. It is not a model.

It exists so the farm's scheduling overhead can be measured against an ideal (rows x gpu_time / replicas) and against
other schedulers on the same stand-in workload. Options: ``gpu_time_s`` (sleep in ``generate``), ``prep_time_s``
(sleep in ``prepare_subject``, i.e. CPU pre-work), ``post_time_s`` (sleep in ``postprocess``, CPU post-work beside the
model) and ``load_time_s`` (sleep in ``setup``); frames are a small constant grey clip so encoding stays cheap.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from farm.models.base import Backend
from farm.params import SamplingParams
from farm.types import GenerationRequest, ReplicaResources


class SimulatedBackend(Backend):
    name = "simulated"
    SPEED_OPTIONS = frozenset({"gpu_time_s", "prep_time_s", "post_time_s", "load_time_s", "cpus"})
    OPTIONS = SPEED_OPTIONS

    def resources(self, gpus_per_replica: float = 1.0) -> ReplicaResources:
        return ReplicaResources(gpus=gpus_per_replica, cpus=float(self.spec.options.get("cpus", 0.01)))

    def default_params(self) -> SamplingParams:
        return SamplingParams(num_frames=5, height=32, width=32, num_inference_steps=1, fps=8)

    def check_weights(self, deep: bool = False) -> list[str]:
        """No weights; the sleep options must be numbers >= 0."""
        problems = []
        for name in sorted(self.SPEED_OPTIONS):
            value = self.spec.options.get(name, 0.0)
            try:
                ok = float(value) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"simulated backend: option {name}={value!r} must be a number >= 0")
        return problems

    def setup(self, device: str) -> None:
        time.sleep(float(self.spec.options.get("load_time_s", 0.0)))
        self.device = device

    def fingerprint(self) -> str:
        return f"simulated-gpu{self.spec.options.get('gpu_time_s', 0.0)}"

    def prepare_subject(self, image: np.ndarray) -> Any:
        time.sleep(float(self.spec.options.get("prep_time_s", 0.0)))
        return None

    def generate(self, subject: Any, request: GenerationRequest) -> np.ndarray:
        time.sleep(float(self.spec.options.get("gpu_time_s", 0.0)))
        p = request.params
        return np.full((p.num_frames, p.height, p.width, 3), 0.5, dtype=np.float32)

    def postprocess(self, frames: np.ndarray, request: GenerationRequest) -> np.ndarray:
        time.sleep(float(self.spec.options.get("post_time_s", 0.0)))
        return frames
