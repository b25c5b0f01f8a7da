"""Pre-flight before GPU time: weights (shallow and deep), a writable output, the GPU-time estimate, ``farm validate``.

No Ray. The tiny Lynx checkpoint is written once per test process (``lynx_helpers.tiny_checkpoint``) and copied per
test that damages it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.cli import main
from farm.config import parse_job
from farm.models.lynx.precheck import check_lynx_weights
from farm.params import SamplingParams
from farm.preflight import MEASURED_H200, check_output, estimate_for, preflight, row_seconds
from tests.helpers import rows, still_job, write_manifest
from tests.models.lynx_helpers import tiny_checkpoint

BASE = "Wan2.1-T2V-14B-Diffusers"


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, free to damage."""
    return Path(shutil.copytree(tiny_checkpoint(), tmp_path / "ckpt"))


def _weights(root: Path, adapter: str = "lynx_full") -> dict[str, str]:
    return {
        "base": str(root / BASE),
        "adapter": str(root / adapter),
        "arcface": str(root / "arcface" / "recognition_arcface_ir_se50.pth"),
        "face_pack": str(root / "insightface"),
    }


def _check(root: Path, variant: str = "full", deep: bool = False, **weights: str) -> list[str]:
    return check_lynx_weights({**_weights(root), **weights}, variant, "dlib", None, deep)


def test_the_tiny_checkpoint_passes_shallow_and_deep(ckpt: Path) -> None:
    assert _check(ckpt) == []
    assert _check(ckpt, deep=True) == []
    assert _check(ckpt, "lite", deep=True, adapter=str(ckpt / "lynx_lite")) == []


def test_a_misspelled_adapter_folder_gets_a_did_you_mean(ckpt: Path) -> None:
    (problem,) = _check(ckpt, adapter=str(ckpt / "lynx_ful"))
    assert "weights.adapter" in problem and "lynx_ful'" in problem and "does not exist" in problem
    assert f"did you mean {str(ckpt / 'lynx_full')!r}" in problem


