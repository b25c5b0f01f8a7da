"""The farm running the real Lynx code path (tiny random-weight checkpoint) on fake GPUs: one replica per GPU id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.config import parse_job
from farm.runtime.driver import run_job
from farm.storage import OutputLayout
from farm.table import read_results
from farm.video import decode_video, read_metadata
from tests.conftest import FAKE_GPUS
from tests.helpers import ASTRONAUT, rows, write_manifest
from tests.models.lynx_helpers import adapter_dir, base_dir, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_lynx_replicas_pinned_to_distinct_fake_gpus(tmp_path: Path) -> None:
    data = rows(6, portrait=ASTRONAUT)
    data[1].update(height=32, width=64, seed=3)
    manifest = write_manifest(tmp_path / "m.parquet", data)
    out = str(tmp_path / "out")
    job = parse_job(
        {
            "manifest": manifest,
            "output": out,
            "model": {
                "backend": "lynx",
                "variant": "full",
                "weights": {
                    "base": base_dir(),
                    "adapter": adapter_dir("full"),
                    "face_pack": str(tiny_checkpoint() / "insightface"),
                },
                "options": {"face_detector": "dlib"},
            },
            "defaults": {"num_frames": 5, "height": 48, "width": 80, "num_inference_steps": 2},
            "resources": {
                "replicas": "all",
                "gpus_per_replica": 1,
                "cpus_per_replica": 0.25,
                "in_flight_per_replica": 1,
            },
            "identity": {"enabled": False},
        }
    )
    summary = run_job(job, progress=False)
    assert summary.replicas == FAKE_GPUS and summary.counts["ok"] == 6
    meta = json.loads((tmp_path / "out" / "_job.json").read_text())
    replicas = meta["replicas"]
    gpu_ids = [r["gpu_ids"] for r in replicas]
    assert sorted(gpu_ids) == [[str(i)] for i in range(FAKE_GPUS)], gpu_ids
    assert all(r["cuda_visible_devices"] == r["gpu_ids"][0] for r in replicas)
    assert all(r["device"] == "cpu" for r in replicas)  # fake GPUs: no driver, so the same code runs on CPU
    assert meta["model"]["fingerprint"] and "Lynx" in meta["model"]["description"]
    recs = {r["id"]: r for r in read_results(OutputLayout(out)).to_pylist()}
    frames, fps = decode_video(recs["row-001"]["video"])
    assert frames.shape == (5, 32, 64, 3) and recs["row-001"]["seed"] == 3
    frames, _ = decode_video(recs["row-000"]["video"])
    assert frames.shape == (5, 48, 80, 3) and fps == 16.0
    assert "Lynx" in read_metadata(recs["row-000"]["video"])["comment"]
    assert recs["row-000"]["guidance_scale_i"] == 2.0 and recs["row-000"]["num_inference_steps"] == 2
