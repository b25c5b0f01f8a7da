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


def tiny_lynx_model(**weights) -> dict:
    """The model section of a job on the tiny checkpoint (dlib finds the faces), with more ``weights``."""
    return {
        "backend": "lynx",
        "variant": "full",
        "weights": {
            "base": base_dir(),
            "adapter": adapter_dir("full"),
            "face_pack": str(tiny_checkpoint() / "insightface"),
            **weights,
        },
        "options": {"face_detector": "dlib"},
    }


def test_lynx_replicas_pinned_to_distinct_fake_gpus(tmp_path: Path) -> None:
    data = rows(6, portrait=ASTRONAUT)
    data[1].update(height=32, width=64, seed=3)
    manifest = write_manifest(tmp_path / "m.parquet", data)
    out = str(tmp_path / "out")
    job = parse_job(
        {
            "manifest": manifest,
            "output": out,
            "model": tiny_lynx_model(),
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


@pytest.mark.slow  # ~30 s on 2 cores; the sweep and LoRA parts are covered apart in CI
def test_a_sweep_over_a_loras_strength(tmp_path: Path) -> None:
    """``sweep: {lora.0.scale: [0.0, 1.0]}`` with a CFG-distilled setting (guidance 1.0, the distill sampler): each
    strength is its own model group (the LoRA merged at that strength), records carry it, a rerun makes nothing."""
    from farm.models.lynx.loader import load_lynx
    from tests.models.lora_files import truth, write_wan

    lora = write_wan(tmp_path / "lora.safetensors", truth(load_lynx(base_dir(), adapter_dir("full")).transformer))
    manifest = write_manifest(tmp_path / "m.parquet", rows(1, portrait=ASTRONAUT))
    out = str(tmp_path / "out")
    model = tiny_lynx_model(lora=[{"path": str(lora), "scale": 1.0}])
    model["options"].update(sampler="distill", flow_shift=5.0)
    spec = {
        "manifest": manifest,
        "output": out,
        "model": model,
        "defaults": {"num_frames": 5, "height": 32, "width": 48, "num_inference_steps": 2, "guidance_scale": 1.0},
        "resources": {"replicas": 1, "gpus_per_replica": 1, "cpus_per_replica": 0.25},
        "identity": {"enabled": False},
        "sweep": {"lora.0.scale": [0.0, 1.0]},
    }
    job = parse_job(spec)
    assert [c.id.split("-")[0] for c in job.configs()] == ["lora0x0.0", "lora0x1.0"]
    assert run_job(job, progress=False).counts["ok"] == 2
    recs = sorted(read_results(OutputLayout(out)).to_pylist(), key=lambda r: r["config_id"])
    scales = [json.loads(r["model_config"])["weights"]["lora"][0]["scale"] for r in recs]
    assert scales == [0.0, 1.0]
    videos = [decode_video(r["video"])[0].astype(float) for r in recs]
    assert abs(videos[0] - videos[1]).mean() > 1.0  # 8-bit frames: the LoRA moved them
    again = run_job(parse_job(spec), progress=False)
    assert again.counts.get("ok", 0) == 0 and again.already_committed == 2


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"lora.1.scale": [0.5]}, "no LoRA number 1"),
        ({"lora.0.scale": ["x"]}, "not a LoRA scale"),
        ({"lora.scale": [0.5]}, r"lora.<i>.scale"),
    ],
)
def test_a_bad_lora_sweep_is_a_spec_error(tmp_path: Path, sweep: dict, message: str) -> None:
    from farm.config import SpecError

    spec = {
        "manifest": str(tmp_path / "m.parquet"),
        "output": str(tmp_path / "out"),
        "model": {"backend": "lynx", "weights": {"base": "b", "adapter": "a", "lora": ["/l.safetensors"]}},
        "sweep": sweep,
    }
    with pytest.raises(SpecError, match=message):
        parse_job(spec)


def test_fp8_on_workers_that_cannot_run_it_ends_the_job_with_the_reason(tmp_path: Path) -> None:
    """Every replica refuses at start, before loading weights: the run ends with the replica's one line, not a loop of
    restarts."""
    from farm.runtime.driver import JobAborted

    model = tiny_lynx_model()
    model["options"]["quantize"] = "fp8"
    job = parse_job(
        {
            "manifest": write_manifest(tmp_path / "m.parquet", rows(2, portrait=ASTRONAUT)),
            "output": str(tmp_path / "out"),
            "model": model,
            "resources": {"replicas": 1, "gpus_per_replica": 1, "cpus_per_replica": 0.25},
            "identity": {"enabled": False},
        }
    )
    with pytest.raises(JobAborted, match=r"cannot load the model .*quantize: fp8 needs .*runs on cpu"):
        run_job(job, progress=False)
