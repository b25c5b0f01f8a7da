"""On a CUDA machine the GPU metrics give the CPU's numbers (skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm.metrics import build_metric

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["clip", "identity_facexlib"])
def test_cuda_matches_cpu(name: str, tiny_clip: Path, tiny_arcface: Path, astronaut: np.ndarray) -> None:
    weights = {"clip": tiny_clip, "identity_facexlib": tiny_arcface}[name]
    video = np.stack([astronaut, astronaut[:, ::-1].copy()])
    values = []
    for device in ("cpu", "cuda"):
        metric = build_metric({"name": name, "weights": str(weights), "frames": 2})
        metric.setup(device)
        values.append(metric.score(video, astronaut, "an astronaut smiles at the camera"))
    cpu, gpu = values
    assert cpu.keys() == gpu.keys()
    for column, value in cpu.items():
        if isinstance(value, float):
            assert gpu[column] == pytest.approx(value, abs=1e-3), column
        else:
            assert gpu[column] == value, column