def test_a_missing_shard_is_found(ckpt: Path) -> None:
    (ckpt / BASE / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (problem,) = _check(ckpt)
    assert "weights.base" in problem and "transformer/diffusion_pytorch_model.safetensors" in problem


def test_a_shard_named_by_the_index_but_absent_is_found(ckpt: Path) -> None:
    index = {"weight_map": {"a": "diffusion_pytorch_model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ckpt / BASE / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = _check(ckpt)
    assert "model-00002-of-00002.safetensors" in problem and "download the complete checkpoint" in problem


def test_a_misspelled_part_folder_is_named(ckpt: Path) -> None:
    (ckpt / BASE / "transformer").rename(ckpt / BASE / "transfomer")
    (problem,) = _check(ckpt)
    assert "transformer" in problem and "'transfomer' is there" in problem


def test_a_truncated_safetensors_header_is_found_only_deep(ckpt: Path) -> None:
    path = ckpt / "lynx_full" / "ip_layers.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    assert _check(ckpt) == []
    problems = _check(ckpt, deep=True)
    assert any("ip_layers.safetensors" in p and "truncated" in p for p in problems), problems


def test_a_file_cut_after_its_header_is_found_deep(ckpt: Path) -> None:
    path = ckpt / BASE / "vae" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (problem,) = _check(ckpt, deep=True)
    assert "weights.base" in problem and "vae" in problem and "truncated" in problem


def test_the_other_variants_adapter_is_found_deep(ckpt: Path) -> None:
    (ckpt / "lynx_full" / "lynx_adapter.json").unlink()  # official adapters have no such file: the headers tell
    assert _check(ckpt, "lite", adapter=str(ckpt / "lynx_full")) == []
    (problem,) = _check(ckpt, "lite", deep=True, adapter=str(ckpt / "lynx_full"))
    assert "ID layers for 3 blocks" in problem and "lynx_full adapter?" in problem and "lynx_lite" in problem


def test_the_other_variants_adapter_is_found_shallow_when_it_says_so(ckpt: Path) -> None:
    problems = _check(ckpt, "full", adapter=str(ckpt / "lynx_lite"))
    assert any("ref_layers.safetensors" in p for p in problems)
    assert any("variant='lite'" in p for p in problems)


def test_missing_face_files_are_found(ckpt: Path) -> None:
    shutil.rmtree(ckpt / "insightface")
    (problem,) = check_lynx_weights(_weights(ckpt), "full", "insightface", None, False)
    assert "weights.face_pack" in problem and "does not exist" in problem
    (problem,) = _check(ckpt, arcface=str(ckpt / "arcface" / "recognition_arcface.pth"))
    assert "weights.arcface" in problem and "recognition_arcface_ir_se50.pth" in problem  # did-you-mean


def test_a_local_output_under_a_file_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    problem = check_output(str(tmp_path / "file" / "out"))
    assert problem is not None and "not writable" in problem and str(tmp_path / "file" / "out") in problem


def test_a_local_output_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    assert check_output(str(tmp_path / "a" / "b")) is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    assert check_output(str(tmp_path / "out")) is None
    assert list((tmp_path / "out").iterdir()) == []


def test_s3_output_writable_and_a_missing_bucket(s3_endpoint: dict[str, Any], s3_bucket: str) -> None:
    options = s3_endpoint["storage_options"]
    assert check_output(f"{s3_bucket}/out", options) is None
    problem = check_output("s3://farm-no-such-bucket-x/out", options)
    assert problem is not None and "s3://farm-no-such-bucket-x/out" in problem and "Traceback" not in problem


def test_estimate_scales_from_the_measured_setting() -> None:
    full = MEASURED_H200["full"]
    official = SamplingParams(num_frames=81, height=480, width=832, num_inference_steps=50)
    assert row_seconds(full, official) == pytest.approx(50 * 10.13 + 1.83)
    half = SamplingParams(num_frames=81, height=480, width=416, num_inference_steps=25)
    assert row_seconds(full, half) == pytest.approx((25 * 10.13 + 1.83) / 2)


def test_preflight_of_a_still_job(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows(3))
    report = preflight(still_job(manifest, str(tmp_path / "out")))
    assert report.ok, report.render()
    assert "GPU time estimate: none for the still backend" in report.render()


def _lynx_spec(tmp_path: Path, ckpt: Path, adapter: str) -> Path:
    spec = {
        "manifest": write_manifest(tmp_path / "m.parquet", rows(2)),
        "output": str(tmp_path / "out"),
        "model": {
            "backend": "lynx",
            "variant": "full",
            "weights": _weights(ckpt, adapter),
            "options": {"face_detector": "dlib"},
        },
        "identity": {"enabled": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_farm_validate_fails_on_a_misspelled_adapter(
    tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(_lynx_spec(tmp_path, ckpt, "lynx_ful"))]) == 1
    out = capsys.readouterr().out
    assert "pre-flight: BLOCKED" in out and "lynx_ful'" in out and "did you mean" in out and "lynx_full'" in out
    assert "GPU-hours on one NVIDIA H200" in out


def test_farm_validate_passes_and_estimates(tmp_path: Path, ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(_lynx_spec(tmp_path, ckpt, "lynx_full"))]) == 0
    out = capsys.readouterr().out
    assert "pre-flight: ok" in out and "GPU time estimate: 2 rows x" in out and "deep:" not in out
    assert main(["validate", "--deep", str(_lynx_spec(tmp_path, ckpt, "lynx_full"))]) == 0
    assert "checked weights (deep: file headers read)" in capsys.readouterr().out  # says the deep checks ran


def test_estimate_for_a_job_counts_manifest_rows(tmp_path: Path, ckpt: Path) -> None:
    job = parse_job(yaml.safe_load(_lynx_spec(tmp_path, ckpt, "lynx_full").read_text()))
    estimate = estimate_for(job)
    assert estimate.rows == 2 and estimate.seconds > 0


def test_a_replica_start_failure_reaches_the_user_as_the_loaders_line() -> None:
    from farm.runtime.pool import _start_failure

    class InitFailed(Exception):
        actor_init_failed = True

    report = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::Replica.__init__()\x1b[39m "
        '(pid=1, ip=10.0.0.1)\n  File "replica.py", line 30, in __init__\n    raise start_failure(...)\n'
        "farm.runtime.replica.ReplicaStartError: MissingWeightsFile: missing checkpoint folder file '/w/lynx_ful'"
        " (full traceback in /tmp/ray/logs/farm-replica-0-1.log on host:abcd)"
    )
    assert _start_failure(InitFailed(report)) == (
        "MissingWeightsFile: missing checkpoint folder file '/w/lynx_ful' "
        "(full traceback in /tmp/ray/logs/farm-replica-0-1.log on host:abcd)"
    )
    assert _start_failure(RuntimeError("node died")) == "RuntimeError: node died"


def test_estimate_counts_guidance_passes() -> None:
    """A CFG-distilled LoRA at guidance 1.0 runs one pass per step where the measured default ran three."""
    full, lite = MEASURED_H200["full"], MEASURED_H200["lite"]
    distilled = SamplingParams(num_frames=81, height=480, width=832, num_inference_steps=4, guidance_scale=1.0)
    assert row_seconds(full, distilled) == pytest.approx(4 * 10.13 / 3 + 1.83)
    two_pass = SamplingParams(num_frames=121, height=480, width=832, num_inference_steps=50, guidance_scale_i=None)
    assert row_seconds(lite, two_pass) == pytest.approx(50 * 12.00 + 2.73)
    three_pass = SamplingParams(num_frames=121, height=480, width=832, num_inference_steps=50, guidance_scale_i=2.0)
    assert row_seconds(lite, three_pass) == pytest.approx(50 * 12.00 * 3 / 2 + 2.73)


def test_validate_names_the_opt_in_approximations(tmp_path: Path, ckpt: Path) -> None:
    spec = yaml.safe_load(_lynx_spec(tmp_path, ckpt, "lynx_full").read_text())
    assert not [f for f in preflight(parse_job(spec)).findings if f.check == "model"]  # the official path
    spec["model"]["options"].update(sampler="distill", flow_shift=5.0, quantize="fp8")
    spec["model"]["weights"]["lora"] = [{"path": str(tmp_path / "x.safetensors"), "scale": 0.8}]
    report = preflight(parse_job(spec))
    model = [f for f in report.findings if f.check == "model"]
    assert len(model) == 1 and not model[0].blocking
    assert "x.safetensors at scale 0.8; sampler distill; flow_shift 5.0; quantize fp8" in model[0].message
    assert "warning [model] videos will differ from the reference inference" in report.render()
