"""Guidance passes across a replica's GPUs: with ``resources.gpus_per_replica: 2`` or ``3`` the 2-3 guidance passes
of each denoising step run at the same time, each on its own GPU, instead of one after another (or stacked) on one.

The replica holds one copy of the transformer (with its ID/Ref adapters and whatever LoRA or quantization changed in
it) per GPU; each copy has its own ``AdapterState``, so no pass sees another's conditioning. Conditioning (prompt
embeddings, ID tokens, reference buffers) moves to each GPU once per video; latents move every step (a few MB) and
the noise predictions come back to the first GPU, where guidance is combined and the scheduler steps. Frames equal
one GPU's within float rounding (the same kernels on the same inputs; a stacked batch splits differently).

Trade-off: it lowers the time per video (about 1/passes of the transformer time, full: 3 passes on 3 GPUs) for users
who need one video fast; for throughput, one replica per GPU does as well or better (no transfers, no idle GPU
while the first one combines guidance) — the farm's default.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

MAX_GUIDANCE_PASSES = 3  # full's three-pass guidance; lite uses two


@dataclass
class PassModel:
    """One transformer copy a guidance pass runs on: its module, its adapter state and its device."""

    transformer: Any
    state: Any  # farm.models.lynx.adapters.AdapterState
    device: torch.device


def copy_to(primary: PassModel, device: str | torch.device) -> PassModel:
    """A copy of ``primary``'s transformer whose every parameter and buffer is created directly on ``device`` (GPU
    to GPU: the first GPU never holds two copies); the copy's processors share one new ``AdapterState``."""
    device = torch.device(device)
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for param in primary.transformer.parameters():
            memo[id(param)] = torch.nn.Parameter(param.detach().to(device), requires_grad=False)
        for buffer in primary.transformer.buffers():
            memo[id(buffer)] = buffer.to(device)
    transformer = copy.deepcopy(primary.transformer, memo)
    state = copy.deepcopy(primary.state, memo)  # through the same memo: the state the copied processors read
    return PassModel(transformer, state, device)


def guidance_devices(device: str | torch.device, visible: int | None = None) -> list[str]:
    """The replica's other GPUs, for guidance passes 2 and 3: ``cuda:1``.. of the GPUs Ray gave it (``visible``:
    ``torch.cuda.device_count()``). None on a CPU replica or with one GPU."""
    if torch.device(device).type != "cuda":
        return []
    count = torch.cuda.device_count() if visible is None else visible
    return [f"cuda:{i}" for i in range(1, min(count, MAX_GUIDANCE_PASSES))]


def split_passes(passes: int, models: int) -> list[list[int]]:
    """Which passes each model runs: round robin (3 passes on 2 GPUs: ``[[0, 2], [1]]``); no empty groups."""
    return [list(range(k, passes, models)) for k in range(min(passes, models))]


class DeviceCopies:
    """Tensors already moved to another device, kept for one video (conditioning is constant through its steps)."""

    def __init__(self) -> None:
        self._moved: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if tensor is None or tensor.device == device:
            return tensor
        key = (id(tensor), str(device))
        found = self._moved.get(key)
        if found is None or found[0] is not tensor:  # the source is held too, so its id cannot be reused
            found = (tensor, tensor.to(device))
            self._moved[key] = found
        return found[1]

    def clear(self) -> None:
        self._moved.clear()
